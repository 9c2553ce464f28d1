"""Official GLUE / SuperGLUE metrics, computed offline with numpy and scipy.

* cola: Matthews correlation; stsb: Pearson and Spearman correlation;
* mrpc, qqp: accuracy and F1 of the positive class (1); cb: accuracy and macro F1;
* all other tasks: accuracy.

Every result also has ``primary``: the single number the benchmarks report, on a 0-100 scale
(the mean of a task's two metrics where it has two). Degenerate inputs give 0.0 instead of NaN:
constant predictions or labels for a correlation, no true or predicted positives for F1.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats

from sam_peft.tasks.specs import TaskSpec, resolve_task

__all__ = [
    "accuracy",
    "binary_f1",
    "compute_metrics",
    "macro_f1",
    "matthews_corrcoef",
    "metrics_fn_for_trainer",
    "pearson_spearman",
]


def _confusion(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of examples with true class ``i`` predicted as ``j``."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, preds), 1)
    return matrix


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    """Share of exact matches."""
    return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation, general K-class form (Gorodkin 2004); equals the binary MCC for K = 2.

    ``(c * s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` with ``c`` correct
    predictions, ``s`` examples, ``p_k`` / ``t_k`` predicted / true counts of class ``k``;
    0.0 when the denominator vanishes (constant predictions or labels).
    """
    preds, labels = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if preds.size == 0 or preds.shape != labels.shape:
        raise ValueError(
            f"matthews_corrcoef needs equally long, non-empty inputs; got shapes {preds.shape} "
            f"and {labels.shape}."
        )
    matrix = _confusion(preds, labels, int(max(preds.max(), labels.max())) + 1).astype(np.float64)
    s, c = matrix.sum(), np.trace(matrix)
    t, p = matrix.sum(axis=1), matrix.sum(axis=0)
    denominator = math.sqrt((s * s - float(p @ p)) * (s * s - float(t @ t)))
    return 0.0 if denominator == 0 else float((c * s - float(p @ t)) / denominator)


def _f1_from_counts(tp: float, fp: float, fn: float) -> float:
    return 0.0 if tp == 0 else float(2 * tp / (2 * tp + fp + fn))


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive``; 0.0 when there are no true positives."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = np.sum((preds == positive) & (labels == positive))
    fp = np.sum((preds == positive) & (labels != positive))
    fn = np.sum((preds != positive) & (labels == positive))
    return _f1_from_counts(tp, fp, fn)


def macro_f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes occurring in labels or predictions.

    This is the convention of the SuperGLUE scorer (scikit-learn's ``average="macro"``); on CB's
    validation split all three classes occur, so it is the mean over the three classes.
    """
    preds, labels = np.asarray(preds), np.asarray(labels)
    classes = np.union1d(preds, labels)
    return float(np.mean([binary_f1(preds, labels, positive=k) for k in classes]))


def _correlation(fn: Callable[..., Any], x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = float(fn(x, y)[0])
    return 0.0 if math.isnan(value) else value


def pearson_spearman(preds: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Pearson and Spearman correlation (0.0 where undefined, e.g. constant predictions)."""
    x, y = np.asarray(preds, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    return _correlation(stats.pearsonr, x, y), _correlation(stats.spearmanr, x, y)


def _regression_scores(predictions: Any, spec: TaskSpec) -> np.ndarray:
    scores = np.asarray(predictions, dtype=np.float64)
    if scores.ndim == 2 and scores.shape[1] == 1:
        scores = scores[:, 0]
    if scores.ndim != 1:
        raise ValueError(
            f"{spec.name} is regression: predictions must have shape [n] or [n, 1], got {scores.shape}."
        )
    return scores


def _class_ids(predictions: Any, spec: TaskSpec) -> np.ndarray:
    preds = np.asarray(predictions)
    if preds.ndim == 2 and preds.shape[1] > 1:
        return preds.argmax(axis=1)
    if preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.ndim != 1:
        raise ValueError(
            f"{spec.name}: predictions must be logits [n, num_labels] or class ids [n], "
            f"got shape {preds.shape}."
        )
    if preds.size and not np.all(np.mod(preds, 1) == 0):
        example = preds[np.mod(preds, 1) != 0][0]
        raise ValueError(
            f"{spec.name}: 1-D predictions must be integer class ids, got non-integer values "
            f"such as {example!r}; pass the logits [n, num_labels] instead."
        )
    return preds.astype(np.int64)


def compute_metrics(task: str | TaskSpec, predictions: Any, labels: Any) -> dict[str, float]:
    """Official metrics of ``task`` plus ``primary`` (0-100).

    Args:
        task: task name or :class:`TaskSpec`.
        predictions: logits ``[n, num_labels]`` (``[n, 2]`` for copa), class ids ``[n]``, or for stsb
            scores ``[n]`` / ``[n, 1]``.
        labels: gold labels ``[n]``.
    """
    spec = resolve_task(task)
    if isinstance(predictions, tuple):  # models may return (logits, hidden states, ...)
        predictions = predictions[0]
    gold = np.asarray(labels)
    if gold.ndim == 2 and gold.shape[1] == 1:
        gold = gold[:, 0]
    preds = _regression_scores(predictions, spec) if spec.is_regression else _class_ids(predictions, spec)
    if gold.ndim != 1 or len(preds) != len(gold):
        raise ValueError(
            f"{spec.name}: got {len(preds)} predictions for labels of shape {gold.shape}; "
            "they must match one to one."
        )
    if len(gold) == 0:
        raise ValueError(f"{spec.name}: cannot compute metrics on an empty set of predictions.")
    if spec.is_regression:
        pearson, spearman = pearson_spearman(preds, gold)
        return {"pearson": pearson, "spearmanr": spearman, "primary": 100 * (pearson + spearman) / 2}
    gold = gold.astype(np.int64)
    num_classes = max(spec.num_labels, 2)
    for name, values in (("predictions", preds), ("labels", gold)):
        if values.min() < 0 or values.max() >= num_classes:
            found = f"{int(values.min())}..{int(values.max())}"
            raise ValueError(
                f"{spec.name}: {name} must be class ids in [0, {num_classes - 1}], "
                f"found {found}; drop unlabelled (-1) test rows first."
            )
    if spec.name == "cola":
        mcc = matthews_corrcoef(preds, gold)
        return {"matthews_correlation": mcc, "primary": 100 * mcc}
    acc = accuracy(preds, gold)
    if spec.name in ("mrpc", "qqp"):
        f1 = binary_f1(preds, gold)
        return {"accuracy": acc, "f1": f1, "primary": 100 * (acc + f1) / 2}
    if spec.name == "cb":
        f1 = macro_f1(preds, gold)
        return {"accuracy": acc, "f1": f1, "primary": 100 * (acc + f1) / 2}
    return {"accuracy": acc, "primary": 100 * acc}


def metrics_fn_for_trainer(task: str | TaskSpec) -> Callable[[Any], dict[str, float]]:
    """A ``compute_metrics`` callable for :class:`transformers.Trainer` (it prefixes keys with ``eval_``)."""
    spec = resolve_task(task)

    def trainer_metrics(eval_prediction: Any) -> dict[str, float]:
        return compute_metrics(spec, eval_prediction.predictions, eval_prediction.label_ids)

    return trainer_metrics
