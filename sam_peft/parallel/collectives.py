"""Process-group plumbing: which engine holds the weights, shards of DTensors, reductions and gathers.

Three layouts of a model's parameters across processes:

* one process, or replicated weights (plain `torch.distributed`, DDP): every rank holds whole tensors;
* FSDP2 (`fully_shard`): every parameter is a DTensor sharded on dim 0 (`Shard.of` gives this rank's part);
* DeepSpeed ZeRO-3 partitions parameters its own way; it is refused (`check_engine`) with a pointer to FSDP.

Every function here is a no-op (or the one-process answer) when no process group of several ranks is initialised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import SelectionError


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (an FSDP2 / `fully_shard` parameter or gradient)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch builds without distributed
        return False
    return isinstance(tensor, DTensor)


def check_engine(params: Sequence[torch.Tensor]) -> str:
    """'fsdp' when the targeted parameters are DTensor shards, else 'replicated'; refuses DeepSpeed ZeRO-3."""
    if any(hasattr(p, "ds_id") or hasattr(p, "ds_numel") for p in params):
        raise SelectionError(
            "the model's parameters are partitioned by DeepSpeed ZeRO-3, which sam-peft's burn-in selection does not "
            "support (each rank would see an empty placeholder instead of its partition's gradients). Use PyTorch "
            "FSDP2 instead: torch.distributed.fsdp.fully_shard, or accelerate's FSDP plugin with fsdp_version: 2 "
            "(see docs/distributed.md); DDP, which keeps whole weights, is supported too."
        )
    sharded = [is_sharded(p) for p in params]
    if any(sharded) and not all(sharded):
        raise SelectionError("some targeted parameters are FSDP2 DTensor shards and others are not; apply "
                             "fully_shard to the root module too, so that every parameter is sharded.")
    return "fsdp" if any(sharded) else "replicated"


@dataclass(frozen=True)
class Shard:
    """The part of a flat tensor one rank holds: local flat entries [start, start + numel) of `total`."""

    local: torch.Tensor  # this rank's entries (any shape, read flat)
    start: int
    total: int

    @staticmethod
    def of(tensor: torch.Tensor) -> Shard:
        """The local shard of a DTensor sharded on dim 0 of a 1-D mesh, or a whole plain tensor (start 0)."""
        if not is_sharded(tensor):
            return Shard(tensor, 0, tensor.numel())
        from torch.distributed.tensor import Shard as ShardPlacement

        placements = tuple(tensor.placements)
        if len(placements) != 1 or not (isinstance(placements[0], ShardPlacement) and placements[0].dim == 0):
            raise SelectionError(f"sharded selection supports DTensors sharded on dim 0 of a 1-D mesh (FSDP2's "
                                 f"default); got placements {placements}.")
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, placements)
        row = 1
        for size in tensor.shape[1:]:
            row *= size
        local = tensor.to_local()
        return Shard(local, int(offset[0]) * row if local.numel() else 0, tensor.numel())


def all_reduce_(tensors: Sequence[torch.Tensor], group=None) -> None:
    """Sum each tensor over ranks in place (no-op in one process). Half-precision tensors are summed in fp32 (not
    every backend reduces bf16), one at a time."""
    if not initialized():
        return
    for tensor in tensors:
        if tensor.dtype in (torch.bfloat16, torch.float16):
            wide = tensor.float()
            dist.all_reduce(wide, op=dist.ReduceOp.SUM, group=group)
            tensor.copy_(wide)
        else:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (so that every rank raises together instead of hanging)."""
    if not initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_rows(row: torch.Tensor) -> torch.Tensor:
    """[world, n] from each rank's [n] (int64, CPU-side values)."""
    if not initialized():
        return row.unsqueeze(0)
    device = collective_device()
    parts = [torch.empty_like(row, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, row.to(device))
    return torch.stack([p.cpu() for p in parts])


def gather_sorted_indices(local: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Every rank's chosen indices of every tensor, concatenated and sorted: the same list on every rank."""
    if not initialized():
        return [idx.sort().values for idx in local]
    counts = torch.tensor([idx.numel() for idx in local], dtype=torch.int64)
    all_counts = gather_rows(counts)  # [world, tensors]
    flat = torch.cat(local) if local else torch.empty(0, dtype=torch.int64, device=device)
    width = int(all_counts.sum(1).max())
    padded = torch.zeros(width, dtype=torch.int64, device=device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, padded)
    out = []
    offsets = [0] * len(parts)
    for i in range(len(local)):
        pieces = []
        for r, part in enumerate(parts):
            n = int(all_counts[r, i])
            pieces.append(part[offsets[r] : offsets[r] + n])
            offsets[r] += n
        out.append(torch.cat(pieces).sort().values)
    return out


def collective_device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
