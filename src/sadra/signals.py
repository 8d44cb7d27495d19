"""Signals: what the probe measures per target module, one class each, in one registry.

A signal implements three steps, and :func:`sadra.probe.estimate_sensitivity` does the rest
(sampling, the stopping rule, pooling over processes, the progress bar):

* ``prepare(model, batch, params, calls, b_idx, first_visit)``: the work a batch's rounds share
  (a forward pass, a first-order graph);
* ``sample(shared, batch, params, generator, retain)``: one round, one number per module;
* ``rounds_per_batch``: how many rounds share one batch by default;
* ``one_pass``: whether the signal stops once every batch has been visited (rounds on a batch
  already seen would add nothing it uses).

``finish(names, shapes)`` may add fields to the report (the gradient signal's spectra).

Signals shipped:

``fisher``
    The Monte-Carlo Fisher (Gauss-Newton) trace: targets drawn from the model's own predictive
    distribution, one gradient of the summed loss, ``||g_i||^2 / n`` for ``n`` sampled targets.
    Positive, one gradient per round.
``hutchinson``
    Hutchinson's estimate of ``tr(H_ii)``, the Hessian's diagonal block of module i, from
    Rademacher vectors: ``per_module`` (one HvP per module per round on one shared first-order
    graph) or ``joint`` (one HvP per round over every block; noisier).
``gradient``
    The mean calibration gradient ``G_m`` of each module (true labels) and its spectrum, plus the
    Fisher trace per round (the curvature the ``spectral-newton`` rule divides by). The batches
    alternate between two halves; the signal part of ``sigma_j(G_m)^2`` is what exceeds the noise
    floor that the two halves' difference measures (:func:`signal_spectrum`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from .errors import ConfigError, CurvatureError, DataError


class Signal:
    """Base class: one round gives one sample per target module."""

    name: ClassVar[str] = ""
    options: ClassVar[tuple[str, ...]] = ()
    rounds_per_batch: int = 1
    one_pass: ClassVar[bool] = False

    def prepare(self, model, batch, params, calls, b_idx: int, first_visit: bool) -> Any:
        raise NotImplementedError

    def sample(self, shared, batch, params, generator: torch.Generator, retain: bool) -> list[float]:
        raise NotImplementedError

    def finish(self, names: Sequence[str], shapes: Mapping[str, tuple[int, int]]) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **{k: getattr(self, k) for k in self.options}}


SIGNALS: dict[str, type[Signal]] = {}


def register_signal(cls: type[Signal]) -> type[Signal]:
    """Add a Signal subclass to the registry under ``cls.name`` (usable as a decorator)."""
    if not cls.name:
        raise ConfigError(f"signal class {cls.__name__} needs a non-empty 'name'")
    SIGNALS[cls.name] = cls
    return cls


def make_signal(name: str, **options: Any) -> Signal:
    """An instance of the registered signal ``name``; options it does not take are ignored."""
    if name not in SIGNALS:
        raise ConfigError(f"unknown estimator {name!r}; choose one of: {', '.join(SIGNALS)}")
    cls = SIGNALS[name]
    return cls(**{k: v for k, v in options.items() if k in cls.options})


# --- shared pieces -----------------------------------------------------------------------------

def _dot(v: torch.Tensor, hv: torch.Tensor | None) -> float:
    if hv is None:  # the loss does not depend on this weight (at this order)
        return 0.0
    # One BLAS dot in float64: products of float32 numbers are exact there and the sum does not
    # depend on how threads split it, so one process and several agree to ~1e-16.
    return float(torch.dot(v.reshape(-1).double(), hv.reshape(-1).double()))


def _rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU from one seeded generator, so results do not depend on the device.
    v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(like.device)
    return v.to(like.dtype).mul_(2).sub_(1)


def sampled_target_loss(logits: torch.Tensor, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Summed loss against targets drawn from the model's own predictive distribution.

    Classification logits ``(n, C)`` draw a class per row; a single output (regression) draws
    ``y ~ N(f, 1)``; causal-LM logits ``(B, T, V)`` draw the next token at each position whose
    label is not -100 (shifted as the model's own loss shifts them).
    """
    logits = logits.float()
    if logits.ndim == 3:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        flat = logits[:, :-1, :]
        mask = labels[:, 1:] != -100 if labels is not None else torch.ones(flat.shape[:2], dtype=torch.bool,
                                                                             device=flat.device)
        flat = flat[mask]
    else:
        flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    if n == 0:
        raise DataError("a calibration batch has no positions to score (all labels are -100); give longer texts")
    if flat.shape[-1] == 1:
        noise = torch.randn(flat.shape, generator=generator).to(flat.device)
        return 0.5 * ((flat - (flat + noise).detach()) ** 2).sum(), n
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1).cpu()
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(flat.device)
    return nn.functional.cross_entropy(flat, sampled, reduction="sum"), n


def _finite_loss(value: torch.Tensor, what: str, b_idx: int) -> torch.Tensor:
    if not torch.isfinite(value).all():
        raise CurvatureError(f"non-finite {what} on calibration batch {b_idx}; check the batch and the model's dtype")
    return value


# --- the signals -------------------------------------------------------------------------------

@register_signal
class FisherSignal(Signal):
    """Monte-Carlo Fisher trace per module: ``||g_i||^2 / n`` with sampled targets."""

    name = "fisher"

    def prepare(self, model, batch, params, calls, b_idx, first_visit):
        return _finite_loss(calls.logits(model, batch), "logits", b_idx)

    def sample(self, shared, batch, params, generator, retain):
        loss, n = sampled_target_loss(shared, batch, generator)
        grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
        return [(_dot(g, g) / n if g is not None else 0.0) for g in grads]


@register_signal
class HutchinsonSignal(Signal):
    """Hutchinson's Hessian-trace estimate per module (``per_module`` or ``joint`` vectors)."""

    name = "hutchinson"
    options = ("mode",)

    def __init__(self, mode: str = "per_module"):
        if mode not in ("per_module", "joint"):
            raise ConfigError(f"unknown Hutchinson mode {mode!r}; choose one of: per_module, joint")
        self.mode = mode
        # A joint round is one HvP and its graph a quarter of it, so 8 rounds share a graph; a
        # per-module round is already one HvP per module on one graph.
        self.rounds_per_batch = 8 if mode == "joint" else 1

    def prepare(self, model, batch, params, calls, b_idx, first_visit):
        loss = _finite_loss(calls.loss(model, batch), "loss", b_idx)
        return torch.autograd.grad(loss, params, create_graph=True)

    def sample(self, shared, batch, params, generator, retain):
        if self.mode == "joint":
            vs = [_rademacher(p.shape, generator, p) for p in params]
            hvs = torch.autograd.grad(shared, params, grad_outputs=vs, retain_graph=retain, allow_unused=True)
            return [_dot(v, hv) for v, hv in zip(vs, hvs)]
        row, last = [], len(params) - 1
        for i, (g, p) in enumerate(zip(shared, params)):
            v = _rademacher(p.shape, generator, p)
            (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=retain or i < last, allow_unused=True)
            row.append(_dot(v, hv))
        return row


@register_signal
class GradientSignal(FisherSignal):
    """Mean-gradient spectrum per module, with the Fisher trace as each round's sample.

    Batch b's mean gradient goes to half ``b % 2``; the true-label gradient and the round's Fisher
    sample share the batch's forward. One pass over the batches (``one_pass``). ``finish`` reports,
    per module, ``spectra`` (the signal part of ``sigma_j(G)^2``, from the two halves),
    ``spectra_raw`` (``sigma_j(G)^2`` of the full mean, noise floor included) and how well the two
    halves agree.
    """

    name = "gradient"
    options = ("spectrum_rank",)
    # A batch's mean gradient is taken on its first visit; revisits would only add Fisher samples
    # on rows already seen, which do not shrink the between-batch error of the Fisher trace, so
    # the signal makes one pass over its batches (more batches, not more rounds, buy precision).
    one_pass = True

    def __init__(self, spectrum_rank: int = 33):
        if isinstance(spectrum_rank, bool) or not isinstance(spectrum_rank, int) or spectrum_rank < 1:
            raise ConfigError(f"spectrum_rank must be a positive integer, got {spectrum_rank!r}")
        self.spectrum_rank = spectrum_rank
        self.sums: list[list[torch.Tensor]] | None = None
        self.counts = [0, 0]

    def prepare(self, model, batch, params, calls, b_idx, first_visit):
        if not first_visit:
            return super().prepare(model, batch, params, calls, b_idx, first_visit)
        # The true-label gradient and the Fisher rounds share the batch's forward.
        loss, logits = calls.loss_and_logits(model, batch)
        grads = torch.autograd.grad(_finite_loss(loss, "loss", b_idx), params, retain_graph=True, allow_unused=True)
        if self.sums is None:
            # At least float32, whatever the weights' dtype (bf16 sums lose the small directions).
            self.sums = [[torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]
                         for _ in range(2)]
        for acc, g in zip(self.sums[b_idx % 2], grads):
            if g is not None:
                acc.add_(g.detach().to(acc.dtype))
        self.counts[b_idx % 2] += 1
        return _finite_loss(logits, "logits", b_idx)

    def finish(self, names, shapes):
        sums, counts = self._pooled()
        if min(counts) == 0:
            raise DataError("the gradient signal needs at least 2 calibration batches (two halves); "
                            "raise probe.num_batches and probe.max_probes")
        spectra, raw, agreement = {}, {}, {}
        for i, name in enumerate(names):
            g_a, g_b = sums[0][i] / counts[0], sums[1][i] / counts[1]
            spectra[name], raw[name] = signal_and_raw_spectrum(g_a, g_b, self.spectrum_rank, counts[0], counts[1])
            agreement[name] = half_agreement(g_a, g_b)
        self.sums = None
        return {"spectra": spectra, "spectra_raw": raw, "spectrum_stability": agreement}

    def _pooled(self):
        from .distributed import all_reduce_sum, dist_world

        if dist_world()[0] == 1 or self.sums is None:
            return self.sums, self.counts
        import torch.distributed as dist

        for half in self.sums:
            for t in half:
                dist.all_reduce(t)
        (counts,) = all_reduce_sum(torch.tensor(self.counts, dtype=torch.float64))
        return self.sums, [int(c) for c in counts.tolist()]


def signal_spectrum(g_a: torch.Tensor, g_b: torch.Tensor, k: int, n_a: int = 1, n_b: int = 1) -> list[float]:
    """The signal part of the top ``k`` values ``sigma_j(G)^2`` of the pooled mean G (see
    :func:`signal_and_raw_spectrum`)."""
    return signal_and_raw_spectrum(g_a, g_b, k, n_a, n_b)[0]


def signal_and_raw_spectrum(g_a: torch.Tensor, g_b: torch.Tensor, k: int, n_a: int = 1,
                            n_b: int = 1) -> tuple[list[float], list[float]]:
    """The signal part of the top ``k`` values ``sigma_j(G)^2`` of the pooled mean G.

    ``G_a`` (mean of ``n_a`` batch gradients) and ``G_b`` (of ``n_b``) share the true mean M and
    carry independent noise. Their scaled half-difference
    ``D = (G_a - G_b) sqrt(n_a n_b) / (n_a + n_b)`` has the same noise as the pooled mean
    ``G = (n_a G_a + n_b G_b) / (n_a + n_b)`` and none of M, so ``sigma_1(D)^2`` is where the noise
    floor of G's spectrum ends. The estimate is ``max(sigma_j(G)^2 - sigma_1(D)^2, 0)``: directions
    that noise alone explains are worth 0, and strong directions keep most of their value (the
    subtraction shrinks them a little, which keeps their order). Returns that estimate and the raw
    ``sigma_j(G)^2`` (noise floor included), from one eigen-decomposition of G.
    """
    a, b = _at_least_float32(g_a), _at_least_float32(g_b)
    if a.ndim != 2 or a.shape != b.shape:
        raise DataError(f"signal_spectrum needs two matrices of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    total = n_a + n_b
    pooled = (n_a * a + n_b * b) / total
    difference = (a - b) * (math.sqrt(n_a * n_b) / total)
    floor = float(squared_singular_values(difference)[0])
    raw = squared_singular_values(pooled)[:k]
    return (raw - floor).clamp_min(0).tolist(), raw.tolist()


def squared_singular_values(m: torch.Tensor) -> torch.Tensor:
    """``sigma_j(m)^2``, largest first, as the eigenvalues of the Gram matrix on the smaller side:
    several times faster than an SVD for the nearly low-rank matrices a mean gradient is. In the
    matrix's own precision (at least float32): the values the rules use are the large ones, well
    inside float32's relative precision, and float64 linear algebra runs at about half the speed."""
    m = _at_least_float32(m)
    gram = m.T @ m if m.shape[0] >= m.shape[1] else m @ m.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def _at_least_float32(m: torch.Tensor) -> torch.Tensor:
    return m.to(torch.promote_types(m.dtype, torch.float32))


def half_agreement(g_a: torch.Tensor, g_b: torch.Tensor) -> float:
    """``<G_a, G_b> / mean(||G_a||^2, ||G_b||^2)``: near 1 when the mean gradient is mostly signal,
    near 0 when the two halves' means are mostly noise."""
    a, b = g_a.double().reshape(-1), g_b.double().reshape(-1)
    denom = 0.5 * (float(a @ a) + float(b @ b))
    return float(a @ b) / denom if denom > 0 else 0.0

