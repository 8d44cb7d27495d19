"""Rank allocation under a LoRA parameter budget.

Pure Python and numpy: this module imports no torch, so allocations can be computed,
inspected and tested anywhere. ``RankAllocation.to_lora_config`` imports PEFT lazily.

The rule
--------
A rank-r LoRA adapter on a weight of shape (d_out, d_in) costs ``r * (d_in + d_out)``
parameters. Given a score per module (a Hessian or Fisher trace from :mod:`sadra.probe`):

1. Transform the scores into weights ``w``: ``normalize="none"`` keeps the raw trace,
   ``"per_param"`` divides it by the number of weights in the module (HAWQ's average
   curvature); then ``w = w ** power`` (``power=1``: proportional).
2. Modules whose score is not a positive finite number cannot be ranked by it. They get
   ``min_rank`` (``prune=False``) or rank 0, no adapter (``prune=True``); both are counted
   in the result (``floored`` / ``pruned``).
3. Real-valued ranks ``r_i = clip(lam * w_i, min_rank, max_rank)``, with the single scale
   ``lam`` chosen so the total cost equals the budget. Clamping a module frees or takes
   budget that the others share in proportion to their weights (water-filling).
4. With ``prune=True``, the flattest module is dropped (rank 0) while its ideal rank
   ``lam * w_i`` is below ``min_rank / 2`` -- that is, while it is closer to no adapter than
   to the smallest adapter -- and the remaining modules can still absorb the budget; ``lam``
   is solved again after each drop, so the freed budget goes to the others.
5. Integer ranks: every module starts at ``floor(r_i)``; then, while budget is left, one
   rank step goes to the module with the largest shortfall ``r_i - rank_i`` whose step
   still fits. The total never exceeds the budget, and what is left over is smaller than
   the cost of one more rank on any module below ``max_rank``.

The result is deterministic: ties are broken by module order.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import BudgetError, DataError

NORMALIZE_CHOICES = ("none", "per_param")


def lora_cost(shape: tuple[int, int], rank: int = 1) -> int:
    """Parameters of a rank-``rank`` LoRA adapter (A: r x d_in, B: d_out x r)."""
    d_out, d_in = shape
    return int(rank) * (int(d_in) + int(d_out))


def uniform_budget(shapes: Mapping[str, tuple[int, int]], rank: int) -> int:
    """The parameter count of uniform rank-``rank`` LoRA on every module in ``shapes``."""
    return sum(lora_cost(s, rank) for s in shapes.values())


def resolve_budget(budget: int | str | None, shapes: Mapping[str, tuple[int, int]], base_rank: int) -> int:
    """A budget given as a parameter count, ``"lora-r<k>"``, or None (uniform ``base_rank``)."""
    if budget is None:
        return uniform_budget(shapes, base_rank)
    if isinstance(budget, str):
        text = budget.strip().lower()
        m = re.fullmatch(r"lora-r(\d+)", text)
        if m:
            return uniform_budget(shapes, int(m.group(1)))
        if re.fullmatch(r"\d+", text):
            return int(text)
        raise BudgetError(
            f"budget {budget!r} is not understood; give a parameter count (e.g. 442368) or 'lora-r<rank>' (e.g. lora-r8)"
        )
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise BudgetError(f"budget must be an integer parameter count, got {budget!r}; pass e.g. budget=442368 or 'lora-r8'")
    return int(budget)


@dataclass
class RankAllocation:
    """Integer LoRA ranks per module under a parameter budget."""

    ranks: dict[str, int]
    budget: int
    params: int
    shapes: dict[str, tuple[int, int]]
    scores: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    base_rank: int = 8
    min_rank: int = 2
    max_rank: int = 32
    normalize: str = "none"
    power: float = 1.0
    prune: bool = False
    floored: list[str] = field(default_factory=list)
    pruned: list[str] = field(default_factory=list)
    estimator: str | None = None

    @property
    def leftover(self) -> int:
        return self.budget - self.params

    @property
    def uniform_params(self) -> int:
        return uniform_budget(self.shapes, self.base_rank)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        d["leftover"] = self.leftover
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankAllocation":
        try:
            ranks = {str(k): int(v) for k, v in data["ranks"].items()}
            shapes = {str(k): (int(v[0]), int(v[1])) for k, v in data["shapes"].items()}
            known = {f for f in cls.__dataclass_fields__}
            kwargs = {k: v for k, v in data.items() if k in known and k not in ("ranks", "shapes")}
            alloc = cls(ranks=ranks, shapes=shapes, **kwargs)
            alloc.budget, alloc.params = int(alloc.budget), int(alloc.params)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DataError(
                f"not a SADRA allocation ({type(exc).__name__}: {exc}); create one with 'sadra allocate PROBE.json --out alloc.json'"
            ) from None
        missing = sorted(set(ranks) - set(shapes))
        if missing:
            raise DataError(f"allocation lists ranks for modules without shapes ({missing[0]}, ...); recreate it with 'sadra allocate'")
        if any(r < 0 for r in ranks.values()):
            raise DataError("allocation has a negative rank; recreate it with 'sadra allocate'")
        return alloc

    @classmethod
    def from_json(cls, text: str) -> "RankAllocation":
        from .io import parse_json_object

        return cls.from_dict(parse_json_object(text, "allocation JSON", "recreate it with 'sadra allocate'"))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "RankAllocation":
        from .io import read_text

        return cls.from_json(read_text(path, what="allocation JSON"))

    # --- display -------------------------------------------------------------------------
    def table(self) -> str:
        """A plain-text table: module, score +- s.e., shape, rank, params."""
        rows = [("module", "score", "+- s.e.", "shape", "rank", "params")]
        for name, rank in self.ranks.items():
            score = self.scores.get(name, float("nan"))
            se = self.stderr.get(name, float("nan"))
            d_out, d_in = self.shapes[name]
            rows.append((name, f"{score:.4g}", f"{se:.2g}", f"{d_out}x{d_in}", str(rank), str(lora_cost((d_out, d_in), rank))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for j, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells))
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        nonzero = [r for r in self.ranks.values() if r > 0]
        lines.append("")
        lines.append(
            f"params {self.params:,} of budget {self.budget:,} (leftover {self.leftover:,}; uniform r={self.base_rank}: "
            f"{self.uniform_params:,}); ranks {min(nonzero, default=0)}..{max(nonzero, default=0)}, "
            f"{len(self.pruned)} pruned, {len(self.floored)} floored to min_rank"
        )
        return "\n".join(lines)

    # --- PEFT ----------------------------------------------------------------------------
    def to_lora_config(self, *, alpha_ratio: float = 2.0, use_rslora: bool = False, **lora_kwargs: Any):
        """A ``peft.LoraConfig`` that builds exactly these ranks.

        ``target_modules`` are the full names of the modules with rank > 0; ``rank_pattern``
        and ``alpha_pattern`` are keyed ``^<escaped full name>$`` so that no key can match a
        second module through PEFT's suffix matching. By default ``lora_alpha = alpha_ratio * r``
        per module, which keeps the LoRA scale alpha/r constant across ranks (uniform LoRA r=8,
        alpha=16 has ratio 2). With ``use_rslora=True`` PEFT scales by alpha/sqrt(r) and one
        constant alpha (``alpha_ratio * base_rank``) is used for every module, as rsLoRA intends.
        Other keyword arguments go to ``LoraConfig`` unchanged.
        """
        from peft import LoraConfig

        targets = [n for n, r in self.ranks.items() if r > 0]
        if not targets:
            raise BudgetError("the allocation gives every module rank 0; raise the budget or use prune=False")
        rank_pattern = {f"^{re.escape(n)}$": int(self.ranks[n]) for n in targets}
        if use_rslora:
            alpha_pattern = {}
            base_alpha = alpha_ratio * self.base_rank
        else:
            alpha_pattern = {f"^{re.escape(n)}$": float(alpha_ratio * self.ranks[n]) for n in targets}
            base_alpha = alpha_ratio * self.base_rank
        kwargs = dict(r=self.base_rank, lora_alpha=base_alpha, use_rslora=use_rslora)
        kwargs.update(lora_kwargs)
        return LoraConfig(target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **kwargs)


def _scores_from(report_or_scores: Any, shapes: Mapping[str, Any] | None):
    """Accept a SensitivityReport-like object (duck-typed: no torch import) or a dict."""
    stderr: dict[str, float] = {}
    estimator = None
    if hasattr(report_or_scores, "scores") and hasattr(report_or_scores, "shapes"):
        scores = dict(report_or_scores.scores)
        shapes = dict(report_or_scores.shapes) if shapes is None else shapes
        stderr = dict(getattr(report_or_scores, "stderr", {}) or {})
        estimator = getattr(report_or_scores, "estimator", None)
    elif isinstance(report_or_scores, Mapping):
        scores = dict(report_or_scores)
    else:
        raise BudgetError(
            f"allocate_ranks needs a SensitivityReport or a dict of scores, got {type(report_or_scores).__name__}"
        )
    if shapes is None:
        raise BudgetError("allocate_ranks got plain scores without shapes; pass shapes={module: (d_out, d_in)}")
    return scores, dict(shapes), stderr, estimator


def _solve_scale(w: np.ndarray, cost: np.ndarray, lo: float, hi: float, target: float) -> float:
    """The smallest lam >= 0 with sum(cost * clip(lam * w, lo, hi)) == target.

    The total is piecewise linear and non-decreasing in lam with breakpoints at lo/w and
    hi/w, so it is solved exactly on the segment that brackets the target.
    """
    def total(lam: float) -> float:
        return float(np.sum(cost * np.clip(lam * w, lo, hi)))

    if total(0.0) >= target:
        return 0.0
    pos = w > 0
    points = np.unique(np.concatenate([lo / w[pos], hi / w[pos]]))
    prev = 0.0
    for point in points:
        if total(point) >= target:
            break
        prev = point
    else:  # the target exceeds the capacity; callers check feasibility first
        return float(points[-1]) if len(points) else 0.0
    # On (prev, point) every module is either clamped or strictly proportional.
    mid = 0.5 * (prev + point)
    free = pos & (mid * w > lo) & (mid * w < hi)
    fixed = total(mid) - mid * float(np.sum(cost[free] * w[free]))
    slope = float(np.sum(cost[free] * w[free]))
    if slope <= 0:
        return float(point)
    return float(min(max((target - fixed) / slope, prev), point))


def allocate_ranks(
    report_or_scores: Any,
    *,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    budget: int | str | None = None,
    base_rank: int = 8,
    min_rank: int = 2,
    max_rank: int = 32,
    prune: bool = False,
    normalize: str = "none",
    power: float = 1.0,
) -> RankAllocation:
    """Integer ranks per module, proportional to curvature, under a LoRA parameter budget.

    ``report_or_scores`` is a :class:`~sadra.probe.SensitivityReport` or a dict of scores
    (then ``shapes`` maps each module to ``(d_out, d_in)``). ``budget`` is a parameter count,
    ``"lora-r<k>"``, or None for uniform ``base_rank`` on the same modules. See the module
    docstring for the rule. Raises :class:`BudgetError` on infeasible constraints.
    """
    scores, shapes, stderr, estimator = _scores_from(report_or_scores, shapes)
    for label, value in (("base_rank", base_rank), ("min_rank", min_rank), ("max_rank", max_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise BudgetError(f"{label} must be a non-negative integer, got {value!r}")
    if min_rank > max_rank:
        raise BudgetError(f"min_rank {min_rank} is above max_rank {max_rank}; choose min_rank <= max_rank")
    if max_rank == 0:
        raise BudgetError("max_rank is 0, so no module can get an adapter; choose max_rank >= 1")
    if normalize not in NORMALIZE_CHOICES:
        raise BudgetError(f"normalize must be one of {', '.join(NORMALIZE_CHOICES)}, got {normalize!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
        raise BudgetError(f"power must be a positive finite number, got {power!r}")
    if not scores:
        raise BudgetError("no module scores to allocate; probe at least one target module")
    unknown = [n for n in scores if n not in shapes]
    if unknown:
        raise BudgetError(f"module {unknown[0]!r} has a score but no shape; pass shapes for every scored module")
    names = list(scores)
    shp = {}
    for n in names:
        try:
            d_out, d_in = (int(x) for x in shapes[n])
        except (TypeError, ValueError):
            raise BudgetError(f"shape of {n!r} must be (d_out, d_in), got {shapes[n]!r}") from None
        if d_out <= 0 or d_in <= 0:
            raise BudgetError(f"shape of {n!r} must be positive, got {(d_out, d_in)}")
        shp[n] = (d_out, d_in)
    total_budget = resolve_budget(budget, shp, base_rank)
    if total_budget < 0:
        raise BudgetError(f"budget {total_budget} is negative; give a positive parameter count")

    cost = np.array([lora_cost(shp[n]) for n in names], dtype=np.float64)
    raw = np.array([_as_float(scores[n]) for n in names], dtype=np.float64)
    if normalize == "per_param":
        raw = raw / np.array([shp[n][0] * shp[n][1] for n in names], dtype=np.float64)
    valid = np.isfinite(raw) & (raw > 0)
    w = np.zeros_like(raw)
    if valid.any():
        # Scale to max 1 before the power so that 1e300 or 1e-300 scores neither overflow nor vanish.
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):
            w[valid] = (raw[valid] / raw[valid].max()) ** power
        # Weights this far below the largest cannot earn a rank step of their own; treating them as
        # zero keeps every breakpoint min_rank / w finite. The greedy fill still tops them up if the
        # budget has nowhere else to go.
        w[~np.isfinite(w) | (w < 1e-200)] = 0.0

    invalid_idx = [i for i in range(len(names)) if not valid[i]]
    pruned = set(invalid_idx) if prune else set()
    floored = [] if prune else invalid_idx

    def kept_mask() -> np.ndarray:
        m = np.ones(len(names), dtype=bool)
        m[list(pruned)] = False
        return m

    keep = kept_mask()
    min_cost = float(np.sum(cost[keep] * min_rank))
    max_cost = float(np.sum(cost[keep] * max_rank))
    if not keep.any():
        raise BudgetError("every module score is non-positive or non-finite and prune=True drops them all; re-probe or use prune=False")
    if total_budget < min_cost:
        raise BudgetError(
            f"budget {total_budget:,} is below the {int(min_cost):,} parameters that min_rank={min_rank} needs on "
            f"{int(keep.sum())} modules; lower min_rank or raise the budget"
        )
    if total_budget > max_cost:
        raise BudgetError(
            f"budget {total_budget:,} is above the {int(max_cost):,} parameters that max_rank={max_rank} allows on "
            f"{int(keep.sum())} modules; raise max_rank or lower the budget"
        )

    def solve(keep: np.ndarray) -> tuple[float, np.ndarray]:
        # Floored modules sit at min_rank whatever lam is (weight 0 clips to the lower bound).
        lam = _solve_scale(w[keep], cost[keep], float(min_rank), float(max_rank), float(total_budget))
        real = np.zeros(len(names))
        real[keep] = np.clip(lam * w[keep], min_rank, max_rank)
        return lam, real

    lam, real = solve(keep)
    if prune and min_rank > 0:
        while True:
            candidates = [i for i in range(len(names)) if keep[i]]
            flattest = min(candidates, key=lambda i: (w[i], -i))
            if lam * w[flattest] >= min_rank / 2 or len(candidates) == 1:
                break
            trial = keep.copy()
            trial[flattest] = False
            if float(np.sum(cost[trial] * max_rank)) < total_budget:
                break
            pruned.add(flattest)
            keep = trial
            lam, real = solve(keep)

    ranks = np.zeros(len(names), dtype=np.int64)
    ranks[keep] = np.floor(real[keep] + 1e-12).astype(np.int64)
    ranks[keep] = np.clip(ranks[keep], min_rank, max_rank)
    left = int(total_budget - int(np.sum(cost * ranks)))
    # Greedy fill: the largest shortfall first; a module whose step no longer fits never will
    # again (the leftover only shrinks), so it leaves the heap for good.
    heap = [(-(real[i] - ranks[i]), i) for i in range(len(names)) if keep[i] and ranks[i] < max_rank]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if cost[i] > left:
            continue
        ranks[i] += 1
        left -= int(cost[i])
        if ranks[i] < max_rank:
            heapq.heappush(heap, (-(real[i] - ranks[i]), i))

    rank_map = {n: int(ranks[i]) for i, n in enumerate(names)}
    params = sum(lora_cost(shp[n], r) for n, r in rank_map.items())
    return RankAllocation(
        ranks=rank_map,
        budget=int(total_budget),
        params=int(params),
        shapes=shp,
        scores={n: _as_float(scores[n]) for n in names},
        stderr={n: _as_float(stderr[n]) for n in names if n in stderr},
        base_rank=int(base_rank),
        min_rank=int(min_rank),
        max_rank=int(max_rank),
        normalize=normalize,
        power=float(power),
        prune=bool(prune),
        floored=[names[i] for i in floored],
        pruned=[names[i] for i in sorted(pruned)],
        estimator=estimator,
    )


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return float("nan")
