"""PEFT models for each method: uniform LoRA, SADRA's allocation, AdaLoRA, EVA, a random control."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .allocate import RankAllocation, allocate_ranks
from .errors import ModelError
from .models import head_module_names


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
    alloc.estimator = "random"
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
