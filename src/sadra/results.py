"""Tables from ``results.jsonl``: each metric per task and method, and each method against LoRA.

Differences to LoRA are paired by seed (the same seed gives both methods the same training rows,
order and head initialisation): mean difference, its 95% confidence interval from the t
distribution, and a paired t-test p-value, Holm-corrected across the methods compared on a task.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import METHODS
from .errors import DataError
from .io import atomic_write_text

REFERENCE = "lora"
_REQUIRED = ("task", "method", "seed", "metrics")


def check_records(records: list[dict[str, Any]], source: str = "results.jsonl") -> None:
    """DataError naming the first record that lacks what a table needs (before anything is written)."""
    for i, r in enumerate(records, 1):
        missing = [k for k in _REQUIRED if k not in r]
        if missing or not isinstance(r.get("metrics"), dict):
            what = f"no {missing[0]!r}" if missing else "'metrics' that is not an object"
            raise DataError(f"{source} record {i} has {what}; it was not written by 'sadra benchmark' "
                            "(remove the line or rerun the benchmark)")


def grid_methods(grid: dict[str, Any]) -> list[str]:
    """A benchmark folder's methods (its ``benchmark_config.json``): those it lists, in its order,
    then any other of its ``cells``. Tables follow it, so columns stay put while a grid runs in phases."""
    asked = [c[1] for c in grid.get("cells", []) if isinstance(c, (list, tuple)) and len(c) == 3]
    return list(dict.fromkeys(list(grid.get("methods", [])) + asked))


def paired_stats(a: dict[int, float], b: dict[int, float]) -> dict[str, float] | None:
    """``a - b`` over the seeds both have: n, mean, s.d., 95% CI and the paired t-test p (None if no seed)."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diff = np.array([a[s] - b[s] for s in seeds], dtype=float)
    n, mean = len(diff), float(diff.mean())
    if n < 2:
        return {"n": n, "mean": mean, "sd": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"),
                "p": float("nan")}
    if np.allclose(diff, diff[0], rtol=0.0, atol=1e-12):
        # Every pair differs alike (a metric counts examples, so this happens): no spread to test
        # against. Identical runs get p=1; an equal non-zero difference gets no p-value at all.
        sd, p = 0.0, (1.0 if abs(mean) <= 1e-12 else float("nan"))
    else:
        sd = float(diff.std(ddof=1))
        p = float(stats.ttest_1samp(diff, 0.0).pvalue)
    half = float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (NaN stays NaN and is not counted)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out


def format_mean_sd(values: Sequence[float], scale: float = 100.0, digits: int = 2) -> str:
    """``mean ± s.d. (n=K)`` of ``values`` x ``scale``; "—" when there are none."""
    if not values:
        return "—"
    arr = np.asarray(values, dtype=float) * scale
    if len(arr) == 1:
        return f"{arr[0]:.{digits}f} (n=1)"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f} (n={len(arr)})"


def _cells(records):
    by_cell: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        by_cell[(r["task"], r["method"])][int(r["seed"])] = r  # a later line for the same cell wins
    return by_cell


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def results_table(records: list[dict[str, Any]], methods: Sequence[str] | None = None,
                  failures: Sequence[dict[str, Any]] = ()) -> str:
    """Markdown: metrics (x100) and dev cross-entropy per task and method, parameters, paired differences, costs."""
    check_records(records)
    if not records:
        return "No finished runs yet.\n" + _failed_section(failures)
    by_cell = _cells(records)
    present = {m for _, m in by_cell}
    order = list(methods or METHODS)
    methods = [m for m in order if m in present] + sorted(present - set(order))
    tasks = list(dict.fromkeys(r["task"] for r in records))
    lines = _metric_rows(by_cell, tasks, methods)
    lines += ["", "Trainable parameters (adapter + head; mean over runs):", ""]
    lines += _table(["task"] + methods, [[t] + [_params(by_cell.get((t, m), {})) for m in methods] for t in tasks])
    if REFERENCE in methods and len(methods) > 1:
        lines += _paired_section(by_cell, tasks, methods)
    lines += _cost_section(by_cell, tasks, methods)
    flagged = [f"{r['task']}/{r['method']}/seed{r['seed']}" for r in records if r.get("at_majority_class")]
    if flagged:
        lines += ["", "⚠ ended at the majority-class score (the model predicts one class): " + ", ".join(flagged)]
    return "\n".join(lines) + "\n" + _failed_section(failures, records)


def _metric_rows(by_cell, tasks, methods) -> list[str]:
    from .data import get_task

    rows = []
    for task in tasks:
        spec = get_task(task) if task != "causal-lm" else None
        names = list(spec.metrics) if spec else ["perplexity"]
        if spec is not None and spec.is_prompt:  # before training, then the answer token's perplexity
            names += [f"zero-shot {spec.main_metric}", "perplexity"]
        for metric in names + ["loss"]:
            cells = []
            for m in methods:
                recs = by_cell.get((task, m), {}).values()
                vals = [_record_metric(rec, metric) for rec in recs]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                flag = metric == names[0] and any(rec.get("at_majority_class") for rec in recs)
                scale = 1.0 if metric in ("loss", "perplexity") else 100.0
                cells.append(format_mean_sd(vals, scale, 3 if metric == "loss" else 2) + (" ⚠ majority" if flag else ""))
            split = next((r.get("eval_split", "validation") for m in methods for r in by_cell.get((task, m), {}).values()),
                         "validation")
            label = "cross-entropy" if metric == "loss" else metric
            rows.append([task, f"{label} ({split})"] + cells)
    return _table(["task", "metric"] + methods, rows)


def _record_metric(rec: dict[str, Any], metric: str) -> float | None:
    if metric.startswith("zero-shot "):
        return rec.get("zero_shot_metrics", {}).get(metric[len("zero-shot "):])
    return rec["metrics"].get(metric)


def _params(recs: dict[int, dict[str, Any]]) -> str:
    recs = [r for r in recs.values() if "adapter_params" in r]
    if not recs:
        return "—"
    a = int(np.mean([r["adapter_params"] for r in recs]))
    h = int(np.mean([r.get("head_params", 0) for r in recs]))
    return f"{a:,} + {h:,}"


def _paired_section(by_cell, tasks, methods) -> list[str]:
    from .data import get_task

    others = [m for m in methods if m != REFERENCE]
    lines = ["", f"Each method minus `{REFERENCE}`, paired by seed: mean difference [95% CI] (x100 for the main metric; "
             "cross-entropy as is), Holm-corrected paired t-test p across the methods of a task:", ""]
    rows = []
    for task in tasks:
        main = get_task(task).main_metric if task != "causal-lm" else "perplexity"
        for metric, scale in ((main, 100.0), ("loss", 1.0)):
            cells = [_paired_cell(f, p, scale) for f, p in _paired_with_holm(by_cell, task, metric, others)]
            rows.append([task, "cross-entropy" if metric == "loss" else metric] + cells)
    return lines + _table(["task", "metric"] + others, rows)


def _paired_with_holm(by_cell, task: str, metric: str, others: Sequence[str]) -> list[tuple[dict | None, float]]:
    """Each of ``others`` minus the reference on one task and metric, with Holm's p across ``others``."""
    def values(method: str) -> dict[int, float]:
        return {s: r["metrics"][metric] for s, r in by_cell.get((task, method), {}).items()
                if r["metrics"].get(metric) is not None}

    found = [paired_stats(values(m), values(REFERENCE)) for m in others]
    return list(zip(found, holm([f["p"] if f else float("nan") for f in found])))


def paired_to_reference(records: Sequence[dict[str, Any]], task: str,
                        metric: str) -> dict[str, tuple[dict | None, float]]:
    """Every method of ``records`` minus ``lora`` on one task and metric: the paired statistics and the
    Holm-corrected p across the methods compared, exactly as ``results.md`` reports them."""
    by_cell = _cells(records)
    others = sorted({m for _, m in by_cell} - {REFERENCE})
    return dict(zip(others, _paired_with_holm(by_cell, task, metric, others)))


def format_paired(stat: dict[str, float], scale: float = 100.0, digits: int = 2, p: float | None = None) -> str:
    """A paired difference as ``mean [ci_low, ci_high] p=P (n=K)`` x ``scale`` (one seed: no interval)."""
    mean = stat["mean"] * scale
    if stat["n"] < 2:
        return f"{mean:+.{digits}f} (n=1)"
    low, high = stat["ci_low"] * scale, stat["ci_high"] * scale
    p_text = "" if p is None else " p=—" if math.isnan(p) else f" p={p:.2g}"
    return f"{mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]{p_text} (n={stat['n']})"


def _paired_cell(stat: dict[str, float] | None, p_holm: float, scale: float) -> str:
    return "—" if stat is None else format_paired(stat, scale, 2 if scale == 100.0 else 3, p_holm)


def _cost_section(by_cell, tasks, methods) -> list[str]:
    rows = []
    for task in tasks:
        for m in methods:
            recs = list(by_cell.get((task, m), {}).values())
            if not recs:
                continue
            cols = []
            for key, fmt in (("calibration_seconds", "{:.1f}"), ("train_seconds", "{:.1f}"),
                             ("calibration_over_step", "{:.1f}"), ("examples_per_second", "{:.1f}"),
                             ("peak_memory_mb", "{:.0f}")):
                vals = [_cost(r, key) for r in recs]
                vals = [v for v in vals if isinstance(v, (int, float))]
                cols.append(fmt.format(np.mean(vals)) if vals else "—")
            rows.append([task, m] + cols)
    return ["", "Cost per run (mean): calibration s, training s, calibration in training steps, training "
            "examples/s, peak memory MB (times leave out runs resumed from a checkpoint):", ""] + \
        _table(["task", "method", "calibration s", "train s", "calibration / step", "examples/s", "peak MB"], rows)


def _cost(rec: dict[str, Any], key: str) -> float | None:
    # A run resumed from a checkpoint reloads its calibration and times only the steps left.
    if rec.get("resumed_from") and key != "peak_memory_mb":
        return None
    if key == "calibration_over_step":  # calibration time in units of one optimizer step of the same run
        steps, train, calib = rec.get("optimizer_steps"), rec.get("train_seconds"), rec.get("calibration_seconds")
        return calib / (train / steps) if steps and train and calib else None
    return rec.get(key)


def _failed_section(failures: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]] = ()) -> str:
    finished = {(r.get("task"), r.get("method"), r.get("seed")) for r in records}
    latest: dict[tuple, dict[str, Any]] = {}
    for f in failures:
        key = (f.get("task"), f.get("method"), f.get("seed"))
        if key not in finished:
            latest[key] = f
    if not latest:
        return ""
    lines = ["", "## Failed cells", "", "Not in the tables above; rerun the benchmark to retry each once.", ""]
    lines += [f"- {t}/{m}/seed{s}: {f.get('reason', 'failed')}" for (t, m, s), f in latest.items()]
    return "\n".join(lines) + "\n"


def write_results(records: list[dict[str, Any]], out: str | Path, methods: Sequence[str] | None = None,
                  failures: Sequence[dict[str, Any]] = ()) -> str:
    table = results_table(records, methods, failures)
    header = "# Results\n\nMain metric ×100 on each record's evaluation split; mean ± s.d. over seeds (n seeds).\n\n"
    atomic_write_text(Path(out) / "results.md", header + table)
    return table
