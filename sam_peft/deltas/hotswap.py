"""Hot-swapping a loaded adapter's delta in place (peft's `hotswap_adapter` shape), eagerly or under torch.compile.

The swapped adapter keeps its tensors: new indices and values are copied into the existing buffers, so a compiled
model reads them without recompiling. A tensor whose new delta has fewer entries than the adapter holds is padded
with zero-valued entries at unused positions (θ0 + 0 is θ0 exactly); only a tensor with more entries than its
capacity is resized, which a compiled graph sees as a new shape (one recompile per distinct size, after which
dynamo's automatic dynamic shapes usually stop recompiling). Load the adapter with the most entries first, or
reserve capacity with `reserve_capacity`, to never recompile.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..errors import ConfigError
from ..storage.identity import BaseIdentity, check_same_base
from ..storage.validation import check_entries
from ..tuner.layer import VALUES_DTYPE
from ..tuner.targets import resolve_adapter, targets, tuner_of
from .adapter_dir import delta_from_adapter_dir
from .delta import SparseDelta

logger = logging.getLogger(__name__)


def hotswap_adapter(model: nn.Module, source: str | Path | SparseDelta, adapter_name: str = "default") -> int:
    """Replace adapter `adapter_name`'s delta with `source` (a saved adapter directory or a `SparseDelta` recorded on
    the same base), in place. Returns the number of tensors that had to grow (each one recompiles a compiled model).

    Everything is checked before anything changes: the base identity, every tensor's name and index range, and the
    dense heads. An adapter merged into the weights is refused (unmerge first).
    """
    tuner = tuner_of(model)
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    config.require_selected(adapter_name, "hot-swapping it")
    delta = source if isinstance(source, SparseDelta) else delta_from_adapter_dir(source)
    found = {t.name: t for t in targets(tuner, adapter_name)}
    _check(delta, found, config, adapter_name)
    heads = _heads(tuner.model, adapter_name)
    unknown = sorted(set(delta.dense) - set(heads))
    if unknown:
        raise ConfigError(f"the new delta trains {unknown[:3]} densely, which adapter '{adapter_name}' does not "
                          "(modules_to_save): load it as a new adapter instead.")
    grown = 0
    with torch.no_grad():
        for name, target in found.items():
            indices, values = delta.entries.get(name, (torch.empty(0, dtype=torch.long), torch.empty(0)))
            grown += _swap(target, indices, values)
        for name, tensor in delta.dense.items():
            heads[name].copy_(tensor)
    config.counts = {name: int(t.values.numel()) for name, t in found.items()}
    if grown:
        logger.info("Hot-swap grew %d tensor(s) of adapter '%s' beyond their capacity: a compiled model recompiles.",
                    grown, adapter_name)
    return grown


def reserve_capacity(model: nn.Module, capacity: dict[str, int] | float, adapter_name: str = "default") -> None:
    """Pad adapter `adapter_name` to `capacity` entries per tensor ({base parameter name: entries}, or a factor of
    its current counts) with zero-valued entries, so later hot-swaps up to that size never recompile. Do it before
    compiling."""
    tuner = tuner_of(model)
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    config.require_selected(adapter_name, "reserving capacity in it")
    with torch.no_grad():
        for target in targets(tuner, adapter_name):
            size = capacity.get(target.name, target.values.numel()) if isinstance(capacity, dict) \
                else int(target.values.numel() * capacity)
            size = min(max(size, target.values.numel()), target.numel)
            if size > target.values.numel():
                indices, values = _padded(target.indices.long(), target.values.detach(), size, target.numel)
                target.layer.set_entries(adapter_name, target.attr, indices, values)
    config.counts = {t.name: int(t.values.numel()) for t in targets(tuner, adapter_name)}


def _check(delta: SparseDelta, found: dict, config, adapter_name: str) -> None:
    extra = sorted(set(delta.entries) - set(found))
    if extra:
        raise ConfigError(f"the new delta has entries for {extra[:3]}, which adapter '{adapter_name}' does not "
                          "target; hot-swap deltas of adapters with the same target_modules.")
    incoming = BaseIdentity(delta.metadata.get("base_architecture"), None, delta.metadata.get("base_fingerprint"))
    check_same_base(incoming, config.base_architecture, lambda: config.base_fingerprint,
                    f"the delta hot-swapped into adapter '{adapter_name}'")
    for name, (indices, values) in delta.entries.items():
        target = found[name]
        check_entries(name, indices, values, target.numel)
        if target.layer.merged:
            raise ValueError(f"{target.layer.module_key} has merged adapters; unmerge them before hot-swapping.")


def _heads(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    return {f"{name}.{pname}": param
            for name, module in model.named_modules()
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
            for pname, param in module.modules_to_save[adapter_name].named_parameters()}


def _swap(target, indices: torch.Tensor, values: torch.Tensor) -> int:
    """Write one tensor's new entries into the adapter's buffers (padded to their size); 1 if they had to grow."""
    capacity = target.values.numel()
    if indices.numel() > capacity:
        target.layer.set_entries(target.adapter, target.attr, indices, values)
        return 1
    indices, values = _padded(indices.long(), values, capacity, target.numel)
    target.indices.copy_(indices.to(target.indices.device, target.indices.dtype))
    target.values.copy_(values.to(target.values.device, VALUES_DTYPE))
    target.layer.invalidate_caches(rebuild=False)  # inference needs no structure: the swap stays O(k)
    return 0


def _padded(indices: torch.Tensor, values: torch.Tensor, size: int, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`size` sorted entries: the given ones plus zero values at the lowest positions they do not use."""
    missing = size - indices.numel()
    if missing <= 0:
        return indices, values
    free = torch.ones(min(numel, size + indices.numel()), dtype=torch.bool, device=indices.device)
    free[indices[indices < free.numel()]] = False
    extra = free.nonzero().squeeze(1)[:missing]
    merged = torch.cat([indices, extra])
    order = merged.argsort()
    padded_values = torch.cat([values.float(), torch.zeros(missing, device=values.device)])
    return merged[order], padded_values[order]

