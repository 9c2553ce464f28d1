"""Packing a model's parameters into one flat buffer, so sparse deltas switch with a handful of kernel calls.

Applying a delta tensor by tensor costs a few small operations per tensor (about 2 ms for MiniLM's 101
tensors). When the targeted parameters are views of one buffer, `SparseDelta` instead gathers and scatters all
entries at once through global flat indices.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn


def pack_parameters(model: nn.Module, names: list[str] | None = None) -> int:
    """Move parameters (default: every floating-point one) into one contiguous buffer per (device, dtype).

    Values and parameter objects are unchanged (each parameter's `.data` becomes a view of the buffer), so
    optimizers and hooks keep working. Returns the number of parameters packed.
    """
    wanted = None if names is None else set(names)
    groups: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        if (wanted is None or name in wanted) and param.dtype.is_floating_point and param.device.type != "meta":
            groups[(param.device, param.dtype)].append(param)
    for (device, dtype), params in groups.items():
        buffer = torch.empty(sum(p.numel() for p in params), dtype=dtype, device=device)
        offset = 0
        with torch.no_grad():
            for param in params:
                view = buffer[offset : offset + param.numel()]
                view.copy_(param.data.reshape(-1))
                param.data = view.view_as(param)
                offset += param.numel()
    return sum(len(p) for p in groups.values())


def flat_view(params: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]] | None:
    """(a 1-D view of the storage, each parameter's offset in it) when all are contiguous views of one storage."""
    if not params:
        return None
    first = params[0]
    pointer = first.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() != pointer or p.dtype != first.dtype or not p.is_contiguous()
           for p in params):
        return None
    storage = first.untyped_storage()
    flat = torch.empty(0, dtype=first.dtype, device=first.device)
    flat.set_(storage, 0, (storage.nbytes() // first.element_size(),))
    return flat, [p.storage_offset() for p in params]
