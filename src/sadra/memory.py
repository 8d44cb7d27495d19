"""A process's own peak memory: CUDA peak allocation, or the peak resident set since the last reset.

``ru_maxrss`` is not used: on Linux it keeps the parent's peak across fork and exec, so a child
started from a large process reports the parent's memory. ``VmHWM`` restarts when
``/proc/self/clear_refs`` is written, so the peak of a phase (training, calibration) is its own.
"""

from __future__ import annotations

import torch


def _status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    return _status_mb("VmRSS")


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Start a new peak: CUDA's counter on a GPU, VmHWM on Linux (a no-op where neither exists)."""
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak since the last :func:`reset_peak_memory`: CUDA allocation, else resident memory (MB)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _status_mb("VmHWM")
    return float("nan") if peak is None else peak
