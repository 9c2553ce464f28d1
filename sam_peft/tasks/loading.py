"""Load a task as a :class:`datasets.DatasetDict` with ``train`` / ``heldout`` / ``dev`` splits.

The official test labels of GLUE and SuperGLUE are private, so results are reported on ``dev``, the
official dev (validation) split, and ``heldout`` (early stopping and learning-rate choice) is a
deterministic random ``heldout_fraction`` (10 %) of the official train split, which ``train`` is the
rest of. Every split has the same normalised columns,
whichever source it came from (hub or local files):

* single sentence (cola, sst2): ``text``, ``label``, ``idx``
* pairs (mrpc, stsb, qqp, mnli, qnli, rte, wnli, cb, boolq): ``text``, ``text_pair``, ``label``, ``idx``
  (boolq: question / passage; stsb's ``label`` is a float score in [0, 5])
* wic: ``word``, ``text``, ``text_pair`` (sentence1 / sentence2), ``label``, ``idx``
* copa: ``premise``, ``choice1``, ``choice2``, ``question``, ``label``, ``idx``
* wsc: ``text``, ``span1_text``, ``span1_index``, ``span2_text``, ``span2_index``, ``label``, ``idx``
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import numpy as np

from sam_peft.tasks.readers import read_local_file
from sam_peft.tasks.specs import CHOICE, PAIR, SINGLE, WORD_PAIR, TaskSpec, resolve_task

__all__ = ["features_for", "load_task", "split_train_heldout"]

logger = logging.getLogger(__name__)

_INT = datasets.Value("int64")
_STR = datasets.Value("string")


def features_for(task: str | TaskSpec) -> datasets.Features:
    """The normalised column schema of ``task`` (see the module docstring)."""
    spec = resolve_task(task)
    label = datasets.Value("float32") if spec.is_regression else _INT
    if spec.layout == SINGLE:
        cols = {"text": _STR}
    elif spec.layout == PAIR:
        cols = {"text": _STR, "text_pair": _STR}
    elif spec.layout == WORD_PAIR:
        cols = {"word": _STR, "text": _STR, "text_pair": _STR}
    elif spec.layout == CHOICE:
        cols = {"premise": _STR, "choice1": _STR, "choice2": _STR, "question": _STR}
    else:
        cols = {
            "text": _STR,
            "span1_text": _STR,
            "span1_index": _INT,
            "span2_text": _STR,
            "span2_index": _INT,
        }
    return datasets.Features({**cols, "label": label, "idx": _INT})


def split_train_heldout(
    train: datasets.Dataset, seed: int = 0, heldout_fraction: float = 0.1
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out ``round(heldout_fraction * n)`` rows of ``train``: returns (train, heldout).

    The held-out rows are the first ones of ``numpy.random.default_rng(seed).permutation(n)``; both
    parts keep the original row order. The result depends only on ``n``, ``seed`` and ``heldout_fraction``.
    """
    is_number = isinstance(heldout_fraction, (int, float)) and not isinstance(heldout_fraction, bool)
    if not is_number or not 0 < heldout_fraction < 1:
        raise ValueError(
            f"heldout_fraction must be a number strictly between 0 and 1, got {heldout_fraction!r}; "
            "the default 0.1 holds out 10% of the official train split."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    n = len(train)
    n_heldout = round(heldout_fraction * n)
    if n_heldout == 0 or n_heldout == n:
        logger.warning("heldout_fraction=%s of %d training rows leaves an empty split.", heldout_fraction, n)
    perm = np.random.default_rng(int(seed)).permutation(n)
    heldout_rows = np.sort(perm[:n_heldout])
    train_rows = np.sort(perm[n_heldout:])
    return train.select(train_rows.tolist()), train.select(heldout_rows.tolist())


def _from_local(
    spec: TaskSpec, data_dir: str | os.PathLike[str]
) -> tuple[datasets.Dataset, datasets.Dataset]:
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} is not a directory. Pass the folder that contains {spec.local_dir}/ "
            f"(the official GLUE/SuperGLUE layout), or data_dir=None to use the Hugging Face hub."
        )
    features = features_for(spec)
    splits = []
    for name in spec.local_files:
        path = root / spec.local_dir / name
        columns = read_local_file(spec, path)
        columns = {key: columns.get(key, []) for key in features}
        splits.append(datasets.Dataset.from_dict(columns, features=features))
        logger.info("Read %d %s rows from %s", len(splits[-1]), spec.name, path)
    return splits[0], splits[1]


def _normalise_hub(spec: TaskSpec, ds: datasets.Dataset) -> datasets.Dataset:
    """Rename the hub's columns to the normalised ones, drop the rest and cast to the shared schema."""
    features = features_for(spec)
    renames = dict(zip(spec.hub_columns, ("text", "text_pair"), strict=False))
    missing = [c for c in [*renames, "label"] if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"Hub dataset {spec.hub_path!r} ({spec.hub_config!r}) lacks columns {missing}; "
            f"found {ds.column_names}. Pass data_dir= with the official files instead."
        )
    if "idx" not in ds.column_names:
        ds = ds.add_column("idx", list(range(len(ds))))
    ds = ds.rename_columns(renames).select_columns(list(features))
    text_cols = [name for name, feat in features.items() if feat == _STR]

    def fill_none(batch: dict[str, list]) -> dict[str, list]:
        return {c: ["" if v is None else v for v in batch[c]] for c in text_cols}

    ds = ds.map(fill_none, batched=True, desc=f"Normalising {spec.name}")
    return ds.cast(features)


def _from_hub(spec: TaskSpec) -> tuple[datasets.Dataset, datasets.Dataset]:
    logger.info("Loading %s (%s) from the Hugging Face hub", spec.hub_path, spec.hub_config)
    raw = datasets.load_dataset(spec.hub_path, spec.hub_config)
    for split in ("train", spec.validation_split):
        if split not in raw:
            raise ValueError(
                f"Hub dataset {spec.hub_path!r} ({spec.hub_config!r}) has no split {split!r}; "
                f"found {list(raw)}. Pass data_dir= with the official files instead."
            )
    return _normalise_hub(spec, raw["train"]), _normalise_hub(spec, raw[spec.validation_split])


def load_task(
    task: str | TaskSpec,
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    heldout_fraction: float = 0.1,
    limit: int | None = None,
) -> datasets.DatasetDict:
    """Load ``task`` as ``DatasetDict(train=..., heldout=..., dev=...)``.

    Args:
        task: task name (``"rte"``, ``"STS-B"``, ...) or a :class:`TaskSpec`.
        data_dir: folder holding the official files in ``<data_dir>/<local_dir>/`` (e.g. ``glue/RTE/
            train.tsv``); ``None`` downloads ``spec.hub_path`` / ``spec.hub_config`` from the hub.
        seed: seed of the permutation that picks the held-out rows out of the official train split.
        heldout_fraction: share of the official train split held out as ``heldout``.
        limit: if given, keep only the first ``limit`` rows of each split (after splitting).

    ``train`` + ``heldout`` partition the official train split; ``dev`` is the official dev split.
    """
    spec = resolve_task(task)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
    official_train, official_dev = _from_hub(spec) if data_dir is None else _from_local(spec, data_dir)
    train, heldout = split_train_heldout(official_train, seed=seed, heldout_fraction=heldout_fraction)
    splits = {"train": train, "heldout": heldout, "dev": official_dev}
    if limit is not None:
        splits = {name: ds.select(range(min(limit, len(ds)))) for name, ds in splits.items()}
    logger.info("%s: %s", spec.name, ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
    return datasets.DatasetDict(splits)
