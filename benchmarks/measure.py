"""What both benchmark scripts record about a run: the commit, and a process's own memory peak.

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
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def reset_peak() -> None:
    # ru_maxrss would also count the parent's memory at fork time; VmHWM restarts here.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def child_env() -> dict[str, str]:
    """The environment for a measuring child: this folder importable."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(HERE) + (os.pathsep + path if path else "")}
