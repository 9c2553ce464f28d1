"""Combining sparse deltas: `add_weighted_adapter` (linear, TIES, DARE) and `SparseDelta.combine`, checked against
sums built by hand on dense tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model

import sam_peft
from sam_peft import SparseDelta
from sam_peft.errors import ConfigError
from sam_peft.tuner.combine import Combination
from sam_peft.tuner.targets import targets

N = 500


def _sparse(seed: int, k: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    indices = torch.randperm(N, generator=g)[:k].sort().values
    return indices, torch.randn(k, generator=g)


def _dense(indices, values) -> torch.Tensor:
    return torch.zeros(N).index_put_((indices.long(),), values.float())


def _ties_by_hand(parts, weights, density, method) -> torch.Tensor:
    trimmed = []
    for indices, values in parts:
        keep = math.ceil(density * values.numel())
        top = values.abs().argsort(descending=True)[:keep]
        trimmed.append(_dense(indices[top], values[top]))
    stack = torch.stack(trimmed)
    votes = stack.sum(0) if method == "total" else stack.sign().sum(0)
    sign = torch.where(votes >= 0, 1.0, -1.0)
    out = torch.zeros(N)
    for i in range(N):
        agree = [(w * stack[j, i]).item() for j, w in enumerate(weights)
                 if stack[j, i] != 0 and stack[j, i].sign() == sign[i]]
        out[i] = sum(agree) / max(len(agree), 1)
    return out


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, -2.0, 0.25]])
def test_linear_is_the_weighted_dense_sum(weights):
    parts = [_sparse(s) for s in range(3)]
    indices, values = Combination(("a", "b", "c"), tuple(weights)).combine(parts)
    expected = sum(w * _dense(*p) for w, p in zip(weights, parts))
    assert torch.equal(indices, torch.unique(torch.cat([i for i, _ in parts])))
    torch.testing.assert_close(_dense(indices, values), expected)


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 1.0])
def test_ties_matches_trim_elect_disjoint_mean(method, density):
    parts = [_sparse(s, k=200) for s in range(3)]  # k = 200 of 500: many entries shared by 2 or 3 deltas
    weights = [1.0, 0.5, 2.0]
    _, values = combined = Combination(("a", "b", "c"), tuple(weights), "ties", density, method).combine(parts)
    torch.testing.assert_close(_dense(*combined), _ties_by_hand(parts, weights, density, method))
    assert combined[0].numel() == torch.unique(torch.cat([i for i, _ in parts])).numel()


def test_dare_drops_and_rescales_seeded():
    parts = [_sparse(s, k=400) for s in range(2)]
    dare = Combination(("a", "b"), (1.0, 1.0), "dare_linear", 0.25, seed=3)
    first, again = dare.combine(parts), dare.combine(parts)
    assert torch.equal(first[1], again[1]), "the same seed must drop the same entries"
    single = Combination(("a",), (1.0,), "dare_linear", 0.25, seed=3).combine(parts[:1])
    kept = single[1] != 0
    assert 0.15 < kept.float().mean() < 0.35  # ~25 % of 400 entries kept
    torch.testing.assert_close(single[1][kept], 4 * parts[0][1][kept])
    full = Combination(("a", "b"), (1.0, 2.0), "dare_linear", 1.0).combine(parts)
    torch.testing.assert_close(full[1], Combination(("a", "b"), (1.0, 2.0)).combine(parts)[1])


@pytest.mark.parametrize("bad, match", [
    (dict(weights=(1.0,)), "one weight per delta"),
    (dict(combination_type="svd"), "not supported"),
    (dict(combination_type="ties"), "needs a density"),
    (dict(combination_type="ties", density=1.5), "needs a density"),
    (dict(density=0.5), "linear"),
    (dict(weights=(1.0, float("nan"))), "finite"),
    (dict(combination_type="ties", density=0.5, majority_sign_method="max"), "majority_sign_method"),
])
def test_bad_combinations_are_refused(bad, match):
    args = dict(adapters=("a", "b"), weights=(1.0, 1.0)) | bad
    with pytest.raises(ConfigError, match=match):
        Combination(**args)


# ----------------------------------------------------------------------------- on a model
def _llama():
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))


def _two_adapters():
    config = dict(task_type="CAUSAL_LM", sparsity=0.1, selection="random")
    model = get_peft_model(_llama(), sam_peft.SAMConfig(**config, seed=1), adapter_name="one")
    model.add_adapter("two", sam_peft.SAMConfig(**config, seed=2))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ("one", "two"):
            for target in targets(model, name):
                target.values.copy_(0.05 * torch.randn(target.values.shape, generator=g))
    return model.eval()


def _by_hand(model, weights) -> dict[str, torch.Tensor]:
    """θ0 + Σ w_j Δ_j per parameter, built densely from each adapter's entries."""
    params = dict(model.get_base_model().named_parameters())
    out = {}
    for name, w in zip(("one", "two"), weights):
        for t in targets(model, name):
            base = out.get(t.name, params[f"{_module(t.name)}.base_layer.{t.name.rsplit('.', 1)[1]}"].detach().clone())
            flat = base.reshape(-1)
            flat.index_add_(0, t.indices.long(), w * t.values.detach())
            out[t.name] = base
    return out


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


def test_add_weighted_adapter_linear_equals_the_hand_built_model(tmp_path):
    model = _two_adapters()
    weights = [0.7, -0.3]
    model.add_weighted_adapter(["one", "two"], weights, "mix")
    ids = torch.randint(0, 64, (2, 5))
    model.set_adapter("mix")
    with torch.no_grad():
        mixed = model(input_ids=ids).logits
    reference = _llama().eval()
    with torch.no_grad():
        for name, tensor in _by_hand(model, weights).items():
            dict(reference.named_parameters())[name].copy_(tensor)
        expected = reference(input_ids=ids).logits
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path, selected_adapters=["mix"])
    saved = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert saved["combined_from"] == {"adapters": ["one", "two"], "weights": weights, "combination_type": "linear",
                                      "density": None, "majority_sign_method": None, "seed": None}
    reloaded = PeftModel.from_pretrained(_llama().eval(), tmp_path / "mix")
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, mixed)


@pytest.mark.parametrize("kind, density", [("ties", 0.5), ("dare_linear", 0.5)])
def test_sparse_delta_combine_equals_the_adapter(kind, density):
    model = _two_adapters()
    model.add_weighted_adapter(["one", "two"], [1.0, 0.5], "mix", combination_type=kind, density=density, seed=4)
    deltas = [SparseDelta.from_peft(model, name) for name in ("one", "two")]
    combined = SparseDelta.combine(deltas, [1.0, 0.5], kind, density=density, seed=4)
    adapter = SparseDelta.from_peft(model, "mix")
    assert combined.entries.keys() == adapter.entries.keys()
    for name, (indices, values) in adapter.entries.items():
        assert torch.equal(combined.entries[name][0], indices.long())
        torch.testing.assert_close(combined.entries[name][1], values)
    assert json.loads(combined.metadata["combined_from"])["combination_type"] == kind


def test_add_weighted_adapter_refusals():
    model = _two_adapters()
    with pytest.raises(ConfigError, match="does not exist"):
        model.add_weighted_adapter(["one", "typo"], [1.0, 1.0], "mix")
    with pytest.raises(ConfigError, match="already exists"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "two")
    model.add_adapter("other", sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.1, selection="random",
                                                  target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="target different parameters"):
        model.add_weighted_adapter(["one", "other"], [1.0, 1.0], "mix")
    model.add_adapter("unselected", sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.1))
    with pytest.raises(sam_peft.NotSelectedError):
        model.add_weighted_adapter(["one", "unselected"], [1.0, 1.0], "mix")
    assert "mix" not in model.peft_config


def test_dense_heads_of_several_adapters_are_refused():
    torch.manual_seed(0)
    base = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64))
    config = dict(task_type="SEQ_CLS", sparsity=0.1, selection="magnitude")
    model = get_peft_model(base, sam_peft.SAMConfig(**config), adapter_name="one")
    model.add_adapter("two", sam_peft.SAMConfig(**config))
    with pytest.raises(ConfigError, match="modules_to_save"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "mix")
