"""Training speed of each method on identical batches at equal parameter budget, in one run.

    python benchmarks/train_throughput.py --glue-dir ../shared/glue --json throughput.json

Every method trains the same MiniLM classifier on the same fixed batches (AdamW, the same
number of optimizer steps); figures are optimizer steps per second relative to uniform LoRA:

* sadra_over_lora      LoRA with SADRA's ranks (allocation from a Fisher probe; the probe itself is
                       calibration, reported by probe_cost.py, not training)
* adalora_over_lora    PEFT's AdaLoRA, its budget scheduler called every step
* eva_over_lora        PEFT's EVA, its own SVD calibration included in its time
* full_over_lora       full fine-tuning
* peak_memory_mb       per method: growth of resident memory over the loaded model (each method runs
                       in its own process so the peaks do not mix)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import child_env, git_commit

CHILD = r"""
import json, sys, time
import torch
method, glue_dir, steps, batch_size, max_length, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
from measure import mem_mb, reset_peak
from peft import get_peft_model
from sadra.adapt import (adalora_config, allocated_lora_config, eva_model, uniform_lora_config)
from sadra.allocate import allocate_ranks, uniform_budget
from sadra.config import RUN_DEFAULTS
from sadra.data import calibration_batches, load_glue
from sadra.models import find_targets, head_module_names, load_model, target_shapes
from sadra.probe import estimate_sensitivity
rows = load_glue("sst2", "train", glue_dir)
model, tok = load_model("minilm", 2, seed=0)
batches = calibration_batches(rows, tok, num_batches=8, batch_size=batch_size, max_length=max_length, seed=0)
targets = find_targets(model); shapes = target_shapes(model, targets); heads = head_module_names(model)
reset_peak()
base = mem_mb("VmRSS")
setup_seconds = 0.0
if method == "lora":
    model = get_peft_model(model, uniform_lora_config(targets, r=8, alpha=16, dropout=0.1, modules_to_save=heads, task_type="SEQ_CLS"))
elif method == "sadra":
    # The Fisher trace with the proportional rule: uneven ranks, whose training speed is what is measured
    # (the default spectral rule allocates uniform ranks on this model).
    report = estimate_sensitivity(model, batches[:4], estimator="fisher", max_probes=8, rtol=0)
    alloc = allocate_ranks(report, rule="proportional", budget=uniform_budget(shapes, 8), min_rank=2, max_rank=32)
    model = get_peft_model(model, allocated_lora_config(alloc, dropout=0.1, alpha_ratio=2.0, use_rslora=False, modules_to_save=heads, task_type="SEQ_CLS"))
elif method == "adalora":
    settings = dict(init_r=12, target_r=8, alpha=16.0, tinit_ratio=0.1, tfinal_ratio=0.3, deltaT=1, beta1=0.85, beta2=0.85, orth_reg_weight=0.1)
    model = get_peft_model(model, adalora_config(targets, total_step=steps, settings=settings, dropout=0.1, modules_to_save=heads, task_type="SEQ_CLS"))
elif method == "eva":
    start = time.perf_counter()
    model = eva_model(model, targets, batches, r=8, alpha=16, dropout=0.1, settings=RUN_DEFAULTS["eva"], modules_to_save=heads, task_type="SEQ_CLS")
    setup_seconds = time.perf_counter() - start
model.train()
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
def step(i):
    loss = model(**batches[i % len(batches)]).loss
    loss.backward()
    opt.step()
    if method == "adalora":
        model.base_model.update_and_allocate(i)
    opt.zero_grad(set_to_none=True)
step(0)  # warm-up
start = time.perf_counter()
for i in range(1, steps + 1):
    step(i)
seconds = time.perf_counter() - start
peak = mem_mb("VmHWM")
json.dump({"steps_per_second": steps / seconds, "steps_per_second_with_setup": steps / (seconds + setup_seconds),
           "setup_seconds": setup_seconds, "peak_memory_growth_mb": peak - base}, open(out, "w"))
"""

METHODS = ("lora", "sadra", "adalora", "eva", "full")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue-dir", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="runs per method (alternating order)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    # Each method runs --repeats times in its own process, in forward then reverse order, so a
    # drift of the machine's speed during the run falls on every method alike; steps/s is the mean.
    measured: dict[str, list[dict]] = {m: [] for m in METHODS}
    for rep in range(args.repeats):
        for method in (METHODS if rep % 2 == 0 else METHODS[::-1]):
            out = tmp / f"{method}-{rep}.json"
            subprocess.run([sys.executable, "-c", CHILD, method, args.glue_dir, str(args.steps), str(args.batch_size),
                            str(args.max_length), str(out)], check=True, stdout=subprocess.DEVNULL, env=child_env())
            measured[method].append(json.loads(out.read_text()))
    runs = {m: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for m, rs in measured.items()}
    lora = runs["lora"]["steps_per_second"]
    figures = {
        "sadra_over_lora": runs["sadra"]["steps_per_second"] / lora,
        "adalora_over_lora": runs["adalora"]["steps_per_second"] / lora,
        "eva_over_lora": runs["eva"]["steps_per_second_with_setup"] / lora,
        "eva_over_lora_training_only": runs["eva"]["steps_per_second"] / lora,
        "full_over_lora": runs["full"]["steps_per_second"] / lora,
        "peak_memory_mb": {m: round(r["peak_memory_growth_mb"], 1) for m, r in runs.items()},
        "steps_per_second": {m: round(r["steps_per_second"], 3) for m, r in runs.items()},
        "eva_setup_seconds": runs["eva"]["setup_seconds"],
        "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length, "repeats": args.repeats,
        "date": time.strftime("%Y-%m-%d"), "git_commit": git_commit(),
        "machine": f"{os.cpu_count()} cores {platform.machine()}, {torch_threads()} torch threads",
    }
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{'method':10s} {'steps/s':>8s} {'vs lora':>8s} {'peak MB':>8s}")
    for m in METHODS:
        ratio = runs[m]["steps_per_second"] / lora
        print(f"{m:10s} {runs[m]['steps_per_second']:8.3f} {ratio:8.3f} {runs[m]['peak_memory_growth_mb']:8.1f}")
    print(f"eva including its calibration: {figures['eva_over_lora']:.3f} x lora")


if __name__ == "__main__":
    main()
