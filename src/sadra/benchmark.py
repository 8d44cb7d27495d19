"""The benchmark grid: tasks x methods x seeds, resumable, one JSON line per finished cell.

Each cell runs in its own process (``python -m sadra train``), so its peak memory is its own
and a crash, a kill or a hang loses at most that cell. A cell is keyed by its task, method,
seed and the hash of its full resolved settings; the parent appends its record to
``results.jsonl`` with a single write once the child has written ``metrics.json``. A cell that
fails or runs past ``cell_timeout`` is killed and recorded in ``failures.jsonl`` instead (never
in both), and the grid goes on. Rerunning the same command skips finished cells, resumes
unfinished ones from their last checkpoint and retries a failed cell once (``retry_failed``).
A rerun whose settings differ from those a finished cell ran with stops with an error: the
old and new cells would not be comparable. Use a new ``--out`` or ``--series NAME`` for that.
With ``workers > 1`` that many cells run at once, each worker taking the next cell from one queue;
the shared files are written under one lock, and a record is appended only once per cell.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, ContextManager

import yaml

from . import __version__
from .config import NOT_IDENTITY, BenchmarkConfig, settings_hash, training_hash, zero_shot_key
from .errors import ConfigError, SadraError
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


def derived_cell_timeout(settings: dict[str, Any], train_rows: int) -> int:
    """The default wall-clock limit of a cell: generous, only there to end a hang.

    It assumes 2 training examples/s at 64 tokens (about 25 times slower than LoRA on 2 idle CPU
    cores, so a machine shared with other jobs stays well inside it) plus 15 minutes for loading,
    calibration and evaluation.
    """
    tr = settings["train"]
    rows = min(train_rows, settings["max_train_samples"] or train_rows)
    examples = rows * tr["epochs"] * max(1.0, settings["max_length"] / 64)
    return int(900 + examples / 2)


class _Cell:
    def __init__(self, cfg: BenchmarkConfig, out: Path, task: str, method: str, seed: int):
        self.task, self.method, self.seed = task, method, seed
        self.base_method = cfg.base_method(method)
        self.settings = cfg.resolve(task, method)
        self.hash = settings_hash(self.settings, self.base_method)
        self.folder = run_dir(out, task, method, seed)

    @property
    def key(self) -> tuple[str, str, int]:
        return self.task, self.method, self.seed

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/seed{self.seed}"


def run_benchmark(cfg: BenchmarkConfig, out: str | Path, *, progress: bool = True, report: bool = True,
                  retry_failed: bool = True, workers: int = 1) -> list[dict[str, Any]]:
    """Run every missing cell of the grid; returns all records in ``out/results.jsonl``.

    ``workers > 1`` runs that many cell processes at once (each claims the next cell; give each
    fewer threads with ``train.threads``)."""
    from tqdm.auto import tqdm

    from .data import check_glue_folder
    from .distributed import is_main_process, maybe_init_distributed

    for task in cfg.tasks:  # fail before any run starts, not hours in
        check_glue_folder(task, cfg.resolve(task, cfg.methods[0])["glue_dir"])
    distributed = maybe_init_distributed()
    main = is_main_process()
    out = ensure_dir(out, "benchmark output folder")
    with _lock_folder(out) if main else contextlib.nullcontext():
        cells = [_Cell(cfg, out, t, m, s) for t, m, s in cfg.cells()]
        done = _check_same_settings(cells, out)
        if main:
            _write_grid(out, cfg, cells)
        commit = git_commit()
        if workers > 1 and not distributed:
            _run_workers([c for c in cells if c.key not in done and _should_run(c, out, retry_failed)], cfg, out,
                         workers, commit, done)
        else:
            bar = tqdm(cells, desc="benchmark", unit="run", disable=not (progress and main))
            for cell in bar:
                bar.set_postfix_str(cell.name)
                if cell.key in done or not _should_run(cell, out, retry_failed):
                    continue
                record = _run_in_process(cell, cfg, progress and main) if distributed else _run_cell(cell, cfg, out, progress)
                if record is not None:
                    _record(cell, record, cfg, out, commit, done, write=main)
        records = read_jsonl(out / "results.jsonl")
        if main:
            _write_outputs(out, records, cfg, report)
    return records


LOCK_FILE = ".benchmark.lock"


def _lock_folder(out: Path) -> ContextManager:
    """An exclusive lock on the grid folder while this benchmark runs (its open lock file, to use in a
    ``with``), released by the OS however it ends; a second benchmark on the folder stops with an
    error instead of training the same cells into the same run folders. No lock where the OS has no
    ``flock``."""
    try:
        import fcntl
    except ImportError:
        return contextlib.nullcontext()
    handle = open(out / LOCK_FILE, "a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip()
        handle.close()
        raise ConfigError(f"another sadra benchmark{f' (pid {holder})' if holder else ''} is running on "
                          f"{str(out)!r}; wait for it to finish, or pass another --out") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _write_grid(out: Path, cfg: BenchmarkConfig, cells: list[_Cell]) -> None:
    """``benchmark_config.json``: this invocation's settings, and under ``cells`` and ``methods`` every
    cell and method asked of the folder so far (runs in phases, e.g. ``--methods`` or ``--seeds``
    subsets, add up). ``methods`` follows the config file's order (``listed_methods``), then the
    order first asked, so a grid run in phases gets the columns of one run in one go."""
    from .results import grid_methods

    path = out / "benchmark_config.json"
    try:
        earlier = read_json(path) if path.exists() else {}
        earlier_cells, earlier_methods = list(earlier.get("cells", [])), list(earlier.get("methods", []))
    except (SadraError, AttributeError, TypeError):  # unreadable: start the lists again from this grid
        earlier_cells, earlier_methods = [], []
    asked = [list(c) for c in earlier_cells if isinstance(c, list) and len(c) == 3]
    asked += [list(c.key) for c in cells if list(c.key) not in asked]
    known = grid_methods({"cells": asked, "methods": [m for m in earlier_methods if isinstance(m, str)] + cfg.methods})
    methods = [m for m in cfg.listed_methods if m in known] + [m for m in known if m not in cfg.listed_methods]
    write_json(path, {**cfg.to_dict(), "methods": methods, "cells": asked})


# One lock for the grid's shared files (results.jsonl, failures.jsonl) when workers run cells at once.
_FILES = threading.Lock()


def _record(cell: _Cell, record: dict[str, Any], cfg: BenchmarkConfig, out: Path, commit: str | None,
            done: set, write: bool = True) -> None:
    """Append a finished cell's record once: under the lock, and only if no worker recorded it yet."""
    record.update(preset=cfg.name, git_commit=commit, sadra_version=__version__, method=cell.method,
                  base_method=cell.base_method, settings_hash=cell.hash)
    with _FILES:
        if cell.key in done:
            return
        if write:
            append_jsonl(out / "results.jsonl", record)
            _forget_failures(out, cell)
        done.add(cell.key)


class _Claims:
    """The cells left for the workers, each claimed once. An allocated cell is claimed after the
    ``lora`` cells it could take results from (:func:`_twin_key`) have finished, unless nothing else
    is left to start."""

    def __init__(self, cells: list[_Cell]):
        self._pending, self._lock = list(cells), threading.Lock()
        self._unfinished = {c.key for c in cells}
        twin = {c.key: _twin_key(c.task, c.seed, c.settings) for c in cells}
        loras = [c.key for c in cells if c.base_method == "lora"]
        self._waits_for = {c.key: {t for t in loras if twin[t] == twin[c.key]} for c in cells if _may_take_twin(c)}

    def claim(self) -> _Cell | None:
        with self._lock:
            if not self._pending:
                return None
            cell = next((c for c in self._pending if not self._waits_for.get(c.key, set()) & self._unfinished),
                        self._pending[0])
            self._pending.remove(cell)
            return cell

    def finish(self, cell: _Cell) -> None:
        with self._lock:
            self._unfinished.discard(cell.key)


def _run_workers(cells: list[_Cell], cfg: BenchmarkConfig, out: Path, workers: int, commit: str | None,
                 done: set) -> None:
    """``workers`` threads, each running one cell process at a time; a cell is claimed once
    (:class:`_Claims`), so no two workers run the same cell. Cell output goes to each cell.log."""
    claims = _Claims(cells)

    def work():
        while (cell := claims.claim()) is not None:
            print(f"sadra: {cell.name} started", file=sys.stderr)
            try:
                record = _run_cell(cell, cfg, out, progress=False, echo=False)
                if record is not None:
                    _record(cell, record, cfg, out, commit, done)
                    print(f"sadra: {cell.name} finished", file=sys.stderr)
            finally:
                claims.finish(cell)

    threads = [threading.Thread(target=work, name=f"worker-{i}") for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _check_same_settings(cells: list[_Cell], out: Path) -> set[tuple[str, str, int]]:
    """Finished cells of this grid; an error if one of them ran with other settings."""
    by_key = {c.key: c for c in cells}
    done = set()
    for record in read_jsonl(out / "results.jsonl"):
        key = (record.get("task"), record.get("method"), record.get("seed"))
        cell = by_key.get(key)
        if cell is None:
            continue
        old = record.get("settings_hash") or _legacy_hash(cell)
        if old is not None and old != cell.hash:
            raise ConfigError(
                f"{cell.name} in {str(out)!r} ran with other settings{_first_difference(cell)}; "
                "use a new --out, or --series NAME to start a separate series in it"
            )
        done.add(key)
    return done


def _recorded_settings(cell: _Cell) -> dict[str, Any] | None:
    """The settings a cell's run.yaml says it ran with, completed with today's defaults for keys it
    predates (None if there is no readable run.yaml)."""
    try:
        from .config import RUN_DEFAULTS, merge_run, method_settings

        path = cell.folder / "run.yaml"
        return method_settings(cell.base_method, merge_run(RUN_DEFAULTS, yaml.safe_load(path.read_text()) or {}, str(path)))
    except (OSError, SadraError, yaml.YAMLError):
        return None


def _legacy_hash(cell: _Cell) -> str | None:
    """The hash of a cell recorded before records carried one, from its run.yaml."""
    old = _recorded_settings(cell)
    return None if old is None else settings_hash(old, cell.base_method)


def _first_difference(cell: _Cell) -> str:
    old = _flatten(_recorded_settings(cell) or {})
    for key, new_value in _flatten(cell.settings).items():
        if key.split(".")[0] not in NOT_IDENTITY and key in old and old[key] != new_value:
            return f" ({key} was {old[key]!r}, now {new_value!r})"
    return ""


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _failures_of(out: Path, cell: _Cell) -> list[dict[str, Any]]:
    return [f for f in read_jsonl(out / "failures.jsonl")
            if (f.get("task"), f.get("method"), f.get("seed")) == cell.key and f.get("settings_hash") == cell.hash]


def _should_run(cell: _Cell, out: Path, retry_failed: bool) -> bool:
    """A cell that failed before is retried once (twice failed: left alone); never with retry_failed off."""
    failures = len(_failures_of(out, cell))
    return failures == 0 or (retry_failed and failures < 2)


def _forget_failures(out: Path, cell: _Cell) -> None:
    path = out / "failures.jsonl"
    rows = read_jsonl(path)
    keep = [f for f in rows if (f.get("task"), f.get("method"), f.get("seed")) != cell.key]
    if len(keep) != len(rows):
        atomic_write_text(path, "".join(json.dumps(f) + "\n" for f in keep))


def _run_in_process(cell: _Cell, cfg: BenchmarkConfig, progress: bool) -> dict[str, Any]:
    """Under torchrun every process runs the same cell in-process, so the Trainer's DDP spans them."""
    from .train import run_glue

    started = time.time()
    record = _finished_record(cell.folder) or run_glue(cell.task, cell.base_method, cell.seed, cell.folder,
                                                       cell.settings, progress=progress, preset=cfg.name)
    record["wall_seconds"] = round(time.time() - started, 1)
    return record


def _run_cell(cell: _Cell, cfg: BenchmarkConfig, out: Path, progress: bool, echo: bool = True) -> dict[str, Any] | None:
    """One cell in a child process under its wall-clock limit; None (and a failures.jsonl line) if it fails."""
    record = _finished_record(cell.folder)
    if record is not None:
        return record
    ensure_dir(cell.folder, "run folder")
    twin, zero_shot = _uniform_twin(cell, out), _zero_shot_source(cell, out)
    settings = {**cell.settings, "uniform_twin": str(twin) if twin else cell.settings["uniform_twin"],
                "zero_shot_from": str(zero_shot) if zero_shot else cell.settings["zero_shot_from"]}
    atomic_write_text(cell.folder / "run.yaml", yaml.safe_dump(settings, sort_keys=False))
    cmd = [sys.executable, "-m", "sadra", "train", "--task", cell.task, "--method", cell.base_method,
           "--seed", str(cell.seed), "--config", str(cell.folder / "run.yaml"), "--out", str(cell.folder),
           "--preset-name", cfg.name] + ([] if progress else ["--quiet"])
    limit = cell.settings["cell_timeout"] or derived_cell_timeout(cell.settings, _train_rows(cell))
    started = time.time()
    code, tail = _run_with_limit(cmd, limit, cell.folder / "cell.log", echo)
    record = _finished_record(cell.folder) if code == 0 else None
    if record is not None:
        record["wall_seconds"] = round(time.time() - started, 1)
        return record
    reason = (f"killed after its {limit} s limit (cell_timeout)" if code is None
              else f"exit {code}: {tail or 'no output'}" if code != 0 else "ended without metrics.json")
    with _FILES:
        append_jsonl(out / "failures.jsonl", {"task": cell.task, "method": cell.method, "seed": cell.seed,
                                              "settings_hash": cell.hash, "reason": reason, "cell_timeout": limit,
                                              "wall_seconds": round(time.time() - started, 1), "time": time.time()})
    print(f"sadra: {cell.name} failed ({reason}); recorded in {out / 'failures.jsonl'}, going on", file=sys.stderr)
    return None


def _may_take_twin(cell: _Cell) -> bool:
    """An allocated cell not told its twin: where its allocation comes out uniform it may take a
    finished uniform-LoRA cell's results instead of training the same adapter twice (``uniform_twin``)."""
    from .config import ALLOCATED_METHODS

    return cell.base_method in ALLOCATED_METHODS and not cell.settings["uniform_twin"]


def _twin_key(task: str, seed: int, settings: dict[str, Any]) -> tuple[str, int, str]:
    """What a ``lora`` cell shares with an allocated cell whose twin it is: task, seed and the
    settings that shape training."""
    return task, seed, training_hash(settings)


def _uniform_twin(cell: _Cell, out: Path) -> Path | None:
    """The folder of a finished ``lora`` cell with this cell's :func:`_twin_key`, if it may take one."""
    if not _may_take_twin(cell):
        return None
    return _finished_folder(
        out, lambda r: (r.get("task"), r.get("base_method"), r.get("seed")) == (cell.task, "lora", cell.seed),
        lambda settings: _twin_key(cell.task, cell.seed, settings), _twin_key(cell.task, cell.seed, cell.settings))


def _zero_shot_source(cell: _Cell, out: Path) -> Path | None:
    """For a prompt task, the folder of a finished cell that scored the untrained model on the same
    rows (:func:`zero_shot_key`): this cell takes its zero-shot metrics instead of scoring them again."""
    from .data import get_task

    if not get_task(cell.task).is_prompt or cell.settings["zero_shot_from"]:
        return None
    return _finished_folder(out, lambda r: r.get("task") == cell.task and "zero_shot_metrics" in r,
                            lambda settings: zero_shot_key(cell.task, settings), zero_shot_key(cell.task, cell.settings))


def _finished_folder(out: Path, takes: Callable[[dict], bool], key: Callable[[dict], Any], want: Any) -> Path | None:
    """The run folder of the first record of ``out`` that ``takes`` accepts and whose run ran with
    settings of ``key`` ``want`` (read from its run.yaml; folders without readable ones are passed over)."""
    from .config import RUN_DEFAULTS, merge_run

    for record in read_jsonl(out / "results.jsonl"):
        if not takes(record):
            continue
        folder = run_dir(out, record["task"], record["method"], record["seed"])
        if not (folder / "metrics.json").exists():
            continue
        try:
            settings = merge_run(RUN_DEFAULTS, yaml.safe_load((folder / "run.yaml").read_text()) or {}, "run.yaml")
        except (OSError, SadraError, yaml.YAMLError):
            continue
        if key(settings) == want:
            return folder
    return None


# Set in a cell process's environment: the benchmark that started it (see end_with_benchmark).
PARENT_ENV = "SADRA_BENCHMARK_PID"


def end_with_benchmark() -> None:
    """Called first in a cell process: on Linux the kernel kills it when its benchmark dies.

    A benchmark killed on its own (not with its process group) would otherwise leave the cell
    training unsupervised, and a rerun would start the same cell again into the same folder.
    """
    parent = os.environ.pop(PARENT_ENV, None)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != int(parent):  # the benchmark died before the kernel was told
        os.kill(os.getpid(), signal.SIGKILL)


def _run_with_limit(cmd: list[str], limit: float, log_path: Path, echo: bool = True) -> tuple[int | None, str]:
    """Run ``cmd``, echoing its output and keeping it in ``log_path``; kill it past ``limit`` seconds.

    Returns (exit code or None if killed, its last error line). The child stays in this process
    group, so a kill of the group ends it, and it ends with this process (:func:`end_with_benchmark`).
    """
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                env={**os.environ, PARENT_ENV: str(os.getpid())})

        def pump():
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                log.write(line)
                log.flush()  # the log is what a person watching a long cell reads
                tail.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            code = None
        reader.join(timeout=10)
    errors = [line for line in tail if line.startswith("sadra: error:") or "Error" in line]
    return code, (errors[-1] if errors else (tail[-1] if tail else ""))[:300]


def _train_rows(cell: _Cell) -> int:
    from .data import get_task, glue_dir_from_env

    root = glue_dir_from_env(cell.settings["glue_dir"])
    path = root / get_task(cell.task).folder / "train.tsv" if root else None
    if path is None or not path.is_file():
        return cell.settings["max_train_samples"] or 100_000
    with open(path, "rb") as fh:
        return max(1, sum(1 for _ in fh) - 1)


def _write_outputs(out: Path, records: list[dict[str, Any]], cfg: BenchmarkConfig, report: bool) -> None:
    from .results import write_results

    methods = read_json(out / "benchmark_config.json").get("methods", cfg.methods)  # every phase's, in order
    write_results(records, out, methods=methods, failures=read_jsonl(out / "failures.jsonl"))
    if report:
        try:
            from .report import write_report
        except ImportError:
            return
        write_report(out)


def _finished_record(folder: Path) -> dict[str, Any] | None:
    path = folder / "metrics.json"
    if not path.exists():
        return None
    try:
        record = read_json(path)
    except SadraError:
        return None
    return record if isinstance(record, dict) and "metrics" in record else None
