"""GLUE and SuperGLUE tasks: specs, loading (hub or official files), encoding and offline metrics.

Typical use::

    from sam_peft.tasks import load_task, encode, collator_for, compute_metrics

    splits = load_task("rte", data_dir="../shared/data/glue")   # or data_dir=None for the hub
    train = encode("rte", tokenizer, splits["train"])
    collate = collator_for("rte", tokenizer)
    scores = compute_metrics("rte", logits, labels)              # {"accuracy": ..., "primary": ...}
"""

from sam_peft.tasks.encoding import (
    MultipleChoiceCollator,
    collator_for,
    copa_segments,
    encode,
    mark_wsc_spans,
)
from sam_peft.tasks.loading import features_for, load_task, split_train_heldout
from sam_peft.tasks.metrics import (
    accuracy,
    binary_f1,
    compute_metrics,
    macro_f1,
    matthews_corrcoef,
    metrics_fn_for_trainer,
    pearson_spearman,
)
from sam_peft.tasks.specs import TASKS, TaskSpec, get_task, resolve_task

__all__ = [
    "TASKS",
    "MultipleChoiceCollator",
    "TaskSpec",
    "accuracy",
    "binary_f1",
    "collator_for",
    "compute_metrics",
    "copa_segments",
    "encode",
    "features_for",
    "get_task",
    "load_task",
    "macro_f1",
    "mark_wsc_spans",
    "matthews_corrcoef",
    "metrics_fn_for_trainer",
    "pearson_spearman",
    "resolve_task",
    "split_train_heldout",
]
