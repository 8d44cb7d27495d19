"""Figures and ``report.md`` for a benchmark folder (matplotlib, Agg backend: no display needed).

``write_report(folder)`` reads ``results.jsonl`` and the run folders and writes, next to
``results.md``:

* ``loss_<task>.png``         training loss against step, one line per method (mean over seeds,
                              min-max band)
* ``ranks_<task>.png``        rank heatmaps (layers down, module types across) for each SADRA
                              variant, the random control, EVA and AdaLoRA's final ranks
* ``sensitivity_<task>.png``  per-module curvature with standard-error bars, one panel per estimator
* ``metrics.png``             the main metric per task and method, error bars over seeds, LoRA marked
* ``forest.png``              each method minus LoRA, paired by seed, with 95% intervals
* ``budget.png``              the main metric against adapter parameters, one line per arm run at
                              several budgets (arms named ``NAME-r<k>`` are NAME at uniform r=k's budget)
* ``report.md``               all of the above with the results table and a list of missing runs
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import METHODS
from .io import atomic_write_text, ensure_dir, read_jsonl
from .models import MODULE_TYPES, describe_module

# Okabe-Ito, distinguishable with the common forms of colour blindness, except its yellow, which is
# too faint on white for a point or a thin line: sadra-seed takes Tol's wine instead.
PALETTE = {
    "full": "#000000", "lora": "#0072B2", "sadra": "#D55E00", "sadra-fisher": "#E69F00",
    "adalora": "#009E73", "eva": "#CC79A7", "random": "#999999", "lora-ga": "#56B4E9", "sadra-seed": "#882255",
}
# For arms outside the palette (study variants) in figures told apart by a legend: none near a palette colour.
EXTRA_COLORS = ("#117733", "#332288", "#AA4499", "#999933", "#661100", "#44AA99", "#6699CC", "#DDAA33")


def line_colors(names: Sequence[str]) -> dict[str, str]:
    """A colour per name: the palette's, else the next unused extra one (cycling if there are many)."""
    unknown = [n for n in dict.fromkeys(names) if n not in PALETTE]
    extra = {n: EXTRA_COLORS[i % len(EXTRA_COLORS)] for i, n in enumerate(unknown)}
    return {n: PALETTE.get(n) or extra[n] for n in dict.fromkeys(names)}


def allocation_label(method: str, alloc: Mapping[str, Any]) -> str:
    """A panel title from what the allocation file says produced it, not from the method's name."""
    source = alloc.get("method")
    if source == "adalora":
        return f"{method}\nAdaLoRA final ranks"
    if source == "eva":
        return f"{method}\nEVA"
    if alloc.get("rule") == "random" or alloc.get("estimator") == "random":
        return f"{method}\nrandom scores"
    return f"{method}\n{alloc.get('estimator') or '?'} / {alloc.get('rule') or 'proportional'}"
TYPE_LABELS = {"q": "query", "k": "key", "v": "value", "o": "attn out", "gate": "FFN gate", "ffn_in": "FFN in", "ffn_out": "FFN out",
               "qkv": "qkv"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _rank_grid(ranks: Mapping[str, int]) -> tuple[np.ndarray, list[int], list[str]]:
    """Ranks as a (layers x module types) array; missing cells are NaN."""
    cells = {}
    for name, r in ranks.items():
        layer, kind = describe_module(name)
        cells[(layer if layer is not None else 0, kind)] = r
    layers = sorted({k[0] for k in cells})
    kinds = [k for k in MODULE_TYPES if any(c[1] == k for c in cells)]
    kinds += sorted({c[1] for c in cells} - set(kinds))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), r in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = r
    return grid, layers, kinds


def _draw_heatmap(ax, ranks: Mapping[str, int], title: str, vmax: float) -> Any:
    grid, layers, kinds = _rank_grid(ranks)
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(kinds)), [TYPE_LABELS.get(k, k) for k in kinds], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers], fontsize=8)
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if not math.isnan(grid[i, j]):
                value = int(grid[i, j])
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7,
                        color="white" if value < 0.6 * vmax else "black")
    return im


def plot_allocation(ranks: Mapping[str, int], shapes: Mapping[str, Sequence[int]], path: str | Path, *,
                    title: str = "LoRA ranks", budget: int | None = None, base_rank: int = 8) -> Path:
    """One allocation's heatmap, with its budget and the uniform-LoRA reference in the caption."""
    plt = _plt()
    path = Path(path)
    ensure_dir(path.parent if str(path.parent) else ".", "plot folder")
    params = sum(r * (int(shapes[n][0]) + int(shapes[n][1])) for n, r in ranks.items())
    grid, layers, kinds = _rank_grid(ranks)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.5 + 0.45 * len(layers)))
    im = _draw_heatmap(ax, ranks, title, vmax=max(max(ranks.values(), default=1), 1))
    fig.colorbar(im, ax=ax, label="rank")
    caption = f"{params:,} LoRA parameters"
    if budget is not None:
        caption += f" of budget {budget:,}"
    caption += f"; uniform LoRA: rank {base_rank} in every cell"
    fig.text(0.5, 0.005, caption, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _loss_curves(folder: Path, task: str, methods: list[str], seeds: dict[str, list[int]], out: Path) -> Path | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    colors = line_colors(methods)
    for method in methods:
        curves = []
        for seed in seeds.get(method, []):
            log = folder / task / method / f"seed{seed}" / "train_log.jsonl"
            if not log.exists():
                continue
            points = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            pts = [(p["step"], p["loss"]) for p in points if "loss" in p and "step" in p and "eval_loss" not in p]
            if pts:
                curves.append(dict(pts))
        if not curves:
            continue
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        if not steps:
            continue
        values = np.array([[c[s] for s in steps] for c in curves])
        color = colors[method]
        ax.plot(steps, values.mean(0), label=f"{method} (n={len(curves)})", color=color, lw=1.4)
        if len(curves) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2, lw=0)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (cross-entropy)")
    if "adalora" in methods and seeds.get("adalora"):
        ax.text(0.01, 0.01, "AdaLoRA's logged loss includes its orthogonal regulariser", transform=ax.transAxes,
                fontsize=7, color=PALETTE["adalora"], va="bottom")
    ax.set_title(f"{task}: training loss (mean over seeds; band = min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _uniform_caption(allocations: list[dict]) -> str:
    """What uniform LoRA would be for these panels: one rank and budget when they share them (an
    allocation that does not record them, EVA's or AdaLoRA's, shares the others'), else per panel."""
    ranks = {a["base_rank"] for a in allocations if a.get("base_rank")}
    budgets = {a["budget"] for a in allocations if a.get("budget")}
    if len(ranks) > 1 or len(budgets) > 1:
        return "each panel at the budget of its own uniform LoRA (r=" + ", ".join(map(str, sorted(ranks))) + ")"
    text = f"uniform LoRA = rank {ranks.pop()} everywhere" if ranks else "uniform LoRA: the same rank everywhere"
    return text + (f", budget {budgets.pop():,} parameters" if budgets else "")


def _rank_heatmaps(folder: Path, task: str, methods: list[str], seed: int, out: Path) -> Path | None:
    panels = []
    for method in methods:
        alloc = _load_json(folder / task / method / f"seed{seed}" / "allocation.json")
        if not alloc or not alloc.get("ranks"):
            continue
        panels.append((allocation_label(method, alloc), alloc))
    if not panels:
        return None
    plt = _plt()
    vmax = max(max(a["ranks"].values()) for _, a in panels)
    layers = max(len(_rank_grid(a["ranks"])[1]) for _, a in panels)  # 6 for MiniLM, 30 for SmolLM2
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 1, max(4.2, 1.5 + 0.24 * layers)),
                             squeeze=False)
    im = None
    for ax, (label, alloc) in zip(axes[0], panels):
        shapes = alloc.get("shapes", {})
        params = sum(r * sum(shapes[n]) for n, r in alloc["ranks"].items() if n in shapes)
        im = _draw_heatmap(ax, alloc["ranks"], f"{label}\n{params:,} params", vmax=vmax)
    fig.colorbar(im, ax=axes[0].tolist(), label="rank", shrink=0.8)
    fig.suptitle(f"{task}: LoRA rank per module (seed {seed}); {_uniform_caption([a for _, a in panels])}",
                 fontsize=10, y=1.09)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def _sensitivity(folder: Path, task: str, methods: list[str], seed: int, out: Path) -> Path | None:
    panels = []
    seen = set()
    for method in methods:
        probe = _load_json(folder / task / method / f"seed{seed}" / "probe.json")
        key = probe and (probe.get("estimator"), probe.get("mode"))
        if probe and probe.get("scores") and key not in seen:  # one panel per signal
            seen.add(key)
            panels.append(probe)
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.3 * len(panels)), squeeze=False)
    for ax, probe in zip(axes[:, 0], panels):
        names = list(probe["scores"])
        scores = np.array([probe["scores"][n] for n in names])
        se = np.array([probe["stderr"][n] for n in names])
        kinds = [describe_module(n)[1] for n in names]
        colors = [PALETTE[m] for m in ("lora", "sadra", "sadra-fisher", "adalora", "eva", "random")]
        kind_color = {k: colors[i % len(colors)] for i, k in enumerate(dict.fromkeys(kinds))}
        x = np.arange(len(names))
        ax.bar(x, scores, color=[kind_color[k] for k in kinds], alpha=0.85)
        ax.errorbar(x, scores, yerr=se, fmt="none", ecolor="black", elinewidth=0.8, capsize=2)
        ax.set_xticks(x, [f"L{describe_module(n)[0]} {TYPE_LABELS.get(k, k)}" for n, k in zip(names, kinds)],
                      rotation=90, fontsize=7)
        if np.all(scores > 0) and scores.max() / max(scores.min(), 1e-300) > 100:
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="black", lw=0.6)
        est = probe.get("estimator")
        mode = f", {probe.get('mode')}" if probe.get("mode") else ""
        ax.set_ylabel("trace estimate")
        ax.set_title(f"{task}: per-module curvature, {est}{mode} ({probe.get('probes')} probes; bars = ±1 s.e.)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _main_by_seed(records: list[dict], task: str, method: str, metric: str) -> dict[int, float]:
    """``{seed: 100 x metric}`` of one task and method, over the records that have the metric."""
    return {int(r["seed"]): 100 * r["metrics"][metric] for r in records
            if r["task"] == task and r["method"] == method and metric in r.get("metrics", {})}


def _metrics_plot(records: list[dict], methods: list[str], out: Path) -> Path | None:
    from .data import get_task

    tasks = list(dict.fromkeys(r["task"] for r in records))
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.8), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = get_task(task).main_metric
        xs, means, errs, colors, labels = [], [], [], [], []
        for i, m in enumerate(methods):
            vals = list(_main_by_seed(records, task, m, metric).values())
            if not vals:
                continue
            xs.append(len(xs))
            means.append(np.mean(vals))
            errs.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            colors.append(PALETTE.get(m, "#777777"))
            labels.append(f"{m}\n(n={len(vals)})")
        # Points, not bars: the axis is zoomed to the spread, and a cut bar would mislead.
        for x, mean, err, color in zip(xs, means, errs, colors):
            ax.errorbar([x], [mean], yerr=[err], fmt="o", color=color, ms=7, capsize=4, lw=1.5)
        lora = list(_main_by_seed(records, task, "lora", metric).values())
        if lora:
            ax.axhline(np.mean(lora), color=PALETTE["lora"], ls="--", lw=1, label="LoRA r=8 (mean)")
            ax.legend(fontsize=7, loc="lower right")
        low = min(m - e for m, e in zip(means, errs)) if means else 0
        high = max(m + e for m, e in zip(means, errs)) if means else 100
        pad = max(1.0, 0.15 * (high - low))
        ax.set_ylim(max(0, low - pad), min(100, high + pad))
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_xticks(xs, labels, fontsize=7, rotation=30, ha="right")
        ax.set_ylabel(f"{metric} ×100 (validation)")
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Main metric per method: mean over seeds, error bars = std over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _forest_plot(records: list[dict], methods: list[str], out: Path) -> Path | None:
    """Each method minus LoRA on the main metric, paired by seed: mean and 95% CI, one panel per task."""
    from .data import get_task
    from .results import REFERENCE, paired_stats

    tasks = [t for t in dict.fromkeys(r["task"] for r in records)
             if any(r["task"] == t and r["method"] == REFERENCE for r in records)]
    others = [m for m in methods if m != REFERENCE and any(r["method"] == m for r in records)]
    if not tasks or not others:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 0.45 * len(others) + 1.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        metric = get_task(task).main_metric
        ref = _main_by_seed(records, task, REFERENCE, metric)
        for y, m in enumerate(others):
            stat = paired_stats(_main_by_seed(records, task, m, metric), ref)
            if stat is None:
                continue
            color = PALETTE.get(m, "#777777")
            if stat["n"] >= 2:
                ax.errorbar([stat["mean"]], [y], xerr=[[stat["mean"] - stat["ci_low"]], [stat["ci_high"] - stat["mean"]]],
                            fmt="o", color=color, capsize=3, ms=6)
            else:  # one seed: a point without an interval (hollow)
                ax.plot([stat["mean"]], [y], "o", mfc="none", color=color, ms=6)
            ax.annotate(f"n={stat['n']}", (stat["mean"], y), textcoords="offset points", xytext=(0, 6), fontsize=6,
                        ha="center")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(others)), others, fontsize=7)
        ax.set_ylim(len(others) - 0.5, -0.5)
        ax.set_xlabel(f"{metric} x100 minus {REFERENCE} (paired by seed)")
        ax.set_title(task)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Paired difference to LoRA: mean and 95% CI over seeds (hollow: one seed, no interval)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


_BUDGET_SUFFIX = re.compile(r"^(?P<family>.+)-r(?P<rank>\d+)$")


def budget_family(method: str) -> str:
    """The arm a method is at another budget: ``sadra-r2`` -> ``sadra``; ``sadra`` -> ``sadra``."""
    match = _BUDGET_SUFFIX.match(method)
    return match["family"] if match else method


def _budget_plot(records: list[dict], out: Path) -> Path | None:
    """Main metric (mean ± s.d.) against adapter parameters, per task and arm family, over the seeds
    the family has at every budget: a budget with more seeds would otherwise bend the curve by its
    extra seeds alone."""
    from .data import get_task

    swept = _budget_points(records)
    tasks = list(dict.fromkeys(t for t, _ in swept))
    if not tasks:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(5.6, 4.6 * len(tasks)), 4.0), squeeze=False)
    colors = line_colors([family for _, family in swept])
    twins = _budget_twins(swept)
    labels = _budget_labels(swept, twins)
    for ax, task in zip(axes[0], tasks):
        budgets = set()
        for (t, family), (by_budget, n) in swept.items():
            if t != task:
                continue
            xs = sorted(by_budget)
            budgets.update(xs)
            errs = [np.std(by_budget[x], ddof=1) if n > 1 else 0.0 for x in xs]
            same = twins[(t, family)] is not None  # dashed, so the line it lies on shows through
            ax.errorbar(xs, [np.mean(by_budget[x]) for x in xs], yerr=errs, fmt="o--" if same else "o-", capsize=3,
                        color=colors[family], label=labels[(t, family)], mfc="none" if same else None)
        ax.set_xscale("log")
        ax.set_xticks(sorted(budgets), [f"{x / 1000:,.0f}k" for x in sorted(budgets)])
        ax.minorticks_off()
        ax.set_xlabel("adapter parameters (the budget of uniform LoRA r)")
        ax.set_ylabel(f"{get_task(task).main_metric} ×100")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Main metric against the parameter budget\n(mean ± s.d. over the seeds run at every budget)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _budget_twins(swept: dict) -> dict[tuple[str, str], str | None]:
    """For each arm, the earlier arm of its task whose every point it equals (its line hides under that
    one's: e.g. an allocation that came out uniform takes LoRA's results), else None."""
    twins, seen = {}, {}
    for (task, family), (by_budget, _) in swept.items():
        points = (task, tuple(sorted((b, tuple(v)) for b, v in by_budget.items())))
        twins[(task, family)] = seen.get(points)
        seen.setdefault(points, family)
    return twins


def _budget_labels(swept: dict, twins: dict | None = None) -> dict[tuple[str, str], str]:
    """Legend labels: the arm, its seeds, and the arm it equals if any."""
    twins = _budget_twins(swept) if twins is None else twins
    return {(task, family): f"{family} (n={n}" + (f", same as {twins[(task, family)]})" if twins[(task, family)] else ")")
            for (task, family), (_, n) in swept.items()}


def _budget_points(records: list[dict]) -> dict[tuple[str, str], tuple[dict[float, list[float]], int]]:
    """(task, family) -> ({budget: main metric x100 per common seed}, number of common seeds), for
    families run at two budgets or more."""
    from .data import get_task

    by_seed: dict[tuple[str, str], dict[float, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in records:
        metric = get_task(r["task"]).main_metric if r["task"] != "causal-lm" else None
        if metric in r.get("metrics", {}) and r.get("adapter_params"):
            budget = float(r.get("lora_budget") or r["adapter_params"])
            by_seed[(r["task"], budget_family(r["method"]))][budget][int(r["seed"])] = 100 * r["metrics"][metric]
    swept = {}
    for key, budgets in by_seed.items():
        common = set.intersection(*(set(v) for v in budgets.values()))
        if len(budgets) >= 2 and common:
            swept[key] = ({b: [v[s] for s in sorted(common)] for b, v in budgets.items()}, len(common))
    return swept


def _missing(folder: Path, records: list[dict]) -> list[str]:
    """Grid cells without a result line, saying whether their run started."""
    config = _load_json(folder / "benchmark_config.json") or {}
    done = {(r.get("task"), r.get("method"), r.get("seed")) for r in records}
    asked = config.get("cells") or [  # folders written before the grid listed its cells
        (t, m, s) for t in config.get("tasks", []) for m in config.get("methods", [])
        for s in config.get("seeds", []) if s in config.get("method_seeds", {}).get(m, [s])]
    lines = []
    for task, method, seed in map(tuple, asked):
        if (task, method, seed) in done:
            continue
        run = folder / task / method / f"seed{seed}"
        state = "not started" if not run.exists() else (
            "finished but not recorded (rerun the benchmark to record it)" if (run / "metrics.json").exists()
            else "started, unfinished (rerun the benchmark to resume it)")
        lines.append(f"- {task} / {method} / seed {seed}: {state}")
    return lines


def write_report(folder: str | Path) -> Path:
    """Write the figures and ``report.md`` into ``folder``; returns the report's path."""
    from .results import results_table

    folder = Path(folder)
    records, config, methods, tasks = _load_grid(folder)
    figures = _draw_figures(folder, records, methods, tasks)
    sections = ["# Benchmark report", ""]
    if config:
        # A folder filled in parts (one task set or seed at a time) lists what all of them asked for.
        seeds = sorted({int(r["seed"]) for r in records} | set(config.get("seeds") or []))
        sections += [f"Preset `{config.get('name')}`: tasks {', '.join(tasks)}; "
                     f"methods {', '.join(config.get('methods', []))}; seeds {', '.join(map(str, seeds))}; "
                     f"model `{config.get('model')}`, max length {config.get('max_length')}.", ""]
    sections += ["## Results", "", results_table(records, methods, read_jsonl(folder / "failures.jsonl"))]
    sections += ["## Missing runs", "", *(_missing(folder, records) or ["None: every cell of the grid has a result."]), ""]
    sections += ["## Figures", ""]
    for title, path in figures:
        sections += [f"### {title}", "", f"![{title}]({path.name})", ""]
    if not figures:
        sections.append("No figures: no run has finished yet.")
    report = folder / "report.md"
    atomic_write_text(report, "\n".join(sections) + "\n")
    return report


def _load_grid(folder: Path) -> tuple[list[dict], dict, list[str], list[str]]:
    """A benchmark folder's records (checked before any figure is written), config, methods and tasks."""
    from .errors import DataError
    from .results import check_records, grid_methods

    if not folder.is_dir():
        raise DataError(f"benchmark folder {str(folder)!r} does not exist; pass the --out folder of 'sadra benchmark'")
    records = read_jsonl(folder / "results.jsonl")
    check_records(records, str(folder / "results.jsonl"))
    if not records and not (folder / "benchmark_config.json").exists():
        raise DataError(f"{str(folder)!r} holds no results.jsonl or benchmark_config.json; pass the --out folder of 'sadra benchmark'")
    config = _load_json(folder / "benchmark_config.json") or {}
    methods = grid_methods({"methods": METHODS, **config}) or list(METHODS)
    methods += sorted({r["method"] for r in records} - set(methods))
    tasks = list(dict.fromkeys(list(config.get("tasks", [])) + [r["task"] for r in records]))
    return records, config, methods, tasks


def _draw_figures(folder: Path, records: list[dict], methods: list[str], tasks: list[str]) -> list[tuple[str, Path]]:
    """Every figure the records allow, as (title, path)."""
    seeds: dict[tuple[str, str], list[int]] = defaultdict(list)
    for r in records:
        seeds[(r["task"], r["method"])].append(int(r["seed"]))
    drawn = [("Main metric per task and method", _metrics_plot(records, methods, folder / "metrics.png")),
             ("Paired difference to LoRA per task (95% CI)", _forest_plot(records, methods, folder / "forest.png")),
             ("Main metric against the parameter budget", _budget_plot(records, folder / "budget.png"))]
    for task in tasks:
        per_method = {m: sorted(seeds.get((task, m), [])) for m in methods}
        drawn.append((f"{task}: training loss",
                      _loss_curves(folder, task, methods, per_method, folder / f"loss_{task}.png")))
        first_seed = min((s for (t, _), ss in seeds.items() if t == task for s in ss), default=None)
        if first_seed is not None:
            drawn.append((f"{task}: rank distribution",
                          _rank_heatmaps(folder, task, methods, first_seed, folder / f"ranks_{task}.png")))
            drawn.append((f"{task}: per-module sensitivity",
                          _sensitivity(folder, task, methods, first_seed, folder / f"sensitivity_{task}.png")))
    return [(title, path) for title, path in drawn if path]
