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

Interrupted runs resume from the last checkpoint in ``out_dir/checkpoints`` (AdaLoRA runs start again:
its rank allocator's state is not checkpointed).
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import yaml

from . import __version__
from .allocate import uniform_budget
from .config import RUN_DEFAULTS, check_method, merge_run, method_settings, training_hash, zero_shot_key
from .data import calibration_batches, get_task, load_glue, min_words, split_selection, subsample, tokenize
from .errors import ConfigError, CurvatureError
from .io import atomic_write_text, ensure_dir, read_json, read_text, write_json
from .metrics import glue_metrics, majority_score, perplexity, predictions_from_logits
from .distributed import (check_same_across_processes, is_main_process, local_device, maybe_init_distributed,
                          world_size_from_env)
from .memory import peak_memory_mb, reset_peak_memory
from .models import find_targets, head_module_names, load_model, target_shapes

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


def _set_threads(settings: Mapping[str, Any]) -> None:
    threads = settings["train"].get("threads")
    if threads:
        torch.set_num_threads(int(threads))


def _training_args(tr: Mapping[str, Any], out: Path, seed: int, device: torch.device, progress: bool,
                   steps_per_epoch: int, total_steps: int, evaluate: bool, checkpoints: bool = True):
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
        eval_strategy=("steps" if per_epoch else "epoch") if evaluate and tr["evals_per_epoch"] else "no",
        eval_steps=max(1, steps_per_epoch // tr["evals_per_epoch"]) if per_epoch else None,
        save_strategy="steps" if checkpoints else "no",
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
        ddp_find_unused_parameters=False,
        **_checkpointing_args(bool(tr["gradient_checkpointing"])),
    )


def _checkpointing_args(on: bool) -> dict[str, Any]:
    """Activation checkpointing under the name this transformers release uses (the old one warns)."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: on, f"{name}_kwargs": {"use_reentrant": False} if on else None}


def _prepare(method: str, settings: Mapping[str, Any] | None, out_dir, header: Mapping[str, Any], progress: bool,
             preset: str | None, task_type: str) -> RunContext:
    from transformers import set_seed

    check_method(method)
    settings = method_settings(method, merge_run(RUN_DEFAULTS, dict(settings or {}), "run settings"))
    maybe_init_distributed()
    out = ensure_dir(out_dir, "run folder")
    _set_threads(settings)
    if is_main_process():
        atomic_write_text(out / "config.yaml", yaml.safe_dump({**header, "method": method, **settings}, sort_keys=False))
    set_seed(int(header["seed"]))
    return RunContext(method=method, seed=int(header["seed"]), settings=settings, out=out, device=local_device(),
                      progress=progress, preset=preset, task_type=task_type)


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


def _fit(trainer, out: Path, resumable: bool = True) -> tuple[float, str | None]:
    if not resumable:  # a killed run of this method starts again from step 0
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    last = last_complete_checkpoint(out / "checkpoints") if resumable else None
    resume = str(last) if last else None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    return time.perf_counter() - start, (Path(resume).name if resume else None)


def _common_record(ctx: RunContext, trainer, train_model, timing: Mapping[str, float], trained_examples: float):
    import peft
    import transformers

    from .adapt import count_parameters

    st = ctx.settings
    return {
        **count_parameters(train_model),
        "lora_budget": uniform_budget(ctx.shapes, st["lora"]["r"]),
        "calibration_seconds": round(timing["calibration"], 3),
        "train_seconds": round(timing["train"], 3),
        "eval_seconds": round(timing["eval"], 3),
        "examples_per_second": round(trained_examples / max(timing["train"], 1e-9), 3),
        "peak_memory_mb": round(peak_memory_mb(ctx.device), 1),
        "epochs": st["train"]["epochs"],
        "learning_rate": st["train"]["learning_rate"],
        "optimizer_steps": int(trainer.state.global_step),
        "model": st["model"],
        "max_length": st["max_length"],
        "preset": ctx.preset,
        "sadra_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
        "device": ctx.device.type,
        "processes": world_size_from_env(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        **ctx.info,
    }


def _finish(trainer, train_model, ctx: RunContext) -> None:
    if not is_main_process():
        return
    out = ctx.out
    log = [dict(e) for e in trainer.state.log_history]
    atomic_write_text(out / "train_log.jsonl", "".join(json.dumps(e) + "\n" for e in log))
    if ctx.method == "adalora":
        from .adapt import adalora_ranks

        final = adalora_ranks(train_model)
        write_json(out / "allocation.json", {"method": "adalora", "ranks": final,
                                             "shapes": {k: list(v) for k, v in ctx.shapes.items()}})
    _save_weights(train_model, out, ctx.method)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def glue_rows(spec, settings: Mapping[str, Any]):
    """``(train rows, {split: eval rows}, main split)`` of a GLUE run.

    Seeded subsets; calibration rows come from the train rows only. With
    ``eval_split="selection"`` the run trains on the train file less its selection rows and is
    evaluated on those rows: the dev set is not read at all.
    """
    train_all = min_words(load_glue(spec, "train", settings["glue_dir"]), settings["min_train_words"])
    if settings["eval_split"] == "selection":
        train_all, selection = split_selection(spec, train_all)
        evals = {"selection": subsample(selection, settings["max_eval_samples"], settings["data_seed"])}
    else:
        evals = {split: subsample(load_glue(spec, split, settings["glue_dir"]), settings["max_eval_samples"],
                                  settings["data_seed"]) for split, _ in spec.eval_splits}
    train_rows = subsample(train_all, settings["max_train_samples"], settings["data_seed"])
    return train_rows, evals, next(iter(evals))


@dataclass
class RunContext:
    """What building and training one run needs besides the model."""

    method: str
    seed: int
    settings: dict[str, Any]
    out: Path
    device: torch.device
    progress: bool
    preset: str | None
    task_type: str
    targets: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    heads: list[str] = field(default_factory=list)
    make_batches: Callable[[int, int, int], list] | None = None
    total_steps: int = 1
    info: dict[str, Any] = field(default_factory=dict)


def run_glue(task: str, method: str, seed: int, out_dir: str | Path, settings: Mapping[str, Any] | None = None,
             *, progress: bool = True, preset: str | None = None) -> dict[str, Any]:
    """Fine-tune and evaluate one (task, method, seed); returns the final metrics record.

    A prompt task (``sst2-lm``) trains a causal LM on the answer token and scores the answers'
    log-probabilities; its record adds the zero-shot metrics before training and the answer perplexity.
    """
    spec = get_task(task)
    ctx = _prepare(method, settings, out_dir, {"task": spec.name, "seed": seed}, progress, preset,
                   "CAUSAL_LM" if spec.is_prompt else PEFT_TASK_TYPE)
    st = ctx.settings
    score_zero_shot = spec.is_prompt and not _take_zero_shot(ctx, spec.name)
    train_rows, eval_splits, main_split = glue_rows(spec, st)
    job = (_prompt_job if spec.is_prompt else _classifier_job)(spec, st, seed, train_rows, eval_splits)
    eval_ds = job.eval_ds
    trainer, train_model, timing = _train(ctx, job.model, job.make_batches, job.train_ds,
                                          eval_ds[main_split] if len(eval_ds) == 1 else eval_ds, job.collator,
                                          job.compute_metrics, preprocess=job.preprocess,
                                          zero_shot=eval_ds[main_split] if score_zero_shot else None)
    if trainer is None:
        return _twin_result(ctx, spec.name, timing)
    eval_start = time.perf_counter()
    metrics, extra = _final_eval(trainer, eval_ds, main_split)
    train_check = _train_split_check(trainer, job.train_ds, spec, st, seed)
    timing["eval"] = time.perf_counter() - eval_start
    _finish(trainer, train_model, ctx)
    if spec.is_prompt:
        metrics["perplexity"] = perplexity(metrics["loss"])  # per answer token
    majority = majority_score(spec, [e.label for e in eval_splits[main_split]])
    at_majority = bool(majority) and abs(metrics[spec.main_metric] - majority[spec.main_metric]) < 1e-9
    record = {
        "task": spec.name, "method": method, "seed": int(seed), "eval_split": st["eval_split"], "metrics": metrics,
        "main_metric": spec.main_metric, **({"extra_metrics": extra} if extra else {}),
        "majority_metrics": majority, "at_majority_class": at_majority, "train_split_metrics": train_check,
        "train_samples": len(job.train_ds), "eval_samples": {s: len(d) for s, d in eval_ds.items()},
        **_common_record(ctx, trainer, train_model, timing, len(job.train_ds) * st["train"]["epochs"]),
    }
    if is_main_process():
        write_json(ctx.out / "metrics.json", record)
    return record


def _finished_run(folder: Path, what: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A finished run's record and the settings it ran with."""
    record = read_json(folder / "metrics.json", f"{what}'s metrics")
    ran = yaml.safe_load(read_text(folder / "config.yaml", f"{what}'s config")) or {}
    ran = merge_run(RUN_DEFAULTS, {k: v for k, v in ran.items() if k not in ("task", "seed", "method")}, "config.yaml")
    return record, ran


def _take_zero_shot(ctx: RunContext, task: str) -> bool:
    """Take ``zero_shot_from``'s zero-shot metrics into ``ctx.info``, checked to score the same model on
    the same rows; False when it is unset. Checked before the model loads, so a wrong folder costs nothing."""
    if not ctx.settings["zero_shot_from"]:
        return False
    source = Path(ctx.settings["zero_shot_from"])
    record, ran = _finished_run(source, "the zero-shot source")
    if record.get("task") != task or "zero_shot_metrics" not in record \
            or zero_shot_key(task, ran) != zero_shot_key(task, ctx.settings):
        raise ConfigError(f"zero_shot_from {str(source)!r} is not a finished {task} run of this model on these "
                          "evaluation rows; point it at one, or leave it unset to score them here")
    ctx.info.update(zero_shot_metrics=record["zero_shot_metrics"], zero_shot_from="/".join(source.parts[-3:]))
    return True


def _twin_result(ctx: RunContext, task: str, timing: Mapping[str, float]) -> dict[str, Any]:
    """The record of a run whose allocation built uniform LoRA's adapter: its uniform twin's results
    (metrics, training log, adapter), with this run's method, allocation and calibration time."""
    twin = Path(ctx.settings["uniform_twin"])
    record, ran = _finished_run(twin, "the uniform twin")
    if (record.get("task"), record.get("method"), record.get("seed")) != (task, "lora", ctx.seed) \
            or training_hash(ran) != training_hash(ctx.settings):
        raise ConfigError(f"uniform_twin {str(twin)!r} is not a finished {task} lora run of seed {ctx.seed} with "
                          "this run's settings; point it at one, or leave it unset to train")
    record.update(ctx.info, method=ctx.method, same_training_as="/".join(twin.parts[-3:]),
                  calibration_seconds=round(timing["calibration"], 3))
    if is_main_process():
        for name in ("train_log.jsonl", "adapter"):
            source = twin / name
            if source.is_dir():
                shutil.copytree(source, ctx.out / name, dirs_exist_ok=True)
            elif source.exists():
                shutil.copy2(source, ctx.out / name)
        write_json(ctx.out / "metrics.json", record)
    return record


@dataclass
class TaskJob:
    """A task's model, datasets and metric functions, ready for :func:`_train`."""

    model: Any
    train_ds: Any
    eval_ds: dict[str, Any]
    make_batches: Callable[[int, int, int], list]
    collator: Any
    compute_metrics: Callable
    preprocess: Callable | None = None


def _classifier_job(spec, st: Mapping[str, Any], seed: int, train_rows, eval_splits) -> TaskJob:
    """An encoder (or any model) with a fresh classification head."""
    from transformers import DataCollatorWithPadding

    model, tokenizer = load_model(st["model"], spec.num_labels, seed=seed, trust_remote_code=st["trust_remote_code"])

    def make_batches(num_batches, batch_size, batch_seed):
        return calibration_batches(train_rows, tokenizer, num_batches=num_batches, batch_size=batch_size,
                                   max_length=st["max_length"], seed=batch_seed)

    def compute_metrics(pred):
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        return glue_metrics(spec, predictions_from_logits(spec, logits), pred.label_ids)

    return TaskJob(model, tokenize(train_rows, tokenizer, st["max_length"]),
                   {s: tokenize(rows, tokenizer, st["max_length"]) for s, rows in eval_splits.items()},
                   make_batches, DataCollatorWithPadding(tokenizer), compute_metrics)


def _prompt_job(spec, st: Mapping[str, Any], seed: int, train_rows, eval_splits) -> TaskJob:
    """A causal LM trained on the answer token of each prompt, scored by the answers' log-probabilities."""
    from .lm import answer_log_probs, answer_token_ids, prompt_batches, prompt_collator, prompt_dataset, \
        prompt_predictions

    model, tokenizer = load_model(st["model"], task="causal-lm", seed=seed, trust_remote_code=st["trust_remote_code"])
    model.config.use_cache = False  # no key/value cache in training or scoring: nothing is generated
    answers = answer_token_ids(spec.prompt, tokenizer)
    fmt, length = spec.prompt, st["max_length"]

    def make_batches(num_batches, batch_size, batch_seed):
        return prompt_batches(train_rows, fmt, tokenizer, num_batches=num_batches, batch_size=batch_size,
                              max_length=length, seed=batch_seed)

    def compute_metrics(pred):
        predicted, gold = prompt_predictions(pred.predictions, pred.label_ids, answers)
        return glue_metrics(spec, predicted, gold)

    return TaskJob(model, prompt_dataset(train_rows, fmt, tokenizer, length),
                   {s: prompt_dataset(rows, fmt, tokenizer, length) for s, rows in eval_splits.items()},
                   make_batches, prompt_collator(tokenizer), compute_metrics,
                   preprocess=lambda logits, labels: answer_log_probs(logits, labels, answers))


def run_causal_lm(text_file: str | Path, method: str, seed: int, out_dir: str | Path,
                  settings: Mapping[str, Any] | None = None, *, eval_fraction: float = 0.1, progress: bool = True,
                  preset: str | None = None) -> dict[str, Any]:
    """Fine-tune a causal LM on a text file (one document per line); reports held-out perplexity."""
    from transformers import DataCollatorForLanguageModeling

    from .lm import lm_batch, read_documents, split_documents

    ctx = _prepare(method, settings, out_dir, {"task": "causal-lm", "text_file": str(text_file), "seed": seed},
                   progress, preset, "CAUSAL_LM")
    st = ctx.settings
    if method == "eva":
        from .errors import ConfigError

        raise ConfigError("method eva is not wired for causal-LM runs here; use lora, sadra, sadra-fisher, random, adalora or full")
    train_docs, eval_docs = split_documents(read_documents(text_file), eval_fraction, st["data_seed"])
    train_docs = train_docs[: st["max_train_samples"]] if st["max_train_samples"] else train_docs
    eval_docs = eval_docs[: st["max_eval_samples"]] if st["max_eval_samples"] else eval_docs
    model, tokenizer = load_model(st["model"], task="causal-lm", seed=seed, trust_remote_code=st["trust_remote_code"])
    from datasets import Dataset

    def encode(texts):
        enc = tokenizer(texts, truncation=True, max_length=st["max_length"])
        return Dataset.from_dict({k: list(v) for k, v in enc.items() if k in ("input_ids", "attention_mask")})

    def make_batches(num_batches, batch_size, batch_seed):
        picks = np.resize(np.random.default_rng(batch_seed).permutation(len(train_docs)), num_batches * batch_size)
        return [lm_batch([train_docs[i] for i in picks[k * batch_size:(k + 1) * batch_size]], tokenizer, st["max_length"])
                for k in range(num_batches)]

    train_ds, eval_ds = encode(train_docs), encode(eval_docs)
    trainer, train_model, timing = _train(ctx, model, make_batches, train_ds, eval_ds,
                                          DataCollatorForLanguageModeling(tokenizer, mlm=False), None)
    eval_start = time.perf_counter()
    raw = trainer.evaluate(eval_dataset=eval_ds, metric_key_prefix="final")
    timing["eval"] = time.perf_counter() - eval_start
    _finish(trainer, train_model, ctx)
    loss = float(raw["final_loss"])
    record = {
        "task": "causal-lm", "method": method, "seed": int(seed),
        "metrics": {"loss": loss, "perplexity": perplexity(loss)}, "main_metric": "perplexity",
        "train_samples": len(train_ds), "eval_samples": len(eval_ds),
        **_common_record(ctx, trainer, train_model, timing, len(train_ds) * st["train"]["epochs"]),
    }
    if is_main_process():
        write_json(ctx.out / "metrics.json", record)
    return record


def _train(ctx: RunContext, model, make_batches, train_ds, eval_arg, collator, compute_metrics, *,
           preprocess: Callable | None = None, zero_shot=None):
    """Build the method's model on ``model`` and train it; returns (trainer, trained model, timing).

    ``zero_shot``: a dataset evaluated before training (the adapters start as the identity), into
    ``ctx.info["zero_shot_metrics"]``.
    """
    from transformers import Trainer

    tr = ctx.settings["train"]
    model.to(ctx.device)
    reset_peak_memory(ctx.device)
    ctx.targets = find_targets(model)
    ctx.shapes = target_shapes(model, ctx.targets)
    ctx.heads = head_module_names(model) if ctx.task_type == PEFT_TASK_TYPE else []
    ctx.make_batches = make_batches
    steps_per_epoch = math.ceil(len(train_ds) / (tr["batch_size"] * tr["grad_accum"] * world_size_from_env()))
    ctx.total_steps = max(1, math.ceil(steps_per_epoch * tr["epochs"]))
    calib_start = time.perf_counter()
    from .adapt import build_method_model

    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model; SADRA does not.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = build_method_model(ctx, model)
    timing = {"calibration": time.perf_counter() - calib_start if ctx.method not in ("full", "lora") else 0.0}
    train_model = peft_model if peft_model is not None else model
    if ctx.info.get("uniform_allocation") and ctx.settings["uniform_twin"]:
        return None, train_model, timing  # the twin trained this very adapter: run_glue takes its results
    # AdaLoRA cannot resume: its rank allocator's importance scores are not in a checkpoint, and once
    # budgeting has pruned ranks PEFT saves the pruned shapes, which a fresh init_r model cannot load.
    resumable = ctx.method != "adalora"
    args = _training_args(tr, ctx.out, ctx.seed, ctx.device, ctx.progress, steps_per_epoch, ctx.total_steps,
                          evaluate=True, checkpoints=resumable)
    AdaLoraUpdate, FiniteLoss = _callbacks()
    callbacks = [FiniteLoss()] + ([AdaLoraUpdate(peft_model)] if ctx.method == "adalora" else [])
    trainer = Trainer(model=train_model, args=args, train_dataset=train_ds, eval_dataset=eval_arg,
                      data_collator=collator, compute_metrics=compute_metrics, callbacks=callbacks,
                      preprocess_logits_for_metrics=preprocess)
    if zero_shot is not None:
        ctx.info["zero_shot_metrics"] = _metric_values(trainer.evaluate(eval_dataset=zero_shot,
                                                                        metric_key_prefix="zeroshot"), "zeroshot")
    timing["train"], ctx.info["resumed_from"] = _fit(trainer, ctx.out, resumable)
    return trainer, train_model, timing


def _final_eval(trainer, eval_ds: Mapping[str, Any], main_split: str):
    """Metrics of the final model on each validation split (last epoch; no checkpoint selection)."""
    metrics: dict[str, float] = {}
    extra: dict[str, dict[str, float]] = {}
    for split, ds in eval_ds.items():
        values = _metric_values(trainer.evaluate(eval_dataset=ds, metric_key_prefix="final"), "final")
        if split == main_split:
            metrics = values
        else:
            values.pop("loss", None)
            extra[split] = values
    return metrics, extra


_TIMINGS = ("runtime", "samples_per_second", "steps_per_second", "epoch", "model_preparation_time")


def _metric_values(raw: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The metrics and loss of a ``trainer.evaluate`` result, without its prefix and timings."""
    cut = len(prefix) + 1
    values = {k[cut:]: float(v) for k, v in raw.items() if k.startswith(prefix + "_") and k[cut:] not in _TIMINGS}
    values.setdefault("loss", float("nan"))
    return values


def _train_split_check(trainer, train_ds, spec, settings, seed) -> dict[str, float]:
    """Metrics on a seeded sample of training rows: does the method learn at all?"""
    n = min(len(train_ds), settings["max_eval_samples"] or 512, 512)
    idx = np.sort(np.random.default_rng(seed + 7).choice(len(train_ds), size=n, replace=False))
    raw = trainer.evaluate(eval_dataset=train_ds.select(idx.tolist()), metric_key_prefix="trainsplit")
    return {k[len("trainsplit_"):]: float(v) for k, v in raw.items() if k[len("trainsplit_"):] in spec.metrics}


def _save_weights(model, out: Path, method: str) -> None:
    """Adapters (or the full model) as safetensors, loadable onto the unchanged base model.

    A gradient-initialised (LoRA-GA) adapter was trained on a base model whose weights its
    initialisation shifted; PEFT converts it against the initial adapter into a plain LoRA
    adapter (twice the rank) that stock ``PeftModel.from_pretrained`` loads onto the original.
    """
    target = out / ("model" if method == "full" else "adapter")
    if target.exists():
        shutil.rmtree(target)
    from .adapt import INITIAL_ADAPTER

    initial = out / INITIAL_ADAPTER
    if initial.exists():
        model.save_pretrained(str(target), safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(initial))
        _add_saved_modules(model, target)
        shutil.rmtree(initial, ignore_errors=True)
    else:
        model.save_pretrained(str(target), safe_serialization=True)


def _add_saved_modules(model, target: Path) -> None:
    """Put the trained task head back into a converted adapter file.

    PEFT's conversion of a mutated-init adapter keeps only the LoRA factors and drops the
    ``modules_to_save`` copies (the task head), which the adapter needs to reproduce the run.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = target / "adapter_model.safetensors"
    tensors = load_file(str(path))
    extra = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items() if ".lora_" not in k}
    if extra:
        save_file({**tensors, **extra}, str(path), metadata={"format": "pt"})
