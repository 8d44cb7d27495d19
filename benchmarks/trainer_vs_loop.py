"""Training throughput of ``sadra train`` (the Trainer path) against a plain PyTorch loop.

Both train uniform LoRA on the same model, rows, padding, batch size, optimizer (AdamW, linear
schedule with warm-up, gradient clipping) and epochs; each runs in its own process. The Trainer
path is :func:`sadra.train.run_glue` with evaluation during training off, so its time is training
plus what the Trainer adds per step (checkpoints for resuming, logging, the callbacks).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from measure import child_env

CHILD = r"""
import json, math, sys, tempfile, time
import torch
kind, glue_dir, task, preset, rows, out = sys.argv[1:7]
from sadra.config import load_benchmark_config
st = load_benchmark_config(preset, overrides=[f"glue_dir={glue_dir}"]).resolve(task, "lora")
# The preset's training settings on fewer rows; no evaluation during training in either path.
st.update(max_train_samples=int(rows), max_eval_samples=64)
tr = st["train"]
tr["evals_per_epoch"] = 0
if kind == "trainer":
    from sadra.train import run_glue
    rec = run_glue(task, "lora", 0, tempfile.mkdtemp(), st, progress=False)
    json.dump({"examples_per_second": rec["examples_per_second"], "seconds": rec["train_seconds"],
               "steps": rec["optimizer_steps"]}, open(out, "w"))
    sys.exit()
import warnings
from peft import get_peft_model
from transformers import DataCollatorWithPadding, get_scheduler, set_seed
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
from sadra.adapt import uniform_lora_config
from sadra.data import get_task, tokenize
from sadra.models import find_targets, head_module_names, load_model
from sadra.train import glue_rows
torch.set_num_threads(int(tr["threads"]))
set_seed(0)
spec = get_task(task)
train_rows, _, _ = glue_rows(spec, st)
model, tok = load_model(st["model"], spec.num_labels, seed=0)
lora = st["lora"]
model = get_peft_model(model, uniform_lora_config(find_targets(model), r=lora["r"], alpha=lora["alpha"],
                                                  dropout=lora["dropout"], modules_to_save=head_module_names(model),
                                                  task_type="SEQ_CLS"))
data = tokenize(train_rows, tok, st["max_length"])
loader = torch.utils.data.DataLoader(data, batch_size=tr["batch_size"], shuffle=True, collate_fn=DataCollatorWithPadding(tok),
                                     generator=torch.Generator().manual_seed(0))
steps = math.ceil(len(loader) * tr["epochs"])
decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith("bias") and "LayerNorm" not in n]
rest = [p for n, p in model.named_parameters() if p.requires_grad and (n.endswith("bias") or "LayerNorm" in n)]
opt = torch.optim.AdamW([{"params": decay, "weight_decay": tr["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                        lr=tr["learning_rate"])
sched = get_scheduler(tr["lr_scheduler"], opt, num_warmup_steps=int(round(tr["warmup_ratio"] * steps)), num_training_steps=steps)
model.train()
done, examples = 0, 0
start = time.perf_counter()
while done < steps:
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tr["max_grad_norm"])
        opt.step(); sched.step(); opt.zero_grad(set_to_none=True)
        done += 1; examples += len(batch["labels"])
        if done == steps:
            break
seconds = time.perf_counter() - start
json.dump({"examples_per_second": examples / seconds, "seconds": seconds, "steps": steps}, open(out, "w"))
"""


def trainer_vs_loop(glue_dir: str, task: str, preset: str, rows: int, repeats: int, tmp: Path) -> dict:
    """Examples/s of both paths, each run ``repeats`` times in alternating order (the mean)."""
    runs: dict[str, list[dict]] = {"trainer": [], "loop": []}
    for rep in range(repeats):
        for kind in (("trainer", "loop") if rep % 2 == 0 else ("loop", "trainer")):
            out = tmp / f"{kind}-{rep}.json"
            subprocess.run([sys.executable, "-c", CHILD, kind, glue_dir, task, preset, str(rows), str(out)], check=True,
                           stdout=subprocess.DEVNULL, env=child_env())
            runs[kind].append(json.loads(out.read_text()))
    rate = {k: statistics.fmean(r["examples_per_second"] for r in v) for k, v in runs.items()}
    return {"trainer_over_loop": rate["trainer"] / rate["loop"],
            "trainer_vs_loop": {"examples_per_second": rate, "rows": rows, "repeats": repeats, "preset": preset,
                                "steps": runs["loop"][0]["steps"]}}
