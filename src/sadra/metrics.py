"""GLUE's official metrics, computed with scikit-learn and scipy.

Names and definitions follow the ``evaluate`` library's ``glue`` metric: ``accuracy``, ``f1``
(binary, positive class 1), ``matthews_correlation``, ``pearson`` and ``spearmanr``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def glue_metrics(task: Any, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics for ``task`` (a name or TaskSpec) from predicted ids (or scores) and labels."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    from .data import TaskSpec, get_task

    spec = task if isinstance(task, TaskSpec) else get_task(task)
    predictions = np.asarray(predictions)
    labels = np.asarray(labels)
    out: dict[str, float] = {}
    for name in spec.metrics:
        if name == "accuracy":
            out[name] = float(accuracy_score(labels, predictions))
        elif name == "f1":
            out[name] = float(f1_score(labels, predictions, zero_division=0.0))
        elif name == "matthews_correlation":
            out[name] = float(matthews_corrcoef(labels, predictions))
        elif name == "pearson":
            out[name] = float(pearsonr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
        elif name == "spearmanr":
            out[name] = float(spearmanr(predictions, labels)[0]) if np.std(predictions) > 0 else 0.0
    return out


def predictions_from_logits(task: Any, logits: np.ndarray) -> np.ndarray:
    from .data import TaskSpec, get_task

    spec = task if isinstance(task, TaskSpec) else get_task(task)
    logits = np.asarray(logits)
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.reshape(-1) if spec.is_regression else logits.argmax(-1)


def majority_score(task: str | TaskSpec, labels: Sequence[Any]) -> dict[str, float] | None:
    """The metrics of always predicting the most frequent label (None for regression)."""
    from .data import TaskSpec, get_task

    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if spec.is_regression or not len(labels):
        return None
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    majority = values[np.argmax(counts)]
    return glue_metrics(spec, np.full(len(labels), majority), np.asarray(labels))


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy), capped below float overflow."""
    import math

    return float(math.exp(min(loss, 700)))
