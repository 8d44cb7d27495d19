"""Curvature probes: how sensitive the loss is to each target module's weight.

Two estimators of a per-module curvature trace, both computed on a pretrained model before
any training, on a few calibration batches:

``hutchinson``
    Hutchinson's estimator of ``tr(H_ii)``, the diagonal block of the loss Hessian for module
    i's weight: ``E[v_i . (H v)_i]`` over Rademacher vectors ``v``. Two modes:

    * ``per_module``: ``v`` is non-zero on one block at a time, so ``v_i . (H_ii v_i)`` has only
      the block's own off-diagonal terms as noise. One Hessian-vector product (HvP) per module
      per round, all reusing the batch's first-order graph, which is built once.
    * ``joint``: one HvP per round with ``v`` over every block. ``v_i . (H v)_i`` is still
      unbiased for block i, but every other block's cross terms add variance.

``fisher``
    The Monte-Carlo Fisher (Gauss-Newton) trace: labels are drawn from the model's own
    predictive distribution, the summed loss is differentiated once, and
    ``||g_i||^2 / n`` estimates block i's Fisher trace for ``n`` sampled targets (the
    sampled-label gradients have zero mean, so cross terms vanish in expectation). It is
    positive semi-definite, costs one gradient per round, and is the default: on the default
    model it gives a stable module ranking at a few percent of a training run's time, where
    Hutchinson's does not (benchmarks/README.md).

The model is probed in eval mode (no dropout); only the target weights get gradients; every
parameter's ``requires_grad`` and every module's training flag are restored afterwards. The
probe runs under the math attention kernel, whose double backward exists everywhere.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .errors import CurvatureError, DataError, ModelError
from .models import find_targets, head_module_names, target_shapes

ESTIMATORS = ("hutchinson", "fisher")
MODES = ("per_module", "joint")


def default_probes_per_batch(estimator: str, mode: str = "per_module") -> int:
    """Rounds that share one batch when ``probes_per_batch`` is not given.

    Sharing saves the batch's forward (and Hutchinson's first-order graph) but draws fewer
    batches, so it pays only where that work is a large part of a round: a joint Hutchinson
    round is one HvP, and its graph is a quarter of it (8 rounds per graph bring a probe from
    3.1x to about 2.3x a gradient, benchmarks/README.md). A per-module round is 36 HvPs on one
    graph already, and a Fisher round's noise is mostly the batch itself: one round per batch.
    """
    return 8 if estimator == "hutchinson" and mode == "joint" else 1


LossFn = Callable[[nn.Module, Any], torch.Tensor]
LogitsFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass
class SensitivityReport:
    """Per-module curvature estimates with their standard errors."""

    scores: dict[str, float]
    stderr: dict[str, float]
    num_params: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    probes: int
    estimator: str
    seconds: float
    samples: dict[str, list[float]] = field(default_factory=dict)
    mode: str | None = None
    seed: int = 0
    converged: bool = False
    model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def relative_stderr(self) -> dict[str, float]:
        return {n: (self.stderr[n] / abs(s) if s else math.inf) for n, s in self.scores.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SensitivityReport":
        try:
            known = set(cls.__dataclass_fields__)
            kwargs = {k: v for k, v in data.items() if k in known}
            kwargs["shapes"] = {str(k): (int(v[0]), int(v[1])) for k, v in data["shapes"].items()}
            kwargs["scores"] = {str(k): float(v) for k, v in data["scores"].items()}
            kwargs["stderr"] = {str(k): float(v) for k, v in data["stderr"].items()}
            kwargs["num_params"] = {str(k): int(v) for k, v in data["num_params"].items()}
            report = cls(**kwargs)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise DataError(
                f"not a SADRA probe report ({type(exc).__name__}: {exc}); create one with 'sadra probe --out probe.json'"
            ) from None
        if set(report.scores) != set(report.shapes):
            raise DataError("probe report's scores and shapes name different modules; re-run 'sadra probe'")
        return report

    @classmethod
    def from_json(cls, text: str) -> "SensitivityReport":
        from .io import parse_json_object

        return cls.from_dict(parse_json_object(text, "probe JSON", "re-run 'sadra probe'"))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityReport":
        from .io import read_text

        return cls.from_json(read_text(path, what="probe JSON"))

    def check_model(self, model: nn.Module) -> None:
        """Raise ModelError unless every probed module exists in ``model`` with the same shape."""
        shapes = target_shapes(model, self.shapes)
        for n, s in self.shapes.items():
            if tuple(shapes[n]) != tuple(s):
                raise ModelError(
                    f"probe report was made for another model: {n} is {shapes[n]} here but {tuple(s)} in the report; re-run 'sadra probe' on this model"
                )


# --- defaults for Hugging Face models ---------------------------------------------------------

def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k != "labels"}


def hf_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a Hugging Face model computes from a batch that includes ``labels``."""
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise ModelError("the model returned no loss; include 'labels' in each batch or pass loss_fn")
    return out.loss


def hf_logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model(**_model_inputs(batch)).logits


def _sampled_target_loss(logits: torch.Tensor, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """Summed loss against targets drawn from the model's own predictive distribution.

    Classification logits ``(n, C)`` draw a class per row; a single output (regression) draws
    ``y ~ N(f, 1)``; causal-LM logits ``(B, T, V)`` draw the next token at each position
    whose label is not -100 (shifted as the model's own loss shifts them).
    """
    logits = logits.float()
    if logits.ndim == 3:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        flat = logits[:, :-1, :]
        if labels is not None:
            mask = labels[:, 1:] != -100
        else:
            mask = torch.ones(flat.shape[:2], dtype=torch.bool, device=flat.device)
        flat = flat[mask]
    else:
        flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    if n == 0:
        raise DataError("a calibration batch has no positions to score (all labels are -100); give longer texts")
    if flat.shape[-1] == 1:
        noise = torch.randn(flat.shape, generator=generator).to(flat.device)
        target = (flat + noise).detach()
        return 0.5 * ((flat - target) ** 2).sum(), n
    with torch.no_grad():
        probs = torch.softmax(flat, dim=-1).cpu()
        sampled = torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(flat.device)
    return nn.functional.cross_entropy(flat, sampled, reduction="sum"), n


# --- the probe -------------------------------------------------------------------------------

@contextlib.contextmanager
def _gradients_only_on(model: nn.Module, params: Sequence[nn.Parameter]):
    """Eval mode (no dropout) with gradients on ``params`` only; every flag restored on exit."""
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    train_flags = [(m, m.training) for m in model.modules()]
    try:
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, flag in train_flags:
            m.training = flag


@contextlib.contextmanager
def _probe_state(model: nn.Module, params: Sequence[nn.Parameter]):
    """Eval mode, gradients on ``params`` only, math attention; all restored on exit."""
    with _gradients_only_on(model, params), _math_attention():
        yield


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch: eager attention is then needed
        return contextlib.nullcontext()


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


def _rademacher(shape: torch.Size, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    # Drawn on the CPU from one seeded generator, so results do not depend on the device.
    v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(like.device)
    return v.to(like.dtype).mul_(2).sub_(1)


def warm_up_head(
    model: nn.Module,
    batches: Sequence[Any],
    steps: int,
    *,
    lr: float = 1e-3,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    cache_bytes: int = 1 << 29,
) -> dict[str, torch.Tensor]:
    """Train only the task head for ``steps`` steps; returns the head's previous state.

    A freshly initialised head passes almost no curvature back to the encoder; a short
    warm-up makes the probe measure the task rather than the head's random init.

    The base model is frozen and in eval mode here, so its output for a batch never changes:
    it is computed once per batch and replayed for every later step on that batch (the same
    numbers, one encoder forward per batch instead of per step). The replay is used only when
    each loss call runs the base model exactly once and the cached outputs fit ``cache_bytes``.
    """
    heads = head_module_names(model)
    if not heads:
        raise ModelError(f"{type(model).__name__} has no task head outside its base model; set head warm-up steps to 0")
    params = [p for h in heads for p in getattr(model, h).parameters()]
    saved = {f"{h}.{k}": v.detach().clone() for h in heads for k, v in getattr(model, h).state_dict().items()}
    loss_fn = loss_fn or hf_loss
    device = next(model.parameters()).device
    base = getattr(model, model.base_model_prefix)
    try:
        with _gradients_only_on(model, params):
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            replay = _BaseOutputReplay(base, len(batches), cache_bytes) if steps > len(batches) else None
            for step in range(steps):
                b_idx = step % len(batches)
                batch = _to_device(batches[b_idx], device)
                with replay.serving(b_idx) if replay is not None else contextlib.nullcontext():
                    loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise CurvatureError(f"non-finite loss at head warm-up step {step}; lower the warm-up learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        for p in params:
            p.grad = None
    return saved


class _BaseOutputReplay:
    """Records a frozen base model's output per batch on first use and replays it afterwards.

    Falls back to running the base model (``active`` turns False) as soon as a loss call runs
    it other than exactly once, or the recorded outputs would exceed ``cache_bytes``.
    """

    def __init__(self, base: nn.Module, num_batches: int, cache_bytes: int):
        self.base = base
        self.outputs: list[Any] = [None] * num_batches
        self.cache_bytes = cache_bytes
        self.used_bytes = 0
        self.active = True

    @contextlib.contextmanager
    def serving(self, b_idx: int):
        if not self.active:
            yield
            return
        produced = []
        cached = self.outputs[b_idx]
        original = self.base.forward
        own = self.base.__dict__.get("forward")  # an instance-level forward (e.g. an accelerate hook) stays

        def forward(*args, **kwargs):
            out = cached if cached is not None else original(*args, **kwargs)
            produced.append(out)
            return out

        self.base.forward = forward
        try:
            yield
        finally:
            if own is None:
                del self.base.forward  # back to the class's own forward
            else:
                self.base.forward = own
        if len(produced) != 1:
            self.active, self.outputs = False, []
        elif cached is None:
            # Nothing in the output needs grad (the base model is frozen), so it holds no graph.
            self.used_bytes += _tensor_bytes(produced[0])
            if self.used_bytes > self.cache_bytes:
                self.active, self.outputs = False, []
            else:
                self.outputs[b_idx] = produced[0]


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def restore_head(model: nn.Module, saved: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.load_state_dict(dict(saved), strict=False)


def estimate_sensitivity(
    model: nn.Module,
    batches: Sequence[Any],
    *,
    targets: Sequence[str] | str | None = None,
    loss_fn: LossFn | None = None,
    logits_fn: LogitsFn | None = None,
    estimator: str = "fisher",
    mode: str = "per_module",
    max_probes: int = 64,
    min_probes: int = 3,
    rtol: float = 0.1,
    probes_per_batch: int | None = None,
    seed: int = 0,
    head_warmup_steps: int = 0,
    head_warmup_lr: float = 1e-3,
    progress: bool = False,
) -> SensitivityReport:
    """Estimate each target module's curvature trace on calibration ``batches``.

    ``batches`` is a sequence of whatever ``loss_fn(model, batch)`` / ``logits_fn(model, batch)``
    accept (default: Hugging Face dicts with ``labels``). Each probe round gives one sample per
    module; rounds cycle over the batches, ``probes_per_batch`` consecutive rounds sharing a
    batch (its forward and, for Hutchinson, its first-order graph); ``None`` means
    ``default_probes_per_batch(estimator, mode)``. Stops once every module's
    ``stderr / |mean| <= rtol`` (after ``min_probes`` rounds) or at ``max_probes``.

    The default estimator is ``fisher``: on the default model it ranks modules the same way in
    two independent calibrations (Spearman 0.99) at about 3% of a LoRA run's time, where
    Hutchinson's Hessian trace needs far more time for a less stable ranking
    (benchmarks/README.md has the measurements).
    With ``head_warmup_steps > 0`` the task head is trained alone first and restored after.
    """
    if estimator not in ESTIMATORS:
        raise ModelError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
    if mode not in MODES:
        raise ModelError(f"unknown Hutchinson mode {mode!r}; choose one of: {', '.join(MODES)}")
    if probes_per_batch is None:
        probes_per_batch = default_probes_per_batch(estimator, mode)
    for label, value, low in (("max_probes", max_probes, 1), ("min_probes", min_probes, 1),
                              ("probes_per_batch", probes_per_batch, 1), ("head_warmup_steps", head_warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ModelError(f"{label} must be an integer >= {low}, got {value!r}")
    if not (isinstance(rtol, (int, float)) and rtol >= 0 and math.isfinite(rtol)):
        raise ModelError(f"rtol must be a non-negative number, got {rtol!r}")
    batches = list(batches)
    if not batches:
        raise DataError("no calibration batches; give at least one batch from the train split")
    names = find_targets(model, targets)
    shapes = target_shapes(model, names)
    params = [model.get_submodule(n).weight for n in names]
    loss_fn = loss_fn or hf_loss
    logits_fn = logits_fn or hf_logits
    device = params[0].device

    saved_head = None
    start = time.perf_counter()
    if head_warmup_steps:
        saved_head = warm_up_head(model, batches, head_warmup_steps, lr=head_warmup_lr, loss_fn=loss_fn, seed=seed)

    # Round r (one sample per module) belongs to block r // probes_per_batch; a block's rounds share
    # one batch and its first-order graph. Under torch.distributed, block b runs on process
    # b % world_size and all processes step in lockstep, so the pooled samples are exactly those a
    # single process would draw: every round's random vectors come from its own seeded generator.
    world, rank = _dist_world()
    local: list[tuple[int, list[float]]] = []
    sums = torch.zeros(len(names), dtype=torch.float64)
    sumsq = torch.zeros(len(names), dtype=torch.float64)
    done = 0
    converged = False
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_probes, desc=f"probe ({estimator})", unit="probe", leave=False)
    try:
        with _probe_state(model, params):
            step = 0
            while done < max_probes:
                block = step * world + rank
                first = block * probes_per_batch
                rounds_here = range(first, min(first + probes_per_batch, max_probes))
                b_idx = block % len(batches)
                step_sum = torch.zeros(len(names), dtype=torch.float64)
                step_sq = torch.zeros(len(names), dtype=torch.float64)
                # One forward (and for Hutchinson the first-order graph) serves every round of the block.
                shared = batch = None
                if len(rounds_here):
                    batch = _to_device(batches[b_idx], device)
                    if estimator == "hutchinson":
                        shared = _first_order(model, batch, params, loss_fn, b_idx)
                    else:
                        shared = _fisher_logits(model, batch, logits_fn, b_idx)
                for k, r in enumerate(rounds_here):
                    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + r)
                    retain = k + 1 < len(rounds_here)
                    if estimator == "fisher":
                        row = _fisher_round(shared, batch, params, generator, retain)
                    else:
                        row = _hutchinson_round(shared, params, generator, mode, retain)
                    for i, value in enumerate(row):
                        if not math.isfinite(value):
                            raise CurvatureError(
                                f"non-finite curvature ({value}) for module {names[i]} at probe {r} (batch {b_idx}); "
                                "check the inputs and the model's dtype, or use estimator='fisher'"
                            )
                    local.append((r, row))
                    values = torch.tensor(row, dtype=torch.float64)
                    step_sum += values
                    step_sq += values * values
                shared = batch = None
                count = torch.tensor([float(len(rounds_here))], dtype=torch.float64)
                if world > 1:
                    step_sum, step_sq, count = _all_reduce_sum(step_sum, step_sq, count)
                sums += step_sum
                sumsq += step_sq
                done += int(count.item())
                step += 1
                if bar is not None:
                    bar.update(int(count.item()))
                if done >= max(min_probes, 2) and rtol > 0 and done < max_probes:
                    mean = sums / done
                    var = (sumsq - done * mean * mean).clamp_min(0) / (done - 1)
                    se = torch.sqrt(var / done)
                    if bool(torch.all(se <= rtol * mean.abs())):
                        converged = True
                        break
    finally:
        if bar is not None:
            bar.close()
        if saved_head is not None:
            restore_head(model, saved_head)
        for p in params:
            p.grad = None

    if world > 1:
        # Pool the rows as one summed (rounds x modules) tensor: each round is filled by one process.
        table = torch.zeros(max_probes, len(names), dtype=torch.float64)
        filled = torch.zeros(max_probes, dtype=torch.float64)
        for r, row in local:
            table[r] = torch.tensor(row, dtype=torch.float64)
            filled[r] = 1.0
        table, filled = _all_reduce_sum(table, filled)
        local = [(r, table[r].tolist()) for r in range(max_probes) if filled[r] > 0]
    local.sort(key=lambda item: item[0])
    rounds = len(local)
    samples = [[row[i] for _, row in local] for i in range(len(names))]
    if not converged and rtol > 0 and rounds >= max(min_probes, 2):
        converged = all(_stderr(s) <= rtol * abs(_mean(s)) for s in samples)
    seconds = time.perf_counter() - start
    return SensitivityReport(
        scores={n: _mean(s) for n, s in zip(names, samples)},
        stderr={n: _stderr(s) for n, s in zip(names, samples)},
        num_params={n: shapes[n][0] * shapes[n][1] for n in names},
        shapes=shapes,
        probes=rounds,
        estimator=estimator,
        seconds=seconds,
        samples={n: s for n, s in zip(names, samples)},
        mode=mode if estimator == "hutchinson" else None,
        seed=int(seed),
        converged=converged,
        model=getattr(getattr(model, "config", None), "_name_or_path", None),
        meta={"batches": len(batches), "probes_per_batch": probes_per_batch, "rtol": rtol,
              "max_probes": max_probes, "head_warmup_steps": head_warmup_steps},
    )


def _dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sum small CPU float64 tensors over processes (moved to the GPU for NCCL)."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out


def _first_order(model, batch, params, loss_fn, b_idx):
    loss = loss_fn(model, batch)
    if not torch.isfinite(loss):
        raise CurvatureError(f"non-finite loss on calibration batch {b_idx}; check the batch and the model's dtype")
    return torch.autograd.grad(loss, params, create_graph=True)


def _hutchinson_round(grads, params, generator, mode, retain):
    if mode == "joint":
        vs = [_rademacher(p.shape, generator, p) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=retain, allow_unused=True)
        return [_dot(v, hv) for v, hv in zip(vs, hvs)]
    row = []
    last = len(params) - 1
    for i, (g, p) in enumerate(zip(grads, params)):
        v = _rademacher(p.shape, generator, p)
        (hv,) = torch.autograd.grad(g, p, grad_outputs=v, retain_graph=retain or i < last, allow_unused=True)
        row.append(_dot(v, hv))
    return row


def _fisher_logits(model, batch, logits_fn, b_idx):
    logits = logits_fn(model, batch)
    if not torch.isfinite(logits).all():
        raise CurvatureError(f"non-finite logits on calibration batch {b_idx}; check the batch and the model's dtype")
    return logits


def _fisher_round(logits, batch, params, generator, retain):
    loss, n = _sampled_target_loss(logits, batch, generator)
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [(float(_dot(g, g)) / n if g is not None else 0.0) for g in grads]


def _dot(v: torch.Tensor, hv: torch.Tensor | None) -> float:
    if hv is None:  # the loss does not depend on this weight at second order
        return 0.0
    # One BLAS dot in float64: the products of float32 (or half) numbers are exact there and the
    # sum does not depend on how threads split it, so one process and several agree to ~1e-16;
    # no product tensor is allocated.
    return float(torch.dot(v.reshape(-1).double(), hv.reshape(-1).double()))


def _mean(s: Sequence[float]) -> float:
    return sum(s) / len(s) if s else float("nan")


def _stderr(s: Sequence[float]) -> float:
    n = len(s)
    if n < 2:
        return float("inf")
    m = _mean(s)
    var = sum((x - m) ** 2 for x in s) / (n - 1)
    return math.sqrt(var / n)
