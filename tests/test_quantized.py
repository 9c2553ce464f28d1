"""Sparse deltas on quantized bases (bitsandbytes 4-bit NF4/FP4 with and without double quantization, 8-bit,
torchao int8 weight-only): sizes from the logical weight, forward and gradients equal to a float layer holding the
dequantized weights plus the delta, refusal of kinds without a dequantize path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from quantized_models import KINDS, batches, dequantized_twin, load_quantized, save_float_llama

import sam_peft
from sam_peft.errors import ConfigError
from sam_peft.tuner.ops import compose
from sam_peft.tuner.quantized_layers import QuantizedLinear
from sam_peft.tuner.targets import targets

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def float_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_float_llama(path)
    return path


def _sam(model, **config):
    fields = dict(task_type="CAUSAL_LM", selection="magnitude", sparsity=0.02)
    return get_peft_model(model, sam_peft.SAMConfig(**{**fields, **config}))


def _random_values(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in targets(model, "default"):
            t.values.copy_(torch.randn(t.values.shape, generator=g) * 0.05)


@pytest.mark.parametrize("kind", list(KINDS))
def test_wraps_with_logical_sizes(float_path, kind):
    model = _sam(load_quantized(float_path, kind))
    found = {t.name: t for t in targets(model, "default")}
    q_proj = found["model.layers.0.self_attn.q_proj.weight"]
    assert isinstance(q_proj.layer, QuantizedLinear) and q_proj.quantized
    assert tuple(q_proj.shape) == (64, 64) and q_proj.numel == 4096
    assert q_proj.values.numel() == int(0.02 * 4096)  # the budget of the logical weight, not the packed storage
    assert int(q_proj.indices.max()) < 4096
    assert tuple(found["model.layers.0.mlp.down_proj.weight"].shape) == (64, 128)
    assert q_proj.layer.in_features == 64 and q_proj.layer.out_features == 64


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("autocast", [False, True])
def test_forward_and_gradients_equal_float_reference(float_path, kind, autocast):
    """Output, input gradient and values gradient equal those of a float Linear holding dequantized θ0 + Δ
    (same kernels: fp32 to 1e-5 relative, bf16 autocast to one bf16 rounding of the output, 1e-2 relative)."""
    model = _sam(load_quantized(float_path, kind))
    _random_values(model)
    layer = model.base_model.model.model.layers[1].mlp.down_proj
    values = layer.sparsediff_values["default"]["weight"]
    indices = layer.sparsediff_indices["default"]["weight"].long()
    x = torch.randn(3, 5, 128, requires_grad=True)
    ref_values = values.detach().clone().requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
        ref = F.linear(ref_x, compose(layer.dequantized(), indices, ref_values))
    assert out.dtype == ref.dtype == (torch.bfloat16 if autocast else torch.float32)
    grad = torch.randn(out.shape, dtype=out.dtype)
    out.backward(grad)
    ref.backward(grad)
    tol = dict(rtol=1e-2, atol=1e-2) if autocast else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(x.grad, ref_x.grad, **tol)
    torch.testing.assert_close(values.grad, ref_values.grad, **tol)
    assert values.grad.dtype == torch.float32 and values.dtype == torch.float32


@pytest.mark.parametrize("kind", ["nf4", "int8", "torchao_int8"])
def test_whole_model_equals_dequantized_twin_with_delta(float_path, kind):
    """The whole quantized model with a delta computes what the float model with the dequantized weights and the
    same delta (applied as a SparseDelta) computes; the loss gradient of the values is the same."""
    model = _sam(load_quantized(float_path, kind))
    _random_values(model)
    twin = dequantized_twin(float_path, model.base_model.model)
    twin_model = _sam(twin)
    sam_peft.SparseDelta.from_peft(model)  # extractable
    with torch.no_grad():
        for a, b in zip(targets(model, "default"), targets(twin_model, "default")):
            b.layer.set_entries("default", b.attr, a.indices.long(), a.values.detach())
    batch = batches(1)[0]
    loss = model(**batch).loss
    twin_loss = twin_model(**batch).loss
    loss.backward()
    twin_loss.backward()
    torch.testing.assert_close(loss, twin_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(targets(model, "default"), targets(twin_model, "default")):
        torch.testing.assert_close(a.values.grad, b.values.grad, rtol=1e-4, atol=1e-7)


def test_no_dense_weight_saved_for_backward(float_path):
    """Backward keeps the input side and the written values only: no tensor of the weight's size."""
    model = _sam(load_quantized(float_path, "nf4"))
    layer = model.base_model.model.model.layers[0].mlp.up_proj  # 128 × 64
    saved = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(torch.randn(2, 64, requires_grad=True)).sum().backward()
    assert saved and all(torch.Size(s).numel() < 128 * 64 for s in saved)


class FakeQuantLinear(torch.nn.Module):
    """A GPTQ-style kernel: packed int32 weights in buffers, no dequantize path sam-peft knows."""

    def __init__(self):
        super().__init__()
        self.register_buffer("qweight", torch.zeros(8, 64, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(1, 64))
        self.bias = torch.nn.Parameter(torch.zeros(64))

    def forward(self, x):
        return x


def test_unsupported_quantized_kind_is_refused_before_wrapping(float_path):
    model = load_quantized(float_path, "nf4")
    model.model.layers[0].self_attn.o_proj = FakeQuantLinear()
    with pytest.raises(ConfigError, match="o_proj.*qweight.*bitsandbytes Linear4bit"):
        _sam(model)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # nothing was wrapped
    _sam(model, exclude_modules=["o_proj"])  # left out: the rest is tuned


def test_torchao_with_activation_quantization_is_refused(float_path):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(float_path)
    quantize_(model.model.layers[0].mlp, Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(ConfigError, match="activation quantization"):
        _sam(model)


# ------------------------------------------------------------------------------------------- burn-in (item 2)
def _jaccard(a: dict, b: dict) -> float:
    inter = union = 0
    for name in a:
        x, y = set(a[name].tolist()), set(b[name].tolist())
        inter, union = inter + len(x & y), union + len(x | y)
    return inter / union


def _selected_pair(float_path, kind, selection, **options):
    quantized = _sam(load_quantized(float_path, kind), selection=selection)
    twin = _sam(dequantized_twin(float_path, quantized.base_model.model), selection=selection)
    data = batches(3)
    for model in (quantized, twin):
        if selection not in ("magnitude", "random", "bitfit"):
            sam_peft.select_parameters(model, data, progress=False, **options)
    return sam_peft.selected_indices(quantized), sam_peft.selected_indices(twin), quantized


@pytest.mark.parametrize("kind", ["nf4", "nf4_double", "int8", "torchao_int8"])
@pytest.mark.parametrize("selection,options", [("sam", {}), ("fisher", {}), ("fisher", {"per_example": True}),
                                               ("magnitude", {}), ("random", {}), ("bitfit", {})])
def test_selection_equals_float_reference(float_path, kind, selection, options):
    """The burn-in on the quantized model selects exactly what the existing burn-in selects on the float model
    holding the dequantized weights (fp32 statistics): Jaccard 1.0, and the weights never get a .grad."""
    chosen, reference, model = _selected_pair(float_path, kind, selection, **options)
    assert chosen.keys() == reference.keys()
    assert _jaccard(chosen, reference) == 1.0
    for name in chosen:
        assert torch.equal(chosen[name], reference[name]), name
    assert all(t.param.grad is None for t in targets(model, "default"))
    assert all(t.layer._gradient_sink is None for t in targets(model, "default") if t.quantized)


def test_selection_with_bf16_statistics(float_path):
    """bf16 statistics: the measured Jaccard against the float reference with fp32 statistics (reported, and
    bounded), and exact agreement with the float reference under the same bf16 statistics."""
    chosen, reference, _ = _selected_pair(float_path, "nf4", "sam", statistics_dtype=torch.bfloat16)
    assert _jaccard(chosen, reference) == 1.0
    fp32, _, _ = _selected_pair(float_path, "nf4", "sam")
    measured = _jaccard(chosen, fp32)
    print(f"nf4 burn-in, bf16 vs fp32 statistics: Jaccard {measured:.4f}")
    assert measured > 0.9


def test_gradient_is_folded_in_row_chunks(float_path, monkeypatch):
    """With a chunk of 16 entries (a quarter of a row of 64), the statistics are those of the one-chunk burn-in."""
    from sam_peft.tuner import quantized_layers

    whole, _, _ = _selected_pair(float_path, "nf4", "sam")
    monkeypatch.setattr(quantized_layers, "SINK_CHUNK_ENTRIES", 16)
    monkeypatch.setattr(quantized_layers.fold_weight_gradient, "__defaults__", (16,))
    chunked, _, _ = _selected_pair(float_path, "nf4", "sam")
    assert _jaccard(whole, chunked) == 1.0


@pytest.mark.parametrize("selection,options,match", [("sam_hessian", {}, "double backward"),
                                                     ("sam", {"max_grad_norm": 1.0}, "max_grad_norm")])
def test_unavailable_burn_ins_are_refused(float_path, selection, options, match):
    model = _sam(load_quantized(float_path, "nf4"), selection=selection)
    with pytest.raises(sam_peft.SelectionError, match=match):
        sam_peft.select_parameters(model, batches(1), progress=False, **options)


# ------------------------------------------------------------------------------------------- files and identity
def _trained(float_path, kind):
    model = _sam(load_quantized(float_path, kind), selection="sam")
    sam_peft.select_parameters(model, batches(2), progress=False)
    _random_values(model, seed=3)
    return model


@pytest.mark.parametrize("kind", ["nf4", "nf4_double", "int8", "torchao_int8"])
def test_save_reload_on_quantized_and_on_float_base(float_path, kind, tmp_path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = _trained(float_path, kind)
    record = model.peft_config["default"].base_quantization
    method = {"int8": "bnb_8bit", "torchao_int8": "torchao_int8_weight_only"}.get(kind, "bnb_4bit")
    assert record["method"] == method and "model.layers.0.self_attn.q_proj.weight" in record["parameters"]
    assert "model.embed_tokens.weight" not in record["parameters"]
    model.save_pretrained(tmp_path / "adapter")
    batch = batches(1, seed=5)[0]
    with torch.no_grad():
        expected = model(**batch).logits
        # a fresh quantized base: the same weights, the same outputs
        again = PeftModel.from_pretrained(load_quantized(float_path, kind), tmp_path / "adapter")
        torch.testing.assert_close(again(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        # the unquantized base (QLoRA-style deployment) is accepted: quantized as recorded it is the same base
        on_float = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(float_path), tmp_path / "adapter")
        assert torch.isfinite(on_float(**batch).logits).all()
    for a, b in zip(targets(model, "default"), targets(on_float, "default")):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
    other = tmp_path / "other"
    save_float_llama(other, seed=1)
    with pytest.raises(sam_peft.BaseModelMismatchError, match="fingerprint"):
        PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(other), tmp_path / "adapter")


def test_sparse_delta_records_quantization_and_applies_to_float_base(float_path, tmp_path):
    from transformers import LlamaForCausalLM

    delta = sam_peft.SparseDelta.from_peft(_trained(float_path, "nf4"))
    assert '"quant_type": "nf4"' in delta.metadata["base_quantization"]
    delta.save(tmp_path / "delta.safetensors")
    loaded = sam_peft.SparseDelta.load(tmp_path / "delta.safetensors")
    base = LlamaForCausalLM.from_pretrained(float_path)
    before = base.model.layers[0].self_attn.q_proj.weight.detach().clone()
    loaded.apply_to(base)
    assert not torch.equal(base.model.layers[0].self_attn.q_proj.weight, before)
    loaded.remove_from(base)
    assert torch.equal(base.model.layers[0].self_attn.q_proj.weight, before)
    with pytest.raises(sam_peft.BaseModelMismatchError, match="stored quantized"):
        loaded.apply_to(load_quantized(float_path, "nf4"))
    other = tmp_path / "other"
    save_float_llama(other, seed=1)
    with pytest.raises(sam_peft.BaseModelMismatchError, match="fingerprint"):
        loaded.apply_to(LlamaForCausalLM.from_pretrained(other))


@pytest.mark.parametrize("kind", ["nf4", "nf4_double", "int8", "torchao_int8"])
def test_merge_requantizes_with_a_warning(float_path, kind):
    model = _trained(float_path, kind)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    indices, values = layer.entries("default")["weight"]
    theta0 = layer.dequantized()
    target = compose(theta0, indices.long(), values.detach())
    batch = batches(1, seed=5)[0]
    with pytest.warns(UserWarning, match="quantized again"):
        model.merge_adapter()
    merged = layer.dequantized()
    err = (merged.view(-1)[indices.long()] - target.view(-1)[indices.long()]).abs().mean()
    assert err < values.abs().mean() / 2  # the merged weight holds the delta, up to re-quantization
    model.unmerge_adapter()
    assert torch.equal(layer.dequantized(), theta0)  # the original quantized weight is back
    with torch.no_grad():
        adapter_logits = model(**batch).logits
        with model.disable_adapter():
            base_logits = model(**batch).logits
        with pytest.warns(UserWarning, match="quantized again"):
            unloaded = model.merge_and_unload()
        assert type(unloaded.model.layers[0].self_attn.q_proj) is type(layer.get_base_layer())
        merged_logits = unloaded(**batch).logits
    # the merged model is the adapter's, up to re-quantization: much closer to it than the base is
    assert (merged_logits - adapter_logits).abs().mean() < (base_logits - adapter_logits).abs().mean() / 2


def test_cli_merge_says_which_merge_runs(float_path):
    from sam_peft.cli.merge import _merge_kind

    model = _trained(float_path, "nf4")
    said = _merge_kind(model.peft_config["default"], "base-dir")
    assert "bnb_4bit/nf4" in said and "unquantized base base-dir" in said and "no re-quantization" in said
    assert "float" in _merge_kind(sam_peft.SAMConfig(), "base-dir")


@pytest.mark.parametrize("allocation", ["per_tensor", "global"])
@pytest.mark.parametrize("autocast", [False, True])
def test_statistics_budget_on_a_quantized_base_selects_as_one_pass(float_path, allocation, autocast):
    """`max_statistics_bytes` on an NF4 base: several passes, the same selection as one pass; under bf16 autocast
    too (SAMCallback with bf16=True), where bitsandbytes' own forward returns another dtype than the burn-in's
    kernel, so every pass must run the burn-in's kernel in every quantized layer, not only in its group's."""
    data = batches(3)
    chosen = []
    for budget in (None, 4096 * 4 * 3):  # one pass; then about three q_proj-sized tensors per pass
        model = _sam(load_quantized(float_path, "nf4"), selection="sam", allocation=allocation)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            report = sam_peft.select_parameters(model, data, progress=False, dropout=False,
                                                max_statistics_bytes=budget)
        assert (report.passes > 1) == (budget is not None)
        chosen.append(sam_peft.selected_indices(model))
    for name in chosen[0]:
        assert torch.equal(chosen[0][name], chosen[1][name]), name
