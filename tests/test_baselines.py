"""The paper's baselines: bottleneck adapters (a peft tuner), Mixout, ChildPruning, DiffPruning and DPS, and the
harness pieces that choose learning rates and guard results files."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_bert
from peft import PeftModel, get_peft_model
from torch import nn

from sam_peft.baselines.adapters import BottleneckConfig, BottleneckModel
from sam_peft.baselines.childpruning import ProjectionCallback
from sam_peft.baselines.common import body_parameters, top_fraction_mask
from sam_peft.baselines.diffpruning import DiffPruningCallback, attach_gated_diffs, bake
from sam_peft.baselines.dps import DPSCallback
from sam_peft.baselines.mixout import MixoutLinear, apply_mixout, remove_mixout
from sam_peft.bench.glue import check_consistent, choose_lrs, run_key
from sam_peft.bench.profiles import PROFILES
from sam_peft.errors import ConfigError

# conftest's BERT with a 50-token vocabulary, 32 positions and transformers' default dropout (the baselines train)
_bert = partial(make_bert, dropout=0.1, vocab_size=50, max_position_embeddings=32)


def _batch(n: int = 4, length: int = 7, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 50, (n, length), generator=g), "labels": torch.tensor([0, 1] * (n // 2))}


def _step(model: nn.Module, optimizer, batch: dict) -> float:
    model.train()
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.detach())


# ---------------------------------------------------------------- bottleneck adapters
def test_bottleneck_starts_as_the_base_model_and_trains_only_adapters_and_head():
    base = _bert()
    x = _batch()["input_ids"]
    reference = base(x).logits
    model = get_peft_model(base, BottleneckConfig(task_type="SEQ_CLS"))
    assert torch.equal(model(x).logits, reference)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("bottleneck_" in n or "classifier" in n for n in trainable)
    adapted = [n for n, m in model.named_modules() if isinstance(m, BottleneckModel.tuner_layer_cls)]
    assert len(adapted) == 4  # houlsby: attention output and FFN output of 2 layers
    assert all(n.endswith(("attention.output.dense", ".output.dense")) for n in adapted)


def test_bottleneck_pfeiffer_places_one_adapter_per_layer_and_sizes_the_bottleneck():
    model = get_peft_model(_bert(), BottleneckConfig(placement="pfeiffer", reduction_factor=8,
                                                              task_type="SEQ_CLS"))
    layers = [m for m in model.modules() if isinstance(m, BottleneckModel.tuner_layer_cls)]
    assert len(layers) == 2
    assert layers[0].bottleneck_down["default"].out_features == 32 // 8


def test_bottleneck_save_load_round_trip_and_unmergeable(tmp_path):
    model = get_peft_model(_bert(), BottleneckConfig(task_type="SEQ_CLS"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        _step(model, optimizer, _batch())
    model.eval()
    x = _batch()["input_ids"]
    trained = model(x).logits
    assert not torch.allclose(trained, _bert()(x).logits)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_bert(), tmp_path).eval()
    assert torch.equal(loaded(x).logits, trained)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        loaded.merge_and_unload()
    plain = loaded.unload()  # the adapters go; the trained head stays
    assert not any(isinstance(m, BottleneckModel.tuner_layer_cls) for m in plain.modules())
    assert torch.equal(plain.bert(x).last_hidden_state, _bert().bert(x).last_hidden_state)


@pytest.mark.parametrize("kwargs", [{"placement": "middle"}, {"non_linearity": "cube"}, {"reduction_factor": 0}])
def test_bottleneck_config_errors(kwargs):
    with pytest.raises(ConfigError):
        BottleneckConfig(**kwargs)


# ---------------------------------------------------------------- mixout
def test_mixout_is_identity_in_eval_and_keeps_state_dict_keys():
    model = _bert()
    x = _batch()["input_ids"]
    reference = model(x).logits
    keys = list(model.state_dict())
    assert apply_mixout(model, p=0.9) == sum(1 for m in _bert().modules() if type(m) is nn.Linear)
    assert list(model.state_dict()) == keys
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    model.eval()
    assert torch.allclose(model(x).logits, reference)
    remove_mixout(model)
    assert not any(isinstance(m, MixoutLinear) for m in model.modules())


def test_mixout_mixes_towards_the_pretrained_weight_with_the_right_scale():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    pretrained = layer.weight.detach().clone()
    holder = nn.Sequential(layer)
    apply_mixout(holder, p=0.75)
    with torch.no_grad():
        layer.weight.add_(1.0)  # w − u = 1 everywhere
    holder.train()
    x = torch.eye(64)
    mixed = (layer(x) - layer.bias).T  # the mixed weight, one sample
    delta = mixed - pretrained
    reset = delta.abs() < 1e-5
    assert 0.65 < reset.float().mean() < 0.85  # about p of the entries went back to u
    assert torch.allclose(delta[~reset], torch.full_like(delta[~reset], 4.0), atol=1e-4)  # 1 / (1 − p)
    out = layer(x).sum()
    out.backward()
    grad = layer.weight.grad
    assert set(torch.unique(grad).tolist()) <= {0.0, 4.0}


# ---------------------------------------------------------------- childpruning (iterative projection)
def test_projection_keeps_the_entries_that_moved_most_and_resets_the_rest():
    model = _bert()
    callback = ProjectionCallback(model, sparsity=0.05, projection_steps=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        _step(model, optimizer, _batch())
    moved = {n: (p.detach() - callback.theta0[n]).abs() for n, p in callback.params.items()}
    callback.project()
    for name, param in callback.params.items():
        changed = param.detach() != callback.theta0[name]
        k = math.floor(0.05 * param.numel())
        assert int(changed.sum()) <= k
        if changed.any():
            assert moved[name][changed].min() >= moved[name][~changed].max()
    fixed = {n: m.clone() for n, m in callback.masks.items()}
    _step(model, optimizer, _batch(seed=3))
    callback.enforce()
    for name, param in callback.params.items():
        assert not (param.detach() != callback.theta0[name])[~fixed[name]].any()


# ---------------------------------------------------------------- diffpruning
def test_diffpruning_starts_at_the_base_model_then_projects_to_a_sparse_diff():
    model = _bert()
    x = _batch()["input_ids"]
    reference = model(x).logits
    base_state = {n: p.detach().clone() for n, p in body_parameters(model).items()}
    gated = attach_gated_diffs(model)
    model.eval()
    assert torch.equal(model(x).logits, reference)  # w = 0
    callback = DiffPruningCallback(gated, sparsity=0.05, projection_steps=2)
    penalty = callback.penalty()
    expected = sum(torch.sigmoid(g.alpha).sum() for g in gated.values()) / callback.total
    assert torch.allclose(penalty, expected)
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.endswith("original"))
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    state = SimpleNamespace(global_step=0)
    control = SimpleNamespace(should_evaluate=True, should_save=True)
    for step in (1, 2, 3):
        model.train()
        loss = model(**_batch(seed=step)).loss
        extra = callback.penalty()
        (loss if extra is None else loss + extra).backward()
        optimizer.step()
        optimizer.zero_grad()
        state.global_step = step
        control.should_evaluate = control.should_save = True
        callback.on_step_end(None, state, control)
        if step < 2:
            assert not control.should_evaluate and not control.should_save  # no checkpoint while relaxed
    assert callback.projections == [2] and callback.penalty() is None
    for g in gated.values():
        assert int(g.mask.sum()) == math.floor(0.05 * g.mask.numel())
        assert torch.equal(g.mask.bool(), top_fraction_mask(g.alpha.abs(), 0.05))
    bake(model)
    baked = body_parameters(model, trainable_only=False)
    assert set(baked) == set(base_state)
    for name, param in baked.items():
        changed = int((param.detach() != base_state[name]).sum())
        assert changed <= math.floor(0.05 * param.numel())


# ---------------------------------------------------------------- dps
def test_dps_alternates_dense_and_subnetwork_stages():
    model = _bert()
    callback = DPSCallback(model, stage_steps=2, keep=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # look at gradients only
    state = SimpleNamespace(global_step=0)
    masked_fractions = []
    for step in range(6):
        state.global_step = step
        callback.on_step_begin(None, state, None)
        model.train()
        model(**_batch(seed=step)).loss.backward()
        name, weight = next(iter(callback.weights.items()))
        zero = (weight.grad == 0).float().mean().item()
        masked_fractions.append(zero)
        optimizer.zero_grad()
    assert [DPSCallback.stage_of(s, 2) for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert masked_fractions[0] < 0.1 and masked_fractions[4] < 0.1  # dense stages
    assert 0.45 < masked_fractions[2] < 0.6  # half of the entries frozen in the sub-network stage
    assert callback.selections == 1
    callback.on_train_end(None, state, None)


# ---------------------------------------------------------------- harness: learning rates and consistency
def _record(task, method, seed, lr, heldout, settings=None):
    return {"task": task, "method": method, "seed": seed, "sparsity": None, "lr": lr, "heldout_metric": heldout,
            "metric": heldout, "status": "done", "settings": settings or {}}


def test_choose_lrs_uses_the_best_mean_over_complete_learning_rates(tmp_path):
    path = tmp_path / "grid.jsonl"
    rows = [_record("rte", "sam", 0, 1e-3, 60), _record("cb", "sam", 0, 1e-3, 70),
            _record("rte", "sam", 0, 1e-4, 65), _record("cb", "sam", 0, 1e-4, 70),
            _record("rte", "sam", 0, 1e-2, 90),  # incomplete: cb missing
            _record("rte", "full", 0, 5e-5, 50), _record("cb", "full", 0, 5e-5, 50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert choose_lrs(path) == {"sam": 1e-4, "full": 5e-5}
    with pytest.raises(ValueError, match="no finished runs"):
        choose_lrs(tmp_path / "missing.jsonl")


def test_records_from_before_the_split_rename_are_read():
    """Results files written before the rename call the held-out metric `dev_metric` (benchmarks/results)."""
    from sam_peft.bench.glue import read_records

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "lrgrid.jsonl"
    legacy = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert legacy and all("dev_metric" in r and "heldout_metric" not in r for r in legacy)
    records = read_records(path)
    assert len(records) == sum(r.get("status") == "done" for r in legacy) > 0
    assert [r["heldout_metric"] for r in records] == [r["dev_metric"] for r in legacy if r.get("status") == "done"]
    assert all("dev_metric" not in r for r in records)
    assert choose_lrs(path)


def test_results_file_refuses_runs_made_with_other_settings():
    profile = PROFILES["quick"]
    good = _record("rte", "sam", 0, profile.lrs["sam"], 50, settings=dict(profile.settings))
    check_consistent([good], profile, Path("quick.jsonl"))
    bad = _record("rte", "sam", 0, profile.lrs["sam"], 50, settings={**profile.settings, "max_steps": 7})
    with pytest.raises(ValueError, match="other settings"):
        check_consistent([bad], profile, Path("quick.jsonl"))
    other_lr = _record("rte", "sam", 0, 0.5, 50, settings=dict(profile.settings))
    with pytest.raises(ValueError, match="--name"):
        check_consistent([other_lr], profile, Path("quick.jsonl"))


def test_lr_grid_profile_expands_learning_rates_into_run_keys():
    profile = PROFILES["lrgrid"]
    runs = profile.runs()
    assert len(runs) == len(profile.tasks) * sum(len(profile.lr_grid[m]) for m in profile.methods)
    assert len({run_key(r, with_lr=True) for r in runs}) == len(runs)


def test_lrsearch_and_evidence_profiles(tmp_path):
    """Issue 25's grid: a rate search on the held-out split (seed 0), then 5 seeds at each method's chosen rate."""
    from sam_peft.bench.glue import run_profile

    search, evidence = PROFILES["lrsearch"], PROFILES["evidence"]
    for profile in (search, evidence):
        assert profile.tasks == ("stsb", "mrpc", "cola", "rte") and profile.methods == ("sam", "full", "lora", "random")
        assert profile.settings == {"epochs": 3, "batch_size": 16, "max_length": 128, "evals_per_epoch": 2,
                                    "patience": 2}
    runs = search.runs()
    assert {r["seed"] for r in runs} == {0} and len(runs) == 4 * 4 * 3
    assert {r["sparsity"] for r in runs if r["method"] in ("sam", "random")} == {0.005}  # random at SAM's budget
    assert evidence.seeds == (0, 1, 2, 3, 4) and len(evidence.runs()) == 4 * 4 * 5

    with pytest.raises(ValueError, match="--lrs-from"):  # the untuned defaults are never used silently
        run_profile("evidence", results_dir=str(tmp_path), max_runs=0)
    path = tmp_path / "lrsearch.jsonl"
    rows = [{**_record(task, method, 0, lr, 50 + 100 * lr, settings=dict(search.settings)), "profile": "lrsearch"}
            for task in search.tasks for method in ("sam", "full", "lora") for lr in search.lr_grid[method]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="random"):  # a search that has not finished a method
        run_profile("evidence", results_dir=str(tmp_path), lrs_from=str(path), max_runs=0)
    rows += [{**_record(task, "random", 0, lr, 50, settings=dict(search.settings)), "profile": "lrsearch"}
             for task in search.tasks for lr in search.lr_grid["random"]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert choose_lrs(path) == {"sam": 3e-3, "full": 1e-4, "lora": 3e-3, "random": 3e-4}
    assert run_profile("evidence", results_dir=str(tmp_path), lrs_from=str(path), max_runs=0).name == "evidence.jsonl"


def test_report_covers_the_grid_the_perturbation_table_and_the_sweep(tmp_path):
    from sam_peft.bench.report import write_report

    rows = []
    for seed in (0, 1):
        for task, base in (("rte", 60.0), ("cb", 70.0)):
            for method, shift in (("sam", 2.0), ("full", 0.0)):
                # the held-out metric under its name before the split rename: the report reads both
                common = {"task": task, "method": method, "seed": seed, "status": "done", "lr": 1e-3,
                          "dev_metric": base + shift, "train_loss": 0.5}
                rows.append({**common, "sparsity": 0.005 if method == "sam" else None, "metric": base + shift + seed,
                             "profile": "paper", "settings": {"epochs": 10}})
                rows.append({**common, "sparsity": 0.005 if method == "sam" else None, "metric": base + shift - seed,
                             "profile": "perturb", "settings": {"epochs": 10, "drop_fraction": 0.1}})
                rows.append({**common, "sparsity": None, "metric": base, "profile": "lrgrid", "lr": 1e-4,
                             "settings": {}})
            for p in (0.001, 0.01):
                rows.append({"task": task, "method": "sam", "seed": seed, "sparsity": p, "status": "done",
                             "metric": base + 100 * p, "train_metric": base + 200 * p, "train_loss": 0.4,
                             "lr": 1e-3, "profile": "sweep", "settings": {}})
    path = tmp_path / "all.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report([str(path)], str(tmp_path / "report.md")).read_text()
    assert "Learning-rate grid" in text and "Table 2" in text and "Table 1" in text and "Sparsity sweep" in text
    assert "| sam | 62.50 ± 0.71 | 72.50 ± 0.71 | 67.50 | **67.50** |" in text
    assert "| 0.01 | 4 | 66.00 ± 5.77 | 67.00 ± 5.77 |" in text  # sample std over the 4 runs
    assert (tmp_path / "report-sweep.png").exists() and (tmp_path / "report-methods.png").exists()


def test_a_record_appended_after_a_cut_off_line_is_kept(tmp_path):
    from sam_peft.bench.glue import append_record, read_records

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_record("rte", "sam", 0, 1e-3, 50)) + "\n" + '{"task": "rte", "meth')
    append_record(path, _record("cb", "sam", 0, 1e-3, 60))
    assert [r["task"] for r in read_records(path)] == ["rte", "cb"]


def test_results_file_refuses_another_base_model():
    profile = PROFILES["quick"]
    record = {**_record("rte", "sam", 0, profile.lrs["sam"], 50, settings=dict(profile.settings)),
              "model": "some/other-model"}
    with pytest.raises(ValueError, match="base model"):
        check_consistent([record], profile, Path("quick.jsonl"))
    check_consistent([record], profile, Path("quick.jsonl"), model="some/other-model")


def test_reprojection_run_ends_with_a_projected_sparse_model():
    model = _bert()
    base_state = {n: p.detach().clone() for n, p in body_parameters(model).items()}
    gated = attach_gated_diffs(model)
    callback = DiffPruningCallback(gated, sparsity=0.05, projection_steps=1, reproject_every=2)
    for g in gated.values():
        with torch.no_grad():
            g.w.normal_()  # a dense diff, as after relaxed training
    model.train()
    callback.finish(step=3)
    bake(model)
    assert model.training
    for name, param in body_parameters(model, trainable_only=False).items():
        assert int((param.detach() != base_state[name]).sum()) <= math.floor(0.05 * param.numel())
