"""Tables from ``results.jsonl``: metric per task and method, and each method against LoRA."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import METHODS
from .io import atomic_write_text

REFERENCE = "lora"


def _fmt(values: Sequence[float], scale: float = 100.0) -> str:
    if not values:
        return "—"
    arr = np.asarray(values, dtype=float) * scale
    if len(arr) == 1:
        return f"{arr[0]:.2f} (n=1)"
    return f"{arr.mean():.2f} ± {arr.std(ddof=1):.2f} (n={len(arr)})"


def _paired(records_by_seed_a: dict[int, float], records_by_seed_b: dict[int, float]) -> str:
    seeds = sorted(set(records_by_seed_a) & set(records_by_seed_b))
    if not seeds:
        return "—"
    diff = np.array([records_by_seed_a[s] - records_by_seed_b[s] for s in seeds]) * 100
    if len(diff) == 1:
        return f"{diff[0]:+.2f} (n=1, p n/a)"
    sd = diff.std(ddof=1)
    if sd == 0:
        p = 1.0 if diff.mean() == 0 else 0.0
    else:
        from scipy.stats import ttest_rel

        a = np.array([records_by_seed_a[s] for s in seeds])
        b = np.array([records_by_seed_b[s] for s in seeds])
        p = float(ttest_rel(a, b).pvalue)
    return f"{diff.mean():+.2f} ± {sd:.2f} (n={len(diff)}, p={p:.3g})"


def results_table(records: list[dict[str, Any]], methods: Sequence[str] | None = None) -> str:
    """Markdown: per task its main metric (x100, mean ± std over seeds), parameters, paired diffs."""
    from .data import get_task

    by_cell: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        by_cell[(r["task"], r["method"])][int(r["seed"])] = r  # a later line for the same cell wins
    tasks = list(dict.fromkeys(r["task"] for r in records))
    present = {m for _, m in by_cell}
    methods = [m for m in (methods or METHODS) if m in present] + sorted(present - set(methods or METHODS))
    if not records:
        return "No finished runs yet.\n"
    lines = ["| task | metric | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in tasks:
        spec = get_task(task)
        for metric in spec.metrics:
            cells = []
            for m in methods:
                vals = [rec["metrics"].get(metric) for rec in by_cell.get((task, m), {}).values()]
                vals = [v for v in vals if v is not None and not math.isnan(v)]
                flag = any(rec.get("at_majority_class") for rec in by_cell.get((task, m), {}).values())
                cells.append(_fmt(vals) + (" ⚠ majority" if flag and metric == spec.main_metric else ""))
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Trainable parameters (adapter + head; mean over runs):")
    lines.append("")
    lines.append("| task | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for task in tasks:
        cells = []
        for m in methods:
            recs = list(by_cell.get((task, m), {}).values())
            if recs:
                a = int(np.mean([r["adapter_params"] for r in recs]))
                h = int(np.mean([r["head_params"] for r in recs]))
                cells.append(f"{a:,} + {h:,}")
            else:
                cells.append("—")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    if REFERENCE in methods:
        lines.append("")
        lines.append(f"Each method minus `{REFERENCE}` on the main metric (x100): mean per-seed paired difference ± std, paired t-test p:")
        lines.append("")
        others = [m for m in methods if m != REFERENCE]
        lines.append("| task | " + " | ".join(others) + " |")
        lines.append("|---|" + "---|" * len(others))
        for task in tasks:
            main = get_task(task).main_metric
            ref = {s: r["metrics"][main] for s, r in by_cell.get((task, REFERENCE), {}).items()}
            cells = [_paired({s: r["metrics"][main] for s, r in by_cell.get((task, m), {}).items()}, ref) for m in others]
            lines.append(f"| {task} | " + " | ".join(cells) + " |")
    costs = []
    for task in tasks:
        for m in methods:
            recs = list(by_cell.get((task, m), {}).values())
            if recs:
                costs.append((task, m, np.mean([r["calibration_seconds"] for r in recs]),
                              np.mean([r["train_seconds"] for r in recs]), np.mean([r["examples_per_second"] for r in recs]),
                              np.mean([r["peak_memory_mb"] for r in recs])))
    lines.append("")
    lines.append("Cost per run (mean): calibration s, training s, training examples/s, peak memory MB:")
    lines.append("")
    lines.append("| task | method | calibration s | train s | examples/s | peak MB |")
    lines.append("|---|---|---|---|---|---|")
    for task, m, c, t, e, p in costs:
        lines.append(f"| {task} | {m} | {c:.1f} | {t:.1f} | {e:.1f} | {p:.0f} |")
    flagged = [f"{r['task']}/{r['method']}/seed{r['seed']}" for r in records if r.get("at_majority_class")]
    if flagged:
        lines.append("")
        lines.append("⚠ ended at the majority-class score (the model predicts one class): " + ", ".join(flagged))
    return "\n".join(lines) + "\n"


def write_results(records: list[dict[str, Any]], out: str | Path, methods: Sequence[str] | None = None) -> str:
    table = results_table(records, methods)
    header = "# Results\n\nMain metric ×100 on the validation split; mean ± std over seeds (n seeds).\n\n"
    atomic_write_text(Path(out) / "results.md", header + table)
    return table
