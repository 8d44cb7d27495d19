"""One fine-tuning run with one method, through the Hugging Face Trainer.

``run_glue(task, method, seed, out_dir, settings)`` (GLUE, validation metrics) and
``run_causal_lm(text_file, method, seed, out_dir, settings)`` (held-out perplexity) write into
``out_dir``:

* ``config.yaml``      the resolved settings of the run
* ``probe.json``       the curvature report (SADRA variants)
* ``allocation.json``  the ranks (SADRA variants, random control; EVA and AdaLoRA's final ranks)
* ``train_log.jsonl``  the Trainer's log: loss per logging step, eval metrics per evaluation
* ``adapter/``         the adapter as safetensors, loadable by ``PeftModel.from_pretrained``
                       (``model/`` with the whole model for full fine-tuning)
* ``metrics.json``     final metrics and costs, written last: its presence means "finished"

Interrupted runs resume from the last checkpoint in ``out_dir/checkpoints``.
"""

from __future__ import annotations

import json
import math
import platform
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml

from . import __version__
from .allocate import RankAllocation, allocate_ranks, uniform_budget
from .config import RUN_DEFAULTS, check_method, merge_run
from .data import calibration_batches, get_task, load_glue, majority_score, split_selection, subsample, tokenize
from .errors import CurvatureError
from .io import atomic_write_text, ensure_dir, write_json
from .metrics import glue_metrics, predictions_from_logits
from .distributed import (check_same_across_processes, is_main_process, local_device, maybe_init_distributed,
                          world_size_from_env)
from .models import find_targets, head_module_names, load_model, target_shapes
from .probe import SensitivityReport, estimate_sensitivity

PEFT_TASK_TYPE = "SEQ_CLS"


def _callbacks():
    from transformers import TrainerCallback

    class AdaLoraUpdate(TrainerCallback):
        """Calls AdaLoRA's budget scheduler after each optimizer step, before gradients are cleared.

        Without it AdaLoRA trains as plain LoRA at init_r: ranks never change.
        """

        def __init__(self, peft_model):
            self.peft_model = peft_model

        def on_optimizer_step(self, args, state, control, **kwargs):
            self.peft_model.base_model.update_and_allocate(state.global_step)

    class FiniteLoss(TrainerCallback):
        """Stops the run with a clear error at the first non-finite logged loss."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise CurvatureError(
                    f"non-finite training loss ({loss}) at step {state.global_step}; lower train.learning_rate or check the data"
                )

    return AdaLoraUpdate, FiniteLoss


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # Peak resident set size of this process (Linux reports KiB).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _set_threads(settings: Mapping[str, Any]) -> None:
    threads = settings["train"].get("threads")
    if threads:
        torch.set_num_threads(int(threads))


def _training_args(tr: Mapping[str, Any], out: Path, seed: int, device: torch.device, progress: bool,
                   steps_per_epoch: int, total_steps: int, evaluate: bool):
    from transformers import TrainingArguments

    per_epoch = tr["evals_per_epoch"] > 1
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=tr["epochs"],
        learning_rate=tr["learning_rate"],
        per_device_train_batch_size=tr["batch_size"],
        per_device_eval_batch_size=tr["eval_batch_size"],
        gradient_accumulation_steps=tr["grad_accum"],
        weight_decay=tr["weight_decay"],
        warmup_steps=int(round(tr["warmup_ratio"] * total_steps)),
        lr_scheduler_type=tr["lr_scheduler"],
        max_grad_norm=tr["max_grad_norm"],
        logging_steps=tr["logging_steps"],
        logging_nan_inf_filter=False,
        eval_strategy=("steps" if per_epoch else "epoch") if evaluate else "no",
        eval_steps=max(1, steps_per_epoch // tr["evals_per_epoch"]) if per_epoch else None,
        save_strategy="steps",
        save_steps=tr["save_steps"],
        save_total_limit=tr["save_total_limit"],
        seed=seed,
        data_seed=seed,
        report_to=[],
        disable_tqdm=not progress,
        remove_unused_columns=False,
        use_cpu=device.type != "cuda",
        dataloader_num_workers=0,
        label_names=["labels"],
        gradient_checkpointing=bool(tr["gradient_checkpointing"]),
        gradient_checkpointing_kwargs={"use_reentrant": False} if tr["gradient_checkpointing"] else None,
        ddp_find_unused_parameters=False,
    )


def _prepare(method: str, settings: Mapping[str, Any], out_dir, header: Mapping[str, Any]):
    from transformers import set_seed

    check_method(method)
    settings = merge_run(RUN_DEFAULTS, dict(settings or {}), "run settings")
    distributed = maybe_init_distributed()
    out = ensure_dir(out_dir, "run folder")
    _set_threads(settings)
    if is_main_process():
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**header, "method": method, **settings}, sort_keys=False))
    set_seed(int(header["seed"]))
    device = local_device()
    return settings, out, device, distributed


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (the Trainer writes it last) parses.

    Newer, half-written checkpoints (a kill during saving) are removed so that neither the
    resume nor the Trainer's checkpoint rotation trips over them.
    """
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for ckpt in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((ckpt / "trainer_state.json").read_text())
            return ckpt
        except (OSError, ValueError):
            if is_main_process():
                shutil.rmtree(ckpt, ignore_errors=True)
    return None


def _fit(trainer, out: Path) -> tuple[float, str | None]:
    last = last_complete_checkpoint(out / "checkpoints")
    resume = str(last) if last else None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return time.perf_counter() - start, resume


def _common_record(settings, method, seed, counts, calibration_seconds, train_seconds, eval_seconds, trained_examples,
                   trainer, resume, device, preset, info, shapes) -> dict[str, Any]:
    return {
        **counts,
        "lora_budget": uniform_budget(shapes, settings["lora"]["r"]),
        "calibration_seconds": round(calibration_seconds, 3),
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "examples_per_second": round(trained_examples / max(train_seconds, 1e-9), 3),
        "peak_memory_mb": round(_peak_memory_mb(device), 1),
        "epochs": settings["train"]["epochs"],
        "optimizer_steps": int(trainer.state.global_step),
        "resumed_from": Path(resume).name if resume else None,
        "model": settings["model"],
        "max_length": settings["max_length"],
        "preset": preset,
        "sadra_version": __version__,
        "torch_version": torch.__version__,
        "device": device.type,
        "processes": world_size_from_env(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **{k: v for k, v in info.items() if k in ("probe_seconds", "probes", "estimator", "rule", "ranks_min", "ranks_max",
                                                   "eva_passes", "eva_layers_capped")},
    }


def _finish(trainer, train_model, out: Path, method: str, shapes, info) -> None:
    if not is_main_process():
        return
    log = [dict(e) for e in trainer.state.log_history]
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(e) + "\n" for e in log))
    if method == "adalora":
        from .adapt import adalora_ranks

        info["final_ranks"] = adalora_ranks(train_model)
        write_json(out / "allocation.json", {"method": "adalora", "ranks": info["final_ranks"],
                                             "shapes": {k: list(v) for k, v in shapes.items()}})
    _save_weights(train_model, out, method)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def glue_rows(spec, settings: Mapping[str, Any]):
    """``(train rows, {split: eval rows}, main split)`` of a GLUE run.

    Seeded subsets; calibration rows come from the train rows only. With
    ``eval_split="selection"`` the run trains on the train file less its selection rows and is
    evaluated on those rows: the dev set is not read at all.
    """
    train_all = load_glue(spec, "train", settings["glue_dir"])
    if settings["eval_split"] == "selection":
        train_all, selection = split_selection(spec, train_all)
        evals = {"selection": subsample(selection, settings["max_eval_samples"], settings["data_seed"])}
    else:
        evals = {split: subsample(load_glue(spec, split, settings["glue_dir"]), settings["max_eval_samples"],
                                  settings["data_seed"]) for split, _ in spec.eval_splits}
    train_rows = subsample(train_all, settings["max_train_samples"], settings["data_seed"])
    return train_rows, evals, next(iter(evals))


def run_glue(task: str, method: str, seed: int, out_dir: str | Path, settings: Mapping[str, Any] | None = None,
             *, progress: bool = True, preset: str | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate one (task, method, seed); returns the final metrics record."""
    from transformers import DataCollatorWithPadding, Trainer

    spec = get_task(task)
    settings, out, device, _ = _prepare(method, settings, out_dir, {"task": spec.name, "seed": seed})
    tr = settings["train"]

    train_rows, eval_splits, main_split = glue_rows(spec, settings)

    model, tokenizer = load_model(settings["model"], spec.num_labels, seed=seed, trust_remote_code=settings["trust_remote_code"])
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    targets = find_targets(model)
    shapes = target_shapes(model, targets)
    heads = head_module_names(model)

    train_ds = tokenize(train_rows, tokenizer, settings["max_length"])
    eval_ds = {s: tokenize(rows, tokenizer, settings["max_length"]) for s, rows in eval_splits.items()}
    steps_per_epoch = math.ceil(len(train_ds) / (tr["batch_size"] * tr["grad_accum"] * world_size_from_env()))
    total_steps = max(1, math.ceil(steps_per_epoch * tr["epochs"]))

    def make_batches(num_batches, batch_size, batch_seed):
        return calibration_batches(train_rows, tokenizer, num_batches=num_batches, batch_size=batch_size,
                                   max_length=settings["max_length"], seed=batch_seed)

    calib_start = time.perf_counter()
    info: dict[str, Any] = {}
    peft_model = _build_method(method, model, settings, seed, targets, shapes, heads, make_batches, total_steps,
                               out, progress, info, device, PEFT_TASK_TYPE)
    calibration_seconds = time.perf_counter() - calib_start if method not in ("full", "lora") else 0.0
    train_model = peft_model if peft_model is not None else model
    counts = _count(train_model)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return glue_metrics(spec, predictions_from_logits(spec, logits), pred.label_ids)

    args = _training_args(tr, out, seed, device, progress, steps_per_epoch, total_steps, evaluate=True)
    AdaLoraUpdate, FiniteLoss = _callbacks()
    callbacks = [FiniteLoss()]
    if method == "adalora":
        callbacks.append(AdaLoraUpdate(peft_model))
    eval_arg = eval_ds[main_split] if len(eval_ds) == 1 else eval_ds
    trainer = Trainer(model=train_model, args=args, train_dataset=train_ds, eval_dataset=eval_arg,
                      data_collator=DataCollatorWithPadding(tokenizer), compute_metrics=compute_metrics,
                      callbacks=callbacks)
    train_seconds, resume = _fit(trainer, out)

    eval_start = time.perf_counter()
    metrics, extra = _final_eval(trainer, eval_ds, main_split)
    train_check = _train_split_check(trainer, train_ds, spec, settings, seed)
    eval_seconds = time.perf_counter() - eval_start
    _finish(trainer, train_model, out, method, shapes, info)

    majority = majority_score(spec, [e.label for e in eval_splits[main_split]])
    at_majority = bool(majority) and abs(metrics[spec.main_metric] - majority[spec.main_metric]) < 1e-9
    record = {
        "task": spec.name,
        "method": method,
        "seed": int(seed),
        "eval_split": settings["eval_split"],
        "metrics": metrics,
        "main_metric": spec.main_metric,
        **({"extra_metrics": extra} if extra else {}),
        "majority_metrics": majority,
        "at_majority_class": at_majority,
        "train_split_metrics": train_check,
        "train_samples": len(train_ds),
        "eval_samples": {s: len(d) for s, d in eval_ds.items()},
        **_common_record(settings, method, seed, counts, calibration_seconds, train_seconds, eval_seconds,
                         len(train_ds) * tr["epochs"], trainer, resume, device, preset, info, shapes),
    }
    if is_main_process():
        write_json(out / "metrics.json", record)
    return record


def run_causal_lm(text_file: str | Path, method: str, seed: int, out_dir: str | Path,
                  settings: Mapping[str, Any] | None = None, *, eval_fraction: float = 0.1, progress: bool = True,
                  preset: str | None = None) -> dict[str, Any]:
    """Fine-tune a causal LM on a text file (one document per line); reports held-out perplexity."""
    from transformers import DataCollatorForLanguageModeling, Trainer

    from .lm import lm_batch, read_documents, split_documents

    settings, out, device, _ = _prepare(method, settings, out_dir, {"task": "causal-lm", "text_file": str(text_file), "seed": seed})
    if method == "eva":
        from .errors import ConfigError

        raise ConfigError("method eva is not wired for causal-LM runs here; use lora, sadra, sadra-fisher, random, adalora or full")
    tr = settings["train"]
    docs = read_documents(text_file)
    train_docs, eval_docs = split_documents(docs, eval_fraction, settings["data_seed"])
    train_docs = train_docs[: settings["max_train_samples"]] if settings["max_train_samples"] else train_docs
    eval_docs = eval_docs[: settings["max_eval_samples"]] if settings["max_eval_samples"] else eval_docs

    model, tokenizer = load_model(settings["model"], task="causal-lm", seed=seed, trust_remote_code=settings["trust_remote_code"])
    model.to(device)
    targets = find_targets(model)
    shapes = target_shapes(model, targets)
    from datasets import Dataset

    def encode(texts):
        enc = tokenizer(texts, truncation=True, max_length=settings["max_length"])
        return Dataset.from_dict({k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")})

    train_ds, eval_ds = encode(train_docs), encode(eval_docs)
    steps_per_epoch = math.ceil(len(train_ds) / (tr["batch_size"] * tr["grad_accum"] * world_size_from_env()))
    total_steps = max(1, math.ceil(steps_per_epoch * tr["epochs"]))
    def make_batches(num_batches, batch_size, batch_seed):
        picks = np.resize(np.random.default_rng(batch_seed).permutation(len(train_docs)), num_batches * batch_size)
        return [lm_batch([train_docs[i] for i in picks[k * batch_size:(k + 1) * batch_size]], tokenizer, settings["max_length"])
                for k in range(num_batches)]

    calib_start = time.perf_counter()
    info: dict[str, Any] = {}
    peft_model = _build_method(method, model, settings, seed, targets, shapes, [], make_batches, total_steps,
                               out, progress, info, device, "CAUSAL_LM")
    calibration_seconds = time.perf_counter() - calib_start if method not in ("full", "lora") else 0.0
    train_model = peft_model if peft_model is not None else model
    counts = _count(train_model)
    args = _training_args(tr, out, seed, device, progress, steps_per_epoch, total_steps, evaluate=True)
    AdaLoraUpdate, FiniteLoss = _callbacks()
    callbacks = [FiniteLoss()] + ([AdaLoraUpdate(peft_model)] if method == "adalora" else [])
    trainer = Trainer(model=train_model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), callbacks=callbacks)
    train_seconds, resume = _fit(trainer, out)
    eval_start = time.perf_counter()
    raw = trainer.evaluate(eval_dataset=eval_ds, metric_key_prefix="final")
    eval_seconds = time.perf_counter() - eval_start
    _finish(trainer, train_model, out, method, shapes, info)
    loss = float(raw["final_loss"])
    record = {
        "task": "causal-lm",
        "method": method,
        "seed": int(seed),
        "metrics": {"loss": loss, "perplexity": float(math.exp(min(loss, 700)))},
        "main_metric": "perplexity",
        "train_samples": len(train_ds),
        "eval_samples": len(eval_ds),
        **_common_record(settings, method, seed, counts, calibration_seconds, train_seconds, eval_seconds,
                         len(train_ds) * tr["epochs"], trainer, resume, device, preset, info, shapes),
    }
    if is_main_process():
        write_json(out / "metrics.json", record)
    return record


def _count(model) -> dict[str, Any]:
    from .adapt import count_parameters

    return count_parameters(model)


def _build_method(method, model, settings, seed, targets, shapes, heads, make_batches, total_steps,
                  out: Path, progress: bool, info: dict, device, task_type: str):
    """The model to train for ``method`` (None: train ``model`` itself, i.e. full fine-tuning).

    ``make_batches(num_batches, batch_size, seed)`` gives calibration batches from the train split.
    """
    from peft import get_peft_model

    from .adapt import (adalora_config, allocated_lora_config, eva_model, lora_ranks, random_allocation,
                        uniform_lora_config)

    lora = settings["lora"]
    alloc_set = settings["allocate"]
    if method == "full":
        return None
    if method == "lora":
        return get_peft_model(model, uniform_lora_config(targets, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                                         modules_to_save=heads, task_type=task_type))
    if method == "adalora":
        return get_peft_model(model, adalora_config(targets, total_step=total_steps, settings=settings["adalora"],
                                                    dropout=lora["dropout"], modules_to_save=heads, task_type=task_type))
    alloc_kwargs = dict(budget=uniform_budget(shapes, lora["r"]), base_rank=lora["r"], min_rank=alloc_set["min_rank"],
                        max_rank=alloc_set["max_rank"], prune=alloc_set["prune"], normalize=alloc_set["normalize"],
                        power=alloc_set["power"])
    if method == "eva":
        ev = settings["eva"]
        batches = [{k: v.to(device) for k, v in b.items()} for b in make_batches(ev["num_batches"], ev["batch_size"], seed)]
        peft_model = eva_model(model, targets, batches, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                               settings=ev, modules_to_save=heads, task_type=task_type, progress=progress)
        ranks = lora_ranks(peft_model)
        stats = peft_model.sadra_eva_stats
        info.update(eva_passes=stats["passes"], eva_layers_capped=stats["layers_capped"])
        if is_main_process():
            write_json(out / "allocation.json", {"method": "eva", "ranks": {t: ranks.get(t, 0) for t in targets},
                                                 "shapes": {k: list(v) for k, v in shapes.items()},
                                                 "budget": uniform_budget(shapes, lora["r"]),
                                                 "params": sum(r * sum(shapes[t]) for t, r in ranks.items() if t in shapes)})
        return peft_model
    if method == "random":
        alloc = random_allocation(shapes, seed, **alloc_kwargs)
    elif settings["allocation_file"]:
        alloc = RankAllocation.load(settings["allocation_file"])
        _check_allocation(alloc, model)
    else:
        # sadra-fisher always probes with the Fisher estimator; sadra with probe.estimator (Fisher by default;
        # the benchmark presets set Hutchinson for their sadra column).
        estimator = "fisher" if method == "sadra-fisher" else settings["probe"]["estimator"]
        probe_path = out / "probe.json"
        given = settings["probe_file"]
        if given or probe_path.exists():  # a given probe, or a resumed run's own (same seed, same report)
            report = SensitivityReport.load(given or probe_path)
            report.check_model(model)
        else:
            pr = settings["probe"]
            batches = make_batches(pr["num_batches"], pr["batch_size"], seed)
            report = estimate_sensitivity(
                model, batches, targets=targets, estimator=estimator, mode=pr["mode"], max_probes=pr["max_probes"],
                min_probes=pr["min_probes"], rtol=pr["rtol"], probes_per_batch=pr["probes_per_batch"], seed=seed,
                head_warmup_steps=pr["head_warmup_steps"] if heads else 0, head_warmup_lr=pr["head_warmup_lr"],
                progress=progress)
        if is_main_process():
            report.save(probe_path)
        info.update(probe_seconds=round(report.seconds, 3), probes=report.probes, estimator=report.estimator)
        alloc = allocate_ranks(report, **alloc_kwargs)
    # Every process must build the same shapes, or DDP fails in obscure ways: check loudly here.
    check_same_across_processes(alloc.ranks, "rank allocations")
    if is_main_process():
        alloc.save(out / "allocation.json")
    nonzero = [r for r in alloc.ranks.values() if r > 0]
    info.update(ranks_min=min(nonzero), ranks_max=max(nonzero))
    config = allocated_lora_config(alloc, dropout=lora["dropout"], alpha_ratio=alloc_set["alpha_ratio"],
                                   use_rslora=alloc_set["use_rslora"], modules_to_save=heads, task_type=task_type)
    return get_peft_model(model, config)


def _check_allocation(alloc: RankAllocation, model) -> None:
    """An allocation from a file must name this model's linear modules with their shapes."""
    from .errors import ModelError

    shapes = target_shapes(model, alloc.ranks)
    for name, shape in shapes.items():
        if tuple(alloc.shapes.get(name, shape)) != tuple(shape):
            raise ModelError(f"allocation was made for another model: {name} is {shape} here but "
                             f"{tuple(alloc.shapes[name])} in the file; re-run 'sadra allocate' on this model's probe")


def _final_eval(trainer, eval_ds: Mapping[str, Any], main_split: str):
    """Metrics of the final model on each validation split (last epoch; no checkpoint selection)."""
    metrics: dict[str, float] = {}
    extra: dict[str, dict[str, float]] = {}
    for split, ds in eval_ds.items():
        raw = trainer.evaluate(eval_dataset=ds, metric_key_prefix="final")
        values = {k[len("final_"):]: float(v) for k, v in raw.items()
                  if k.startswith("final_") and k[len("final_"):] not in ("loss", "runtime", "samples_per_second", "steps_per_second", "epoch")}
        if split == main_split:
            metrics = values
            metrics["loss"] = float(raw.get("final_loss", float("nan")))
        else:
            extra[split] = values
    return metrics, extra


def _train_split_check(trainer, train_ds, spec, settings, seed) -> dict[str, float]:
    """Metrics on a seeded sample of training rows: does the method learn at all?"""
    n = min(len(train_ds), settings["max_eval_samples"] or 512, 512)
    idx = np.sort(np.random.default_rng(seed + 7).choice(len(train_ds), size=n, replace=False))
    raw = trainer.evaluate(eval_dataset=train_ds.select(idx.tolist()), metric_key_prefix="trainsplit")
    return {k[len("trainsplit_"):]: float(v) for k, v in raw.items() if k[len("trainsplit_"):] in spec.metrics}


def _save_weights(model, out: Path, method: str) -> None:
    """Adapters (or the full model) as safetensors."""
    target = out / ("model" if method == "full" else "adapter")
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(str(target), safe_serialization=True)
