"""PEFT models for each method: uniform LoRA, SADRA's allocation, AdaLoRA, EVA, a random control."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
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
    """A PEFT model initialised and rank-redistributed by EVA on ``batches`` (PEFT's own code)."""
    from peft import EvaConfig, LoraConfig, get_peft_model, initialize_lora_eva_weights

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), init_lora_weights="eva",
        eva_config=EvaConfig(rho=settings["rho"], tau=settings["tau"], use_label_mask=False,
                             whiten=settings["whiten"], adjust_scaling_factors=settings["adjust_scaling_factors"]),
        modules_to_save=modules_to_save or None, task_type=task_type,
    )
    peft_model = get_peft_model(model, config, low_cpu_mem_usage=True)
    initialize_lora_eva_weights(peft_model, dataloader=list(batches), show_progress_bar=progress)
    return peft_model
