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
