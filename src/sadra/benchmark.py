"""The benchmark grid: tasks x methods x seeds, resumable, one JSON line per finished run.

Each cell runs in its own process (``python -m sadra train``), so its peak memory is its own
and a crash or kill loses at most that cell. The parent appends the cell's record to
``results.jsonl`` with a single write once the child has written ``metrics.json``; rerunning
the same command skips cells already in ``results.jsonl`` and redoes unfinished ones (resuming
from their last checkpoint).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import BenchmarkConfig
from .errors import SadraError
from .io import append_jsonl, atomic_write_text, ensure_dir, read_json, read_jsonl, write_json


def run_dir(out: Path, task: str, method: str, seed: int) -> Path:
    return out / task / method / f"seed{seed}"


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def run_benchmark(cfg: BenchmarkConfig, out: str | Path, *, progress: bool = True, report: bool = True) -> list[dict[str, Any]]:
    """Run every missing cell of the grid; returns all records in ``out/results.jsonl``."""
    from tqdm.auto import tqdm

    from .data import check_glue_folder

    for task in cfg.tasks:  # fail before any run starts, not hours in
        check_glue_folder(task, cfg.resolve(task, cfg.methods[0])["glue_dir"])
    from .distributed import is_main_process, maybe_init_distributed

    distributed = maybe_init_distributed()
    main = is_main_process()
    out = ensure_dir(out, "benchmark output folder")
    results_path = out / "results.jsonl"
    if main:
        write_json(out / "benchmark_config.json", cfg.to_dict())
    done = {(r.get("task"), r.get("method"), r.get("seed")) for r in read_jsonl(results_path)}
    cells = [(t, m, s) for t in cfg.tasks for m in cfg.methods for s in cfg.seeds]
    commit = git_commit()
    bar = tqdm(cells, desc="benchmark", unit="run", disable=not (progress and main))
    for task, method, seed in bar:
        bar.set_postfix_str(f"{task}/{method}/seed{seed}")
        if (task, method, seed) in done:
            continue
        folder = run_dir(out, task, method, seed)
        record = _finished_record(folder)
        if record is None and distributed:
            # Under torchrun every process runs the same cell in-process, so the Trainer's DDP spans them.
            started = time.time()
            from .train import run_glue

            record = run_glue(task, method, seed, folder, cfg.resolve(task, method), progress=progress and main,
                              preset=cfg.name)
            record["wall_seconds"] = round(time.time() - started, 1)
        elif record is None:
            settings = cfg.resolve(task, method)
            ensure_dir(folder, "run folder")
            atomic_write_text(folder / "run.yaml", yaml.safe_dump(settings, sort_keys=False))
            cmd = [sys.executable, "-m", "sadra", "train", "--task", task, "--method", method, "--seed", str(seed),
                   "--config", str(folder / "run.yaml"), "--out", str(folder), "--preset-name", cfg.name]
            if not progress:
                cmd.append("--quiet")
            started = time.time()
            proc = subprocess.run(cmd)
            if proc.returncode != 0:
                raise SadraError(
                    f"run {task}/{method}/seed{seed} failed (exit {proc.returncode}, see above); fix it and rerun the same command to resume"
                )
            record = _finished_record(folder)
            if record is None:
                raise SadraError(f"run {task}/{method}/seed{seed} ended without metrics.json; rerun the same command to resume")
            record["wall_seconds"] = round(time.time() - started, 1)
        record.update(preset=cfg.name, git_commit=commit, sadra_version=__version__)
        if main:
            append_jsonl(results_path, record)
        done.add((task, method, seed))
    if not main:
        return read_jsonl(results_path)
    records = read_jsonl(results_path)
    from .results import write_results

    write_results(records, out, methods=cfg.methods)
    if report:
        try:
            from .report import write_report
        except ImportError:
            pass
        else:
            write_report(out)
    return records


def _finished_record(folder: Path) -> dict[str, Any] | None:
    path = folder / "metrics.json"
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except SadraError:
        return None
    return record if isinstance(record, dict) and "metrics" in record else None
