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
