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


# ---- classification tasks posed to a causal LM (TaskSpec.prompt) ------------------------------

def prompt_text(fmt, example) -> str:
    return fmt.template.format(text_a=example.text_a, text_b=example.text_b)


def answer_token_ids(fmt, tokenizer) -> list[int]:
    """One token id per answer (by label); DataError unless each answer is one distinct token."""
    ids = []
    for answer in fmt.answers:
        tokens = tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise DataError(f"answer {answer!r} is {len(tokens)} tokens for this tokenizer; prompt tasks score "
                            "single-token answers: pick a model whose vocabulary has it as one token")
        ids.append(int(tokens[0]))
    if len(set(ids)) != len(ids):
        raise DataError(f"answers {fmt.answers!r} share a token for this tokenizer; they must differ")
    return ids


def encode_prompts(examples: Sequence[Any], fmt, tokenizer, max_length: int) -> dict[str, list[list[int]]]:
    """Token ids of prompt + answer, with labels on the answer token only (-100 elsewhere).

    Over-long prompts lose their start (the review), never the question or the answer.
    """
    answers = answer_token_ids(fmt, tokenizer)
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer([prompt_text(fmt, e) for e in examples], truncation=True, max_length=max_length - 1)
    finally:
        tokenizer.truncation_side = side
    ids, mask, labels = [], [], []
    for prompt_ids, example in zip(enc["input_ids"], examples):
        answer = answers[int(example.label)]
        ids.append(list(prompt_ids) + [answer])
        mask.append([1] * (len(prompt_ids) + 1))
        labels.append([-100] * len(prompt_ids) + [answer])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def prompt_dataset(examples: Sequence[Any], fmt, tokenizer, max_length: int):
    from datasets import Dataset

    return Dataset.from_dict(encode_prompts(examples, fmt, tokenizer, max_length))


def prompt_collator(tokenizer):
    """Pads ids with the pad token, the mask with 0 and labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")


def prompt_batches(examples: Sequence[Any], fmt, tokenizer, *, num_batches: int, batch_size: int, max_length: int,
                   seed: int) -> list[dict[str, Any]]:
    """Calibration batches of prompt tasks: the same rows :func:`sadra.data.calibration_batches` draws."""
    from .data import calibration_chunks

    collate = prompt_collator(tokenizer)
    batches = []
    for chunk in calibration_chunks(examples, num_batches=num_batches, batch_size=batch_size, seed=seed):
        enc = encode_prompts(chunk, fmt, tokenizer, max_length)
        batches.append(dict(collate([{key: enc[key][j] for key in enc} for j in range(len(chunk))])))
    return batches


def answer_log_probs(logits, labels, answer_ids: Sequence[int]):
    """``(n, K)`` log-probabilities of the K answers at each row's answer position.

    Used as the Trainer's ``preprocess_logits_for_metrics``: it keeps K numbers per row instead of
    the ``(n, T, vocabulary)`` logits.
    """
    import torch

    if isinstance(logits, tuple):
        logits = logits[0]
    position = (labels != -100).float().argmax(dim=1)  # each row's single answer token
    rows = torch.arange(logits.shape[0], device=logits.device)
    before = logits[rows, (position - 1).clamp(min=0)].float()
    return torch.log_softmax(before, dim=-1)[:, list(answer_ids)]


def prompt_predictions(log_probs, label_ids, answer_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted label, true label)`` per row from :func:`answer_log_probs` and padded label ids."""
    log_probs, label_ids = np.asarray(log_probs), np.asarray(label_ids)
    answers = np.asarray(answer_ids)
    gold_token = np.where(label_ids != -100, label_ids, -1).max(axis=1)
    gold = np.array([int(np.flatnonzero(answers == t)[0]) for t in gold_token])
    return log_probs.argmax(axis=1), gold
