"""One call for a user's own training script: calibration data in, a ``peft.LoraConfig`` out.

    config = sadra.auto_lora_config(model, train_dataset, tokenizer=tokenizer, task_type="SEQ_CLS")
    model = peft.get_peft_model(model, config)      # then transformers.Trainer as usual

The probe and the allocation read the same defaults as ``sadra train`` (``sadra.settings``).
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import ConfigError, DataError

_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def auto_lora_config(model, data, *, budget: str | int = "lora-r8", signal: str | None = None, rule: str | None = None,
                     tokenizer=None, targets: Sequence[str] | str | None = None, num_batches: int | None = None,
                     batch_size: int | None = None, max_length: int = 128, seed: int = 0,
                     probe: Mapping[str, Any] | None = None, allocate: Mapping[str, Any] | None = None,
                     progress: bool = False, **lora_kwargs: Any):
    """Probe ``model`` on ``data`` and return a ``LoraConfig`` whose ranks spend ``budget`` unevenly.

    ``data`` is any of: a torch ``DataLoader`` (its first ``num_batches`` batches), a list of batches
    (dicts of tensors), a ``datasets.Dataset`` with tokenised columns (``input_ids``, ... and
    ``label``/``labels``), or a list of texts together with ``tokenizer`` (a causal LM learns the
    texts themselves; a classifier needs ``(text, label)`` pairs). ``budget`` is ``"lora-r<k>"`` (the parameters of uniform rank k on the same
    modules) or a parameter count. ``signal`` and ``rule`` default to ``sadra``'s defaults (with a
    ``signal`` that measures no gradient spectrum, ``rule`` defaults to ``proportional``);
    ``probe`` / ``allocate`` override further settings (``sadra.settings.ProbeSettings`` /
    ``AllocateSettings``). Other keyword arguments go to ``LoraConfig`` (``task_type``,
    ``lora_dropout``, ...); a classifier's fresh head is added to ``modules_to_save`` unless given.

    The returned config carries ``sadra_report`` (the probe's ``SensitivityReport``) and
    ``sadra_allocation`` (the ``RankAllocation``); neither is saved with the adapter.
    """
    from .adapt import allocation_options, probe_options
    from .allocate import allocate_ranks
    from .config import RUN_DEFAULTS, check_signal_and_rule, merge_run
    from .settings import SPECTRUM_SIGNALS, default_rule
    from .models import head_module_names
    from .probe import estimate_sensitivity

    base_rank, budget_value = _parse_budget(budget)
    settings = merge_run(RUN_DEFAULTS, {
        "probe": {**({"estimator": signal} if signal else {}), **dict(probe or {})},
        "allocate": {**({"rule": rule} if rule else {}), **dict(allocate or {})},
        "lora": {"r": base_rank}, "max_length": max_length}, "auto_lora_config")
    if not rule and "rule" not in (allocate or {}):  # the default rule the chosen signal supports
        settings["allocate"]["rule"] = default_rule(settings["probe"]["estimator"] in SPECTRUM_SIGNALS)
    check_signal_and_rule("sadra", settings)
    pr = settings["probe"]
    causal = _is_causal_lm(model)
    batches = calibration_data(data, tokenizer=tokenizer, causal=causal, num_batches=num_batches or pr["num_batches"],
                               batch_size=batch_size or pr["batch_size"], max_length=max_length, seed=seed,
                               pad_token_id=getattr(model.config, "pad_token_id", None))
    heads = [] if causal else head_module_names(model)
    report = estimate_sensitivity(model, batches, targets=targets, seed=seed, progress=progress,
                                  **probe_options(settings, has_head=bool(heads)))
    options = allocation_options(settings)
    if budget_value is not None:
        options["budget"] = budget_value
    alloc = allocate_ranks(report, **options)
    if heads:
        lora_kwargs.setdefault("modules_to_save", heads)
    config = alloc.to_lora_config(alpha_ratio=settings["allocate"]["alpha_ratio"],
                                  use_rslora=settings["allocate"]["use_rslora"], **lora_kwargs)
    config.sadra_report = report
    config.sadra_allocation = alloc
    return config


def _parse_budget(budget: str | int) -> tuple[int, int | None]:
    """``(base rank, parameter count or None)``: ``"lora-r8"`` -> (8, None); ``100000`` -> (8, 100000)."""
    if isinstance(budget, str):
        m = re.fullmatch(r"lora-r(\d+)", budget.strip())
        if not m or int(m.group(1)) < 1:
            raise ConfigError(f"budget {budget!r} is not 'lora-r<k>' (k >= 1) or a parameter count; e.g. budget='lora-r8'")
        return int(m.group(1)), None
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ConfigError(f"budget must be 'lora-r<k>' or a positive parameter count, got {budget!r}")
    return 8, int(budget)


def _is_causal_lm(model) -> bool:
    inner = getattr(model, "get_base_model", lambda: model)()
    return type(inner).__name__.endswith("ForCausalLM")


def calibration_data(data, *, tokenizer=None, causal: bool = False, num_batches: int = 4, batch_size: int = 16,
                     max_length: int = 128, seed: int = 0, pad_token_id: int | None = None) -> list[dict[str, Any]]:
    """Calibration batches (dicts of tensors) from the kinds of ``data`` :func:`auto_lora_config` takes."""
    from torch.utils.data import DataLoader

    if isinstance(data, DataLoader):
        batches = [dict(b) for _, b in zip(range(num_batches), data)]
    elif _is_dataset(data):
        batches = _dataset_batches(data, tokenizer, num_batches, batch_size, seed, pad_token_id)
    elif isinstance(data, (list, tuple)) and data and all(_is_text(x) for x in data):
        batches = _text_batches(list(data), tokenizer, causal, num_batches, batch_size, max_length, seed)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(x, Mapping) for x in data):
        batches = [dict(b) for b in data]
    else:
        raise DataError(f"calibration data of type {type(data).__name__} is not understood; pass a DataLoader, a "
                        "list of batches (dicts of tensors), a tokenised datasets.Dataset or a list of texts with tokenizer=")
    if not batches:
        raise DataError("the calibration data gave no batches; pass at least one batch of rows")
    return [_as_tensors(b) for b in batches]


def _is_text(x) -> bool:
    """A text, or a (text, label) pair."""
    return isinstance(x, str) or (isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str)
                                  and isinstance(x[1], (int, float, np.integer, np.floating)))


def _is_dataset(data) -> bool:
    return type(data).__name__ == "Dataset" and hasattr(data, "column_names") and hasattr(data, "select")


def _dataset_batches(ds, tokenizer, num_batches: int, batch_size: int, seed: int, pad_token_id: int | None):
    if "input_ids" not in ds.column_names:
        raise DataError(f"the dataset has no input_ids column (columns: {', '.join(ds.column_names)}); tokenise it "
                        "first, e.g. ds.map(lambda r: tokenizer(r['text']), batched=True)")
    if "label" in ds.column_names and "labels" not in ds.column_names:
        ds = ds.rename_column("label", "labels")
    ds = ds.select_columns([c for c in _MODEL_INPUTS if c in ds.column_names])
    from .data import subsample

    rows = [ds[int(i)] for i in subsample(range(len(ds)), num_batches * batch_size, seed)]
    pad = _padder(tokenizer, pad_token_id)
    return [pad(rows[k:k + batch_size]) for k in range(0, len(rows), batch_size)]


def _padder(tokenizer, pad_token_id: int | None):
    """Right-pads a list of rows: ids with the pad token, masks with 0, token labels with -100."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else (pad_token_id or 0)
    fill = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0, "labels": -100}

    def pad(rows: list[Mapping[str, Any]]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        out = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if isinstance(values[0], (list, tuple)):
                values = [list(v) + [fill[key]] * (width - len(v)) for v in values]
            out[key] = torch.tensor(values)
        if "attention_mask" not in out:
            out["attention_mask"] = torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                                  for r in rows])
        return out

    return pad


def _text_batches(texts: list[str], tokenizer, causal: bool, num_batches: int, batch_size: int, max_length: int,
                  seed: int):
    if tokenizer is None:
        raise ConfigError("a list of texts needs tokenizer=...; or pass tokenised batches")
    from .lm import lm_batch

    import torch

    labelled = isinstance(texts[0], tuple)
    if labelled != all(isinstance(t, tuple) for t in texts):
        raise DataError("mix of texts and (text, label) pairs; give one kind")
    if not causal and not labelled:
        raise DataError("a classifier is probed with labels: pass (text, label) pairs, a tokenised Dataset with a "
                        "label column, or batches with labels")
    need = min(len(texts), num_batches * batch_size)
    picks = np.random.default_rng(seed).choice(len(texts), size=need, replace=False)
    chunks = [[texts[i] for i in picks[k:k + batch_size]] for k in range(0, need, batch_size)]
    if causal:
        return [lm_batch([t[0] if labelled else t for t in chunk], tokenizer, max_length) for chunk in chunks]
    batches = []
    for chunk in chunks:
        batch = dict(tokenizer([t for t, _ in chunk], truncation=True, max_length=max_length, padding=True,
                               return_tensors="pt"))
        batch["labels"] = torch.tensor([y for _, y in chunk])
        batches.append(batch)
    return batches


def _as_tensors(batch: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    out = {}
    for key, value in batch.items():
        out[key] = value if torch.is_tensor(value) or not isinstance(value, (list, tuple, np.ndarray)) \
            else torch.as_tensor(np.asarray(value))
    return out
