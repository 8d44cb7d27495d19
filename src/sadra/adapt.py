"""PEFT models for each method: uniform LoRA, SADRA's allocation, AdaLoRA, EVA, a random control."""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .allocate import RankAllocation, allocate_ranks, uniform_budget
from .errors import ModelError
from .models import head_module_names

INITIAL_ADAPTER = "adapter_init"  # a gradient-initialised adapter before training (removed at the end)


def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Adapter, head and total trainable parameters, counted from ``requires_grad``.

    Adapter parameters are LoRA/AdaLoRA factors (``lora_A``, ``lora_B``, ``lora_E``); head
    parameters are the trainable copies of the task head (PEFT's ``modules_to_save``), or, for
    full fine-tuning, the head modules themselves; everything else trainable (the whole
    encoder under full fine-tuning) is counted as adapter parameters.
    """
    total = trainable = head = adapter = 0
    head_names = set()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for h in head_module_names(base):
        head_names.add(h)
    for name, p in model.named_parameters():
        n = p.numel()
        total += n
        if not p.requires_grad:
            continue
        trainable += n
        parts = name.split(".")
        if ".lora_" in name:
            adapter += n
        elif "modules_to_save" in parts or any(part in head_names for part in parts[:3]):
            head += n
        else:
            adapter += n
    return {
        "adapter_params": adapter,
        "head_params": head,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100.0 * trainable / max(total, 1),
    }


def lora_parameter_count(model: nn.Module) -> int:
    """Parameters in LoRA A and B factors of a PEFT model."""
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n)


def uniform_lora_config(targets: Sequence[str], *, r: int, alpha: float, dropout: float, modules_to_save: list[str], task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      modules_to_save=modules_to_save or None, task_type=task_type)


def allocated_lora_config(alloc: RankAllocation, *, dropout: float, alpha_ratio: float, use_rslora: bool,
                          modules_to_save: list[str], task_type: str):
    return alloc.to_lora_config(alpha_ratio=alpha_ratio, use_rslora=use_rslora, lora_dropout=dropout,
                                modules_to_save=modules_to_save or None, task_type=task_type)


def random_allocation(shapes: Mapping[str, tuple[int, int]], seed: int, **alloc_kwargs: Any) -> RankAllocation:
    """SADRA's allocation fed i.i.d. log-normal scores: the control for "does curvature matter?".

    Log-normal(0, 1) scores spread ranks over the clamp range about as widely as measured
    curvature does; same budget, clamps and rounding as :func:`allocate_ranks`.
    """
    rng = np.random.default_rng(10_000 + int(seed))
    scores = {n: float(v) for n, v in zip(shapes, rng.lognormal(0.0, 1.0, size=len(shapes)))}
    alloc = allocate_ranks(scores, shapes=dict(shapes), **alloc_kwargs)
    alloc.estimator = alloc.rule = "random"
    return alloc


def adalora_config(targets: Sequence[str], *, total_step: int, settings: Mapping[str, Any], dropout: float,
                   modules_to_save: list[str], task_type: str):
    """PEFT's AdaLoRA with its schedule derived from the run's number of optimizer steps."""
    from peft import AdaLoraConfig

    tinit = int(round(settings["tinit_ratio"] * total_step))
    tfinal = int(round(settings["tfinal_ratio"] * total_step))
    if tinit + tfinal >= total_step:
        # PEFT requires a non-empty budgeting phase; short runs get at least one step of it.
        tfinal = max(0, total_step - tinit - 1)
        tinit = min(tinit, max(0, total_step - tfinal - 1))
    if total_step < 2:
        raise ModelError(f"AdaLoRA needs at least 2 optimizer steps, got {total_step}; train on more rows or epochs")
    return AdaLoraConfig(
        init_r=settings["init_r"], target_r=settings["target_r"], lora_alpha=settings["alpha"], lora_dropout=dropout,
        tinit=tinit, tfinal=tfinal, deltaT=settings["deltaT"], beta1=settings["beta1"], beta2=settings["beta2"],
        orth_reg_weight=settings["orth_reg_weight"], total_step=total_step, target_modules=list(targets),
        modules_to_save=modules_to_save or None, task_type=task_type,
    )


def adalora_ranks(model: nn.Module) -> dict[str, int]:
    """Current AdaLoRA ranks: the non-zero entries of each module's singular-value vector."""
    out = {}
    for name, module in model.named_modules():
        lora_e = getattr(module, "lora_E", None)
        if isinstance(lora_e, nn.ParameterDict) and "default" in lora_e:
            key = name.split("base_model.model.", 1)[-1]
            out[key] = int((lora_e["default"].detach() != 0).sum().item())
    return out


def lora_ranks(model: nn.Module) -> dict[str, int]:
    """Ranks of the LoRA layers of a PEFT model, keyed by the base model's module names."""
    out = {}
    for name, module in model.named_modules():
        r = getattr(module, "r", None)
        if isinstance(r, dict) and "default" in r and hasattr(module, "lora_A"):
            out[name.split("base_model.model.", 1)[-1]] = int(r["default"])
    return out


def probe_options(settings: Mapping[str, Any], *, has_head: bool = True) -> dict[str, Any]:
    """``estimate_sensitivity`` keyword arguments from run settings (shared by ``sadra probe`` and runs)."""
    pr = settings["probe"]
    return dict(estimator=pr["estimator"], mode=pr["mode"], max_probes=pr["max_probes"], min_probes=pr["min_probes"],
                rtol=pr["rtol"], probes_per_batch=pr["probes_per_batch"],
                head_warmup_steps=pr["head_warmup_steps"] if has_head else 0, head_warmup_lr=pr["head_warmup_lr"],
                spectrum_rank=settings["allocate"]["max_rank"] + 1)


def allocation_options(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``allocate_ranks`` keyword arguments from run settings; the budget is uniform ``lora.r``."""
    al = settings["allocate"]
    return dict(rule=al["rule"], budget=f"lora-r{settings['lora']['r']}", base_rank=settings["lora"]["r"],
                min_rank=al["min_rank"], max_rank=al["max_rank"], prune=al["prune"], normalize=al["normalize"],
                power=al["power"])


def build_method_model(ctx, model: nn.Module):
    """The model to train for ``ctx.method`` (None: ``model`` itself, i.e. full fine-tuning)."""
    from peft import get_peft_model

    method, st = ctx.method, ctx.settings
    if method == "full":
        return None
    if method == "adalora":
        return get_peft_model(model, adalora_config(ctx.targets, total_step=ctx.total_steps, settings=st["adalora"],
                                                    dropout=st["lora"]["dropout"], modules_to_save=ctx.heads,
                                                    task_type=ctx.task_type))
    if method == "eva":
        return _eva_for_run(ctx, model)
    alloc = None if method in ("lora", "lora-ga") else _allocation_for_run(ctx, model)
    if alloc is None:
        lora = st["lora"]
        config = uniform_lora_config(ctx.targets, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                     modules_to_save=ctx.heads, task_type=ctx.task_type)
    else:
        config = allocated_lora_config(alloc, dropout=st["lora"]["dropout"], alpha_ratio=st["allocate"]["alpha_ratio"],
                                       use_rslora=st["allocate"]["use_rslora"], modules_to_save=ctx.heads,
                                       task_type=ctx.task_type)
    ctx.info["init"] = st["init"]
    if st["init"] == "gradient":
        peft_model = _gradient_initialised(ctx, model, config)
    else:
        peft_model = get_peft_model(model, config)
    if alloc is not None:
        check_built_ranks(peft_model, alloc.ranks)
        ctx.info["uniform_allocation"] = is_uniform_lora(alloc, ctx.targets, st)
    return peft_model


def is_uniform_lora(alloc: RankAllocation, targets: Sequence[str], settings: Mapping[str, Any]) -> bool:
    """Whether ``alloc`` builds exactly the adapter of uniform LoRA under ``settings``: every target at
    ``lora.r`` with LoRA's alpha, and PEFT's initialisation."""
    lora, al = settings["lora"], settings["allocate"]
    return (set(alloc.ranks) == set(targets) and all(r == lora["r"] for r in alloc.ranks.values())
            and al["alpha_ratio"] * lora["r"] == lora["alpha"] and not al["use_rslora"]
            and settings["init"] == "default")


def check_built_ranks(peft_model: nn.Module, ranks: Mapping[str, int]) -> None:
    """ModelError unless every module's LoRA rank in the built model is the allocated one.

    PEFT skips pattern keys that match no module without a word, so a renamed module would
    otherwise train at the default rank.
    """
    built = lora_ranks(peft_model)
    wrong = [(n, r, built.get(n, 0)) for n, r in ranks.items() if built.get(n, 0) != r]
    extra = sorted(set(built) - set(ranks))
    if wrong or extra:
        first = f"{wrong[0][0]} has rank {wrong[0][2]}, allocated {wrong[0][1]}" if wrong else f"{extra[0]} was not allocated"
        raise ModelError(f"the built adapter does not match the allocation ({len(wrong) + len(extra)} modules; "
                         f"{first}); the allocation was made for another model")


def _allocation_for_run(ctx, model: nn.Module) -> RankAllocation:
    from .distributed import check_same_across_processes, is_main_process

    st = ctx.settings
    if ctx.method == "random":
        opts = allocation_options(st)
        opts.pop("rule")
        alloc = random_allocation(ctx.shapes, ctx.seed, **opts)
    elif st["allocation_file"]:
        alloc = RankAllocation.load(st["allocation_file"])
        check_allocation(alloc, model)
    else:
        alloc = allocate_ranks(_probe_for_run(ctx, model), **allocation_options(st))
    # Every process must build the same shapes, or DDP fails in obscure ways: check loudly here.
    check_same_across_processes(alloc.ranks, "rank allocations")
    if is_main_process():
        alloc.save(ctx.out / "allocation.json")
    nonzero = [r for r in alloc.ranks.values() if r > 0]
    ctx.info.update(ranks_min=min(nonzero), ranks_max=max(nonzero), rule=alloc.rule)
    return alloc


def _probe_for_run(ctx, model: nn.Module):
    """The run's probe report: a given file, the run's own from before a restart, or a new probe."""
    from .distributed import is_main_process
    from .probe import SensitivityReport, estimate_sensitivity

    st = ctx.settings
    path = ctx.out / "probe.json"
    given = st["probe_file"]
    if given or path.exists():  # a resumed run's own report is the one it would compute again
        report = SensitivityReport.load(given or path)
        report.check_model(model)
    else:
        pr = st["probe"]
        batches = ctx.make_batches(pr["num_batches"], pr["batch_size"], ctx.seed)
        report = estimate_sensitivity(model, batches, targets=ctx.targets, seed=ctx.seed, progress=ctx.progress,
                                      **probe_options(st, has_head=bool(ctx.heads)))
    if is_main_process():
        report.save(path)
    ctx.info.update(probe_seconds=round(report.seconds, 3), probes=report.probes, estimator=report.estimator)
    return report


def _gradient_initialised(ctx, model: nn.Module, config):
    """PEFT's LoRA-GA on the chosen ranks: each adapter starts from the calibration gradient's top
    singular directions (PEFT reads each module's own rank, so a rank pattern is honoured)."""
    from peft import LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    from .distributed import is_main_process
    from .probe import to_device

    pr = ctx.settings["probe"]
    batches = ctx.make_batches(pr["num_batches"], pr["batch_size"], ctx.seed)
    config.init_lora_weights = "lora_ga"
    config.lora_ga_config = LoraGAConfig()

    def train_step():
        for batch in batches:
            model(**to_device(batch, ctx.device)).loss.backward()

    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), warnings.catch_warnings():
        # PEFT collects LoRA-GA's gradients with full backward hooks; with frozen inputs torch says so on every call.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        torch.manual_seed(ctx.seed)
        preprocess_loraga(model, config, train_step)
    peft_model = get_peft_model(model, config)
    if is_main_process():
        # The initial adapter, saved as plain LoRA, lets the final one be converted for the unchanged base.
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(str(ctx.out / INITIAL_ADAPTER), safe_serialization=True)
        peft_model.peft_config["default"].init_lora_weights = "lora_ga"
    return peft_model


def _eva_for_run(ctx, model: nn.Module):
    from .distributed import is_main_process
    from .io import write_json

    st = ctx.settings
    ev, lora = st["eva"], st["lora"]
    batches = [{k: v.to(ctx.device) for k, v in b.items()} for b in ctx.make_batches(ev["num_batches"], ev["batch_size"],
                                                                                        ctx.seed)]
    peft_model = eva_model(model, ctx.targets, batches, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                           settings=ev, modules_to_save=ctx.heads, task_type=ctx.task_type, progress=ctx.progress)
    ranks = lora_ranks(peft_model)
    stats = peft_model.sadra_eva_stats
    ctx.info.update(eva_passes=stats["passes"], eva_layers_capped=stats["layers_capped"])
    if is_main_process():
        write_json(ctx.out / "allocation.json", {
            "method": "eva", "ranks": {t: ranks.get(t, 0) for t in ctx.targets},
            "shapes": {k: list(v) for k, v in ctx.shapes.items()}, "budget": uniform_budget(ctx.shapes, lora["r"]),
            "params": sum(r * sum(ctx.shapes[t]) for t, r in ranks.items() if t in ctx.shapes),
            "eva_passes": stats["passes"], "eva_layers_capped": stats["layers_capped"]})
    return peft_model


def check_allocation(alloc: RankAllocation, model: nn.Module) -> None:
    """An allocation from a file must name this model's linear modules with their shapes."""
    from .models import target_shapes

    shapes = target_shapes(model, alloc.ranks)
    for name, shape in shapes.items():
        if tuple(alloc.shapes.get(name, shape)) != tuple(shape):
            raise ModelError(f"allocation was made for another model: {name} is {shape} here but "
                             f"{tuple(alloc.shapes[name])} in the file; re-run 'sadra allocate' on this model's probe")


def eva_model(model: nn.Module, targets: Sequence[str], batches: Sequence[Any], *, r: int, alpha: float, dropout: float,
              settings: Mapping[str, Any], modules_to_save: list[str], task_type: str, progress: bool = False):
    """A PEFT model initialised and rank-redistributed by EVA on ``batches`` (PEFT's own code).

    PEFT cycles over the batches until every layer's components agree with the previous pass;
    :func:`bounded_eva_init` caps that at ``settings["max_passes"]`` passes. Returns the model;
    ``model.sadra_eva_stats`` says how many passes ran and how many layers hit the cap.
    """
    from peft import EvaConfig, LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights="eva",
        eva_config=EvaConfig(rho=settings["rho"], tau=settings["tau"], use_label_mask=False,
                             whiten=settings["whiten"], adjust_scaling_factors=settings["adjust_scaling_factors"]),
        modules_to_save=modules_to_save or None, task_type=task_type,
    )
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    stats = bounded_eva_init(peft_model, list(batches), max_passes=settings["max_passes"], progress=progress)
    peft_model.sadra_eva_stats = stats
    return peft_model


class _BoundedEvaForward:
    """PEFT's EVA forward with a cap on passes over the calibration batches.

    PEFT loops ``for inputs in cycle(batches)`` until every SVD hook reports convergence and
    has no limit of its own. Past the cap this forward marks the hooks still attached (the
    layers not yet converged for their current rank) as converged and skips the model: PEFT
    then ends its loop on the next step, and each such layer keeps the components it has.
    """

    def __init__(self, forward_fn, num_batches: int, max_passes: int):
        self.forward_fn = forward_fn
        # PEFT's first call (the input-hash check) is not a pass of the SVD.
        self.limit = 1 + num_batches * max_passes
        self.num_batches = num_batches
        self.calls = 0
        self.capped: set[str] = set()

    def __call__(self, model, inputs):
        self.calls += 1
        if self.calls <= self.limit:
            return self.forward_fn(model, inputs)
        from peft.tuners.lora.eva import SVDHook

        for name, module in model.named_modules():
            for hook in list(module._forward_hooks.values()):
                if isinstance(hook, SVDHook):
                    if not hasattr(hook.svd, "components_"):
                        raise ModelError(f"EVA saw too few tokens at {name} to compute {hook.n_components} components; "
                                         "give more or longer calibration batches (eva.num_batches, eva.batch_size)")
                    hook.converged = torch.ones_like(hook.converged)
                    self.capped.add(name)
        return None

    @property
    def passes(self) -> float:
        return round(min(self.calls - 1, self.limit - 1) / self.num_batches, 2)


def bounded_eva_init(peft_model: nn.Module, batches: Sequence[Any], *, max_passes: int, progress: bool = False,
                     forward_fn=None, prepare_model_inputs_fn="default", prepare_layer_inputs_fn="default") -> dict[str, Any]:
    """``peft.initialize_lora_eva_weights`` with at most ``max_passes`` passes over ``batches``.

    Returns ``{"passes", "layers_capped", "capped"}``: the passes run and the layers that had
    not converged at the cap (they keep their current components). The ``*_fn`` arguments are
    PEFT's; ``"default"`` keeps PEFT's defaults (token inputs with an attention mask).
    """
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora import eva as peft_eva

    if isinstance(max_passes, bool) or not isinstance(max_passes, int) or max_passes < 1:
        raise ModelError(f"EVA's max_passes must be a positive integer, got {max_passes!r}")
    if not batches:
        raise ModelError("EVA needs at least one calibration batch")
    bounded = _BoundedEvaForward(forward_fn or peft_eva.forward_fn_dict, len(batches), max_passes)
    kwargs = {}
    if prepare_model_inputs_fn != "default":
        kwargs["prepare_model_inputs_fn"] = prepare_model_inputs_fn
    if prepare_layer_inputs_fn != "default":
        kwargs["prepare_layer_inputs_fn"] = prepare_layer_inputs_fn
    initialize_lora_eva_weights(peft_model, dataloader=list(batches), forward_fn=bounded,
                                show_progress_bar=progress, **kwargs)
    return {"passes": bounded.passes, "layers_capped": len(bounded.capped), "capped": sorted(bounded.capped)}
