"""What a run that learned nothing scores on a split, and whether a run did just that.

A classifier that predicts one class for every example gets a fixed score per task and split (RTE dev: 52.71 for
"entailment", 47.29 for "not_entailment"). `constant_baseline` gives those scores, `prediction_histogram` counts a
run's predicted classes, and `constant_facts` gives the fields `sam-peft train` writes to metrics.json and the
benchmark writes to each record: `dev_histogram`, `constant_score`, `constant_class` and the `constant` flag.

Regression (STS-B): any constant prediction, the train mean included, has no correlation with the labels, which
the metrics score as 0.0; so the constant score is 0.0 and there is no histogram.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_peft.tasks.metrics import _class_ids, _regression_scores, compute_metrics
from sam_peft.tasks.specs import TaskSpec, resolve_task

__all__ = ["TOLERANCE", "constant_baseline", "constant_facts", "matches_constant", "prediction_histogram"]

TOLERANCE = 1e-6  # two primary metrics (0-100) this close are the same score


def _num_classes(spec: TaskSpec) -> int:
    return max(spec.num_labels, 2)  # multiple choice (COPA) has one output per choice: 2 choices


def constant_baseline(task: str | TaskSpec, labels: Any) -> dict:
    """The primary metric of predicting each class for every example of a split with these `labels`.

    Returns `constant_scores` (one per class; one value for regression), the best of them (`constant_score`) and
    the class that gets it (`constant_class`, None for regression).
    """
    spec = resolve_task(task)
    gold = np.asarray(labels)
    if spec.is_regression:
        score = compute_metrics(spec, np.zeros(len(gold)), gold)["primary"]
        return {"constant_scores": [score], "constant_score": score, "constant_class": None}
    scores = [compute_metrics(spec, np.full(len(gold), c), gold)["primary"] for c in range(_num_classes(spec))]
    best = int(np.argmax(scores))
    return {"constant_scores": scores, "constant_score": scores[best], "constant_class": best}


def prediction_histogram(task: str | TaskSpec, predictions: Any) -> list[int] | None:
    """How many examples each class was predicted for (from logits or class ids); None for regression."""
    spec = resolve_task(task)
    if spec.is_regression:
        return None
    if isinstance(predictions, tuple):  # models may return (logits, hidden states, ...)
        predictions = predictions[0]
    return np.bincount(_class_ids(predictions, spec), minlength=_num_classes(spec)).tolist()


def matches_constant(score: float, constant_scores: list[float]) -> bool:
    """Whether a primary metric equals what some constant prediction scores."""
    return any(abs(score - s) <= TOLERANCE for s in constant_scores)


def constant_facts(task: str | TaskSpec, predictions: Any, labels: Any, score: float) -> dict:
    """The record fields of a run whose predictions on a split scored `score` (its primary metric).

    `constant` is true when the run predicted a single class (regression: one value) for every example, or when
    its score equals the best constant prediction's.
    """
    spec = resolve_task(task)
    baseline = constant_baseline(spec, labels)
    histogram = prediction_histogram(spec, predictions)
    if histogram is None:
        values = _regression_scores(predictions[0] if isinstance(predictions, tuple) else predictions, spec)
        single = bool(np.ptp(values) == 0)
    else:
        single = sum(count > 0 for count in histogram) == 1
    return {
        "dev_histogram": histogram,
        "constant_score": baseline["constant_score"],
        "constant_class": baseline["constant_class"],
        "constant": single or abs(score - baseline["constant_score"]) <= TOLERANCE,
    }
