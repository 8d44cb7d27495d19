"""How stable a probe's module ranking is, as a function of how many batches and rounds it spends.

One calibration "pool" runs ``B`` batches with ``R`` rounds on each (``probes_per_batch=R``,
``rtol=0``); the report keeps every round's sample and its batch. Any cheaper setting (``b <= B``
batches, ``r <= R`` rounds per batch) is a sub-pool: the first ``r`` rounds of ``b`` batches.
Two pools drawn independently (other rows, other random vectors, other head warm-up) give
independent calibrations, so the Spearman correlation of their sub-pools' module scores is the
stability of that setting. For ``b < B`` the pools split into ``B // b`` disjoint chunks of ``b``
batches, and the figure is the mean over chunk pairs (chunk ``c`` of one pool against chunk ``c``
of the other), which steadies the small settings.

The cost of a setting comes from the timed pieces of the pools: ``warm-up + b * prepare + b * r * round``.
The setting chosen is the cheapest that reaches the target (:func:`cheapest`) or, when none does, the
cheapest within a slack of the best point (:func:`knee`).
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence


def sub_pool_scores(samples: Mapping[str, Sequence[float]], batch_ids: Sequence[int], batches: Sequence[int],
                    rounds: int) -> dict[str, float]:
    """Module scores from the first ``rounds`` rounds on each batch in ``batches`` (mean of batch means)."""
    chosen, seen = [], {}
    for i, b in enumerate(batch_ids):
        if b in batches and seen.get(b, 0) < rounds:
            seen[b] = seen.get(b, 0) + 1
            chosen.append(i)
    missing = [b for b in batches if seen.get(b, 0) < rounds]
    if missing:
        raise ValueError(f"the pool has fewer than {rounds} rounds on batches {missing}")
    return {n: statistics.fmean(s[i] for i in chosen) for n, s in samples.items()}


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    from scipy.stats import spearmanr

    names = list(a)
    return float(spearmanr([a[n] for n in names], [b[n] for n in names])[0])


def setting_spearman(pool_a: Mapping[str, Any], pool_b: Mapping[str, Any], batches: int, rounds: int) -> float:
    """Mean Spearman over the disjoint chunk pairs of ``batches`` batches, ``rounds`` rounds each.

    A pool is ``{"samples": {module: [per-round values]}, "batch_ids": [...], "num_batches": B}``.
    """
    chunks = pool_a["num_batches"] // batches
    values = []
    for c in range(chunks):
        ids = list(range(c * batches, (c + 1) * batches))
        values.append(spearman(sub_pool_scores(pool_a["samples"], pool_a["batch_ids"], ids, rounds),
                               sub_pool_scores(pool_b["samples"], pool_b["batch_ids"], ids, rounds)))
    return statistics.fmean(values)


def curve(pool_a: Mapping[str, Any], pool_b: Mapping[str, Any], timing: Mapping[str, float],
          train_seconds: float | None, rounds_options: Sequence[int]) -> list[dict[str, Any]]:
    """One point per (batches in 1, 2, 4, ... B) x (rounds per batch in ``rounds_options``)."""
    points = []
    b = 1
    while b <= pool_a["num_batches"]:
        for r in rounds_options:
            seconds = timing["warmup"] + b * timing["prepare"] + b * r * timing["round"]
            points.append({"batches": b, "rounds_per_batch": r, "probes": b * r,
                           "spearman": round(setting_spearman(pool_a, pool_b, b, r), 4),
                           "chunk_pairs": pool_a["num_batches"] // b, "seconds": round(seconds, 3),
                           "over_training": round(seconds / train_seconds, 4) if train_seconds else None})
        b *= 2
    return points


def cheapest(points: Sequence[Mapping[str, Any]], target: float) -> Mapping[str, Any] | None:
    """The cheapest point that reaches ``target``, or None."""
    good = [p for p in points if p["spearman"] >= target]
    return min(good, key=lambda p: p["seconds"]) if good else None


def knee(points: Sequence[Mapping[str, Any]], slack: float) -> Mapping[str, Any]:
    """The cheapest point within ``slack`` of the curve's best Spearman: where more spending stops paying."""
    best = max(p["spearman"] for p in points)
    return min((p for p in points if p["spearman"] >= best - slack), key=lambda p: p["seconds"])


def plot_curve(points: Sequence[Mapping[str, Any]], chosen: Mapping[str, Any] | None, target: float, path: str) -> None:
    """Spearman against cost (fraction of a training run), one line per mode x batch size x rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[tuple, list] = {}
    for p in points:
        series.setdefault((p["mode"], p["batch_size"], p["rounds_per_batch"]), []).append(p)
    for (mode, batch_size, rounds), pts in sorted(series.items()):
        pts = sorted(pts, key=lambda p: p["over_training"])
        ax.plot([p["over_training"] for p in pts], [p["spearman"] for p in pts], marker="o" if mode == "per_module" else "s",
                linestyle="-" if batch_size == 4 else "--", alpha=0.4 + 0.6 * (rounds == 1),
                label=f"{mode}, batch {batch_size}, {rounds} round{'s' if rounds > 1 else ''}/batch")
    ax.axhline(target, color="black", linewidth=0.8, linestyle=":")
    ax.axvline(0.05, color="grey", linewidth=0.8, linestyle=":")
    if chosen:
        ax.scatter([chosen["over_training"]], [chosen["spearman"]], s=160, facecolors="none", edgecolors="red", zorder=5)
    ax.set_xscale("log")
    ax.set_xlabel("calibration time / one LoRA training run (cpu preset)")
    ax.set_ylabel("Spearman, two independent calibrations")
    ax.set_title("Hutchinson's module ranking: stability against cost")
    ax.legend(fontsize=6.5, ncol=2, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Plot the Hutchinson stability curve of a probe_cost.py JSON.")
    parser.add_argument("json")
    parser.add_argument("--plot", required=True)
    args = parser.parse_args()
    figures = json.loads(open(args.json).read())
    plot_curve(figures["hutchinson_curve"], figures.get("hutchinson_setting"), figures["hutchinson_target"], args.plot)
