"""Grid throughput on this machine: 1 worker with T threads against T workers with 1 thread each.

Both arms run the same cells (``--task``, ``lora``, seeds 0..N-1 on ``--rows`` training rows of the
``cpu`` preset's settings) through ``sadra benchmark``, each into a fresh folder, in alternating order
(``--repeats`` times). The figure is the wall-clock ratio of the whole grid, cell start-up,
calibration-free training and evaluation included: what a user of ``--workers`` waits for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import git_commit


def grid_seconds(workers: int, threads: int, args: argparse.Namespace) -> float:
    """Wall-clock seconds of one fresh grid run with ``workers`` cell processes of ``threads`` threads."""
    out = Path(tempfile.mkdtemp(prefix=f"workers{workers}-"))
    cmd = [sys.executable, "-m", "sadra", "benchmark", "--preset", "cpu", "--tasks", args.task, "--methods", "lora",
           "--seeds", *map(str, range(args.cells)), "--glue-dir", args.glue_dir, "--out", str(out), "--quiet",
           "--workers", str(workers), f"train.threads={threads}", f"max_train_samples={args.rows}",
           "max_eval_samples=256", "train.epochs=1", "train.evals_per_epoch=0"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"grid with {workers} worker(s) failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(records) == args.cells, f"{len(records)} records for {args.cells} cells"
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--glue-dir", default=os.environ.get("SADRA_GLUE_DIR", "../shared/glue"))
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--cells", type=int, default=4, help="cells per grid (seeds 0..N-1)")
    ap.add_argument("--rows", type=int, default=400, help="training rows per cell (one epoch)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores to share: T")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/workers_speed.json")
    args = ap.parse_args()
    arms = {"one_worker": (1, args.threads), "one_thread_each": (args.threads, 1)}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for repeat in range(args.repeats):
        order = list(arms) if repeat % 2 == 0 else list(reversed(arms))
        for name in order:
            times[name].append(round(grid_seconds(*arms[name], args), 1))
            print(f"{name} ({arms[name][0]} worker(s) x {arms[name][1]} thread(s)): {times[name][-1]} s", flush=True)
    one, many = statistics.median(times["one_worker"]), statistics.median(times["one_thread_each"])
    result = {"date": time.strftime("%Y-%m-%d"), "commit": git_commit(), "task": args.task, "cells": args.cells,
              "rows": args.rows, "threads": args.threads, "seconds": times,
              "one_worker_over_one_thread_each": round(one / many, 3),
              "faster": "one_worker" if one <= many else "one_thread_each"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"1 x {args.threads} threads: {one:.1f} s; {args.threads} x 1 thread: {many:.1f} s; "
          f"ratio {one / many:.3f} ({result['faster']} is faster); wrote {args.json}")


if __name__ == "__main__":
    main()
