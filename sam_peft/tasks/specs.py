"""Static description of every supported GLUE / SuperGLUE task.

One frozen :class:`TaskSpec` per task records where the data lives (hub path/config, local folder
and file names), how examples are shaped (single sentence, pair, multiple choice, span task), the
label space and the official metrics. Everything else in :mod:`sam_peft.tasks` is driven by it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TASKS", "TaskSpec", "get_task", "resolve_task"]

GLUE_HUB = "nyu-mll/glue"
SUPER_GLUE_HUB = "aps/super_glue"

#: Example layouts; they decide the normalised columns and the encoding.
SINGLE, PAIR, CHOICE, SPANS = "single", "pair", "multiple_choice", "spans"
#: A sentence pair about one target word (WiC): ``word``, ``text``, ``text_pair``.
WORD_PAIR = "word_pair"


@dataclass(frozen=True)
class TaskSpec:
    """Everything the loaders, encoder and metrics need to know about one task.

    ``hub_columns`` are the hub's text columns, mapped in order onto ``text`` / ``text_pair``
    (empty for copa and wsc, whose hub columns already match the normalised ones; wic's ``word``
    keeps its name).
    ``local_files`` are the official (train, dev) file names inside ``data_dir/<local_dir>/``.
    """

    name: str
    benchmark: str
    hub_path: str
    hub_config: str
    num_labels: int
    label_names: tuple[str, ...]
    layout: str
    validation_split: str
    local_dir: str
    local_files: tuple[str, str]
    hub_columns: tuple[str, ...]
    metric_names: tuple[str, ...]
    primary_metric: str
    is_regression: bool = False

    @property
    def is_multiple_choice(self) -> bool:
        """True only for copa (two candidate continuations per example)."""
        return self.layout == CHOICE

    @property
    def is_pair(self) -> bool:
        """True when examples carry a ``text_pair`` column."""
        return self.layout in (PAIR, WORD_PAIR)


_ACC = ("accuracy",)
_ACC_F1 = ("accuracy", "f1")
_P_ACC = "100 * accuracy"
_P_ACC_F1 = "100 * mean(accuracy, f1)"
_NLI2 = ("entailment", "not_entailment")


def _glue(
    name: str,
    num_labels: int,
    labels: tuple[str, ...],
    layout: str,
    local_dir: str,
    hub_columns: tuple[str, ...],
    metrics: tuple[str, ...] = _ACC,
    primary: str = _P_ACC,
    dev_file: str = "dev.tsv",
    validation_split: str = "validation",
    **kw: bool,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        benchmark="glue",
        hub_path=GLUE_HUB,
        hub_config=name,
        num_labels=num_labels,
        label_names=labels,
        layout=layout,
        validation_split=validation_split,
        local_dir=local_dir,
        local_files=("train.tsv", dev_file),
        hub_columns=hub_columns,
        metric_names=metrics,
        primary_metric=primary,
        **kw,
    )


def _super_glue(
    name: str,
    labels: tuple[str, ...],
    layout: str,
    local_dir: str,
    hub_columns: tuple[str, ...],
    metrics: tuple[str, ...] = _ACC,
    primary: str = _P_ACC,
    hub_config: str | None = None,
) -> TaskSpec:
    return TaskSpec(
        name=name,
        benchmark="super_glue",
        hub_path=SUPER_GLUE_HUB,
        hub_config=hub_config or name,
        num_labels=len(labels),
        label_names=labels,
        layout=layout,
        validation_split="validation",
        local_dir=local_dir,
        local_files=("train.jsonl", "val.jsonl"),
        hub_columns=hub_columns,
        metric_names=metrics,
        primary_metric=primary,
    )


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _glue(
            "cola",
            2,
            ("unacceptable", "acceptable"),
            SINGLE,
            "CoLA",
            ("sentence",),
            ("matthews_correlation",),
            "100 * matthews_correlation",
        ),
        _glue("sst2", 2, ("negative", "positive"), SINGLE, "SST-2", ("sentence",)),
        _glue(
            "mrpc",
            2,
            ("not_equivalent", "equivalent"),
            PAIR,
            "MRPC",
            ("sentence1", "sentence2"),
            _ACC_F1,
            _P_ACC_F1,
        ),
        _glue(
            "stsb",
            1,
            (),
            PAIR,
            "STS-B",
            ("sentence1", "sentence2"),
            ("pearson", "spearmanr"),
            "100 * mean(pearson, spearmanr)",
            is_regression=True,
        ),
        _glue(
            "qqp",
            2,
            ("not_duplicate", "duplicate"),
            PAIR,
            "QQP",
            ("question1", "question2"),
            _ACC_F1,
            _P_ACC_F1,
        ),
        _glue(
            "mnli",
            3,
            ("entailment", "neutral", "contradiction"),
            PAIR,
            "MNLI",
            ("premise", "hypothesis"),
            dev_file="dev_matched.tsv",
            validation_split="validation_matched",
        ),
        _glue("qnli", 2, _NLI2, PAIR, "QNLI", ("question", "sentence")),
        _glue("rte", 2, _NLI2, PAIR, "RTE", ("sentence1", "sentence2")),
        # WNLI's label 1 is "entailment" (the reverse of RTE and QNLI), as on the hub.
        _glue("wnli", 2, ("not_entailment", "entailment"), PAIR, "WNLI", ("sentence1", "sentence2")),
        _super_glue(
            "cb",
            ("entailment", "contradiction", "neutral"),
            PAIR,
            "CB",
            ("premise", "hypothesis"),
            _ACC_F1,
            "100 * mean(accuracy, macro f1)",
        ),
        _super_glue("copa", ("choice1", "choice2"), CHOICE, "COPA", ()),
        # "wsc.fixed" is the hub's corrected copy of WSC (span texts repaired); same rows and labels.
        _super_glue("wsc", ("False", "True"), SPANS, "WSC", (), hub_config="wsc.fixed"),
        _super_glue("boolq", ("False", "True"), PAIR, "BoolQ", ("question", "passage")),
        _super_glue("wic", ("False", "True"), WORD_PAIR, "WiC", ("sentence1", "sentence2")),
    )
}

_ALIASES = {"sts-b": "stsb", "sst-2": "sst2", "mnli-m": "mnli", "mnli_matched": "mnli"}


def get_task(name: str) -> TaskSpec:
    """Look a task up by name, case-insensitively (``"STS-B"``, ``"sst-2"`` and ``"RTE"`` all work)."""
    if not isinstance(name, str):
        raise TypeError(f"Task name must be a string, got {name!r} ({type(name).__name__}).")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in TASKS:
        raise ValueError(f"Unknown task {name!r}. Valid names: {', '.join(TASKS)} (aliases: sts-b, sst-2).")
    return TASKS[key]


def resolve_task(task: str | TaskSpec) -> TaskSpec:
    """Accept a task name or a :class:`TaskSpec` and return the spec."""
    return task if isinstance(task, TaskSpec) else get_task(task)
