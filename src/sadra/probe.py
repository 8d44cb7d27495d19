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

from .distributed import all_reduce_sum, dist_world
from .errors import CurvatureError, DataError, ModelError
from .models import find_targets, head_module_names, target_shapes
from .settings import default_of
from .signals import SIGNALS, Signal, make_signal, register_signal  # noqa: F401  (public names)

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
    sample_batches: list[int] = field(default_factory=list)
    mode: str | None = None
    seed: int = 0
    converged: bool = False
    model: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    spectra: dict[str, list[float]] = field(default_factory=dict)
    spectra_raw: dict[str, list[float]] = field(default_factory=dict)
    spectrum_stability: dict[str, float] = field(default_factory=dict)

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


def _hf_output_with_loss(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    out = model(**batch)
    if getattr(out, "loss", None) is None:
        raise ModelError("the model returned no loss; include 'labels' in each batch or pass loss_fn")
    return out


def hf_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """The loss a Hugging Face model computes from a batch that includes ``labels``."""
    return _hf_output_with_loss(model, batch).loss


def hf_logits(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model(**_model_inputs(batch)).logits


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
def probe_state(model: nn.Module, params: Sequence[nn.Parameter]):
    """Eval mode, gradients on ``params`` only, math attention; all restored on exit."""
    with _gradients_only_on(model, params), _math_attention():
        yield


def _math_attention():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # older torch: eager attention is then needed
        return contextlib.nullcontext()


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Mapping):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return batch


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
        # A private RNG stream: the warm-up must not move torch's global generator, or the adapter
        # initialised after it would depend on whether a probe ran.
        devices = [device] if device.type == "cuda" else []
        with _gradients_only_on(model, params), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            replay = _BaseOutputReplay(base, len(batches), cache_bytes) if steps > len(batches) else None
            for step in range(steps):
                b_idx = step % len(batches)
                batch = to_device(batches[b_idx], device)
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
    estimator: str = default_of("probe.estimator"),
    mode: str = default_of("probe.mode"),
    max_probes: int = default_of("probe.max_probes"),
    min_probes: int = default_of("probe.min_probes"),
    rtol: float = default_of("probe.rtol"),
    probes_per_batch: int | None = None,
    seed: int = 0,
    head_warmup_steps: int = 0,
    head_warmup_lr: float = 1e-3,
    spectrum_rank: int = 33,
    progress: bool = False,
) -> SensitivityReport:
    """Estimate each target module's signal on calibration ``batches``.

    ``estimator`` names a signal in :data:`SIGNALS` (``fisher``, ``hutchinson``, ``gradient``).
    ``batches`` is a sequence of whatever ``loss_fn(model, batch)`` / ``logits_fn(model, batch)``
    accept (default: Hugging Face dicts with ``labels``). Each probe round gives one sample per
    module; rounds cycle over the batches, ``probes_per_batch`` consecutive rounds sharing a
    batch (``None``: the signal's own default). The standard error treats batches as the unit
    (the spread of per-batch means); rounds on one batch only reduce that batch's noise. Stops
    once every module's ``stderr / |mean| <= rtol`` (after ``min_probes`` rounds, and after every
    batch has been seen once) or at ``max_probes``, the bound. A ``one_pass`` signal (``gradient``)
    also stops after one pass over the batches.

    With ``head_warmup_steps > 0`` the task head is trained alone first and restored after.
    ``spectrum_rank`` is the number of singular values the ``gradient`` signal keeps per module.
    """
    signal = make_signal(estimator, mode=mode, spectrum_rank=spectrum_rank)
    probes_per_batch = signal.rounds_per_batch if probes_per_batch is None else probes_per_batch
    _check_probe_args(max_probes, min_probes, probes_per_batch, head_warmup_steps, rtol)
    batches = list(batches)
    if not batches:
        raise DataError("no calibration batches; give at least one batch from the train split")
    if signal.one_pass:  # the gradient signal: one pass over the batches
        max_probes = min(max_probes, len(batches) * probes_per_batch)
    names = find_targets(model, targets)
    shapes = target_shapes(model, names)
    params = [model.get_submodule(n).weight for n in names]
    calls = Calls(loss_fn or hf_loss, logits_fn or hf_logits)
    start = time.perf_counter()
    saved_head = None
    if head_warmup_steps:
        saved_head = warm_up_head(model, batches, head_warmup_steps, lr=head_warmup_lr, loss_fn=calls.loss, seed=seed)
    try:
        with probe_state(model, params):
            rows, converged = _run_rounds(model, batches, params, names, signal, calls, seed=seed,
                                          max_probes=max_probes, min_probes=min_probes, rtol=rtol,
                                          probes_per_batch=probes_per_batch, progress=progress)
            extras = signal.finish(names, shapes)
    finally:
        if saved_head is not None:
            restore_head(model, saved_head)
        for p in params:
            p.grad = None
    return _report(rows, names, shapes, signal, estimator, mode, seed, converged, model, time.perf_counter() - start,
                   extras, meta={"batches": len(batches), "probes_per_batch": probes_per_batch, "rtol": rtol,
                                 "max_probes": max_probes, "head_warmup_steps": head_warmup_steps})


def _check_probe_args(max_probes, min_probes, probes_per_batch, head_warmup_steps, rtol) -> None:
    for label, value, low in (("max_probes", max_probes, 1), ("min_probes", min_probes, 1),
                              ("probes_per_batch", probes_per_batch, 1), ("head_warmup_steps", head_warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ModelError(f"{label} must be an integer >= {low}, got {value!r}")
    if not (isinstance(rtol, (int, float)) and rtol >= 0 and math.isfinite(rtol)):
        raise ModelError(f"rtol must be a non-negative number, got {rtol!r}")


@dataclass
class Calls:
    loss: LossFn
    logits: LogitsFn

    def loss_and_logits(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The true-label loss and the logits: one forward for the Hugging Face defaults, else two calls."""
        if self.loss is hf_loss and self.logits is hf_logits:
            out = _hf_output_with_loss(model, batch)
            return out.loss, out.logits
        return self.loss(model, batch), self.logits(model, batch)


def _run_rounds(model, batches, params, names, signal, calls, *, seed, max_probes, min_probes, rtol, probes_per_batch,
                progress) -> tuple[list[tuple[int, int, list[float]]], bool]:
    """All probe rounds: ``[(round, batch index, one sample per module)]`` and whether it converged.

    Round r belongs to block r // probes_per_batch; a block's rounds share one batch and what the
    signal prepares on it. Under torch.distributed, block b runs on process b % world_size and
    the processes pool their rows after every step, so all of them stop at the same round and
    hold exactly the rows one process would draw: each round's random vectors come from its own
    seeded generator.
    """
    world, rank = dist_world()
    device = params[0].device
    rows: list[tuple[int, int, list[float]]] = []
    bar = _progress_bar(progress and rank == 0, max_probes, signal.name)
    converged, step = False, 0
    try:
        while len(rows) < max_probes:
            block = step * world + rank
            first = block * probes_per_batch
            b_idx = block % len(batches)
            local = []
            if first < max_probes:
                batch = to_device(batches[b_idx], device)
                shared = signal.prepare(model, batch, params, calls, b_idx, first_visit=block < len(batches))
                span = range(first, min(first + probes_per_batch, max_probes))
                for k, r in enumerate(span):
                    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + r)
                    row = signal.sample(shared, batch, params, generator, retain=k + 1 < len(span))
                    _check_finite(row, names, r, b_idx)
                    local.append((r, b_idx, row))
                shared = batch = None
            before = len(rows)
            rows = _pool_rows(rows, local, world, max_probes, len(names))
            step += 1
            if bar is not None:
                bar.update(len(rows) - before)
            seen = len({b for _, b, _ in rows})
            if (rtol > 0 and len(rows) >= max(min_probes, 2) and seen >= min(len(batches), max_probes)
                    and len(rows) < max_probes and _all_within(rows, rtol)):
                converged = True
                break
    finally:
        if bar is not None:
            bar.close()
    if not converged and rtol > 0 and len(rows) >= max(min_probes, 2):
        converged = _all_within(rows, rtol)
    return rows, converged


def _progress_bar(show: bool, total: int, name: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"probe ({name})", unit="probe", leave=False)


def _check_finite(row: Sequence[float], names: Sequence[str], r: int, b_idx: int) -> None:
    for i, value in enumerate(row):
        if not math.isfinite(value):
            raise CurvatureError(
                f"non-finite curvature ({value}) for module {names[i]} at probe {r} (batch {b_idx}); "
                "check the inputs and the model's dtype, or use estimator='fisher'"
            )


def _pool_rows(rows, local, world, max_probes, width):
    """Add this step's rows; under several processes, every process's rows of this step."""
    if world == 1:
        return sorted(rows + local)
    table = torch.zeros(max_probes, width + 2, dtype=torch.float64)
    for r, b_idx, row in local:
        table[r, 0] = 1.0
        table[r, 1] = b_idx
        table[r, 2:] = torch.tensor(row, dtype=torch.float64)
    (table,) = all_reduce_sum(table)
    new = [(r, int(table[r, 1]), table[r, 2:].tolist()) for r in range(max_probes) if table[r, 0] > 0]
    return sorted(rows + new)


def _all_within(rows, rtol: float) -> bool:
    values = [row for _, _, row in rows]
    ids = [b for _, b, _ in rows]
    for i in range(len(values[0])):
        column = [v[i] for v in values]
        if not _batch_stderr(column, ids) <= rtol * abs(_mean(column)):
            return False
    return True


def _batch_stderr(values: Sequence[float], batch_ids: Sequence[int]) -> float:
    """Standard error of the mean with batches as the unit.

    Rounds on the same batch share its noise, so they are averaged first and the spread of the
    per-batch means gives the error. With a single batch there is no between-batch spread to
    measure; the rounds' own spread is then all there is (a lower bound).
    """
    groups: dict[int, list[float]] = {}
    for v, b in zip(values, batch_ids):
        groups.setdefault(b, []).append(v)
    if len(groups) < 2:
        return _stderr(values)
    return _stderr([_mean(g) for g in groups.values()])


def _report(rows, names, shapes, signal, estimator, mode, seed, converged, model, seconds, extras, meta):
    samples = [[row[i] for _, _, row in rows] for i in range(len(names))]
    ids = [b for _, b, _ in rows]
    return SensitivityReport(
        scores={n: _mean(s) for n, s in zip(names, samples)},
        stderr={n: _batch_stderr(s, ids) for n, s in zip(names, samples)},
        num_params={n: shapes[n][0] * shapes[n][1] for n in names},
        shapes=shapes,
        probes=len(rows),
        estimator=estimator,
        seconds=seconds,
        samples={n: s for n, s in zip(names, samples)},
        sample_batches=ids,
        mode=mode if estimator == "hutchinson" else None,
        seed=int(seed),
        converged=converged,
        model=getattr(getattr(model, "config", None), "_name_or_path", None),
        meta={**meta, "signal": signal.describe()},
        **extras,
    )


def _mean(s: Sequence[float]) -> float:
    return sum(s) / len(s) if s else float("nan")


def _stderr(s: Sequence[float]) -> float:
    n = len(s)
    if n < 2:
        return float("inf")
    m = _mean(s)
    var = sum((x - m) ** 2 for x in s) / (n - 1)
    return math.sqrt(var / n)
