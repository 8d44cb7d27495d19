"""What the benchmark scripts share: the commit, a process's own memory peak, timing, the
forward-over-reverse HvP.

The measuring children import this file (the scripts put this folder on their PYTHONPATH).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_commit() -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    return proc.stdout.strip() or None


def mem_mb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last ``reset_peak``) of this process, in MB."""
    from sadra.memory import current_rss_mb, peak_memory_mb

    return current_rss_mb() if key == "VmRSS" else peak_memory_mb()


def reset_peak() -> None:
    # The run records use the same measure (sadra.memory): VmHWM, restarted here.
    from sadra.memory import reset_peak_memory

    reset_peak_memory()


def child_env() -> dict[str, str]:
    """The environment for a measuring child: this folder importable."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(HERE) + (os.pathsep + path if path else "")}


def median_seconds(fn, repeats: int, device=None) -> float:
    """Median seconds of ``fn`` after one warm-up call; on a CUDA ``device`` each time is synchronised."""
    import statistics
    import time

    import torch

    def sync():
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_over_reverse_hvps(model, names, params, batch, vectors):
    """``H v`` for every target weight at once as ``torch.func.jvp`` of the gradient function (no
    double backward): the alternative to the library's HvP that the benchmarks time."""
    from torch.func import functional_call, grad, jvp

    from sadra.probe import hf_loss

    weights = [n + ".weight" for n in names]

    def loss_of(*w):
        return hf_loss(lambda **kw: functional_call(model, dict(zip(weights, w)), (), kw), batch)

    _, hvps = jvp(grad(loss_of, argnums=tuple(range(len(params)))), tuple(p.detach() for p in params), tuple(vectors))
    return hvps
