"""Hot-swapping an adapter's delta in place: eager outputs equal a freshly loaded adapter, and a compiled model
recompiles only when a tensor grows beyond its capacity (counted with a counting backend)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from peft import PeftModel, get_peft_model

import sam_peft
from sam_peft import SparseDelta
from sam_peft.errors import BaseModelMismatchError, ConfigError
from sam_peft.tuner.targets import targets


def _llama(seed: int = 0):
    torch.manual_seed(seed)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2)).eval()


def _save(path, seed: int, sparsity: float = 0.05):
    model = get_peft_model(_llama(), sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=sparsity,
                                                        selection="random", seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in targets(model, "default"):
            t.values.copy_(0.1 * torch.randn(t.values.shape, generator=g))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": _save(root / "a", 1), "b": _save(root / "b", 2), "small": _save(root / "small", 3, 0.02),
            "big": _save(root / "big", 4, 0.1), "bigger": _save(root / "bigger", 5, 0.2)}


IDS = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _fresh(path) -> torch.Tensor:
    return _logits(PeftModel.from_pretrained(_llama(), path))


@pytest.mark.parametrize("name", ["b", "small", "big"])
def test_eager_swap_equals_a_fresh_load(adapters, name):
    model = PeftModel.from_pretrained(_llama(), adapters["a"])
    grown = sam_peft.hotswap_adapter(model, adapters[name])
    assert (grown > 0) == (name == "big")
    torch.testing.assert_close(_logits(model), _fresh(adapters[name]), rtol=0, atol=1e-6)


def test_swap_from_a_sparse_delta_and_back(adapters):
    model = PeftModel.from_pretrained(_llama(), adapters["a"])
    original = _logits(model)
    sam_peft.hotswap_adapter(model, adapters["b"])
    other = PeftModel.from_pretrained(_llama(), adapters["a"])
    sam_peft.hotswap_adapter(model, SparseDelta.from_peft(other))
    assert torch.equal(_logits(model), original)


def test_compiled_model_recompiles_only_when_a_tensor_grows(adapters):
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(len(example_inputs))
        return gm.forward

    model = PeftModel.from_pretrained(_llama(), adapters["a"])
    compiled = torch.compile(model, backend=counting_backend)
    torch.testing.assert_close(_logits(compiled), _fresh(adapters["a"]), rtol=0, atol=1e-6)
    first = len(compiles)
    assert first >= 1
    for name in ("b", "small", "a"):  # other indices, fewer entries (padded), and back: buffers reused in place
        assert sam_peft.hotswap_adapter(model, adapters[name]) == 0
        torch.testing.assert_close(_logits(compiled), _fresh(adapters[name]), rtol=0, atol=1e-6)
    assert len(compiles) == first, "swapping within capacity recompiled"
    assert sam_peft.hotswap_adapter(model, adapters["big"]) > 0
    torch.testing.assert_close(_logits(compiled), _fresh(adapters["big"]), rtol=0, atol=1e-6)
    grown_once = len(compiles)
    assert grown_once <= 2 * first, "a grown capacity should recompile at most once"
    for name in ("b", "small"):
        sam_peft.hotswap_adapter(model, adapters[name])
        torch.testing.assert_close(_logits(compiled), _fresh(adapters[name]), rtol=0, atol=1e-6)
    assert len(compiles) == grown_once
    torch._dynamo.reset()


def test_reserved_capacity_never_recompiles(adapters):
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(1)
        return gm.forward

    model = PeftModel.from_pretrained(_llama(), adapters["a"])
    largest = json.loads((adapters["bigger"] / "adapter_config.json").read_text())["counts"]
    sam_peft.reserve_capacity(model, largest)  # room for the largest delta to be served
    torch.testing.assert_close(_logits(model), _fresh(adapters["a"]), rtol=0, atol=1e-6)
    compiled = torch.compile(model, backend=counting_backend)
    _logits(compiled)
    first = len(compiles)
    for name in ("big", "bigger", "small", "b"):
        assert sam_peft.hotswap_adapter(model, adapters[name]) == 0
        torch.testing.assert_close(_logits(compiled), _fresh(adapters[name]), rtol=0, atol=1e-6)
    assert len(compiles) == first
    torch._dynamo.reset()


def test_refusals_leave_the_adapter_unchanged(adapters, tmp_path):
    model = PeftModel.from_pretrained(_llama(), adapters["a"])
    before = _logits(model)
    foreign = get_peft_model(_llama(seed=7), sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.05,
                                                                selection="random"))
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        sam_peft.hotswap_adapter(model, SparseDelta.from_peft(foreign))
    narrow = get_peft_model(_llama(), sam_peft.SAMConfig(task_type="CAUSAL_LM", sparsity=0.05, selection="random",
                                                         target_modules=["q_proj"]))
    delta = SparseDelta.from_peft(narrow)
    delta.entries["model.not_a_target.weight"] = (torch.tensor([0]), torch.tensor([1.0]))
    with pytest.raises(ConfigError, match="does not target"):
        sam_peft.hotswap_adapter(model, delta)
    assert torch.equal(_logits(model), before)
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge"):
        sam_peft.hotswap_adapter(model, adapters["b"])
