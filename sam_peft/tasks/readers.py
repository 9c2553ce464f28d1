"""Readers for the official GLUE / SuperGLUE files as the benchmarks distribute them.

Each reader turns one file into a dict of normalised columns (see :mod:`sam_peft.tasks.loading`).
GLUE ``.tsv`` files are split on tabs with quoting off (``csv.QUOTE_NONE``) because RTE, STS-B and
MRPC contain bare ``"`` characters; they are opened as ``utf-8-sig`` so MRPC's BOM disappears.
Label strings are mapped onto the hub's integer ids so local and hub data are interchangeable.
``idx`` is the 0-based row position in the file (the hub's convention), or the ``idx`` field of
SuperGLUE jsonl rows.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sam_peft.tasks.specs import TaskSpec

__all__ = ["read_local_file"]

Columns = dict[str, list[Any]]

_NLI2 = {"entailment": 0, "not_entailment": 1}
_MNLI = {"entailment": 0, "neutral": 1, "contradiction": 2}
_CB = {"entailment": 0, "contradiction": 1, "neutral": 2}


class _Row:
    """One parsed line with enough context to report a precise error."""

    def __init__(self, path: Path, line: int, fields: list[str]) -> None:
        self.path, self.line, self.fields = path, line, fields

    def error(self, message: str) -> ValueError:
        return ValueError(
            f"{self.path}, line {self.line}: {message}. Check that the file is the official, "
            "unmodified download."
        )

    def get(self, i: int) -> str:
        return self.fields[i]

    def as_int(self, i: int) -> int:
        try:
            return int(self.fields[i])
        except ValueError:
            raise self.error(f"expected an integer label, got {self.fields[i]!r}") from None

    def as_float(self, i: int) -> float:
        try:
            return float(self.fields[i])
        except ValueError:
            raise self.error(f"expected a float score, got {self.fields[i]!r}") from None

    def mapped(self, i: int, mapping: dict[str, int]) -> int:
        return self.lookup(self.fields[i], mapping)

    def lookup(self, value: str, mapping: dict[str, int]) -> int:
        if value not in mapping:
            raise self.error(f"unknown label {value!r} (expected one of {sorted(mapping)})")
        return mapping[value]


def _tsv_rows(path: Path, header: bool, min_fields: int) -> Iterator[_Row]:
    """Yield the data rows of a tab-separated file, skipping the header and blank lines."""
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        for i, fields in enumerate(reader):
            if (header and i == 0) or not fields or fields == [""]:
                continue
            row = _Row(path, reader.line_num, fields)
            if len(fields) < min_fields:
                raise row.error(f"expected at least {min_fields} tab-separated fields, found {len(fields)}")
            yield row


# (header?, minimum number of fields, row -> (text, text_pair or None, label)) for each GLUE task.
_TsvParser = Callable[[_Row], tuple[str, str | None, int | float]]
_TSV: dict[str, tuple[bool, int, _TsvParser]] = {
    "cola": (False, 4, lambda r: (r.get(3), None, r.as_int(1))),
    "sst2": (True, 2, lambda r: (r.get(0), None, r.as_int(1))),
    "mrpc": (True, 5, lambda r: (r.get(3), r.get(4), r.as_int(0))),
    "stsb": (True, 10, lambda r: (r.get(7), r.get(8), r.as_float(-1))),
    "qqp": (True, 6, lambda r: (r.get(3), r.get(4), r.as_int(5))),
    "mnli": (True, 11, lambda r: (r.get(8), r.get(9), r.mapped(-1, _MNLI))),
    "qnli": (True, 4, lambda r: (r.get(1), r.get(2), r.mapped(3, _NLI2))),
    "rte": (True, 4, lambda r: (r.get(1), r.get(2), r.mapped(3, _NLI2))),
    "wnli": (True, 4, lambda r: (r.get(1), r.get(2), r.as_int(3))),
}


def _read_tsv(spec: TaskSpec, path: Path) -> Columns:
    header, min_fields, parse = _TSV[spec.name]
    cols: Columns = {"text": [], "label": [], "idx": []}
    if spec.is_pair:
        cols["text_pair"] = []
    for row in _tsv_rows(path, header, min_fields):
        text, pair, label = parse(row)
        cols["text"].append(text)
        if spec.is_pair:
            cols["text_pair"].append(pair or "")
        cols["label"].append(label)
        cols["idx"].append(len(cols["idx"]))
    return cols


def _jsonl_rows(path: Path) -> Iterator[tuple[_Row, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = _Row(path, line_no, [])
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise row.error(f"invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise row.error(f"expected a JSON object, got {type(record).__name__}")
            yield row, record


def _field(row: _Row, record: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in record:
        raise row.error(f"missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise row.error(f"field {key!r} has unexpected value {value!r}")
    return value


def _pair_record(first: str, second: str) -> Callable[[_Row, dict[str, Any]], dict[str, Any]]:
    def parse(row: _Row, rec: dict[str, Any]) -> dict[str, Any]:
        return {"text": _field(row, rec, first, str), "text_pair": _field(row, rec, second, str)}

    return parse


def _wic_record(row: _Row, rec: dict[str, Any]) -> dict[str, Any]:
    return {"word": _field(row, rec, "word", str), **_pair_record("sentence1", "sentence2")(row, rec)}


def _copa_record(row: _Row, rec: dict[str, Any]) -> dict[str, Any]:
    values = {key: _field(row, rec, key, str) for key in ("premise", "choice1", "choice2", "question")}
    if values["question"] not in ("cause", "effect"):
        raise row.error(f"question must be 'cause' or 'effect', got {values['question']!r}")
    values["label"] = _field(row, rec, "label", int)
    if values["label"] not in (0, 1):
        raise row.error(f"label must be 0 or 1, got {values['label']!r}")
    return values


def _wsc_record(row: _Row, rec: dict[str, Any]) -> dict[str, Any]:
    target = _field(row, rec, "target", dict)
    values = {"text": _field(row, rec, "text", str)}
    for key in ("span1_text", "span1_index", "span2_text", "span2_index"):
        values[key] = _field(row, target, key, int if key.endswith("index") else str)
    return values


# Row parsers of the SuperGLUE tasks; a parser that sets no "label" leaves it to the bool reader.
_JSONL: dict[str, Callable[[_Row, dict[str, Any]], dict[str, Any]]] = {
    "cb": _pair_record("premise", "hypothesis"),
    "boolq": _pair_record("question", "passage"),
    "copa": _copa_record,
    "wsc": _wsc_record,
    "wic": _wic_record,
}


def _read_jsonl(spec: TaskSpec, path: Path) -> Columns:
    cols: Columns = {}
    for position, (row, rec) in enumerate(_jsonl_rows(path)):
        values = _JSONL[spec.name](row, rec)
        if spec.name == "cb":
            values["label"] = row.lookup(_field(row, rec, "label", str), _CB)
        elif "label" not in values:
            values["label"] = int(_field(row, rec, "label", bool))
        idx = rec.get("idx", position)
        values["idx"] = idx if isinstance(idx, int) and not isinstance(idx, bool) else position
        for key, value in values.items():
            cols.setdefault(key, []).append(value)
    return cols


def read_local_file(spec: TaskSpec, path: Path) -> Columns:
    """Parse one official file of ``spec`` into normalised columns.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a row is malformed (the message names the file and line).
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"Expected the official {spec.name} file at {path}, but it does not exist. Pass data_dir= the "
            f"folder that contains {spec.local_dir}/{spec.local_files[0]} and {spec.local_dir}/"
            f"{spec.local_files[1]}, or data_dir=None to download {spec.hub_path!r} "
            f"({spec.hub_config!r}) from the Hugging Face hub."
        )
    reader = _read_tsv if path.suffix == ".tsv" else _read_jsonl
    return reader(spec, path)
