"""Causal language models: calibration batches from a text file and fine-tuning with perplexity."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import DataError


def read_documents(path: str | Path) -> list[str]:
    """One document per non-empty line of a UTF-8 text file."""
    from .io import read_text

    docs = [line.strip() for line in read_text(path, what="text file").splitlines() if line.strip()]
    if not docs:
        raise DataError(f"text file {str(path)!r} has no non-empty lines; give one document per line")
    return docs


def lm_batch(texts: Sequence[str], tokenizer, max_length: int) -> dict[str, Any]:
    """Padded token batch; labels are the input ids with padding set to -100 (ignored)."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
    return batch


def load_text_batches(path: str | Path, tokenizer, *, num_batches: int, batch_size: int, max_length: int,
                      seed: int) -> list[dict[str, Any]]:
    """``num_batches`` seeded batches of documents from ``path`` for next-token calibration."""
    docs = read_documents(path)
    need = num_batches * batch_size
    rng = np.random.default_rng(seed)
    if need <= len(docs):
        picks = rng.choice(len(docs), size=need, replace=False)
    else:  # small files: cycle through a shuffled copy
        picks = np.resize(rng.permutation(len(docs)), need)
    return [lm_batch([docs[i] for i in picks[k * batch_size:(k + 1) * batch_size]], tokenizer, max_length)
            for k in range(num_batches)]


def split_documents(docs: list[str], eval_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded train/eval split (at least one document in each)."""
    if len(docs) < 2:
        raise DataError("causal-LM training needs at least 2 documents (lines) to hold one out for perplexity")
    order = np.random.default_rng(seed).permutation(len(docs))
    n_eval = min(len(docs) - 1, max(1, int(round(eval_fraction * len(docs)))))
    return [docs[i] for i in order[n_eval:]], [docs[i] for i in order[:n_eval]]
