"""Linear, transformers Conv1D and Embedding layers: the large weight runs with the active delta written in.

With one active adapter and a writable float weight, each kernel that reads the weight (the forward, and the
input gradient in backward) runs with W[idx] = θ0[idx] + values written in (in W's dtype; the fp32 values are the
master copy), and θ0 is written back right after: O(k) each way, no dense copy, no host sync, and W holds θ0
whenever anyone else looks (state dict, merging, fingerprints, other adapters). Where W cannot be written (several
active adapters, quantized or sharded weights) the delta runs as a separate sparse term on its sub-block instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layer import SparseDiffLayer
from .ops import (
    BlockStructure,
    DeltaSlot,
    EmbeddingStructure,
    compose,
    composed_delta_matmul,
    matmul,
    sparse_delta_embedding,
    sparse_term,
    tensor_version,
    written_delta_embedding,
    written_delta_matmul,
)
from .quantized_layers import QuantizedLinear, check_supported, quantized_kind, unsupported_quantization

# a mixed batch adds its adapters' deltas as gathered terms while Σ rows × tokens × k ≤ this × the weight's size;
# beyond it the per-group forwards are faster (MiniLM, 8 adapters, 256 tokens per group: terms 1.8× slower, CPU)
TERMS_MAX_RATIO = 1.0


def _writable(weight: torch.Tensor) -> bool:
    """A plain, contiguous float tensor on a real device (not a quantized, sharded or meta parameter, a transposed
    view, or an inference tensor, which cannot be written outside `inference_mode`)."""
    return type(weight) in (nn.Parameter, torch.Tensor) and weight.dtype.is_floating_point \
        and weight.device.type != "meta" and weight.is_contiguous() \
        and (torch.compiler.is_compiling() or not weight.is_inference())  # a graph composes, never writes


@dataclass(frozen=True, eq=False)
class _Plan:
    """What a Linear's last call ran with (one active adapter, delta written in), reused while all of it
    is still what the layer holds: the same plan key, values (in the same storage), indices buffer, base tensors,
    and W's storage and version as when θ0 was read."""

    key: tuple
    values: torch.Tensor
    values_ptr: int
    own_values: nn.ParameterDict  # the adapter's dicts: `functional_call` swaps their entries for one call
    own_indices: nn.Module
    indices: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    bias_delta: tuple[torch.Tensor, torch.Tensor] | None
    structure: BlockStructure | None  # None: built by an inference call, taken only by calls that need no gradient
    slot: DeltaSlot

    def holds(self, layer: SparseDiffLinear) -> bool:
        base = layer.get_base_layer()
        return self.key == layer._plan_key() and self.values.data_ptr() == self.values_ptr \
            and self.own_values["weight"] is self.values and self.own_indices["weight"] is self.indices \
            and self.weight is base.weight and self.bias is base.bias \
            and DeltaSlot.weight_key(self.weight) == self.slot.key


class _WeightDeltaLayer(SparseDiffLayer):
    """A layer whose `weight` carries a delta through the fast paths of `ops`."""

    _plan: _Plan | None = None  # what the last call ran with, reused while nothing it depends on changed
    _reads_compose = False  # `layer.weight` is θ0 (read often for its dtype; composing would copy the weight)

    def invalidate_caches(self, rebuild: bool = True) -> None:
        self._plan = None  # it holds a slot and the tensors it was built for
        super().invalidate_caches(rebuild)

    def _slot(self, adapters: list[str], indices: torch.Tensor) -> DeltaSlot:
        weight = self.get_base_layer().weight
        return self._cached(("slot", tuple(adapters)),
                            lambda: (indices.data_ptr(), indices.numel(), DeltaSlot.weight_key(weight)),
                            lambda: self._locked_slot(weight, indices))

    def _locked_slot(self, weight: torch.Tensor, indices: torch.Tensor) -> DeltaSlot:
        # θ0 is read under the lock: another thread may have the delta written into W at this moment
        with self._lock:
            return DeltaSlot.build(weight, indices, self._lock)

    def _weight_delta(self, adapters: list[str]):
        """(writable, int64 indices, values) of the weight's delta over the active adapters, or None."""
        if "weight" not in self.tuned_parameters():
            return None
        delta = self._delta(adapters, "weight")
        if delta is None:
            return None
        return len(adapters) == 1 and _writable(self.get_base_layer().weight), delta[0], delta[1]

    def _structure(self, adapters: list[str], indices: torch.Tensor):
        raise NotImplementedError

    def _build_structures(self) -> None:
        super()._build_structures()
        active = self._active_with_entries()
        found = self._weight_delta(active) if active else None
        if found is None or found[1].device.type == "meta":
            return
        indices = found[1]
        # indices not loaded yet (e.g. `to_empty` before loading) may be anything: build from valid ones only
        # (loading rebuilds), so an out-of-range index never reaches a kernel
        if bool((indices.min() >= 0) & (indices.max() < self.get_base_layer().weight.numel())):
            self._structure(active, indices)


class SparseDiffLinear(_WeightDeltaLayer):
    """nn.Linear (and transformers' Conv1D, `transposed=True`)."""

    transposed = False

    @property
    def in_features(self) -> int:
        weight = self.get_base_layer().weight
        return weight.shape[0] if self.transposed else weight.shape[1]

    @property
    def out_features(self) -> int:
        weight = self.get_base_layer().weight
        return weight.shape[1] if self.transposed else weight.shape[0]

    def _structure(self, adapters: list[str], indices: torch.Tensor) -> BlockStructure:
        shape = tuple(self.get_base_layer().weight.shape)
        return self._cached(("block", tuple(adapters)), lambda: (indices.data_ptr(), indices.numel(), shape),
                            lambda: BlockStructure.build(indices, shape))

    def _plan_key(self) -> tuple:
        active = self._active_adapter
        return (self._disable_adapters, active if isinstance(active, str) else tuple(active),
                tuple(self.merged_adapters), self._epoch)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if torch.compiler.is_compiling() or kwargs.get("adapter_names") is not None:
            return super().forward(x, *args, **kwargs)
        plan = self._plan
        if plan is not None and plan.holds(self):  # the hot path: nothing changed since the last call
            bias = plan.bias if plan.bias_delta is None else compose(plan.bias, *plan.bias_delta)
            if plan.structure is not None or not _needs_grad(x, plan.values, bias):  # an inference plan has none
                return written_delta_matmul(x, plan.weight, bias, plan.values, plan.structure, self.transposed,
                                            plan.slot)
        self._plan = None
        return super().forward(x, *args, **kwargs)

    def _forward_with_deltas(self, adapters: list[str], x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        bias_delta = None if base.bias is None else self._delta(adapters, "bias")
        bias = base.bias if bias_delta is None else compose(base.bias, *bias_delta)
        found = self._weight_delta(adapters)
        if found is None:
            return matmul(x, base.weight, bias, self.transposed)
        writable, indices, values = found
        if torch.compiler.is_compiling() and not _needs_grad(x, values, bias):
            # a graph for inference reads only the entries (graph inputs), no structure built from them: swapping
            # them in place (`hotswap_adapter`) never recompiles it
            return matmul(x, compose(base.weight, indices, values), bias, self.transposed)
        if writable and not torch.compiler.is_compiling() and not _needs_grad(x, values, bias):
            # inference: the delta written in for the call needs θ0's slot only, no structure (a swap stays O(k))
            slot = self._slot(adapters, indices)
            self._remember(adapters, values, bias_delta, None, slot)
            return written_delta_matmul(x, base.weight, bias, values, None, self.transposed, slot)
        structure = self._structure(adapters, indices)
        if writable and torch.compiler.is_compiling():  # no lock, no in-place write in a graph
            return composed_delta_matmul(x, base.weight, bias, values, indices, structure, self.transposed)
        if writable:
            slot = self._slot(adapters, indices)
            self._remember(adapters, values, bias_delta, structure, slot)
            return written_delta_matmul(x, base.weight, bias, values, structure, self.transposed, slot)
        out = matmul(x, base.weight, bias, self.transposed) if bias is not base.bias else base(x, *args, **kwargs)
        return out + sparse_term(x, values, structure, self.transposed, self.out_features).to(out.dtype)

    def forward_rows_by_terms(self, names: tuple[str, ...], groups: list[tuple[str, torch.Tensor]],
                              x: torch.Tensor) -> torch.Tensor | None:
        """A mixed-adapter batch (`names`: each row's adapter; `groups`: each adapter's rows) in one matmul with θ0
        for every row, then every adapter's delta added to its own rows at once: one gather of x at each (row,
        entry)'s input column, scaled by the entry's value, one scatter-add to its output (O(rows × k)). None where
        the per-group forwards are cheaper or needed: a weight that is not a plain float tensor, or a batch whose
        gathered terms (rows × tokens × k) would outgrow the weight (there the per-group matmuls cost what one
        does)."""
        base = self.get_base_layer()
        weight = base.weight
        if self.disable_adapters or type(weight) not in (nn.Parameter, torch.Tensor) \
                or not weight.dtype.is_floating_point or weight.device.type == "meta":
            return None
        held = [(name, rows) for name, rows in groups if name in self.sparsediff_values
                and "weight" in self.sparsediff_values[name] and self.sparsediff_values[name]["weight"].numel()]
        tokens = x[0].numel() // max(x.shape[-1], 1)  # tokens per row
        if tokens * sum(rows.numel() * self.sparsediff_values[name]["weight"].numel() for name, rows in held) \
                > TERMS_MAX_RATIO * weight.numel():
            return None
        out = matmul(x, weight, base.bias, self.transposed)
        if held:
            sources = [self.sparsediff_indices[name]["weight"] for name, _ in held]
            gather_at, add_at, value_at = self._cached(
                ("mixed",), lambda: (names, x.shape[0], self.transposed,
                                     *((tensor_version(s), s.data_ptr(), s.numel()) for s in sources)),
                lambda: self._pair_indices(held, x.device))
            values = torch.cat([self.sparsediff_values[name]["weight"] for name, _ in held]).to(out.dtype)
            rows, width = x.shape[0], self.in_features
            xt = x.to(out.dtype).reshape(rows, tokens, width).transpose(1, 2).reshape(rows * width, tokens)
            terms = xt.index_select(0, gather_at) * values.index_select(0, value_at).unsqueeze(1)
            added = out.new_zeros(rows * self.out_features, tokens).index_add_(0, add_at, terms)
            out += added.view(rows, self.out_features, tokens).transpose(1, 2).reshape(out.shape)
        if base.bias is not None:
            for name, rows in groups:
                bias = self._delta([name], "bias")
                if bias is not None:
                    vector = out.new_zeros(self.out_features).index_add_(0, bias[0], bias[1].to(out.dtype))
                    out.index_add_(0, rows, vector.expand(rows.numel(), *out.shape[1:]))
        return out

    def _pair_indices(self, held: list[tuple[str, torch.Tensor]], device: torch.device):
        """For every (row, entry) of the batch: where x is read (row · in + input column), where the term is added
        (row · out + output row of W) and which of the concatenated values scales it."""
        gather_at, add_at, value_at, offset = [], [], [], 0
        for name, rows in held:
            indices = self._delta([name], "weight")[0]
            if self.transposed:  # Conv1D: W is in × out
                inputs, outputs = indices // self.out_features, indices % self.out_features
            else:
                inputs, outputs = indices % self.in_features, indices // self.in_features
            rows = rows.to(device).unsqueeze(1)
            gather_at.append((rows * self.in_features + inputs).reshape(-1))
            add_at.append((rows * self.out_features + outputs).reshape(-1))
            value_at.append((offset + torch.arange(indices.numel(), device=device)).repeat(rows.shape[0]))
            offset += indices.numel()
        return torch.cat(gather_at), torch.cat(add_at), torch.cat(value_at)

    def _remember(self, adapters: list[str], values: torch.Tensor, bias_delta, structure: BlockStructure | None,
                  slot: DeltaSlot) -> None:
        """Keep what this call ran with as the plan of the next ones (no structure: an inference plan, which a
        call that needs gradients does not take). Writable means one adapter; no plan for tensors swapped in
        for one call (functional_call) or wrapped by torch.func transforms, nor for one row group of a
        mixed-adapter batch."""
        if type(values) is nn.Parameter and adapters == self._active_with_entries():
            base = self.get_base_layer()
            own_values, own_indices = self.sparsediff_values[adapters[0]], self.sparsediff_indices[adapters[0]]
            self._plan = _Plan(self._plan_key(), values, values.data_ptr(), own_values, own_indices,
                               own_indices["weight"], base.weight, base.bias, bias_delta, structure, slot)


class SparseDiffConv1D(SparseDiffLinear):
    """transformers' Conv1D (weight stored in × out)."""

    transposed = True


class SparseDiffEmbedding(_WeightDeltaLayer):
    """nn.Embedding: the lookup reads the table with the delta written in; the values' gradient sums per row."""

    @property
    def num_embeddings(self) -> int:
        return self.get_base_layer().num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.get_base_layer().embedding_dim

    def _structure(self, adapters: list[str], indices: torch.Tensor) -> EmbeddingStructure:
        base = self.get_base_layer()
        shape = tuple(base.weight.shape)
        return self._cached(("rows", tuple(adapters)), lambda: (indices.data_ptr(), indices.numel(), shape),
                            lambda: EmbeddingStructure.build(indices, shape, base.padding_idx))

    def _forward_with_deltas(self, adapters: list[str], input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.get_base_layer()
        options = dict(padding_idx=base.padding_idx, max_norm=base.max_norm, norm_type=base.norm_type,
                       scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
        found = self._weight_delta(adapters)
        if found is None:
            return torch.nn.functional.embedding(input_ids, base.weight, **options)
        writable, indices, values = found
        if torch.compiler.is_compiling() and not _needs_grad(input_ids, values, None):
            return torch.nn.functional.embedding(input_ids, compose(base.weight, indices, values), **options)
        if writable and not torch.compiler.is_compiling() and not _needs_grad(input_ids, values, None):
            return written_delta_embedding(input_ids, base.weight, values, None, self._slot(adapters, indices),
                                           **options)
        structure = self._structure(adapters, indices)
        if writable and not torch.compiler.is_compiling():  # a graph adds the delta's rows as a separate term
            return written_delta_embedding(input_ids, base.weight, values, structure, self._slot(adapters, indices),
                                           **options)
        return sparse_delta_embedding(input_ids, base.weight, values, structure, **options)


def _needs_grad(x: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or values.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _runs_own_forward(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether calling `module` is exactly `cls.forward` on its weight: no forward of a subclass (e.g. OPT's and
    BART's learned positional embeddings add an offset or read only the input's shape) and no hooks, which the
    fast layers, calling the kernel themselves, would skip."""
    hooks = module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
        or getattr(module, "_backward_pre_hooks", None)
    return isinstance(module, cls) and type(module).forward is cls.forward and not hooks


def layer_class_for(module: nn.Module) -> type[SparseDiffLayer]:
    """The tuner layer class that wraps `module`: a fast layer only where it reproduces the module's forward
    exactly, else the generic layer, which calls the module itself with θ0 + Δ."""
    from transformers.pytorch_utils import Conv1D

    if quantized_kind(module) is not None:
        return QuantizedLinear
    if unsupported_quantization(module) is not None:
        check_supported([(type(module).__name__, module)])  # raises, naming the supported kinds
    if _runs_own_forward(module, nn.Linear):
        return SparseDiffLinear
    if _runs_own_forward(module, Conv1D):
        return SparseDiffConv1D
    if _runs_own_forward(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq:
        return SparseDiffEmbedding
    return SparseDiffLayer
