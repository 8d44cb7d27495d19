"""How cell processes share one GPU: LoRA steps per second for one process alone, for K processes
at once, and for K at once under CUDA's multi-process service (MPS), measured side by side in one run.

    python benchmarks/gpu_share.py --json results/gpu/share.json     # one GPU, about 2 minutes
    python benchmarks/gpu_share.py --device cpu --procs 2 --steps 2 --warmup 1 --batch-size 4 \\
        --max-length 16 --json share.json                            # the CPU check the tests run

Each process loads MiniLM (the packed ``.gpu/minilm`` where present) with LoRA r=8 on the six
matrices of every block, as the grid's cells do, takes ``--warmup`` AdamW steps on SST-2 batches
of the ``gpu`` preset's SST-2 shape (128 x 64), waits until every process is ready, then times
``--steps`` steps. A setting's figure is all processes' steps over the wall time from the first
timed step to the last. The K-process arms alternate (plain, MPS, plain), and MPS runs only where
``nvidia-cuda-mps-control`` exists and a CUDA context opens under it; otherwise its entry says why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from measure import child_env, git_commit

MPS_DIRS = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/sadra-share-mps/pipe", "CUDA_MPS_LOG_DIRECTORY": "/tmp/sadra-share-mps/log"}


def child(args: argparse.Namespace) -> None:
    """One measuring process: warm up, signal ready, wait for the others, time the steps, print JSON."""
    import torch

    from gpu_probe import model_and_batches, lora_model

    torch.set_num_threads(1)
    device = torch.device(args.device)
    model, batches = model_and_batches("minilm", args.glue_dir, args.max_length, 4, args.batch_size, device)
    model = lora_model(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step(i: int) -> None:
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    _synchronize(device)
    barrier = Path(args.barrier)
    (barrier / f"ready-{args.rank}").touch()
    deadline = time.time() + 300
    while len(list(barrier.glob("ready-*"))) < args.procs and time.time() < deadline:
        time.sleep(0.01)
    start = time.time()
    for i in range(args.steps):
        step(i)
    _synchronize(device)
    print(json.dumps({"start": start, "end": time.time(), "steps": args.steps}))


def _synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_arm(procs: int, args: argparse.Namespace, env: dict[str, str]) -> float:
    """Steps per second of ``procs`` processes started together."""
    barrier = Path(tempfile.mkdtemp(prefix="share-"))
    common = [sys.executable, __file__, "--child", "--procs", str(procs), "--barrier", str(barrier),
              "--device", args.device, "--glue-dir", args.glue_dir, "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    children = [subprocess.Popen(common + ["--rank", str(r)], env=env, stdout=subprocess.PIPE, text=True)
                for r in range(procs)]
    outs = [c.communicate(timeout=args.timeout)[0] for c in children]
    shutil.rmtree(barrier, ignore_errors=True)
    if any(c.returncode for c in children):
        sys.exit(f"gpu_share: a measuring process failed (exit codes {[c.returncode for c in children]})")
    timings = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    wall = max(t["end"] for t in timings) - min(t["start"] for t in timings)
    return round(sum(t["steps"] for t in timings) / wall, 3)


def start_mps(args: argparse.Namespace) -> tuple[dict[str, str] | None, str]:
    """The environment for MPS clients and a note, or None and why not."""
    if args.device != "cuda" or shutil.which("nvidia-cuda-mps-control") is None:
        return None, "no nvidia-cuda-mps-control here" if args.device == "cuda" else f"device {args.device}"
    for folder in MPS_DIRS.values():
        os.makedirs(folder, exist_ok=True)
    env = {**child_env(), **MPS_DIRS}
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=env, check=False)
    probe = [sys.executable, "-c", "import torch; torch.ones(1, device='cuda').sum().item()"]
    if subprocess.run(probe, env=env, timeout=60).returncode != 0:
        stop_mps(env)
        return None, "the MPS daemon started but a CUDA context did not open under it"
    return env, "on"


def stop_mps(env: dict[str, str]) -> None:
    subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=env, check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--glue-dir", default=os.environ.get("SADRA_GLUE_DIR", ".gpu/glue" if Path(".gpu/glue").is_dir()
                                                         else "../shared/glue"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--procs", type=int, default=16, help="processes sharing the device: the grid's workers")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per process first")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--timeout", type=float, default=600, help="seconds one arm may take")
    ap.add_argument("--json", help="where to write the figures (required)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--barrier", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if not args.json:
        ap.error("--json is required: where to write the figures, e.g. --json results/gpu/share.json")
    figures = measure(args)
    Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: figures[k] for k in ("alone", "together", "mps", "together_over_alone", "mps_over_together")}))


def measure(args: argparse.Namespace) -> dict:
    env = child_env()
    alone, together = run_arm(1, args, env), [run_arm(args.procs, args, env)]
    mps_env, note = start_mps(args)
    mps = None
    if mps_env is not None:
        try:
            mps = run_arm(args.procs, args, mps_env)
        finally:
            stop_mps(mps_env)
        together.append(run_arm(args.procs, args, env))  # plain again, after MPS: drift shows here
    plain = sum(together) / len(together)
    return {"date": time.strftime("%Y-%m-%d"), "git_commit": git_commit(), "device": args.device,
            "procs": args.procs, "steps": args.steps, "batch_size": args.batch_size, "max_length": args.max_length,
            "alone": alone, "together_runs": together, "together": round(plain, 3), "mps": mps, "mps_note": note,
            "together_over_alone": round(plain / alone, 3),
            "mps_over_together": None if mps is None else round(mps / plain, 3)}


if __name__ == "__main__":
    main()
