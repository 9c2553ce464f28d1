"""Sparse deltas on quantized Linear weights (bitsandbytes 4-bit and 8-bit, torchao int8 weight-only).

A quantized weight cannot hold θ0 + Δ, so each call dequantizes it transiently: the fp32 values are added to the
dequantized θ0 at the indices (`add_rounded_once`, O(k)), and one matmul runs with that copy, which is freed when
the call returns. Backward dequantizes again rather than keeping a dense weight, and computes the values' gradient
on the entries' sub-block exactly as on float bases (`ops`). Sizes, shapes and indices are those of the logical
(out × in) weight, never of its packed storage.

During a burn-in the same kernel runs with a *gradient sink* instead of a delta: backward hands the output gradient
and the input to the sink, which folds the weight gradient gᵀx into the statistics in chunks of rows (no weight
gradient larger than one chunk ever exists).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .layer import SparseDiffLayer
from .ops import (
    BlockStructure,
    _first_order_only,
    _input_side,
    _values_gradient,
    add_rounded_once,
    compose,
    not_a_view,
    write_at,
)

logger = logging.getLogger(__name__)

# A gradient sink's chunk: rows of the weight gradient computed at once, at most this many entries.
SINK_CHUNK_ENTRIES = 1 << 22


# --------------------------------------------------------------------------------------------- the backends
@dataclass(frozen=True)
class QuantizedKind:
    """One supported quantization backend: how to recognise its layers, dequantize their weight, describe the
    quantization (recorded in delta files) and quantize a float weight again (merging, base identity)."""

    method: str
    matches: Callable[[nn.Module], bool]
    dequantize: Callable[[nn.Module], torch.Tensor]  # a fresh float tensor of the logical (out, in) shape
    describe: Callable[[nn.Module], dict[str, Any]]
    quantize_like: Callable[[torch.Tensor, dict[str, Any], torch.device], nn.Parameter]
    shape: Callable[[nn.Module], torch.Size]


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a bnb layer cannot exist without it
        return None
    return bnb


def _is_bnb(module: nn.Module, name: str) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and _bnb() is not None \
        and isinstance(module, getattr(_bnb().nn, name))


# bitsandbytes 4-bit (NF4 / FP4, with or without double quantization)
def _bnb4_matches(module: nn.Module) -> bool:
    return _is_bnb(module, "Linear4bit") and getattr(module.weight, "quant_state", None) is not None


def _bnb4_canonical(module: nn.Module):
    """The weight in bitsandbytes' canonical layout: its CPU inference path repacks it in place (eval, no grad,
    AVX512-BF16), a layout that `dequantize_4bit` does not read; it is unpacked back, as bitsandbytes itself does
    before saving or moving the weight."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        module.quant_state = weight.quant_state
    return weight


def _bnb4_dequantize(module: nn.Module) -> torch.Tensor:
    weight = _bnb4_canonical(module)
    return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)


def _bnb4_describe(module: nn.Module) -> dict[str, Any]:
    weight = _bnb4_canonical(module)
    state = weight.quant_state
    return {"method": "bnb_4bit", "quant_type": state.quant_type, "double_quant": bool(state.nested),
            "blocksize": int(state.blocksize), "dtype": str(state.dtype).removeprefix("torch."),
            "quant_storage": str(weight.data.dtype).removeprefix("torch.")}


def _bnb4_quantize_like(dense: torch.Tensor, recorded: dict[str, Any], device: torch.device) -> nn.Parameter:
    params = _bnb().nn.Params4bit(
        dense.to("cpu", getattr(torch, recorded["dtype"])).contiguous(), requires_grad=False,
        quant_type=recorded["quant_type"], blocksize=recorded["blocksize"],
        compress_statistics=recorded["double_quant"], quant_storage=getattr(torch, recorded["quant_storage"]))
    return params.to(device)


def _bnb4_shape(module: nn.Module) -> torch.Size:
    return torch.Size(module.weight.quant_state.shape)


# bitsandbytes 8-bit (LLM.int8 with int8 weights)
def _bnb8_matches(module: nn.Module) -> bool:
    return _is_bnb(module, "Linear8bitLt") and module.weight.dtype == torch.int8


def _bnb8_scales(module: nn.Module) -> torch.Tensor:
    scales = module.state.SCB if module.state.SCB is not None else module.weight.SCB
    if scales is None:
        raise ConfigError(f"{type(module).__name__} holds int8 weights without their scales (SCB); load the model "
                          "with transformers' BitsAndBytesConfig(load_in_8bit=True) before wrapping it.")
    return scales


def _bnb8_dequantize(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    return _bnb().functional.int8_vectorwise_dequant(weight.data, _bnb8_scales(module).to(weight.device))


def _bnb8_describe(module: nn.Module) -> dict[str, Any]:
    return {"method": "bnb_8bit", "dtype": "float16"}  # bitsandbytes quantizes rows from their float16 copy


def _bnb8_quantize_like(dense: torch.Tensor, recorded: dict[str, Any], device: torch.device) -> nn.Parameter:
    return _bnb().nn.Int8Params(dense.to("cpu", torch.float16).contiguous(), requires_grad=False,
                                has_fp16_weights=False).to(device)


# torchao int8 weight-only (Int8WeightOnlyConfig / quantize_)
def _torchao_weight(module: nn.Module):
    weight = getattr(module, "weight", None)
    if not type(weight).__module__.startswith("torchao"):
        return None
    return weight


def _torchao_int8_matches(module: nn.Module) -> bool:
    weight = _torchao_weight(module)
    return isinstance(module, nn.Linear) and type(weight).__name__ == "Int8Tensor" \
        and getattr(weight, "act_quant_kwargs", None) is None and type(module).forward is nn.Linear.forward


def _torchao_int8_describe(module: nn.Module) -> dict[str, Any]:
    weight = module.weight
    block = list(weight.block_size)
    return {"method": "torchao_int8_weight_only", "dtype": str(weight.dtype).removeprefix("torch."),
            "granularity": "per_row" if block == [1, weight.shape[1]] else f"group_{block[-1]}"}


def _torchao_int8_quantize_like(dense: torch.Tensor, recorded: dict[str, Any],
                                device: torch.device) -> nn.Parameter:
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerGroup, PerRow

    granularity = recorded["granularity"]
    granularity = PerRow() if granularity == "per_row" else PerGroup(int(granularity.removeprefix("group_")))
    hp = dense.to(device, getattr(torch, recorded["dtype"]))
    return nn.Parameter(Int8Tensor.from_hp(hp, granularity), requires_grad=False)


KINDS: tuple[QuantizedKind, ...] = (
    QuantizedKind("bnb_4bit", _bnb4_matches, _bnb4_dequantize, _bnb4_describe, _bnb4_quantize_like, _bnb4_shape),
    QuantizedKind("bnb_8bit", _bnb8_matches, _bnb8_dequantize, _bnb8_describe, _bnb8_quantize_like,
                  lambda m: m.weight.shape),
    QuantizedKind("torchao_int8_weight_only", _torchao_int8_matches, lambda m: m.weight.dequantize(),
                  _torchao_int8_describe, _torchao_int8_quantize_like, lambda m: m.weight.shape),
)
SUPPORTED = ("bitsandbytes Linear4bit (NF4/FP4, with or without double quantization)",
             "bitsandbytes Linear8bitLt (int8 weights)", "torchao int8 weight-only (Int8WeightOnlyConfig)")
_KIND_BY_METHOD = {kind.method: kind for kind in KINDS}
# buffers and parameters by which kernels of other quantization libraries hold their packed weights
_PACKED_NAMES = ("qweight", "W_q", "qzeros", "weight_packed", "packed_weight")
_QUANTIZING_LIBRARIES = ("bitsandbytes", "torchao", "hqq", "auto_gptq", "gptqmodel", "awq", "optimum", "quanto",
                         "exllama", "marlin", "compressed_tensors", "aqlm", "eetq", "fbgemm")


def quantized_kind(module: nn.Module) -> QuantizedKind | None:
    """The supported backend whose quantized Linear `module` is, or None (a float module)."""
    return next((kind for kind in KINDS if kind.matches(module)), None)


def kind_named(method: str) -> QuantizedKind:
    if method not in _KIND_BY_METHOD:
        raise ConfigError(f"base_quantization method {method!r} is unknown to this sam-peft; it supports "
                          f"{sorted(_KIND_BY_METHOD)}.")
    return _KIND_BY_METHOD[method]


def unsupported_quantization(module: nn.Module) -> str | None:
    """Why `module` holds quantized weights that no supported backend can dequantize (None: it does not, or it is
    supported). Checked before anything is wrapped, so an unsupported kernel is an error, never a silent skip."""
    if quantized_kind(module) is not None:
        return None
    kind = type(module).__name__
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        if tensor is None:
            continue
        origin = type(tensor).__module__.split(".")[0]
        if name in _PACKED_NAMES:
            return f"{kind} keeps packed weights in '{name}'"
        if origin in _QUANTIZING_LIBRARIES:
            detail = " with activation quantization" if getattr(tensor, "act_quant_kwargs", None) else ""
            return f"{kind} holds its '{name}' as a {type(tensor).__name__}{detail}"
        if name in module._parameters and not tensor.dtype.is_floating_point:
            return f"{kind} holds its parameter '{name}' as {tensor.dtype}"
    if type(module).__module__.split(".")[0] in _QUANTIZING_LIBRARIES and module._parameters:
        return f"{kind} (from {type(module).__module__}) is a quantized layer"
    return None


def check_supported(named: list[tuple[str, nn.Module]]) -> None:
    """Refuse targeted modules with quantized weights of a kind without a dequantize path."""
    bad = [(name, why) for name, module in named if (why := unsupported_quantization(module)) is not None]
    if bad:
        listed = "; ".join(f"'{n}': {why}" for n, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3
                                                                     else "")
        raise ConfigError(
            f"{listed}. sam-peft can fine-tune these quantized bases: {'; '.join(SUPPORTED)}. Load the model with one "
            "of them (or in float), or leave these modules out with exclude_modules / target_modules."
        )


# --------------------------------------------------------------------------------------------- autograd
def _compute_dtype(x: torch.Tensor, base: nn.Module) -> torch.dtype:
    """The autocast dtype if autocast is on; else bitsandbytes' set compute dtype (as its own layer uses); else
    x's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    if getattr(base, "compute_type_is_set", False) and getattr(base, "compute_dtype", None) is not None:
        return base.compute_dtype
    return x.dtype


def _tuned_weight(layer: QuantizedLinear, indices: torch.Tensor | None, written: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """θ0 dequantized, with `written` (θ0 + Δ, rounded once) at the indices, in `dtype`: a fresh dense tensor."""
    weight = layer.dequantized()
    if indices is not None:
        weight.view(-1).index_put_((indices,), written.to(weight.dtype))  # int32 or int64 indices
    return weight.to(dtype)


class QuantizedDeltaMatmul(torch.autograd.Function):
    """y = x (θ0 + Δ)ᵀ + b for a quantized θ0: one transient dequantized copy per kernel (forward, and again for
    the input gradient in backward); the values' gradient from the entries' sub-block, as on float weights.
    `sink` (burn-in only, no delta): backward hands (output gradient, input) to it for the weight gradient;
    `anchor` is a tensor that requires grad, so backward runs even where nothing upstream needs a gradient."""

    @staticmethod
    def forward(ctx, x, values, bias, anchor, layer, indices, structure, sink):
        dtype = _compute_dtype(x, layer.get_base_layer())
        out_dtype = dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        weight, written = layer.dequantized(), None  # one dequantization: θ0 at the indices is read from it
        if indices is not None:
            flat = weight.view(-1)
            written = add_rounded_once(flat.index_select(0, indices), values.detach())
            flat.index_put_((indices,), written.to(weight.dtype))  # int32 or int64 indices
        xc = x.to(dtype)
        out = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
        ctx.layer, ctx.indices, ctx.written, ctx.dtype, ctx.sink = layer, indices, written, dtype, sink
        ctx.x_shape, ctx.x_dtype, ctx.bias_dtype = x.shape, x.dtype, None if bias is None else bias.dtype
        ctx.structure = structure
        x_side, ctx.take = None, False
        if values is not None:
            x_side, ctx.take = _input_side(xc, structure, False, dtype, values.requires_grad)
        ctx.save_for_backward(x_side, xc.reshape(-1, x.shape[-1]) if sink is not None else None)
        return not_a_view(out.to(out_dtype), x, bias)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        x_side, x2 = ctx.saved_tensors
        go2 = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.dtype)
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _tuned_weight(ctx.layer, ctx.indices, ctx.written, ctx.dtype)
            grad_x = (go2 @ weight).view(ctx.x_shape).to(ctx.x_dtype)
            del weight
        if ctx.needs_input_grad[1]:
            grad_values = _values_gradient(ctx.structure, False, x_side, ctx.take, go2)
        if ctx.needs_input_grad[2]:
            grad_bias = go2.sum(0).to(ctx.bias_dtype)
        if ctx.sink is not None:
            ctx.sink(go2, x2)
        return grad_x, grad_values, grad_bias, None, None, None, None, None


def fold_weight_gradient(go2: torch.Tensor, x2: torch.Tensor, fold_rows: Callable[[int, torch.Tensor], None],
                         chunk_entries: int = SINK_CHUNK_ENTRIES) -> None:
    """Compute the weight gradient go2ᵀ x2 (out × in) in chunks of rows, handing each to `fold_rows(first row,
    chunk)` at once: no gradient larger than one chunk is held."""
    out_features, in_features = go2.shape[1], x2.shape[1]
    rows = max(1, chunk_entries // max(1, in_features))
    x2 = x2.to(go2.dtype)
    for start in range(0, out_features, rows):
        fold_rows(start, go2[:, start:start + rows].t() @ x2)


# --------------------------------------------------------------------------------------------- the layer
class QuantizedLinear(SparseDiffLayer):
    """A quantized Linear (see `KINDS`) with sparse deltas on its logical weight (and its bias, if any)."""

    _reads_compose = False  # the weight is stored quantized: no θ0 + Δ is composed for reads or methods
    _methods_compose = False

    # (anchor, sink) while a burn-in runs; sink None: the layer runs the burn-in kernel but keeps no statistics
    _gradient_sink: tuple[torch.Tensor, Callable | None] | None = None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, module_key: str,
                 skip: frozenset[str] = frozenset()) -> None:
        self.__dict__["kind"] = quantized_kind(base_layer)
        if hasattr(base_layer, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference path would repack the weight in place with its scales rounded to bf16,
            # changing θ0 (and the base fingerprint) under the delta; wrapped layers keep the canonical layout
            base_layer.support_avx512bf16_for_cpu = False
        super().__init__(base_layer, adapter_name, config, module_key, skip)
        self._merged_weights: dict[str, nn.Parameter] = {}

    @property
    def in_features(self) -> int:
        return int(self.parameter_shape("weight")[1])

    @property
    def out_features(self) -> int:
        return int(self.parameter_shape("weight")[0])

    # ----------------------------------------------------------------- the logical weight
    def is_quantized(self, name: str) -> bool:
        return name == "weight"

    def parameter_shape(self, name: str) -> torch.Size:
        if name == "weight":
            return self.kind.shape(self.get_base_layer())
        return super().parameter_shape(name)

    def dequantized(self) -> torch.Tensor:
        """θ0 of the weight, dequantized: a fresh dense float tensor (out × in)."""
        with self._lock, torch.no_grad():
            return self.kind.dequantize(self.get_base_layer())

    def dequantized_at(self, indices: torch.Tensor) -> torch.Tensor:
        return self.dequantized().view(-1).index_select(0, indices)

    def dense_parameter(self, name: str) -> torch.Tensor:
        return self.dequantized() if name == "weight" else super().dense_parameter(name)

    def quantization(self) -> dict[str, Any]:
        """How the weight is quantized, as recorded in delta files (`base_quantization`)."""
        return self.kind.describe(self.get_base_layer())

    # ----------------------------------------------------------------- forward
    def _weight_delta(self, adapters: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(indices, values) of the weight's delta. One adapter's indices are used as stored (int32 below 2³¹
        entries): the kernel indexes with them directly, so no int64 copy is cached per layer (8 bytes per entry
        on a model where the rest of the layer is 4 bits per weight). Several adapters: their summed union."""
        if len(adapters) != 1:
            return self._delta(adapters, "weight")
        own = self.sparsediff_values[adapters[0]] if adapters[0] in self.sparsediff_values else {}
        values = own.get("weight")
        if values is None or values.numel() == 0:
            return None
        return self.sparsediff_indices[adapters[0]]["weight"], values

    def _structure(self, adapters: list[str], indices: torch.Tensor) -> BlockStructure:
        shape = tuple(self.parameter_shape("weight"))
        return self._cached(("block", tuple(adapters)), lambda: (indices.data_ptr(), indices.numel(), shape),
                            lambda: BlockStructure.build(indices, shape))

    def _build_structures(self) -> None:
        super()._build_structures()
        active = self._active_with_entries()
        if not active or "weight" not in self.tuned_parameters():
            return
        delta = self._weight_delta(active)
        if delta is not None and delta[0].device.type != "meta" and \
                bool((delta[0].min() >= 0) & (delta[0].max() < self.parameter_shape("weight").numel())):
            self._structure(active, delta[0])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sink = self._gradient_sink
        if sink is not None and torch.is_grad_enabled():
            anchor, fold = sink
            return QuantizedDeltaMatmul.apply(x, None, self.get_base_layer().bias, anchor, self, None, None, fold)
        return super().forward(x, *args, **kwargs)

    def _forward_with_deltas(self, adapters: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        base = self.get_base_layer()
        bias_delta = None if base.bias is None else self._delta(adapters, "bias")
        bias = base.bias if bias_delta is None else compose(base.bias, *bias_delta)
        delta = self._weight_delta(adapters) if "weight" in self.tuned_parameters() else None
        if delta is None and bias is base.bias:
            return base(x, *args, **kwargs)
        indices, values = (None, None) if delta is None else delta
        structure = None if delta is None else self._structure(adapters, indices)
        return QuantizedDeltaMatmul.apply(x, values, bias, None, self, indices, structure, None)

    # ----------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str, name: str = "weight") -> torch.Tensor:
        if name != "weight":
            return super().get_delta_weight(adapter_name, name)
        indices, values = self.entries(adapter_name)[name]
        zeros = torch.zeros(self.parameter_shape(name), dtype=torch.float32, device=values.device)
        return compose(zeros, indices.long(), values.detach())

    def check_merge(self, adapter_names: list[str]) -> None:
        for adapter in adapter_names:
            if adapter in self.sparsediff_values and "weight" in self.sparsediff_values[adapter]:
                indices, values = self.entries(adapter)["weight"]
                merged = add_rounded_once(self.dequantized_at(indices.long()), values.detach())
                if not torch.isfinite(merged).all():
                    raise ValueError(f"Merging adapter '{adapter}' into {self.module_key}.weight gives non-finite "
                                     "values; the base is unchanged.")
        super().check_merge([a for a in adapter_names if "weight" not in self.sparsediff_values.get(a, {})])

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize the weight, add the delta (rounded once), quantize it again with the same settings: the
        re-quantization rounds, so the merged layer is close to, not equal to, θ0 + Δ (a warning says so). The bias
        is merged exactly. `unmerge` restores the original quantized weight and bias exactly."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        if safe_merge:
            self.check_merge(adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.sparsediff_values:
                continue
            backup = {}
            with torch.no_grad():
                for name, (indices, values) in self.entries(adapter).items():
                    idx = indices.long()
                    if name != "weight":
                        param = self.tuned_parameters()[name]
                        backup[name] = param.data.reshape(-1).index_select(0, idx)
                        write_at(param, idx, add_rounded_once(backup[name], values))
                        torch.autograd.graph.increment_version(param)
                    elif idx.numel():
                        warnings.warn(
                            f"Merging a sparse delta into the {self.kind.method} weight of {self.module_key}: it is "
                            "dequantized, the delta added and the result quantized again, which rounds it (the merged "
                            "model differs slightly from the adapter's). Merge into the unquantized base for exact "
                            "weights.", UserWarning, stacklevel=3)
                        dense = self.dequantized()
                        flat = dense.view(-1)
                        flat.index_copy_(0, idx, add_rounded_once(flat.index_select(0, idx), values))
                        recorded = self.quantization()
                        self._merged_weights[adapter] = base.weight
                        self._set_weight(self.kind.quantize_like(dense, recorded, base.weight.device))
            self._merge_backup[adapter] = backup
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the quantized weight and the bias entries that `merge` replaced, most recent merge first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                for name, saved in self._merge_backup.pop(adapter, {}).items():
                    param = self.tuned_parameters()[name]
                    write_at(param, self.sparsediff_indices[adapter][name].long(), saved)
                    torch.autograd.graph.increment_version(param)
            original = self._merged_weights.pop(adapter, None)
            if original is not None:
                self._set_weight(original)

    def _set_weight(self, weight: nn.Parameter) -> None:
        base = self.get_base_layer()
        base.weight = weight
        if self.kind.method == "bnb_4bit":
            base.quant_state = weight.quant_state
            weight.module = base
        elif self.kind.method == "bnb_8bit":
            base.state.reset_grads()
            base.state.CB, base.state.SCB = weight.CB, weight.SCB
            weight.CB, weight.SCB = None, None
        self.invalidate_caches()



# --------------------------------------------------------------------------------------------- identity
def quantization_record(found: list) -> dict[str, Any] | None:
    """What a delta records about its base's quantization (`base_quantization`): the settings of each quantized
    target and the targets they apply to, e.g. {"method": "bnb_4bit", "quant_type": "nf4", "double_quant": False,
    "blocksize": 64, "dtype": "float32", "quant_storage": "uint8", "parameters": [...]}; several settings give
    {"groups": [...]}; None for a float base."""
    groups: dict[str, tuple[dict, list[str]]] = {}
    for t in found:
        if t.quantized:
            settings = t.layer.quantization()
            groups.setdefault(json.dumps(settings, sort_keys=True), (settings, []))[1].append(t.name)
    records = [{**settings, "parameters": names} for settings, names in groups.values()]
    if not records:
        return None
    return records[0] if len(records) == 1 else {"groups": records}


def recorded_settings(record: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """{parameter name: its recorded quantization settings} of a `quantization_record`."""
    if not record:
        return {}
    groups = record["groups"] if "groups" in record else [record]
    return {name: {k: v for k, v in group.items() if k != "parameters"}
            for group in groups for name in group["parameters"]}


def roundtrip(dense: torch.Tensor, settings: dict[str, Any]) -> torch.Tensor:
    """A float weight quantized with recorded `settings` and dequantized again: what a base quantized that way from
    this weight holds (how an unquantized base is compared with the fingerprint of the quantized one)."""
    kind = kind_named(settings["method"])
    with torch.no_grad():
        weight = kind.quantize_like(dense.detach(), settings, dense.device)
        return kind.dequantize(SimpleNamespace(weight=weight, state=SimpleNamespace(SCB=None)))


class DenseWeights(Mapping):
    """{name: θ0 as a float tensor of its logical shape}, computed one at a time as it is read (for the base
    fingerprint): a quantized weight is read dequantized; a float weight that `record` names as quantized in the
    delta's base is read quantized-and-dequantized with the recorded settings (`roundtrip`), so the unquantized base
    of a delta trained on a quantized one has its fingerprint, and any other float base does not."""

    def __init__(self, loaders: dict[str, Callable[[], torch.Tensor]], record: dict[str, Any] | None = None,
                 quantized: frozenset[str] = frozenset()) -> None:
        settings = recorded_settings(record)
        self._loaders = {
            name: (partial(_roundtrip_loaded, load, settings[name]) if name in settings and name not in quantized
                   else load)
            for name, load in loaders.items()
        }

    @classmethod
    def of_targets(cls, found: list, record: dict[str, Any] | None = None) -> DenseWeights:
        return cls({t.name: t.dense for t in found}, record, frozenset(t.name for t in found if t.quantized))

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def _roundtrip_loaded(load: Callable[[], torch.Tensor], settings: dict[str, Any]) -> torch.Tensor:
    return roundtrip(load(), settings)


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """Whether a parameter is stored quantized (packed integers or a quantized tensor subclass)."""
    return not tensor.dtype.is_floating_point or type(tensor).__module__.split(".")[0] in _QUANTIZING_LIBRARIES
