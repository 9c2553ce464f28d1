"""Constant predictions: the baseline score of a split, the histogram of a run's predicted classes, the `constant`
flag, and the report that counts constant runs and leaves their tasks out of comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sam_peft.bench.report import mark_constant, mostly_constant, paired_table, table1, write_report
from sam_peft.tasks.constant import constant_baseline, constant_facts, matches_constant, prediction_histogram


def test_constant_baseline_scores_every_class_with_the_tasks_metric():
    rte = constant_baseline("rte", [0, 0, 0, 1])  # accuracy: always 0 -> 75, always 1 -> 25
    assert rte["constant_scores"] == pytest.approx([75.0, 25.0])
    assert rte["constant_score"] == pytest.approx(75.0) and rte["constant_class"] == 0
    # mrpc: (accuracy + F1 of class 1) / 2; always 1 on 3 positives of 4: (75 + 100 * 6/7) / 2
    mrpc = constant_baseline("mrpc", [1, 1, 1, 0])
    assert mrpc["constant_scores"] == pytest.approx([12.5, (75 + 600 / 7) / 2])
    assert mrpc["constant_class"] == 1
    cb = constant_baseline("cb", [0, 1, 1, 2])  # three classes; always 1: accuracy 50, macro F1 (0 + 2/3 + 0) / 3
    assert len(cb["constant_scores"]) == 3 and cb["constant_score"] == pytest.approx((50 + 100 * 2 / 9) / 2)
    assert constant_baseline("cola", [0, 1, 1])["constant_scores"] == [0.0, 0.0]  # Matthews: undefined -> 0
    stsb = constant_baseline("stsb", [0.5, 3.0, 4.2])  # any constant (the train mean too) has no correlation
    assert stsb == {"constant_scores": [0.0], "constant_score": 0.0, "constant_class": None}


def test_histogram_of_predicted_classes():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
    assert prediction_histogram("rte", logits) == [2, 1]
    assert prediction_histogram("rte", (logits, "hidden states")) == [2, 1]
    assert prediction_histogram("cb", np.array([2, 2, 0])) == [1, 0, 2]  # class ids; class 1 never predicted
    assert prediction_histogram("copa", np.array([[0.1, 0.9], [0.3, 0.2]])) == [1, 1]  # choice scores
    assert prediction_histogram("stsb", np.array([1.0, 2.0])) is None


def test_constant_flag():
    labels = np.array([0, 0, 1, 1, 0])  # always 0 scores 60
    one_class = constant_facts("rte", np.array([1, 1, 1, 1, 1]), labels, 40.0)  # the minority class everywhere
    assert one_class == {"dev_histogram": [0, 5], "constant_score": pytest.approx(60.0), "constant_class": 0,
                         "constant": True}
    tie = constant_facts("rte", np.array([0, 1, 0, 0, 0]), labels, 60.0)  # two classes, the constant score
    assert tie["dev_histogram"] == [4, 1] and tie["constant"]
    learned = constant_facts("rte", np.array([0, 0, 1, 0, 0]), labels, 80.0)
    assert learned["dev_histogram"] == [4, 1] and not learned["constant"]
    flat = constant_facts("stsb", np.full((4, 1), 2.5), np.array([0.0, 1.0, 2.0, 3.0]), 0.0)
    assert flat == {"dev_histogram": None, "constant_score": 0.0, "constant_class": None, "constant": True}
    assert not constant_facts("stsb", np.array([0.1, 1.2, 1.9, 3.1]), np.array([0.0, 1.0, 2.0, 3.0]), 99.0)["constant"]
    assert matches_constant(47.29241877256318, [52.707581227436826, 47.29241877256318])
    assert not matches_constant(47.3, [52.707581227436826, 47.29241877256318])


def _run(task, method, seed, metric, **extra):
    return {"task": task, "method": method, "seed": seed, "sparsity": None, "metric": metric, "status": "done",
            "profile": "quick", "lr": 1e-3, **extra}


def test_report_counts_constant_runs_and_leaves_their_task_out(tmp_path):
    runs = []
    for seed in range(3):
        # rte: full predicts one class in 2 of 3 runs (mostly constant); sam learns
        runs.append(_run("rte", "sam", seed, 70.0 + seed, constant=False, constant_score=52.7))
        runs.append(_run("rte", "full", seed, 52.7 if seed < 2 else 60.0, constant=seed < 2, constant_score=52.7))
        # cb: both learn, sam 1 point ahead
        runs.append(_run("cb", "sam", seed, 61.0 + seed, constant=False, constant_score=36.1))
        runs.append(_run("cb", "full", seed, 60.0 + seed + (0.5 if seed == 1 else 0), constant=False,
                         constant_score=36.1))
    assert mostly_constant(runs) == {("full", "rte")}
    text, summary = table1(runs)
    assert "| rte † |" in text and "left out: rte" in text
    assert summary["sam"]["mean"] == pytest.approx(62.0) and summary["full"]["mean"] == pytest.approx(61 + 0.5 / 3)
    assert summary["sam"]["mean_all"] == pytest.approx((71.0 + 62.0) / 2)
    pairs = paired_table(runs, [("sam", "full")])
    assert "| sam vs full | 3 | +0.83 | 3 / 0 / 0 |" in pairs and pairs.rstrip().endswith("| rte |")

    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in runs))
    report = write_report([str(path)], str(tmp_path / "report.md")).read_text()
    assert "Classification runs: 2 of 12 constant." in report
    assert "| rte | 52.70 | 2 / 3 | 0 / 3 |" in report  # methods in name order: full, sam


def test_report_prints_no_std_for_a_single_run(tmp_path):
    runs = [_run("cb", "sam", 0, 61.0, constant=False), _run("cb", "full", 0, 60.0, constant=False),
            _run("rte", "sam", 0, 55.0, constant=False), _run("rte", "full", 0, 54.0, constant=False)]
    text, summary = table1(runs)
    assert "± " not in text.split("\n\n", 1)[1]
    assert "| sam | 55.00 | 61.00 | 58.00 | **58.00** | n/a | n/a | 1 |" in text


def test_older_records_are_judged_from_the_dev_labels(tmp_path):
    rte = tmp_path / "RTE"
    rte.mkdir()
    dev = ["entailment"] * 3 + ["not_entailment"]
    for split, labels in (("train", ["entailment", "not_entailment"] * 10), ("dev", dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        rows += [f"{i}\ta b .\tc d .\t{label}" for i, label in enumerate(labels)]
        (rte / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    old = [_run("rte", "sam", 0, 25.0), _run("rte", "sam", 1, 50.0), _run("stsb", "sam", 0, 0.0),
           _run("stsb", "sam", 1, 12.0)]
    unknown = [dict(r) for r in old]
    mark_constant(unknown)  # no data: classification unknown, regression needs none
    assert [r["constant"] for r in unknown] == [None, None, True, False]
    mark_constant(old, str(tmp_path))
    assert [r["constant"] for r in old] == [True, False, True, False]  # 25: always "not_entailment"
    assert old[0]["constant_score"] == pytest.approx(75.0)
    new = [_run("rte", "sam", 0, 25.0, constant=False)]
    mark_constant(new, str(tmp_path))
    assert new[0]["constant"] is False  # a record's own flag is kept


def test_bootstrap_interval_covers_the_score_and_narrows_with_more_examples():
    from sam_peft.tasks.interval import bootstrap_interval

    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 1600):
        labels = rng.integers(0, 2, n)
        preds = np.where(rng.random(n) < 0.8, labels, 1 - labels)  # about 80 % right
        score = 100 * np.mean(preds == labels)
        low, high = bootstrap_interval("rte", preds, labels)
        assert low <= score <= high
        widths.append(high - low)
        # the normal approximation of a binomial proportion's 95 % interval: within 25 % of it
        assert (high - low) == pytest.approx(2 * 1.96 * 100 * np.sqrt(0.8 * 0.2 / n), rel=0.25)
    assert widths[1] < widths[0] / 3  # 16x the examples: about a quarter of the width
    assert bootstrap_interval("rte", preds, labels) == bootstrap_interval("rte", preds, labels)  # seeded


def test_interval_facts_say_whether_a_run_beats_the_constant_prediction():
    from sam_peft.tasks.interval import interval_facts

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 277)
    chance = np.where(rng.random(277) < 0.5, labels, 1 - labels)  # a coin
    baseline = constant_baseline("rte", labels)["constant_score"]
    assert interval_facts("rte", chance, labels, baseline)["above_constant"] is False
    good = np.where(rng.random(277) < 0.9, labels, 1 - labels)
    facts = interval_facts("rte", good, labels, baseline)
    assert facts["above_constant"] is True and facts["dev_interval"][0] > baseline
    gold = rng.normal(size=300)  # regression: the constant score is 0 correlation
    assert interval_facts("stsb", gold + rng.normal(size=300), gold, 0.0)["above_constant"] is True
    with pytest.raises(ValueError, match="must match"):
        interval_facts("rte", good[:10], labels, baseline)


def _stops_after(callback, values: list[float]) -> int | None:
    """The 1-based evaluation after which `callback` stops training, or None."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir="unused", metric_for_best_model="primary", load_best_model_at_end=True,
                             eval_strategy="steps", save_strategy="steps", report_to=[])
    state, control = TrainerState(), TrainerControl()
    for i, value in enumerate(values, start=1):
        callback.on_evaluate(args, state, control, metrics={"eval_primary": value})
        if state.best_metric is None or value > state.best_metric:  # what the Trainer's checkpointing records
            state.best_metric = value
        if control.should_training_stop:
            return i
    return None


def test_early_stopping_counts_only_after_the_model_beats_the_constant_prediction():
    from transformers import EarlyStoppingCallback

    from sam_peft.training import EarlyStoppingAboveConstant

    plateau = [0.0, 0.0, 0.0, 12.0, 20.0, 19.0, 18.0]  # CoLA: Matthews 0 for an epoch, then learning
    assert _stops_after(EarlyStoppingCallback(early_stopping_patience=2), plateau) == 3  # kept a constant model
    assert _stops_after(EarlyStoppingAboveConstant(2, floor=0.0), plateau) == 7
    assert _stops_after(EarlyStoppingAboveConstant(2, floor=0.0), [0.0] * 6) is None  # never learns: full budget
    # a held-out score at or below the constant prediction's (here 51.4) is not a start either
    assert _stops_after(EarlyStoppingAboveConstant(1, floor=51.4), [51.4, 50.0, 51.4, 55.0, 54.0]) == 5
    # once a run has beaten the floor, it stops exactly where plain early stopping stops
    rng = np.random.default_rng(0)
    for _ in range(200):
        values = [0.0] * int(rng.integers(0, 3)) + list(np.round(rng.uniform(0, 10, size=8), 1))
        patience = int(rng.integers(1, 4))
        plain = _stops_after(EarlyStoppingCallback(early_stopping_patience=patience), values)
        if plain is not None and max(values[:plain]) > 0.0:
            assert _stops_after(EarlyStoppingAboveConstant(patience, floor=0.0), values) == plain
    with pytest.raises(ValueError, match="patience"):
        EarlyStoppingAboveConstant(0, floor=0.0)
