"""How precisely a split measures a run: a percentile-bootstrap interval of the primary metric.

The examples of the split are resampled with replacement (`resamples` times, a fixed seed) and the task's primary
metric is recomputed on each resample; the interval is the (α/2, 1 − α/2) percentiles of those scores. One method
for every task and metric (accuracy, F1, Matthews, Pearson/Spearman), so `sam-peft train` can say whether a run is
distinguishable from a constant prediction: it is when the constant score lies below the interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sam_peft.tasks.metrics import compute_metrics
from sam_peft.tasks.specs import TaskSpec, resolve_task

__all__ = ["INTERVAL_METHOD", "bootstrap_interval", "interval_facts"]

RESAMPLES, SEED = 1000, 0
INTERVAL_METHOD = f"percentile bootstrap over the dev examples, {RESAMPLES} resamples, seed {SEED}"


def bootstrap_interval(task: str | TaskSpec, predictions: Any, labels: Any, confidence: float = 0.95,
                       resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    """The `confidence` percentile-bootstrap interval (low, high) of the primary metric (0-100) of `predictions`
    against `labels`, resampling examples with replacement."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}.")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}.")
    spec = resolve_task(task)
    if isinstance(predictions, tuple):  # models may return (logits, hidden states, ...)
        predictions = predictions[0]
    preds, gold = np.asarray(predictions), np.asarray(labels)
    if len(preds) != len(gold) or len(gold) == 0:
        raise ValueError(f"{spec.name}: got {len(preds)} predictions for {len(gold)} labels; they must match one to "
                         "one and not be empty.")
    rng = np.random.default_rng(seed)
    scores = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, len(gold), len(gold))
        scores[i] = compute_metrics(spec, preds[rows], gold[rows])["primary"]
    alpha = 1 - confidence
    low, high = np.quantile(scores, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def interval_facts(task: str | TaskSpec, predictions: Any, labels: Any, constant_score: float) -> dict:
    """The record fields `dev_interval` ([low, high], 95 %), `dev_interval_method`, and `above_constant`: whether
    the whole interval lies above the best constant prediction's score."""
    low, high = bootstrap_interval(task, predictions, labels)
    return {"dev_interval": [low, high], "dev_interval_method": INTERVAL_METHOD, "above_constant": low > constant_score}
