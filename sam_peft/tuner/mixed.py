"""Mixed-adapter batches: peft's `adapter_names` argument, one adapter (or `"__base__"`) per row of a batch.

Linear and Conv1D layers on a float weight, in inference, run one matmul with θ0 for the whole batch and add every
adapter's delta to its rows in one gather and one scatter-add over (row, entry) pairs (O(rows × k)): the weight is
read once however many adapters the batch holds. A row's output equals the one it gets alone with its adapter set
up to rounding (there θ0 + Δ is rounded once into the weight; here x·Δ is a separate term). Where that does not
apply (other layer kinds, quantized weights, a batch whose gathered terms would outgrow the weight), each layer
splits its input by row into one sub-batch per adapter, runs each sub-batch exactly as a single-adapter forward
would (the delta written into the weight for the call, O(k)), and puts the rows back in place.

A layer where the batch's adapters differ can only split rows it can see: its first input must have the batch as
dimension 0. The one exception is an absolute position table read with ids of shape (1, T) broadcast over the
batch (BERT-style `position_embeddings`, GPT-2's `wpe`): each adapter's rows of the table are computed once and
repeated over that adapter's rows. Layers that receive flattened tokens (an MoE router after `view(-1, hidden)`)
or indices with no batch dimension (T5's relative attention bias reads a (T, T) bucket matrix) are refused with an
error naming the module: a per-row delta cannot reach rows the layer does not see. One case cannot be told apart:
a layer whose input has no batch dimension but whose first dimension happens to equal the batch size; exclude
such tables from the targets of adapters served in mixed batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

BASE = "__base__"
# arguments of peft's forward that this tuner does not implement: refused, never ignored
UNSUPPORTED_FORWARD_ARGUMENTS = ("alora_offsets",)
# absolute position tables that transformers reads with position ids of shape (1, T), broadcast over the batch
BROADCAST_POSITION_TABLES = frozenset({"position_embeddings", "wpe"})


@dataclass(frozen=True, eq=False)
class MixedBatch:
    """The adapter of each row, grouped: (adapter, row positions) in order of first appearance."""

    names: tuple[str, ...]
    groups: tuple[tuple[str, torch.Tensor], ...]
    _on_device: dict = field(default_factory=dict, repr=False)

    @staticmethod
    def of(names: Sequence[str]) -> MixedBatch:
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise TypeError(f"adapter_names must be a list with one adapter name per row, got {names!r}.")
        rows: dict[str, list[int]] = {}
        for position, name in enumerate(names):
            rows.setdefault(name, []).append(position)
        return MixedBatch(tuple(names), tuple((n, torch.tensor(r, dtype=torch.long)) for n, r in rows.items()))

    def rows(self, position: int, device: torch.device) -> torch.Tensor:
        key = (position, device)
        if key not in self._on_device:
            self._on_device[key] = self.groups[position][1].to(device)
        return self._on_device[key]


def mixed_batch_forward(layer: nn.Module, batch: MixedBatch, args: tuple, kwargs: dict) -> torch.Tensor:
    """`layer`'s output with each row's own adapter (or the base for `"__base__"` and adapters it does not hold)."""
    if not args or not isinstance(args[0], torch.Tensor):
        raise TypeError(f"{layer.module_key}: a mixed-adapter batch needs the input tensor as the first positional "
                        "argument.")
    if len(batch.groups) == 1 or not any(_holds(layer, name) for name, _ in batch.groups):
        return _run(layer, batch.groups[0][0], args, kwargs)  # one function for every row: nothing to split
    x = args[0]
    size = len(batch.names)
    shared = _broadcast_positions(layer, x, size)
    if x.dim() == 0 or (x.shape[0] != size and not shared):
        raise ValueError(
            f"{layer.module_key} ({type(layer.get_base_layer()).__name__}) receives an input of shape "
            f"{tuple(x.shape)} for {size} adapter names: its rows are not the batch's rows (flattened tokens, as "
            "in an MoE router, or position indices shared by every row), so a mixed-adapter batch cannot be split "
            "here. Leave this module out of target_modules (exclude_modules), or run each adapter's rows as a "
            "separate batch.")
    if layer.merged:
        raise ValueError(f"{layer.module_key} has merged adapters {layer.merged_adapters}; unmerge them before "
                         "passing adapter_names.")
    by_terms = getattr(layer, "forward_rows_by_terms", None)
    if by_terms is not None and not shared and len(args) == 1 and not kwargs:
        groups = [(name, batch.rows(position, x.device)) for position, (name, _) in enumerate(batch.groups)]
        out = by_terms(batch.names, groups, x)
        if out is not None:
            return out
    out = None
    for position, (name, _) in enumerate(batch.groups):
        rows = batch.rows(position, x.device)
        if shared:  # every row reads the same positions: each adapter's table rows, repeated over its rows
            part = _run(layer, name, args, kwargs).expand(rows.numel(), -1, -1)
        else:
            part = _run(layer, name, _take(args, rows, size), _take(kwargs, rows, size))
        if not isinstance(part, torch.Tensor) or part.dim() == 0 or part.shape[0] != rows.numel():
            raise ValueError(f"{layer.module_key} ({type(layer.get_base_layer()).__name__}) does not return one "
                             "output row per input row, so a mixed-adapter batch cannot be split here.")
        if out is None:
            out = part.new_empty((size, *part.shape[1:]))
        out.index_copy_(0, rows, part)
    return out


def _broadcast_positions(layer: nn.Module, x: torch.Tensor, size: int) -> bool:
    """Whether `layer` is an absolute position table read with ids of shape (1, T), broadcast over the batch, as
    BERT-style `position_embeddings` and GPT-2's `wpe` are: known by name, as nothing else tells a broadcast batch
    dimension from a length-1 query dimension (T5's relative attention bias in a decoding step)."""
    return x.dim() == 2 and x.shape[0] == 1 and size > 1 and not x.dtype.is_floating_point \
        and isinstance(layer.get_base_layer(), nn.Embedding) \
        and layer.module_key.rsplit(".", 1)[-1] in BROADCAST_POSITION_TABLES


def _holds(layer: nn.Module, name: str) -> bool:
    return name in layer.sparsediff_values and any(v.numel() for v in layer.sparsediff_values[name].values())


def _run(layer: nn.Module, name: str, args: tuple, kwargs: dict) -> Any:
    if layer.disable_adapters or name == BASE or not _holds(layer, name):
        return layer.base_layer(*args, **kwargs)
    return layer._forward_with_deltas([name], *args, **kwargs)


def _take(values, rows: torch.Tensor, size: int):
    """Every tensor whose dimension 0 is the batch, restricted to `rows`; anything else as it is."""
    if isinstance(values, dict):
        return {k: _take_one(v, rows, size) for k, v in values.items()}
    return tuple(_take_one(v, rows, size) for v in values)


def _take_one(value, rows: torch.Tensor, size: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == size:
        return value.index_select(0, rows)
    return value


# ----------------------------------------------------------------------------- the model-level hook
def refuse_unsupported_arguments(kwargs: dict) -> None:
    for name in UNSUPPORTED_FORWARD_ARGUMENTS:
        if kwargs.get(name) is not None:
            raise ValueError(f"sam-peft adapters do not support {name}= (an aLoRA argument); remove it.")
