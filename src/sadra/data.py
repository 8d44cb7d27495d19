"""GLUE tasks: one table of specs, a strict reader for the original TSV layout, the hub.

A local GLUE folder (``--glue-dir`` or ``SADRA_GLUE_DIR``) holds ``<TASK>/train.tsv`` and
``<TASK>/dev.tsv`` (MNLI: ``dev_matched.tsv`` / ``dev_mismatched.tsv``) as GLUE distributes them:
tab-separated, quoting off (SST-2 sentences contain bare ``"``). Without a folder the task is
read from the hub (``nyu-mll/glue``), which needs network access. Labels follow the hub's ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError

GLUE_ENV = "SADRA_GLUE_DIR"
HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class PromptFormat:
    """A classification task as text for a causal LM: ``template`` is filled with the row's
    ``text_a`` (and ``text_b``); the model is trained and scored on ``answers[label]``, which
    must each be one token of the model's tokenizer."""

    template: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str                        # canonical id: sst2, mrpc, ...
    folder: str                      # folder in the GLUE layout: SST-2, MRPC, ...
    text_columns: tuple[str, ...]    # hub column names of the one or two texts
    tsv_text: tuple[str | int, ...]  # the same columns in the TSV (names, or indices if no header)
    tsv_label: str | int
    header: bool
    num_labels: int                  # 1 = regression
    label_names: tuple[str, ...] | None  # string labels in the TSV, in hub id order
    metrics: tuple[str, ...]         # evaluate's GLUE metric names, main metric first
    eval_splits: tuple[tuple[str, str], ...] = (("validation", "dev.tsv"),)
    prompt: PromptFormat | None = None  # set: the task is posed to a causal LM (see sadra.lm)

    @property
    def is_prompt(self) -> bool:
        return self.prompt is not None

    @property
    def main_metric(self) -> str:
        return self.metrics[0]

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in [
        TaskSpec("cola", "CoLA", ("sentence",), (3,), 1, False, 2, None, ("matthews_correlation",)),
        TaskSpec("sst2", "SST-2", ("sentence",), ("sentence",), "label", True, 2, None, ("accuracy",)),
        TaskSpec("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", True, 2, None,
                 ("f1", "accuracy")),
        TaskSpec("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", True, 2, None,
                 ("f1", "accuracy")),
        TaskSpec("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", True, 1, None,
                 ("pearson", "spearmanr")),
        TaskSpec("mnli", "MNLI", ("premise", "hypothesis"), ("sentence1", "sentence2"), "gold_label", True, 3,
                 ("entailment", "neutral", "contradiction"), ("accuracy",),
                 (("validation_matched", "dev_matched.tsv"), ("validation_mismatched", "dev_mismatched.tsv"))),
        TaskSpec("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", True, 2,
                 ("entailment", "not_entailment"), ("accuracy",)),
        TaskSpec("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", True, 2,
                 ("entailment", "not_entailment"), ("accuracy",)),
        TaskSpec("sst2-lm", "SST-2", ("sentence",), ("sentence",), "label", True, 2, None, ("accuracy",),
                 prompt=PromptFormat("Review: {text_a}\nSentiment:", (" negative", " positive"))),
        TaskSpec("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", True, 2, None,
                 ("accuracy",)),
    ]
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}


def get_task(name: str) -> TaskSpec:
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise DataError(f"unknown GLUE task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[key]


@dataclass
class Example:
    text_a: str
    text_b: str | None
    label: float | int


def parse_glue_tsv(data: bytes | str, spec: TaskSpec, source: str = "<tsv>") -> list[Example]:
    """Parse one GLUE TSV file strictly. Raises DataError naming the file, line and fix."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DataError(f"{source} is not UTF-8 text (byte {exc.start}); use the original GLUE files") from None
    else:
        text = data[1:] if data.startswith("\ufeff") else data
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or (spec.header and len(lines) < 2):
        raise DataError(f"{source} has no data rows; re-download the GLUE task or fix --glue-dir")
    if spec.header:
        header = lines[0].split("\t")
        wanted = list(spec.tsv_text) + [spec.tsv_label]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(
                f"{source} has a wrong header: missing column {missing[0]!r} (got {header[:6]}); use the original GLUE {spec.folder} files"
            )
        text_idx = [header.index(c) for c in spec.tsv_text]
        label_idx = header.index(spec.tsv_label)
        rows, first_line = lines[1:], 2
        width = len(header)
    else:
        text_idx = [int(c) for c in spec.tsv_text]
        label_idx = int(spec.tsv_label)
        rows, first_line = lines, 1
        width = max(text_idx + [label_idx]) + 1
    need = max(text_idx + [label_idx]) + 1
    out = []
    for offset, line in enumerate(rows):
        lineno = first_line + offset
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != width and (spec.header or len(fields) < need):
            # An extra tab would shift a text into the next column: refuse rather than misread.
            raise DataError(
                f"{source} line {lineno} has {len(fields)} fields, expected {width}; a field holds a tab, "
                "or the file is truncated or not tab-separated (use the original GLUE files)"
            )
        label = _parse_label(fields[label_idx], spec, source, lineno)
        texts = [fields[i] for i in text_idx]
        out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, label))
    if not out:
        raise DataError(f"{source} has no data rows; re-download the GLUE task or fix --glue-dir")
    return out


def _parse_label(raw: str, spec: TaskSpec, source: str, lineno: int) -> float | int:
    raw = raw.strip()
    try:
        if spec.is_regression:
            value = float(raw)
            if not np.isfinite(value):
                raise ValueError
            return value
        if spec.label_names is not None:
            return spec.label_names.index(raw)
        value = int(raw)
        if not 0 <= value < spec.num_labels:
            raise ValueError
        return value
    except ValueError:
        allowed = ", ".join(spec.label_names) if spec.label_names else (
            "a number" if spec.is_regression else f"0..{spec.num_labels - 1}")
        raise DataError(f"{source} line {lineno} has label {raw[:30]!r}, expected {allowed}; use the original GLUE files") from None


def glue_dir_from_env(glue_dir: str | os.PathLike | None) -> Path | None:
    if glue_dir:
        return Path(glue_dir)
    env = os.environ.get(GLUE_ENV)
    return Path(env) if env else None


def split_names(spec: TaskSpec) -> list[str]:
    return ["train"] + [s for s, _ in spec.eval_splits]


def _split_files(spec: TaskSpec) -> dict[str, str]:
    return {"train": "train.tsv", **dict(spec.eval_splits)}


def _local_file(spec: TaskSpec, split: str, root: Path) -> Path:
    """The TSV of ``split`` under a local GLUE folder, or DataError naming what is missing."""
    if not root.is_dir():
        raise DataError(f"GLUE folder {str(root)!r} does not exist; pass --glue-dir or set {GLUE_ENV} to a folder holding {spec.folder}/")
    name = _split_files(spec)[split]
    path = root / spec.folder / name
    if not path.is_file():
        raise DataError(f"GLUE file {str(path)!r} is missing; the folder must hold {spec.folder}/{name} in GLUE's layout")
    return path


def load_glue(task: str | TaskSpec, split: str = "train", glue_dir: str | os.PathLike | None = None) -> list[Example]:
    """Rows of one split: from ``glue_dir`` (or ``SADRA_GLUE_DIR``) if given, else from the hub."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if split not in _split_files(spec):
        raise DataError(f"{spec.name} has no split {split!r}; choose one of: {', '.join(_split_files(spec))}")
    root = glue_dir_from_env(glue_dir)
    if root is None:
        return _load_from_hub(spec, split)
    path = _local_file(spec, split, root)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {str(path)!r} ({exc.strerror}); check its permissions") from None
    return parse_glue_tsv(data, spec, source=str(path))


def _load_from_hub(spec: TaskSpec, split: str) -> list[Example]:
    try:
        import datasets

        ds = datasets.load_dataset(HUB_DATASET, spec.name, split=split)
    except Exception as exc:  # the hub client raises many types for "offline"
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise DataError(
            f"cannot load {spec.name} from the hub ({first}); pass --glue-dir or set {GLUE_ENV} to a local GLUE folder"
        ) from None
    a, b = spec.text_columns[0], (spec.text_columns[1] if len(spec.text_columns) > 1 else None)
    return [Example(row[a], row[b] if b else None, row["label"]) for row in ds]


def check_glue_folder(task: str | TaskSpec, glue_dir: str | os.PathLike | None) -> None:
    """Fail fast, before any training, if a local GLUE folder lacks a file or has a wrong header."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    root = glue_dir_from_env(glue_dir)
    if root is None:
        return
    for split in split_names(spec):
        path = _local_file(spec, split, root)
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        cut = head.rfind(b"\n")
        parse_glue_tsv(head[: cut + 1] if cut > 0 else head, spec, source=str(path))


def subsample(examples: Sequence[Example], n: int | None, seed: int) -> list[Example]:
    """A seeded random subset of ``n`` rows in their original order (all rows if n is None)."""
    if n is None or n >= len(examples):
        return list(examples)
    if n <= 0:
        raise DataError(f"a subset size must be positive, got {n}; set max_train_samples / max_eval_samples >= 1")
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in idx]


def min_words(examples: Sequence[Example], n: int | None) -> list[Example]:
    """The rows whose texts (both of a pair together) have at least ``n`` words (all rows if n is None)."""
    if n is None:
        return list(examples)
    kept = [e for e in examples if len(e.text_a.split()) + len((e.text_b or "").split()) >= n]
    if not kept:
        raise DataError(f"no training row has {n} or more words; lower min_train_words")
    return kept


# Rows held out of each train file for choosing settings (never trained on, never the dev set).
# Keyed by GLUE folder, so that a task and its prompt form (sst2, sst2-lm) hold out the same rows.
SELECTION_SIZES = {"MRPC": 400, "SST-2": 872, "QNLI": 1000}
SELECTION_SEED = 0


def selection_size(spec: TaskSpec, num_rows: int) -> int:
    return SELECTION_SIZES.get(spec.folder, min(1000, max(1, num_rows // 10)))


def split_selection(spec: TaskSpec, train_rows: Sequence[Example]) -> tuple[list[Example], list[Example]]:
    """``(rest, selection)``: a fixed seeded set of train rows held out for model selection.

    The selection rows do not depend on ``data_seed``: every study draws its training rows from
    the rest, and selects on the same held-out rows.
    """
    n = selection_size(spec, len(train_rows))
    if n >= len(train_rows):
        raise DataError(f"{spec.name}'s train split has {len(train_rows)} rows, too few to hold out {n} for selection")
    picked = np.zeros(len(train_rows), dtype=bool)
    picked[np.random.default_rng(SELECTION_SEED).choice(len(train_rows), size=n, replace=False)] = True
    rest = [e for e, p in zip(train_rows, picked) if not p]
    return rest, [e for e, p in zip(train_rows, picked) if p]


def tokenize(examples: Sequence[Example], tokenizer, max_length: int):
    """A ``datasets.Dataset`` of token ids and labels, unpadded (padding is per batch)."""
    from datasets import Dataset

    a = [e.text_a for e in examples]
    b = [e.text_b for e in examples] if examples and examples[0].text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_length)
    columns: dict[str, Any] = {k: list(v) for k, v in enc.items()}
    columns["labels"] = [e.label for e in examples]
    return Dataset.from_dict(columns)


def calibration_chunks(examples: Sequence[Example], *, num_batches: int, batch_size: int, seed: int) -> list[list[Example]]:
    """``num_batches`` lists of ``batch_size`` distinct rows drawn from ``examples`` (seeded)."""
    need = num_batches * batch_size
    if need > len(examples):
        raise DataError(
            f"calibration needs {need} rows ({num_batches} x {batch_size}) but the train split has {len(examples)}; lower the batch count or size"
        )
    rows = subsample(examples, need, seed)
    order = np.random.default_rng(seed + 1).permutation(need)
    return [[rows[i] for i in order[k * batch_size:(k + 1) * batch_size]] for k in range(num_batches)]


def calibration_batches(
    examples: Sequence[Example], tokenizer, *, num_batches: int, batch_size: int, max_length: int, seed: int
) -> list[dict[str, Any]]:
    """``num_batches`` padded batches of ``batch_size`` distinct rows drawn from ``examples``."""
    import torch

    batches = []
    for chunk in calibration_chunks(examples, num_batches=num_batches, batch_size=batch_size, seed=seed):
        a = [e.text_a for e in chunk]
        b = [e.text_b for e in chunk] if chunk[0].text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch = dict(enc)
        dtype = torch.float32 if isinstance(chunk[0].label, float) else torch.long
        batch["labels"] = torch.tensor([e.label for e in chunk], dtype=dtype)
        batches.append(batch)
    return batches
