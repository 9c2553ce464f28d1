"""Core behaviour of the sparse-delta tuner, as a peft-style test matrix.

Every case of `CASES` (a tiny random-init transformers model, a config and a task type) runs through the same
generic tests: parameter counting, forward against a hand-made reference, gradients against the dense gradient,
merging and unloading, saving and loading, several adapters, half precision, training, and `SparseDelta`.
Further tests cover the autograd functions directly, config validation, the exact top-k, and known bugs.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from functools import partial

import conftest
import pytest
import torch
import torch.nn.functional as F
from conftest import HIDDEN, SEQ, VOCAB, bert_config, gpt2_config, make_llama
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors import safe_open
from transformers import BertForMaskedLM, GPT2LMHeadModel

import sam_peft
from sam_peft.ranking.budget import Budget
from sam_peft.ranking.topk import top_entries
from sam_peft.storage.encoding import ADAPTER_KEYS, decode_tensors
from sam_peft.tuner.ops import (
    BlockStructure,
    DeltaSlot,
    EmbeddingStructure,
    delta_written,
    matmul,
    sparse_delta_embedding,
    sparse_term,
    written_delta_embedding,
    written_delta_matmul,
)

BATCH = 2  # rows per input batch in this file (conftest's BATCH is 4)
PREFIX = "base_model.model."


# --------------------------------------------------------------------------- model factories: conftest's, 3 labels

make_bert = partial(conftest.make_bert, num_labels=3)
make_roberta = partial(conftest.make_roberta, num_labels=3)
make_gpt2 = partial(conftest.make_gpt2, num_labels=3)


@dataclass(frozen=True)
class Case:
    id: str
    factory: Callable[..., torch.nn.Module]
    config: dict = field(default_factory=dict)
    task_type: str = "SEQ_CLS"
    pad: int = 0


CASES = [
    Case("bert-magnitude", make_bert, dict(sparsity=0.05, selection="magnitude")),
    Case("bert-random-global", make_bert, dict(sparsity=0.05, selection="random", allocation="global")),
    Case("roberta-random", make_roberta, dict(sparsity=0.05, selection="random"), pad=1),
    Case("gpt2-magnitude", make_gpt2, dict(sparsity=0.05, selection="magnitude")),
    Case("gpt2-random-global", make_gpt2, dict(sparsity=0.05, selection="random", allocation="global")),
    Case("llama-random", make_llama, dict(sparsity=0.05, selection="random"), "CAUSAL_LM"),
    Case("llama-magnitude-global", make_llama, dict(sparsity=0.05, selection="magnitude", allocation="global"),
         "CAUSAL_LM"),
]
matrix = pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
BERT = CASES[0]

def make_config(case: Case, **overrides) -> sam_peft.SparseDiffConfig:
    return sam_peft.SparseDiffConfig(task_type=case.task_type, **{**case.config, **overrides})


def make_peft(case: Case, dtype: torch.dtype | None = None, **overrides):
    """(peft model, untouched deep copy of its base model)."""
    model = case.factory()
    if dtype is not None:
        model = model.to(dtype)
    base = copy.deepcopy(model)
    return get_peft_model(model, make_config(case, **overrides)), base


def make_inputs(case: Case, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch: row 1 ends with two pad tokens (masked out)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, -2:] = case.pad
    attention_mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def make_labels(case: Case, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if case.task_type == "CAUSAL_LM":
        return inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return torch.tensor([0, 2])


@torch.no_grad()
def logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def weighted_loss(out: torch.Tensor) -> torch.Tensor:
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    return (out.float() * weights).sum()


# --------------------------------------------------------------------------- reading a peft model by hand


def _base_name(peft_name: str, marker: str) -> str:
    """'base_model.model.a.b.<marker>.w' -> 'a.b.w' (the name in the original model)."""
    module, attr = peft_name.removeprefix(PREFIX).split(marker)
    return f"{module}.{attr}"


def sparse_values(pm, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    marker = f".sparsediff_values.{adapter}."
    return {_base_name(n, marker): p for n, p in pm.named_parameters() if marker in n}


def sparse_indices(pm, adapter: str = "default") -> dict[str, torch.Tensor]:
    marker = f".sparsediff_indices.{adapter}."
    return {_base_name(n, marker): b for n, b in pm.named_buffers() if marker in n}


def head_params(pm, adapter: str = "default") -> dict[str, torch.nn.Parameter]:
    marker = f".modules_to_save.{adapter}."
    return {_base_name(n, marker): p for n, p in pm.named_parameters() if marker in n}


def base_params(pm) -> dict[str, torch.Tensor]:
    """The frozen base parameters inside the peft model, by their name in the original model."""
    out = {}
    for name, param in pm.named_parameters():
        for marker in (".base_layer.", ".original_module."):
            if marker in name:
                out[_base_name(name, marker)] = param
    return out


def head_module_names(pm) -> list[str]:
    return [n.removeprefix(PREFIX) for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def randomize(pm, adapter: str = "default", head: bool = True, scale: float = 0.1) -> None:
    """Random delta values (and a perturbed head) so that every path is exercised with non-zero deltas."""
    with torch.no_grad():
        for param in sparse_values(pm, adapter).values():
            param.normal_().mul_(scale)
        if head:
            for param in head_params(pm, adapter).values():
                param.add_(torch.randn_like(param) * scale)


def reference(base, pm, adapter: str = "default", sparse: bool = True, head: bool = True):
    """A deep copy of the base with `flat[idx] += values` applied by hand (and the adapter's head copied in)."""
    ref = copy.deepcopy(base)
    params = dict(ref.named_parameters())
    with torch.no_grad():
        if sparse:
            indices = sparse_indices(pm, adapter)
            for name, values in sparse_values(pm, adapter).items():
                flat = params[name].data.view(-1)
                idx = indices[name].long()
                flat[idx] += values.detach().to(flat.dtype)
        if head:
            for name, param in head_params(pm, adapter).items():
                params[name].data.copy_(param.detach())
    return ref


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def plain_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# =========================================================================== the matrix


@matrix
def test_trainable_parameters(case, capsys):
    pm, base = make_peft(case)
    config = pm.peft_config["default"]
    heads = head_module_names(pm)
    head_size = sum(
        p.numel() for n, m in pm.named_modules() if isinstance(m, ModulesToSaveWrapper)
        for p in m.modules_to_save["default"].parameters()
    )
    if case.task_type == "CAUSAL_LM":
        assert heads == [] and head_size == 0
    else:
        assert len(heads) == 1 and head_size > 0
    assert sum(config.counts.values()) > 0
    trainable, total = pm.get_nb_trainable_parameters()
    assert trainable == sum(config.counts.values()) + head_size
    assert total == sum(p.numel() for p in base.parameters()) + trainable
    numel = {n: p.numel() for n, p in base.named_parameters() if n in config.counts}
    fraction = Fraction(str(case.config["sparsity"]))
    if case.config.get("allocation", "per_tensor") == "global":
        assert sum(config.counts.values()) == math.floor(fraction * sum(numel.values()))
    else:
        assert config.counts == {n: math.floor(fraction * k) for n, k in numel.items()}

    for name, param in pm.named_parameters():  # a values tensor without entries could never change: frozen
        expected = (".sparsediff_values.default." in name and param.numel() > 0) or ".modules_to_save.default." in name
        assert param.requires_grad == expected, name
    for name, param in sparse_values(pm).items():
        assert param.dtype == torch.float32 and param.numel() == config.counts[name]

    pm.print_trainable_parameters()
    assert "trainable params" in capsys.readouterr().out

    # By default every parameter is targeted except the densely trained head and the output embeddings (trainers
    # such as TRL read lm_head.weight directly).
    head_names = {n for n in dict(base.named_parameters()) if any(n.startswith(h + ".") for h in heads)}
    output = base.get_output_embeddings()
    output_names = {n for n, p in base.named_parameters() if output is not None and p is output.weight}
    assert set(config.counts) == set(dict(base.named_parameters())) - head_names - output_names


@matrix
def test_selected_indices(case):
    pm, base = make_peft(case)
    chosen = sam_peft.selected_indices(pm)
    params = dict(base.named_parameters())
    assert chosen.keys() == pm.peft_config["default"].counts.keys()
    for name, idx in chosen.items():
        assert name in params
        assert idx.dtype == torch.int64 and idx.dim() == 1
        assert idx.numel() == pm.peft_config["default"].counts[name]
        if idx.numel():
            assert bool((idx[1:] > idx[:-1]).all()), f"{name} not strictly increasing"
            assert 0 <= int(idx.min()) and int(idx.max()) < params[name].numel()
    if case.config["selection"] == "magnitude" and case.config.get("allocation", "per_tensor") == "per_tensor":
        for name, idx in chosen.items():  # magnitude: the kept entries are the largest |θ0| of each tensor
            scores = params[name].detach().abs().reshape(-1)
            expected = torch.sort(-scores, stable=True).indices[: idx.numel()].sort().values
            assert torch.equal(idx, expected), name


@matrix
def test_forward_matches_manual_reference(case):
    pm, base = make_peft(case)
    inputs = make_inputs(case)
    base_out = logits(base, inputs)
    assert torch.equal(logits(pm, inputs), base_out), "zero-initialised deltas must leave the model unchanged"
    randomize(pm)
    out = logits(pm, inputs)
    assert not torch.allclose(out, base_out)
    torch.testing.assert_close(out, logits(reference(base, pm), inputs), rtol=1e-5, atol=1e-5)


@matrix
def test_gradients_match_dense_reference(case):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    ref = reference(base, pm)
    ref.requires_grad_(True)
    weighted_loss(pm(**inputs).logits).backward()
    weighted_loss(ref(**inputs).logits).backward()

    for name, param in base_params(pm).items():
        assert param.grad is None, f"frozen base weight {name} got a gradient"
    ref_params = dict(ref.named_parameters())
    indices = sparse_indices(pm)
    for name, values in sparse_values(pm).items():
        if values.numel() == 0:
            continue
        dense = ref_params[name].grad
        expected = torch.zeros_like(values) if dense is None else dense.reshape(-1)[indices[name].long()]
        assert values.grad is not None, name
        torch.testing.assert_close(values.grad, expected, rtol=1e-4, atol=1e-5, msg=name)
    for name, param in head_params(pm).items():
        torch.testing.assert_close(param.grad, ref_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


@matrix
def test_merge_unmerge(case):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    before = {n: p.detach().clone() for n, p in base_params(pm).items()}
    out = logits(pm, inputs)
    pm.merge_adapter()
    layers = [m for m in pm.modules() if isinstance(m, BaseTunerLayer) and not isinstance(m, ModulesToSaveWrapper)]
    assert layers and all(m.merged for m in layers)
    torch.testing.assert_close(logits(pm, inputs), out, rtol=1e-5, atol=1e-5)
    pm.unmerge_adapter()
    assert not any(m.merged for m in layers)
    for name, param in base_params(pm).items():
        torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(logits(pm, inputs), out, rtol=1e-5, atol=1e-5)


@matrix
def test_merge_and_unload(case):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    out = logits(pm, inputs)
    merged = pm.merge_and_unload()
    assert type(merged) is type(base)
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in merged.modules())
    assert dict(merged.named_parameters()).keys() == dict(base.named_parameters()).keys()
    torch.testing.assert_close(logits(merged, inputs), out, rtol=1e-5, atol=1e-5)


@matrix
def test_unload(case):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    # peft keeps the trained modules_to_save head on unload; the sparse deltas are dropped.
    expected = logits(reference(base, pm, sparse=False), inputs)
    unloaded = pm.unload()
    assert type(unloaded) is type(base)
    assert not any(isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper)) for m in unloaded.modules())
    assert torch.equal(logits(unloaded, inputs), expected)
    if case.task_type == "CAUSAL_LM":
        assert_same_params(plain_params(unloaded), plain_params(base))


@matrix
def test_disable_adapter(case):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    out = logits(pm, inputs)
    with pm.disable_adapter():
        assert torch.equal(logits(pm, inputs), logits(base, inputs))
    torch.testing.assert_close(logits(pm, inputs), out, rtol=0, atol=0)


@matrix
def test_save_load_roundtrip(case, tmp_path):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    out = logits(pm, inputs)
    config = pm.peft_config["default"]
    pm.save_pretrained(tmp_path)

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in keys}
    heads = tuple(f"{PREFIX}{h}." for h in head_module_names(pm))
    for key in keys:  # format 2: per tuned tensor a uint8 index stream and float32 values, and the head
        assert ".sparsediff_indices." in key or ".sparsediff_values." in key or key.startswith(heads), key
        if ".sparsediff_indices." in key:
            assert tensors[key].dtype == torch.uint8, key
        if ".sparsediff_values." in key:
            assert tensors[key].dtype == torch.float32, key
    assert sum(".sparsediff_indices." in k for k in keys) == len(config.counts)
    assert (metadata["sam_peft_format"], metadata["sam_peft_index_encoding"], metadata["sam_peft_values_dtype"]) == (
        "2", "coded-gaps", "float32")
    decoded, dtypes = decode_tensors(tensors, ADAPTER_KEYS)
    assert dtypes <= {"float32"}
    assert all(t.dtype == torch.int64 for k, t in decoded.items() if ".sparsediff_indices." in k)
    assert any(k.startswith(heads) for k in keys) == (case.task_type == "SEQ_CLS")
    assert metadata["base_fingerprint"] == config.base_fingerprint and len(config.base_fingerprint) == 32
    assert metadata["base_architecture"] == type(base).__name__
    saved_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved_config["counts"] == config.counts
    assert saved_config["peft_type"] == "SPARSEDIFF"

    loaded = PeftModel.from_pretrained(case.factory(), tmp_path)
    for name, values in sparse_values(pm).items():
        assert torch.equal(sparse_values(loaded)[name], values), name
        assert torch.equal(sparse_indices(loaded)[name].long(), sparse_indices(pm)[name].long()), name
    assert_same_params(
        {n: p.detach() for n, p in head_params(loaded).items()}, {n: p.detach() for n, p in head_params(pm).items()}
    )
    assert torch.equal(logits(loaded, inputs), out)


@matrix
def test_load_on_other_base_checks_fingerprint(case, tmp_path, monkeypatch):
    pm, _ = make_peft(case)
    randomize(pm)
    pm.save_pretrained(tmp_path)
    monkeypatch.delenv("SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH", raising=False)
    with pytest.raises(sam_peft.BaseModelMismatchError):
        PeftModel.from_pretrained(case.factory(seed=1), tmp_path)
    monkeypatch.setenv("SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH", "1")
    loaded = PeftModel.from_pretrained(case.factory(seed=1), tmp_path)
    for name, values in sparse_values(pm).items():
        assert torch.equal(sparse_values(loaded)[name], values), name


@matrix
def test_multiple_adapters(case, tmp_path):
    pm, base = make_peft(case)
    inputs = make_inputs(case)
    config_b = make_config(case, selection="random", allocation="per_tensor", seed=1)
    pm.add_adapter("b", config_b)
    assert sum(v.numel() for v in sparse_values(pm, "b").values()) > 0
    randomize(pm, "default")
    randomize(pm, "b")
    out_default = logits(reference(base, pm, "default"), inputs)
    out_b = logits(reference(base, pm, "b"), inputs)
    assert not torch.allclose(out_default, out_b)

    assert pm.active_adapter == "default"
    torch.testing.assert_close(logits(pm, inputs), out_default, rtol=1e-5, atol=1e-5)
    pm.set_adapter("b")
    torch.testing.assert_close(logits(pm, inputs), out_b, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in sparse_values(pm, "b").values())
    assert not any(p.requires_grad for p in sparse_values(pm, "default").values())
    pm.set_adapter("default")
    torch.testing.assert_close(logits(pm, inputs), out_default, rtol=1e-5, atol=1e-5)

    # Saving with several adapters writes the extra one in a subfolder; each reloads on a fresh base.
    pm.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "b" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(case.factory(), tmp_path)
    torch.testing.assert_close(logits(loaded, inputs), out_default, rtol=1e-5, atol=1e-5)
    loaded.load_adapter(tmp_path / "b", adapter_name="b")
    loaded.set_adapter("b")
    torch.testing.assert_close(logits(loaded, inputs), out_b, rtol=1e-5, atol=1e-5)
    for name, values in sparse_values(pm, "b").items():
        assert torch.equal(sparse_values(loaded, "b")[name], values), name

    # load_adapter under a new name, then delete adapters.
    pm.load_adapter(tmp_path, adapter_name="x")
    pm.set_adapter("x")
    torch.testing.assert_close(logits(pm, inputs), out_default, rtol=1e-5, atol=1e-5)
    pm.delete_adapter("b")
    assert "b" not in pm.peft_config
    assert not sparse_values(pm, "b") and not sparse_indices(pm, "b")
    torch.testing.assert_close(logits(pm, inputs), out_default, rtol=1e-5, atol=1e-5)
    pm.set_adapter("default")
    pm.delete_adapter("x")
    assert set(pm.peft_config) == {"default"}
    torch.testing.assert_close(logits(pm, inputs), out_default, rtol=1e-5, atol=1e-5)


@matrix
@pytest.mark.filterwarnings("ignore:Already unmerged")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(case, dtype):
    pm, base = make_peft(case, dtype=dtype)
    inputs = make_inputs(case)
    for name, values in sparse_values(pm).items():
        assert values.dtype == torch.float32, name
    assert torch.equal(logits(pm, inputs), logits(base, inputs))
    randomize(pm, head=False)

    out = pm(**inputs).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    weighted_loss(out).backward()
    grads = [v.grad for v in sparse_values(pm).values() if v.numel()]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads)
    assert all(p.grad is None for p in base_params(pm).values())

    # merge -> unmerge restores the base within the dtype's rounding of (w + v) - v.
    original = plain_params(base)
    values = sparse_values(pm)
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert_restored(base_params(pm), original, values, dtype)

    # safe_merge refuses a delta that overflows the base dtype, and leaves that layer unmerged.
    name, target = [(n, v) for n, v in values.items() if v.numel()][-1]
    with torch.no_grad():
        target[0] = 1e38 if dtype == torch.float16 else float("inf")
    before = {n: p.detach().clone() for n, p in base_params(pm).items()}
    with pytest.raises(ValueError, match="non-finite"):
        pm.merge_adapter(safe_merge=True)
    assert torch.equal(base_params(pm)[name], before[name])
    layer = pm.get_submodule(PREFIX + name.rsplit(".", 1)[0])
    assert not layer.merged
    pm.unmerge_adapter()  # undo the layers merged before the failing one
    assert_restored(base_params(pm), before, values, dtype)


def assert_restored(params, original, values, dtype) -> None:
    """Each base tensor equals `original` up to the rounding of (w + v) - v in `dtype`."""
    eps = torch.finfo(dtype).eps
    for name, param in params.items():
        v = values.get(name)
        v_max = 0.0 if v is None or v.numel() == 0 else float(v.detach().abs().clamp_max(1e4).max())
        bound = 2 * eps * (float(original[name].abs().max()) + v_max)
        diff = float((param.float() - original[name].float()).abs().max())
        assert diff <= bound, f"{name}: {diff} > {bound}"


@matrix
def test_training_touches_only_selected_entries(case):
    pm, base = make_peft(case)
    pm.train()
    inputs = make_inputs(case)
    labels = make_labels(case, inputs)
    original = plain_params(base)
    head_before = {n: p.detach().clone() for n, p in head_params(pm).items()}
    optimizer = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = pm(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)

    inside = base_params(pm)
    for name, param in inside.items():  # the frozen base weights are untouched
        assert torch.equal(param, original[name]), name
    if case.task_type == "SEQ_CLS":
        assert head_before and any(not torch.equal(p, head_before[n]) for n, p in head_params(pm).items())

    indices = sam_peft.selected_indices(pm)
    pm.merge_adapter()
    changed = 0
    for name, idx in indices.items():
        merged = inside[name].detach().reshape(-1)
        outside = torch.ones(merged.numel(), dtype=torch.bool)
        outside[idx] = False
        assert torch.equal(merged[outside], original[name].reshape(-1)[outside]), name
        changed += int((merged[idx] != original[name].reshape(-1)[idx]).sum())
    assert changed > 0
    pm.unmerge_adapter()


@matrix
def test_sparse_delta(case, tmp_path):
    pm, base = make_peft(case)
    randomize(pm)
    inputs = make_inputs(case)
    out = logits(pm, inputs)
    delta = sam_peft.SparseDelta.from_peft(pm)
    assert delta.num_entries == sum(pm.peft_config["default"].counts.values())
    assert delta.dense.keys() == head_params(pm).keys()

    plain = copy.deepcopy(base)
    original = plain_params(plain)
    delta.apply_to(plain)
    torch.testing.assert_close(logits(plain, inputs), out, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        delta.apply_to(plain)
    delta.remove_from(plain)
    assert_same_params(plain_params(plain), original)
    with pytest.raises(ValueError):
        delta.remove_from(plain)

    path = delta.save(tmp_path / "delta.safetensors")
    loaded = sam_peft.SparseDelta.load(path)
    assert loaded.shapes == delta.shapes
    assert loaded.entries.keys() == delta.entries.keys()
    for name, (idx, values) in delta.entries.items():
        assert torch.equal(loaded.entries[name][0], idx) and loaded.entries[name][0].dtype == torch.int64
        assert torch.equal(loaded.entries[name][1], values)
    assert_same_params(loaded.dense, delta.dense)
    assert loaded.metadata["base_fingerprint"] == delta.metadata["base_fingerprint"]
    loaded.apply_to(plain)
    torch.testing.assert_close(logits(plain, inputs), out, rtol=1e-5, atol=1e-5)
    loaded.remove_from(plain)

    with pytest.raises(sam_peft.BaseModelMismatchError):
        delta.apply_to(case.factory(seed=1))

    data = path.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(sam_peft.DeltaFileError):
        sam_peft.SparseDelta.load(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(sam_peft.DeltaFileError):
        sam_peft.SparseDelta.load(garbage)

    # Arithmetic: union of the entries (values summed where both have one), and scaling.
    pm2 = get_peft_model(copy.deepcopy(base), make_config(case, selection="random", seed=7))
    randomize(pm2)
    other = sam_peft.SparseDelta.from_peft(pm2)
    total = delta + other
    for name, shape in delta.shapes.items():
        numel = math.prod(shape)

        def dense(d, name=name, numel=numel):
            idx, values = d.entries.get(name, (torch.empty(0, dtype=torch.long), torch.empty(0)))
            return torch.zeros(numel).index_add_(0, idx, values)

        idx = total.entries[name][0]
        assert torch.equal(idx, torch.unique(torch.cat([delta.entries[name][0], other.entries[name][0]])))
        torch.testing.assert_close(dense(total), dense(delta) + dense(other), rtol=0, atol=1e-7)
    for name, tensor in total.dense.items():
        torch.testing.assert_close(tensor, delta.dense[name] + other.dense[name])
    half = delta.scale(0.5)
    for name, (idx, values) in delta.entries.items():
        assert torch.equal(half.entries[name][0], idx)
        assert torch.equal(half.entries[name][1], values * 0.5)
    for name, tensor in delta.dense.items():
        assert torch.equal(half.dense[name], tensor * 0.5)
    scaled = 0.5 * delta
    assert all(torch.equal(scaled.entries[n][1], half.entries[n][1]) for n in delta.entries)


# =========================================================================== autograd functions


def _pattern(kind: str, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    n_rows, n_cols = shape
    if kind == "few":  # two rows x three columns: both sides restricted
        rows, cols = torch.tensor([1, 4]), torch.tensor([0, 2, 5])
        return (rows[:, None] * n_cols + cols[None, :]).reshape(-1).sort().values
    if kind == "cols":  # every row, two columns: only the column side restricted
        return (torch.arange(n_rows)[:, None] * n_cols + torch.tensor([1, 3])[None, :]).reshape(-1)
    numel = n_rows * n_cols  # "many": most entries
    return torch.randperm(numel, generator=generator)[: int(0.7 * numel)].sort().values


def _written(x, weight, b, values, indices, structure, transposed):
    """The written-in path as a layer runs it: W holds θ0 + Δ(values), the Function routes the gradient."""
    before = weight.clone()
    slot = DeltaSlot.build(weight, indices, threading.Lock())
    out = written_delta_matmul(x, weight, b, values, structure, transposed, slot)
    assert torch.equal(weight, before), "W holds θ0 again after the call"
    return out


def _sparse_term(x, weight, b, values, indices, structure, transposed):
    """The separate-term path: base matmul plus x Δᵀ on the sub-block."""
    n_out = weight.shape[1] if transposed else weight.shape[0]
    return matmul(x, weight, b, transposed) + sparse_term(x, values, structure, transposed, n_out)


@pytest.mark.parametrize("path", [_written, _sparse_term], ids=["written", "sparse-term"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("kind", ["few", "cols", "many"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_sparse_delta_matmul_gradcheck(path, transposed, kind, with_bias):
    generator = torch.Generator().manual_seed(0)
    n_in, n_out = 7, 6
    shape = (n_in, n_out) if transposed else (n_out, n_in)
    weight = torch.randn(shape, dtype=torch.float64, generator=generator)
    indices = _pattern(kind, shape, generator)
    structure = BlockStructure.build(indices, shape)
    if kind == "few":
        assert structure.rows is not None and structure.cols is not None
    elif kind == "cols":
        assert structure.rows is None and structure.cols is not None
    else:
        assert structure.rows is None and structure.cols is None
    x = torch.randn(2, 3, n_in, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(n_out, dtype=torch.float64, generator=generator, requires_grad=True) if with_bias else None
    values = torch.randn(indices.numel(), dtype=torch.float64, generator=generator, requires_grad=True)

    def fn(x, values, *maybe_bias):
        b = maybe_bias[0] if maybe_bias else None
        return path(x, weight, b, values, indices, structure, transposed)

    args = (x, values) + ((bias,) if with_bias else ())
    assert torch.autograd.gradcheck(fn, args)

    composed = weight.reshape(-1).index_add(0, indices, values.detach()).view(shape)
    expected = x.detach() @ composed if transposed else x.detach() @ composed.t()
    if with_bias:
        expected = expected + bias.detach()
    torch.testing.assert_close(fn(*args), expected)
    with torch.no_grad():
        torch.testing.assert_close(fn(*args), expected)


@pytest.mark.parametrize("written", [True, False], ids=["written", "sparse-term"])
def test_sparse_delta_embedding_matches_dense_with_padding(written):
    generator = torch.Generator().manual_seed(0)
    n_rows, dim, pad = 10, 4, 2
    weight = torch.randn(n_rows, dim, dtype=torch.float64, generator=generator)
    weight[pad] = 0
    # entries in the padding row, in rows present in the batch, and in rows absent from it
    indices = torch.tensor([1, 5, pad * dim, pad * dim + 3, 3 * dim + 1, 7 * dim, 7 * dim + 2, 9 * dim + 3])
    values = torch.randn(indices.numel(), dtype=torch.float64, generator=generator, requires_grad=True)
    input_ids = torch.tensor([[3, 7, pad, 0], [7, 7, pad, 3]])
    structure = EmbeddingStructure.build(indices, (n_rows, dim), pad)
    if written:
        slot = DeltaSlot.build(weight, indices, threading.Lock())
        out = written_delta_embedding(input_ids, weight, values, structure, slot, padding_idx=pad)
    else:
        out = sparse_delta_embedding(input_ids, weight, values, structure, padding_idx=pad)

    composed = weight.reshape(-1).index_add(0, indices, values.detach()).view(n_rows, dim).requires_grad_(True)
    expected = F.embedding(input_ids, composed, padding_idx=pad)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=generator)
    out.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(values.grad, composed.grad.reshape(-1)[indices])
    rows = indices // dim
    assert torch.all(values.grad[rows == pad] == 0), "padding-row entries must get no gradient"
    assert torch.all(values.grad[rows == 9] == 0), "rows absent from the batch get no gradient"
    assert torch.all(values.grad[(rows == 7) | (rows == 0)] != 0)


def test_delta_written_follows_the_weight_and_restores_on_error():
    """The slot writes θ0 + Δ only inside the kernel: θ0 comes back after an exception, and a weight changed in
    place (or given new storage) after the slot was built is read again, not overwritten with the old θ0."""
    weight = torch.arange(12, dtype=torch.float32).view(3, 4)
    indices = torch.tensor([1, 6, 11])
    slot = DeltaSlot.build(weight, indices, threading.Lock())
    written = slot.written(torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(RuntimeError, match="inside"):
        with delta_written(slot, written):
            assert weight.view(-1)[indices].tolist() == [1.5, 6.5, 11.5]
            raise RuntimeError("inside the kernel")
    assert torch.equal(weight, torch.arange(12, dtype=torch.float32).view(3, 4))
    assert slot.lock.acquire(blocking=False), "the lock is released after the error"
    slot.lock.release()
    with torch.no_grad():
        weight.mul_(2)  # in place: the version moves
    with delta_written(slot, written):
        pass
    assert torch.equal(weight, 2 * torch.arange(12, dtype=torch.float32).view(3, 4))
    weight.data = torch.full((3, 4), 7.0)  # new storage
    with delta_written(slot, written):
        assert weight.view(-1)[indices].tolist() == [1.5, 6.5, 11.5]
    assert torch.equal(weight, torch.full((3, 4), 7.0))


def test_moving_a_layer_drops_its_plan_and_slots():
    """The forward plan and θ0 slots hold a view of the weight's storage: moving or casting the model drops them,
    so the old storage is not kept alive and the next step reads the new one."""
    pm, _ = make_peft(next(c for c in CASES if c.id == "llama-random"))
    ids = torch.randint(3, VOCAB, (BATCH, SEQ))
    pm(input_ids=ids).logits.sum().backward()
    layers = [m for m in pm.modules() if getattr(m, "_plan", None) is not None]
    assert layers, "training forwards cache a plan"
    pm.double()
    for layer in layers:
        assert layer._plan is None
        assert not any(isinstance(v, DeltaSlot) for _, v in layer._cache.values())
    out = pm(input_ids=ids).logits
    assert out.dtype == torch.float64


class _OneLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 12)

    def forward(self, x):
        return self.proj(x)


def _one_linear_sam():
    torch.manual_seed(0)
    config = sam_peft.SparseDiffConfig(sparsity=0.1, selection="random", target_modules=["proj"])
    model = get_peft_model(_OneLinear(), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for values in layer.sparsediff_values["default"].values():
            values.uniform_(-1, 1)
    return model, layer


def _dense_reference(layer, x):
    base = layer.get_base_layer()
    weight = base.weight + layer.get_delta_weight("default", "weight")
    bias = base.bias + layer.get_delta_weight("default", "bias") if "bias" in layer.sparsediff_values["default"] \
        else base.bias
    return F.linear(x, weight, bias)


def test_plan_follows_a_weight_changed_or_replaced_after_the_first_step():
    """The cached forward plan is used only while the layer's weight is the same tensor, in the same storage and
    version as when θ0 was read: a weight scaled in place, or a new Parameter, is what the next forward reads."""
    model, layer = _one_linear_sam()
    x = torch.randn(5, 16)
    model(x).sum().backward()  # builds the plan
    with torch.no_grad():
        layer.get_base_layer().weight.mul_(2)
    torch.testing.assert_close(model(x), _dense_reference(layer, x))
    layer.get_base_layer().weight = torch.nn.Parameter(torch.randn(12, 16), requires_grad=False)
    torch.testing.assert_close(model(x), _dense_reference(layer, x))
    layer.get_base_layer().weight.data = torch.randn(12, 16)
    torch.testing.assert_close(model(x), _dense_reference(layer, x))


def test_an_inference_plan_serves_later_calls_and_yields_to_training():
    """A forward without gradients caches a plan without a block structure: later inference calls take it (equal
    to the dense reference, also after values change in place), a call that needs gradients does not, and the
    values' gradient is then the dense reference's."""
    model, layer = _one_linear_sam()
    x = torch.randn(5, 16)
    with torch.no_grad():
        model(x)
        assert layer._plan is not None and layer._plan.structure is None, "inference caches a plan"
        plan = layer._plan
        torch.testing.assert_close(model(x), _dense_reference(layer, x))
        assert layer._plan is plan, "a second inference call reuses it"
        layer.sparsediff_values["default"]["weight"].mul_(-1)
        torch.testing.assert_close(model(x), _dense_reference(layer, x))
    model(x).pow(2).sum().backward()
    values = layer.sparsediff_values["default"]["weight"]
    assert layer._plan.structure is not None, "a training call builds its own plan"
    dense = layer.get_delta_weight("default", "weight").requires_grad_(True)
    base = layer.get_base_layer()
    bias = base.bias + layer.get_delta_weight("default", "bias") if "bias" in layer.sparsediff_values["default"] \
        else base.bias
    F.linear(x, base.weight + dense, bias).pow(2).sum().backward()
    indices = layer.sparsediff_indices["default"]["weight"].long()
    torch.testing.assert_close(values.grad, dense.grad.view(-1)[indices])


def test_second_order_gradients_refuse_loudly():
    """θ0 + Δ is in W only while a kernel runs, so a graph of the backward could not keep it: double backward
    through a written-in layer raises rather than differentiating through θ0."""
    model, _ = _one_linear_sam()
    x = torch.randn(5, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad.pow(2).sum().backward()


def test_slot_reads_theta0_under_the_lock():
    """A slot rebuilt (after `invalidate_caches`, `.to`, a new adapter) while another thread has the delta written
    into W must not take θ0 + Δ for θ0: it waits for the lock, and W ends bit-exact at θ0."""
    model, layer = _one_linear_sam()
    weight = layer.get_base_layer().weight
    theta0 = weight.detach().clone()
    x = torch.randn(5, 16)
    expected = _dense_reference(layer, x)
    layer.invalidate_caches()
    outputs = []
    with layer._lock:  # as if another thread's kernel had its delta written in
        weight.data.add_(1.0)
        worker = threading.Thread(target=lambda: outputs.append(model(x).detach()))
        worker.start()
        worker.join(timeout=0.3)
        weight.data.copy_(theta0)
    worker.join()
    assert torch.equal(weight, theta0)
    torch.testing.assert_close(outputs[0], expected)


def test_functional_call_swapped_values_after_a_forward():
    """Values swapped in by `torch.func.functional_call` are what the call uses, also after the layer cached its
    plan, and they get the gradient."""
    model, layer = _one_linear_sam()
    x = torch.randn(5, 16)
    model(x)  # caches the plan
    name = next(n for n, _ in model.named_parameters() if "sparsediff_values" in n and n.endswith("weight"))
    swapped = torch.randn_like(dict(model.named_parameters())[name]).requires_grad_(True)
    out = torch.func.functional_call(model, {name: swapped}, (x,))
    fresh, fresh_layer = _one_linear_sam()
    torch.testing.assert_close(out, torch.func.functional_call(fresh, {name: swapped}, (x,)))
    assert not torch.allclose(out, model(x))
    (grad,) = torch.autograd.grad(out.sum(), swapped)
    assert grad.abs().sum() > 0


def test_bf16_merge_equals_the_weights_the_forward_reads():
    """Merging into a bf16 base adds in fp32 and rounds once, as the forward does: the merged model is the
    trained one, bit for bit."""
    model, layer = _one_linear_sam()
    model = model.to(torch.bfloat16)
    for values in layer.sparsediff_values["default"].values():
        values.data = values.data.float() * 0.1  # `.to(bfloat16)` cast the values too: fp32 again, trained size
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        model.merge_adapter()
        merged = model(x)
    assert torch.equal(before, merged)


def test_non_contiguous_and_inference_weights_take_the_separate_term():
    """A transposed-view weight or an inference tensor cannot be written in place: the layer runs the delta as a
    separate term, and merge/unmerge still restore the base exactly."""
    torch.manual_seed(0)
    module = _OneLinear()
    module.proj.weight = torch.nn.Parameter(torch.randn(16, 12).t())
    config = sam_peft.SparseDiffConfig(sparsity=0.1, selection="random", target_modules=["proj"])
    model = get_peft_model(module, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.sparsediff_values["default"]["weight"].uniform_(-1, 1)
    theta0 = layer.get_base_layer().weight.detach().clone()
    x = torch.randn(5, 16)
    expected = _dense_reference(layer, x)
    torch.testing.assert_close(model(x), expected)
    with torch.no_grad():
        model.merge_adapter()
        torch.testing.assert_close(model(x), expected)
        model.unmerge_adapter()
    assert torch.equal(layer.get_base_layer().weight, theta0)
    plain = _OneLinear()  # the same base, its weight a transposed view too
    plain.proj.weight = torch.nn.Parameter(theta0.t().contiguous().t())
    plain.proj.bias = torch.nn.Parameter(layer.get_base_layer().bias.detach().clone())
    delta = sam_peft.SparseDelta.from_peft(model)
    delta.apply_to(plain)
    torch.testing.assert_close(plain(x), expected)
    delta.remove_from(plain)
    assert torch.equal(plain.proj.weight, theta0) and not plain.proj.weight.is_contiguous()
    with torch.inference_mode():
        base = _OneLinear()
    config = sam_peft.SparseDiffConfig(sparsity=0.1, selection="random", target_modules=["proj"])
    model = get_peft_model(base, config)
    with torch.inference_mode():
        out = model(torch.randn(5, 16))
    assert out.shape == (5, 12)


def test_embedding_padding_row_entries_in_model():
    """BERT word embeddings (padding_idx=0) with entries forced into the padding row."""
    pm, base = make_peft(BERT)
    layer = pm.get_submodule(PREFIX + "bert.embeddings.word_embeddings")
    assert isinstance(layer, sam_peft.tuner.weight_layers.SparseDiffEmbedding)
    assert layer.get_base_layer().padding_idx == 0
    inputs = make_inputs(BERT)
    present = int(inputs["input_ids"][0, 0])
    absent = next(r for r in range(1, VOCAB) if r not in inputs["input_ids"])
    indices = torch.tensor(sorted([0, 5, HIDDEN - 1, present * HIDDEN, present * HIDDEN + 7, absent * HIDDEN + 3]))
    layer.set_entries("default", "weight", indices)
    randomize(pm)
    ref = reference(base, pm)
    ref.requires_grad_(True)
    weighted_loss(pm(**inputs).logits).backward()
    weighted_loss(ref(**inputs).logits).backward()
    values = sparse_values(pm)["bert.embeddings.word_embeddings.weight"]
    dense = dict(ref.named_parameters())["bert.embeddings.word_embeddings.weight"].grad
    torch.testing.assert_close(values.grad, dense.reshape(-1)[indices], rtol=1e-4, atol=1e-5)
    rows = indices // HIDDEN
    assert torch.all(values.grad[rows == 0] == 0) and torch.all(values.grad[rows == absent] == 0)
    assert torch.all(values.grad[rows == present] != 0)


# =========================================================================== config and targeting


@pytest.mark.parametrize("sparsity", [0, -1, 1.5, float("nan"), "a", True], ids=str)
def test_invalid_sparsity(sparsity):
    with pytest.raises(sam_peft.ConfigError):
        sam_peft.SparseDiffConfig(sparsity=sparsity)
    with pytest.raises(ValueError):
        sam_peft.SparseDiffConfig(sparsity=sparsity)


@pytest.mark.parametrize("kwargs", [dict(selection="nope"), dict(allocation="per_row"), dict(format_version=99)],
                         ids=["selection", "allocation", "format_version"])
def test_invalid_choices(kwargs):
    with pytest.raises(sam_peft.ConfigError):
        sam_peft.SparseDiffConfig(**kwargs)


def test_high_sparsity_warns(caplog):
    with caplog.at_level("WARNING", logger="sam_peft"):
        config = sam_peft.SparseDiffConfig(sparsity=0.9)
    assert config.sparsity == 0.9
    assert any("0.1" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    caplog.clear()
    with caplog.at_level("WARNING", logger="sam_peft"):
        sam_peft.SparseDiffConfig(sparsity=0.5)
        sam_peft.SparseDiffConfig(sparsity=1.0 / 3)
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_exclude_modules():
    pm, base = make_peft(BERT, exclude_modules=["LayerNorm"])
    counts = pm.peft_config["default"].counts
    names = set(dict(base.named_parameters()))
    assert not any("LayerNorm" in n for n in counts)
    assert set(counts) == {n for n in names if "LayerNorm" not in n and not n.startswith("classifier.")}
    assert isinstance(pm.get_submodule(PREFIX + "bert.embeddings.LayerNorm"), torch.nn.LayerNorm)
    trainable, _ = pm.get_nb_trainable_parameters()
    assert trainable == sum(counts.values()) + sum(p.numel() for p in base.classifier.parameters())


def test_target_modules():
    pm, base = make_peft(BERT, target_modules=["query", "value"])
    counts = pm.peft_config["default"].counts
    expected = {
        n for n in dict(base.named_parameters()) if ".attention.self.query." in n or ".attention.self.value." in n
    }
    assert set(counts) == expected and len(expected) == 8
    assert set(sam_peft.selected_indices(pm)) == expected
    assert set(sparse_values(pm)) == expected
    assert isinstance(pm.get_submodule(PREFIX + "bert.encoder.layer.0.attention.self.key"), torch.nn.Linear)


def test_sam_config_before_selection():
    pm = get_peft_model(make_bert(), sam_peft.SAMConfig(task_type="SEQ_CLS"))
    assert pm.peft_config["default"].selection == "sam" and pm.peft_config["default"].counts is None
    with pytest.raises(sam_peft.NotSelectedError):
        sam_peft.selected_indices(pm)
    with pytest.raises(ValueError):
        sam_peft.selected_indices(pm, "missing")


# =========================================================================== exact top-k


def reference_topk(named: list[tuple[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    flat = torch.cat([s.reshape(-1).float() for _, s in named])
    order = torch.sort(-flat, stable=True).indices[:k]
    out, start = {}, 0
    for name, scores in named:
        picked = order[(order >= start) & (order < start + scores.numel())] - start
        out[name] = picked.sort().values
        start += scores.numel()
    return out


def _tied_scores(seed: int) -> list[tuple[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (0,), (7,), (2, 2, 3), (1,)]
    named = [(f"t{i}", torch.randint(-3, 4, shape, generator=generator).float()) for i, shape in enumerate(shapes)]
    named[0][1].view(-1)[::4] = -0.0  # -0.0 ties with 0.0
    return named


def topk_global(named, k):
    return top_entries(named, Budget((0,) * len(named), (k,)))


def topk_per_tensor(named, counts):
    return top_entries(named, Budget(tuple(range(len(named))), tuple(counts[n] for n, _ in named)))


@pytest.mark.parametrize("chunk", [None, 4], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("seed", [0, 1])
def test_topk_global_matches_stable_sort(seed, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(sam_peft.ranking.topk, "CHUNK", chunk)
    named = _tied_scores(seed)
    total = sum(s.numel() for _, s in named)
    for k in range(total + 1):
        got = topk_global(named, k)
        expected = reference_topk(named, k)
        assert got.keys() == expected.keys()
        for name in expected:
            assert got[name].dtype == torch.int64
            assert torch.equal(got[name], expected[name]), (k, name)
    assert topk_global(named, total + 5)["t0"].numel() == 15
    with pytest.raises(ValueError):
        topk_global(named, -1)


def test_topk_continuous_scores():
    generator = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(40, 25, generator=generator)), ("b", torch.randn(300, generator=generator) * 1e-3),
             ("c", torch.rand(77, generator=generator) * 1e6)]
    for k in (1, 13, 500, 1376):
        got = topk_global(named, k)
        expected = reference_topk(named, k)
        assert all(torch.equal(got[n], expected[n]) for n in expected), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_topk_per_tensor_matches_stable_sort(seed):
    named = _tied_scores(seed)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(10):
        counts = {n: int(torch.randint(0, s.numel() + 1, (1,), generator=generator)) for n, s in named}
        got = topk_per_tensor(named, counts)
        for name, scores in named:
            assert torch.equal(got[name], reference_topk([(name, scores)], counts[name])[name]), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_topk_rejects_non_finite(bad):
    scores = torch.arange(6, dtype=torch.float32)
    scores[2] = bad
    with pytest.raises(ValueError):
        topk_global([("x", scores)], 3)
    with pytest.raises(ValueError):
        topk_per_tensor([("x", scores)], {"x": 3})


# =========================================================================== regressions


def test_add_adapter_selects_data_free_entries():
    pm, base = make_peft(BERT)
    config_b = make_config(BERT, selection="random", seed=3)
    pm.add_adapter("b", config_b)
    fresh = get_peft_model(copy.deepcopy(base), make_config(BERT, selection="random", seed=3))
    assert pm.peft_config["b"].base_fingerprint == pm.peft_config["default"].base_fingerprint
    expected = sam_peft.selected_indices(fresh)
    got = sam_peft.selected_indices(pm, "b")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_load_adapter_checks_fingerprint(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH", raising=False)
    pm, _ = make_peft(BERT)
    pm.save_pretrained(tmp_path)
    other = get_peft_model(make_bert(seed=1), make_config(BERT))
    with pytest.raises(sam_peft.BaseModelMismatchError):
        other.load_adapter(tmp_path, adapter_name="x")


def _tied_gpt2() -> tuple[torch.nn.Module, torch.nn.Parameter, torch.nn.Parameter]:
    model = GPT2LMHeadModel(gpt2_config())
    return model, model.lm_head.weight, model.transformer.wte.weight


def _tied_bert_mlm() -> tuple[torch.nn.Module, torch.nn.Parameter, torch.nn.Parameter]:
    model = BertForMaskedLM(bert_config(num_hidden_layers=1))
    return model, model.cls.predictions.decoder.weight, model.bert.embeddings.word_embeddings.weight


@pytest.mark.parametrize("factory", [_tied_gpt2, _tied_bert_mlm], ids=["gpt2-lm", "bert-mlm"])
def test_tied_embeddings_merge_consistent(factory):
    torch.manual_seed(0)
    model, head_weight, embedding_weight = factory()
    model.eval()
    assert head_weight is embedding_weight
    pm = get_peft_model(model, sam_peft.SparseDiffConfig(sparsity=0.05))
    randomize(pm)
    inputs = {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))}
    out = logits(pm, inputs)
    pm.merge_adapter()
    torch.testing.assert_close(logits(pm, inputs), out, rtol=1e-5, atol=1e-5)


def test_saved_metadata_belongs_to_the_saved_adapter(tmp_path):
    pm, _ = make_peft(BERT)
    pm.add_adapter("b", make_config(BERT, sparsity=0.1, selection="random"))
    target = tmp_path / "b"
    pm.save_pretrained(target)
    for path, adapter in ((target, "default"), (target / "b", "b")):
        with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
            metadata = handle.metadata()
        config = pm.peft_config[adapter]
        assert (metadata["selection"], metadata["sparsity"]) == (config.selection, repr(config.sparsity)), adapter


class _FreqEmbeddingModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4, scale_grad_by_freq=True)
        self.out = torch.nn.Linear(4, 2)

    def forward(self, input_ids):
        return self.out(self.emb(input_ids))


def test_embedding_scale_grad_by_freq_gradient():
    torch.manual_seed(0)
    model = _FreqEmbeddingModel()
    base = copy.deepcopy(model)
    pm = get_peft_model(model, sam_peft.SparseDiffConfig(sparsity=0.5, selection="random", target_modules=["emb"]))
    randomize(pm)
    input_ids = torch.tensor([[0, 1, 1, 1, 7, 7]])
    ref = reference(base, pm)
    ref.requires_grad_(True)
    weighted_loss(pm(input_ids=input_ids)).backward()
    weighted_loss(ref(input_ids)).backward()
    values = sparse_values(pm)["emb.weight"]
    expected = ref.emb.weight.grad.reshape(-1)[sparse_indices(pm)["emb.weight"].long()]
    torch.testing.assert_close(values.grad, expected)


def test_adapter_loads_on_same_checkpoint_in_bf16(tmp_path, monkeypatch):
    monkeypatch.delenv("SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH", raising=False)
    pm, _ = make_peft(BERT)
    randomize(pm)
    pm.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_bert().to(torch.bfloat16), tmp_path)
    for name, values in sparse_values(pm).items():
        assert torch.equal(sparse_values(loaded)[name], values), name


def test_unmerge_restores_fp32_base_bit_exactly():
    pm, _ = make_peft(BERT)
    randomize(pm)
    before = {n: p.detach().clone() for n, p in base_params(pm).items()}
    pm.merge_adapter()
    pm.unmerge_adapter()
    assert_same_params({n: p.detach() for n, p in base_params(pm).items()}, before)


def test_stacked_deltas_come_off_in_reverse_order():
    pm, base = make_peft(BERT)
    randomize(pm)
    delta = sam_peft.SparseDelta.from_peft(pm)
    other = delta.scale(0.5)  # the same entries and head
    sparse_only = sam_peft.SparseDelta({n: (i, v * 2) for n, (i, v) in delta.entries.items()}, dict(delta.shapes),
                                       metadata=dict(delta.metadata))
    plain = copy.deepcopy(base).eval()
    before = plain_params(plain)
    delta.apply_to(plain)
    other.apply_to(plain, verify_fingerprint=False)  # stacked: the base it sees is θ0 + Δ
    with pytest.raises(ValueError, match="reverse order"):
        delta.remove_from(plain)  # would restore θ0 under `other`, and `other` would then put back θ0 + Δ
    other.remove_from(plain)
    delta.remove_from(plain)
    assert_same_params(plain_params(plain), before)
    # disjoint deltas (one holds only the head, the other only the entries) come off in any order, exactly
    head_only = sam_peft.SparseDelta({}, {}, dict(delta.dense), dict(delta.metadata))
    head_only.apply_to(plain, verify_fingerprint=False)
    sparse_only.apply_to(plain, verify_fingerprint=False)
    head_only.remove_from(plain)
    sparse_only.remove_from(plain)
    assert_same_params(plain_params(plain), before)
    # the model keeps no delta alive (only which entries it changed): a delta left applied and dropped is freed,
    # and still keeps an earlier one that shares its entries from coming off
    delta.apply_to(plain)
    dropped = delta.scale(0.5)
    dropped.apply_to(plain, verify_fingerprint=False)
    ref = weakref.ref(dropped)
    del dropped
    gc.collect()
    assert ref() is None
    with pytest.raises(ValueError, match="reverse order"):
        delta.remove_from(plain)


def test_packed_model_switches_deltas_exactly():
    pm, base = make_peft(BERT)
    randomize(pm)
    delta = sam_peft.SparseDelta.from_peft(pm)
    other = delta.scale(0.5)
    plain = copy.deepcopy(base).eval()
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    assert sam_peft.pack_parameters(plain) == len(before)
    inputs = {"input_ids": torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))}
    expected = logits(pm, inputs)
    for _ in range(2):
        delta.apply_to(plain)
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        delta.remove_from(plain)
        other.apply_to(plain)
        other.remove_from(plain)
    assert_same_params({n: p.detach() for n, p in plain.named_parameters()}, before)
