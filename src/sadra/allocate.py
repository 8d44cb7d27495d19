"""Rank allocation under a LoRA parameter budget: rules say what a rank is worth, one solver
turns that into integer ranks.

Pure Python and numpy: this module imports no torch, so allocations can be computed, inspected
and tested anywhere. ``RankAllocation.to_lora_config`` imports PEFT lazily.

A rank-r LoRA adapter on a weight of shape (d_out, d_in) costs ``r * (d_in + d_out)`` parameters.

Rules (:data:`RULES`; one function each, added with :func:`register_rule`) turn a probe report
into one of two forms:

* :class:`Weights`, one number per module (``proportional``): ranks proportional to the weights,
  clamped to ``[min_rank, max_rank]`` with the excess shared by the others (water-filling), then
  rounded under the budget.
* :class:`Values`, a falling list per module, the worth of its 1st, 2nd, ... rank
  (``spectral``: ``sigma_j(G)^2``; ``spectral-newton``: ``sigma_j(G)^2 / h``). Rank steps go out
  greedily by value per parameter: for values that fall with j this is the allocation that
  maximises the summed value under the budget.

Either way the solver guarantees: total <= budget; what is left is smaller than one more rank
step on any module below ``max_rank``; ties broken by module order (deterministic). Modules the
rule cannot value (a score that is not positive and finite) get ``min_rank`` (``floored``) or,
with ``prune=True``, rank 0 (``pruned``). With ``prune=True`` the proportional path also drops the
flattest module while its ideal rank is below ``min_rank / 2`` and shares its budget among the
others; the greedy path starts every module at 0 and its first step is a block of ``min_rank``.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import BudgetError, DataError
from . import settings as _settings
from .settings import default_of

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
    rule: str = "proportional"

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

    # --- exports for other tools ---------------------------------------------------------
    def _patterns(self, alpha_ratio: float) -> tuple[list[str], dict[str, int], dict[str, float]]:
        """Target names (rank > 0) and rank/alpha patterns keyed ``^<escaped full name>$``.

        Anchored full names: PEFT matches pattern keys as suffixes, so a bare ``layer.1.query``
        would also match ``layer.11.query``.
        """
        targets = [n for n, r in self.ranks.items() if r > 0]
        if not targets:
            raise BudgetError("the allocation gives every module rank 0; raise the budget or use prune=False")
        ranks = {f"^{re.escape(n)}$": int(self.ranks[n]) for n in targets}
        alphas = {f"^{re.escape(n)}$": float(alpha_ratio * self.ranks[n]) for n in targets}
        return targets, ranks, alphas

    def to_axolotl(self, *, alpha_ratio: float = 2.0) -> dict[str, Any]:
        """axolotl config keys for these ranks: ``lora_target_modules`` plus ``lora_rank_pattern`` and
        ``lora_alpha_pattern`` (axolotl forwards both to PEFT's ``rank_pattern`` / ``alpha_pattern``)."""
        targets, ranks, alphas = self._patterns(alpha_ratio)
        if any(a != round(a) for a in alphas.values()):
            raise BudgetError(f"axolotl takes integer alphas, but alpha_ratio {alpha_ratio} gives fractional ones; "
                              "use an integer alpha_ratio")
        return {"adapter": "lora", "lora_r": int(self.base_rank), "lora_alpha": int(round(alpha_ratio * self.base_rank)),
                "lora_target_modules": targets, "lora_rank_pattern": ranks,
                "lora_alpha_pattern": {k: int(round(a)) for k, a in alphas.items()}}

    def export(self, path: str | Path, fmt: str = "json", *, alpha_ratio: float = 2.0, **lora_kwargs: Any) -> Path:
        """Write the allocation as ``json`` (this object), ``peft`` (an ``adapter_config.json``-ready
        ``LoraConfig``; ``LoraConfig.from_pretrained`` reads the folder it is named
        ``adapter_config.json`` in) or ``axolotl`` (YAML keys for an axolotl config)."""
        from .io import atomic_write_text

        if fmt == "json":
            self.save(path)
        elif fmt == "peft":
            config = self.to_lora_config(alpha_ratio=alpha_ratio, **lora_kwargs).to_dict()
            config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
            atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")
        elif fmt == "axolotl":
            import yaml

            header = (f"# LoRA ranks from SADRA ({self.rule} rule): {self.params:,} parameters of a budget of "
                      f"{self.budget:,} (uniform r={self.base_rank}).\n# Merge these keys into an axolotl config.\n")
            atomic_write_text(path, header + yaml.safe_dump(self.to_axolotl(alpha_ratio=alpha_ratio), sort_keys=False))
        else:
            raise DataError(f"unknown export format {fmt!r}; use json, peft or axolotl")
        return Path(path)

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

        targets, rank_pattern, alpha_pattern = self._patterns(alpha_ratio)
        if use_rslora:
            alpha_pattern = {}
        base_alpha = alpha_ratio * self.base_rank
        kwargs = dict(r=self.base_rank, lora_alpha=base_alpha, use_rslora=use_rslora)
        kwargs.update(lora_kwargs)
        return LoraConfig(target_modules=targets, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, **kwargs)


class Weights(dict):
    """A rule's output: one weight per module; ranks are proportional to it."""


class Values(dict):
    """A rule's output: per module, the worth of its 1st, 2nd, ... rank (falling)."""


Rule = Callable[..., "Weights | Values"]
RULES: dict[str, Rule] = {}


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Decorator: ``@register_rule("mine")`` on ``f(signal: SignalData, **options) -> Weights | Values``."""
    def add(fn: Rule) -> Rule:
        RULES[name] = fn
        return fn

    return add


@dataclass
class SignalData:
    """What a rule may read: a report's scores (curvature traces), spectra and weight counts."""

    scores: dict[str, float]
    shapes: dict[str, tuple[int, int]]
    spectra: dict[str, list[float]] = field(default_factory=dict)
    estimator: str | None = None
    stderr: dict[str, float] = field(default_factory=dict)

    def num_params(self, name: str) -> int:
        return self.shapes[name][0] * self.shapes[name][1]


@register_rule("proportional")
def proportional_rule(signal: SignalData, *, normalize: str = "none", power: float = 1.0, **_: Any) -> Weights:
    """Rank proportional to ``score ** power`` (``per_param``: the trace per weight)."""
    if normalize not in NORMALIZE_CHOICES:
        raise BudgetError(f"normalize must be one of {', '.join(NORMALIZE_CHOICES)}, got {normalize!r}")
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
        raise BudgetError(f"power must be a positive finite number, got {power!r}")
    raw = {n: _as_float(s) for n, s in signal.scores.items()}
    if normalize == "per_param":
        raw = {n: v / signal.num_params(n) for n, v in raw.items()}
    valid = [v for v in raw.values() if math.isfinite(v) and v > 0]
    if not valid:
        return Weights({n: float("nan") for n in raw})
    top = max(valid)
    out = {}
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        for n, v in raw.items():
            # Scaled to max 1 before the power so that 1e300 or 1e-300 scores neither overflow nor vanish.
            out[n] = float((v / top) ** power) if math.isfinite(v) and v > 0 else float("nan")
    return Weights(out)


@register_rule("spectral")
def spectral_rule(signal: SignalData, **_: Any) -> Values:
    """The j-th rank of a module is worth ``sigma_j(G)^2``: the loss drop of its direction, curvature-free."""
    _need_spectra(signal, "spectral")
    return Values({n: list(signal.spectra.get(n, [])) for n in signal.scores})


@register_rule("spectral-newton")
def spectral_newton_rule(signal: SignalData, **_: Any) -> Values:
    """The j-th rank is worth ``sigma_j(G)^2 / h``, with h the module's Fisher trace per weight.

    With curvature ``h I`` a rank-k update lowers the local quadratic model of the loss by at most
    ``sum_{j<=k} sigma_j(G)^2 / (2h)``.
    """
    _need_spectra(signal, "spectral-newton")
    out = {}
    for n in signal.scores:
        h = _as_float(signal.scores[n]) / signal.num_params(n)
        out[n] = [v / h for v in signal.spectra.get(n, [])] if math.isfinite(h) and h > 0 else [float("nan")]
    return Values(out)


def _need_spectra(signal: SignalData, rule: str) -> None:
    if not signal.spectra:
        raise BudgetError(f"rule {rule!r} needs the gradient spectrum; probe with --estimator gradient "
                          f"(this report is from {signal.estimator or 'plain scores'})")


def _signal_from(report_or_scores: Any, shapes: Mapping[str, Any] | None) -> SignalData:
    """Accept a SensitivityReport-like object (duck-typed: no torch import) or a dict of scores."""
    if hasattr(report_or_scores, "scores") and hasattr(report_or_scores, "shapes"):
        data = SignalData(scores=dict(report_or_scores.scores),
                          shapes=dict(report_or_scores.shapes) if shapes is None else dict(shapes),
                          spectra=dict(getattr(report_or_scores, "spectra", {}) or {}),
                          estimator=getattr(report_or_scores, "estimator", None),
                          stderr=dict(getattr(report_or_scores, "stderr", {}) or {}))
    elif isinstance(report_or_scores, Mapping):
        if shapes is None:
            raise BudgetError("allocate_ranks got plain scores without shapes; pass shapes={module: (d_out, d_in)}")
        data = SignalData(scores=dict(report_or_scores), shapes=dict(shapes))
    else:
        raise BudgetError(
            f"allocate_ranks needs a SensitivityReport or a dict of scores, got {type(report_or_scores).__name__}"
        )
    if not data.scores:
        raise BudgetError("no module scores to allocate; probe at least one target module")
    unknown = [n for n in data.scores if n not in data.shapes]
    if unknown:
        raise BudgetError(f"module {unknown[0]!r} has a score but no shape; pass shapes for every scored module")
    data.shapes = {n: _check_shape(n, data.shapes[n]) for n in data.scores}
    return data


def _check_shape(name: str, shape: Any) -> tuple[int, int]:
    try:
        d_out, d_in = (int(x) for x in shape)
    except (TypeError, ValueError):
        raise BudgetError(f"shape of {name!r} must be (d_out, d_in), got {shape!r}") from None
    if d_out <= 0 or d_in <= 0:
        raise BudgetError(f"shape of {name!r} must be positive, got {(d_out, d_in)}")
    return d_out, d_in


def _check_ranks(base_rank: Any, min_rank: Any, max_rank: Any) -> None:
    for label, value in (("base_rank", base_rank), ("min_rank", min_rank), ("max_rank", max_rank)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise BudgetError(f"{label} must be a non-negative integer, got {value!r}")
    if min_rank > max_rank:
        raise BudgetError(f"min_rank {min_rank} is above max_rank {max_rank}; choose min_rank <= max_rank")
    if max_rank == 0:
        raise BudgetError("max_rank is 0, so no module can get an adapter; choose max_rank >= 1")


def default_rule(signal: SignalData) -> str:
    """The default rule for what ``signal`` carries (:func:`sadra.settings.default_rule`)."""
    return _settings.default_rule(bool(signal.spectra))


def allocate_ranks(
    report_or_scores: Any,
    *,
    rule: str | None = None,
    shapes: Mapping[str, tuple[int, int]] | None = None,
    budget: int | str | None = None,
    base_rank: int = default_of("lora.r"),
    min_rank: int = default_of("allocate.min_rank"),
    max_rank: int = default_of("allocate.max_rank"),
    prune: bool = default_of("allocate.prune"),
    normalize: str = default_of("allocate.normalize"),
    power: float = default_of("allocate.power"),
) -> RankAllocation:
    """Integer ranks per module under a LoRA parameter budget, valued by ``rule``.

    ``report_or_scores`` is a :class:`~sadra.probe.SensitivityReport` or a dict of scores (then
    ``shapes`` maps each module to ``(d_out, d_in)``). ``rule`` names an entry of :data:`RULES`; None
    takes :func:`default_rule` (sadra's default for a report with the gradient spectrum, else
    ``proportional``).
    ``budget`` is a parameter count, ``"lora-r<k>"``, or None for uniform ``base_rank`` on the same
    modules. See the module docstring. Raises :class:`BudgetError` on infeasible constraints.
    """
    signal = _signal_from(report_or_scores, shapes)
    rule = rule or default_rule(signal)
    if rule not in RULES:
        raise BudgetError(f"unknown rule {rule!r}; choose one of: {', '.join(RULES)}")
    _check_ranks(base_rank, min_rank, max_rank)
    total_budget = resolve_budget(budget, signal.shapes, base_rank)
    if total_budget < 0:
        raise BudgetError(f"budget {total_budget} is negative; give a positive parameter count")
    form = RULES[rule](signal, normalize=normalize, power=power)
    names = list(signal.scores)
    cost = np.array([lora_cost(signal.shapes[n]) for n in names], dtype=np.float64)
    solver = _solve_weights if isinstance(form, Weights) else _solve_values
    ranks, floored, pruned = solver(form, names, cost, total_budget, min_rank, max_rank, prune)
    rank_map = {n: int(ranks[i]) for i, n in enumerate(names)}
    return RankAllocation(
        ranks=rank_map, budget=int(total_budget),
        params=int(sum(lora_cost(signal.shapes[n], r) for n, r in rank_map.items())), shapes=signal.shapes,
        scores={n: _as_float(signal.scores[n]) for n in names},
        stderr={n: _as_float(signal.stderr[n]) for n in names if n in signal.stderr},
        base_rank=int(base_rank), min_rank=int(min_rank), max_rank=int(max_rank), normalize=normalize,
        power=float(power), prune=bool(prune), floored=[names[i] for i in floored],
        pruned=[names[i] for i in sorted(pruned)], estimator=signal.estimator, rule=rule,
    )


def _check_feasible(cost: np.ndarray, keep: np.ndarray, budget: int, min_rank: int, max_rank: int) -> None:
    if not keep.any():
        raise BudgetError("every module score is non-positive or non-finite and prune=True drops them all; "
                          "re-probe or use prune=False")
    min_cost = float(np.sum(cost[keep] * min_rank))
    max_cost = float(np.sum(cost[keep] * max_rank))
    if budget < min_cost:
        raise BudgetError(f"budget {budget:,} is below the {int(min_cost):,} parameters that min_rank={min_rank} "
                          f"needs on {int(keep.sum())} modules; lower min_rank or raise the budget")
    if budget > max_cost:
        raise BudgetError(f"budget {budget:,} is above the {int(max_cost):,} parameters that max_rank={max_rank} "
                          f"allows on {int(keep.sum())} modules; raise max_rank or lower the budget")


# --- proportional path: water-filling, pruning, rounding ----------------------------------------

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
    slope = float(np.sum(cost[free] * w[free]))
    fixed = total(mid) - mid * slope
    if slope <= 0:
        return float(point)
    return float(min(max((target - fixed) / slope, prev), point))


def _solve_weights(form: Weights, names, cost, budget, min_rank, max_rank, prune):
    raw = np.array([_as_float(form[n]) for n in names], dtype=np.float64)
    # NaN marks a module the rule cannot value; a weight that underflowed to 0 is still valued.
    valid = np.isfinite(raw) & (raw >= 0)
    w = np.where(valid, raw, 0.0)
    # Weights this far below the largest cannot earn a rank step of their own; as zero they keep
    # every breakpoint min_rank / w finite. The rounding still tops them up if the budget has
    # nowhere else to go.
    w[w < 1e-200] = 0.0
    invalid = [i for i in range(len(names)) if not valid[i]]
    pruned = set(invalid) if prune else set()
    keep = np.ones(len(names), dtype=bool)
    keep[list(pruned)] = False
    _check_feasible(cost, keep, budget, min_rank, max_rank)
    lam, real = _waterfill(w, cost, keep, budget, min_rank, max_rank)
    if prune and min_rank > 0:
        keep, lam, real = _prune_flattest(w, cost, keep, budget, min_rank, max_rank, lam, real, pruned)
    ranks = _round_under_budget(real, cost, keep, budget, min_rank, max_rank)
    return ranks, ([] if prune else invalid), pruned


def _waterfill(w, cost, keep, budget, min_rank, max_rank):
    # Floored modules sit at min_rank whatever lam is (weight 0 clips to the lower bound).
    lam = _solve_scale(w[keep], cost[keep], float(min_rank), float(max_rank), float(budget))
    real = np.zeros(len(w))
    real[keep] = np.clip(lam * w[keep], min_rank, max_rank)
    return lam, real


def _prune_flattest(w, cost, keep, budget, min_rank, max_rank, lam, real, pruned):
    """Drop the flattest kept module while it is closer to no adapter than to min_rank."""
    while True:
        candidates = [i for i in range(len(w)) if keep[i]]
        flattest = min(candidates, key=lambda i: (w[i], -i))
        if lam * w[flattest] >= min_rank / 2 or len(candidates) == 1:
            return keep, lam, real
        trial = keep.copy()
        trial[flattest] = False
        if float(np.sum(cost[trial] * max_rank)) < budget:
            return keep, lam, real
        pruned.add(flattest)
        keep = trial
        lam, real = _waterfill(w, cost, keep, budget, min_rank, max_rank)


def _round_under_budget(real, cost, keep, budget, min_rank, max_rank) -> np.ndarray:
    """Floors, then one rank step at a time to the largest shortfall ``real - rank`` that still fits.

    A module whose step no longer fits never will again (the leftover only shrinks), so it
    leaves the heap for good: the leftover ends smaller than any growable module's step.
    """
    ranks = np.zeros(len(real), dtype=np.int64)
    ranks[keep] = np.clip(np.floor(real[keep] + 1e-12).astype(np.int64), min_rank, max_rank)
    left = int(budget - int(np.sum(cost * ranks)))
    heap = [(-(real[i] - ranks[i]), i) for i in range(len(real)) if keep[i] and ranks[i] < max_rank]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        if cost[i] > left:
            continue
        ranks[i] += 1
        left -= int(cost[i])
        if ranks[i] < max_rank:
            heapq.heappush(heap, (-(real[i] - ranks[i]), i))
    return ranks


# --- greedy path: rank steps by value per parameter ---------------------------------------------

def _solve_values(form: Values, names, cost, budget, min_rank, max_rank, prune):
    values = [_value_list(form.get(n, []), max_rank) for n in names]
    invalid = [i for i, v in enumerate(values) if v is None]
    keep = np.ones(len(names), dtype=bool)
    if prune:
        keep[invalid] = False
    _check_feasible(cost, keep, budget, min_rank, max_rank)
    start = 0 if prune else min_rank
    ranks = np.where(keep, start, 0).astype(np.int64)
    values = [v if v is not None else [0.0] * max_rank for v in values]
    ranks = _greedy_steps(values, cost, keep, ranks, budget, min_rank, max_rank)
    pruned = {i for i in range(len(names)) if ranks[i] == 0 and (prune and min_rank > 0 or not keep[i])}
    return ranks, ([] if prune else invalid), pruned


def _value_list(raw: Sequence[float], max_rank: int) -> list[float] | None:
    """The first ``max_rank`` values, negatives as 0, padded with 0; None if any is not finite."""
    out = [_as_float(v) for v in list(raw)[:max_rank]]
    if not out or any(not math.isfinite(v) for v in out):
        return None
    return [max(v, 0.0) for v in out] + [0.0] * (max_rank - len(out))


def _greedy_steps(values, cost, keep, ranks, budget, min_rank, max_rank) -> np.ndarray:
    """Hand out rank steps by value per parameter until no step fits.

    A module at rank 0 (prune) takes a block of ``min_rank`` ranks as its first step, valued at
    the block's mean. Equal values go to the module with the lower rank first, then module order.
    """
    left = int(budget - int(np.sum(cost * ranks)))

    def entry(i: int):
        r = int(ranks[i])
        size = max(min_rank, 1) if r == 0 else 1
        worth = sum(values[i][r:r + size]) / size
        return (-worth / cost[i], r, i, size)

    heap = [entry(i) for i in range(len(ranks)) if keep[i] and ranks[i] < max_rank]
    heapq.heapify(heap)
    while heap:
        _, _, i, size = heapq.heappop(heap)
        if cost[i] * size > left:
            continue
        ranks[i] += size
        left -= int(cost[i] * size)
        if ranks[i] < max_rank:
            heapq.heappush(heap, entry(i))
    return ranks


def _as_float(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError, OverflowError):
        return float("nan")
