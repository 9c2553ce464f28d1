"""Selection across processes: which engine holds the weights, reductions, and exact top-k over sharded scores.

Three layouts of the burn-in statistics:

* one process, or replicated weights (plain `torch.distributed`, DDP): every rank holds whole statistics of its
  own batches; they are summed over ranks (one all-reduce) and every rank selects the same entries locally;
* FSDP2 (`fully_shard`): every targeted parameter is a DTensor sharded on dim 0 and its gradient arrives already
  reduce-scattered (averaged over ranks). Each rank folds its own shard into shard-sized statistics — no second
  reduction — and the top-k is found by a distributed radix select (`topk_sharded`) that all-reduces histograms of
  order-preserving keys, never a score tensor. Only the chosen indices (k of them) are all-gathered, so every rank
  installs the same set;
* DeepSpeed ZeRO-3 partitions parameters its own way; it is refused (`check_engine`) with a pointer to FSDP.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import SelectionError
from .topk import CHUNK, _keys

_DIGITS = 4  # passes of the radix select over 32-bit keys
_RADIX = 256  # 8 bits per pass: a histogram is 256 counts per group, whatever the tensor sizes


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
    """Sum each tensor over ranks in place (no-op in one process)."""
    if not initialized():
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on any rank (so that every rank raises together instead of hanging)."""
    if not initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _unsigned(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2³²) ordered like the float32 scores (-0.0 and 0.0 share a key)."""
    return _keys(scores).to(torch.int64) + (1 << 31)


def _local_chunks(shard: Shard):
    flat = shard.local.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, _unsigned(flat[start : start + CHUNK])


def topk_sharded(shards: Sequence[Shard], groups: Sequence[int], ks: Sequence[int],
                 device: torch.device | None = None) -> list[torch.Tensor]:
    """Exact top-k over tensors split across ranks, without gathering any score tensor.

    Args:
        shards: this rank's part of every score tensor, in the same order on every rank.
        groups: the group of each tensor (per-tensor top-k: one group per tensor; global: all in group 0).
        ks: entries to keep per group.
        device: where histograms live (the scores' device by default).

    Returns:
        For each tensor, its chosen global flat indices (sorted int64), the same on every rank. The set is the one
        a stable descending sort of the group's scores concatenated in tensor order would keep: among equal scores
        the earlier tensor, then the lower flat index wins — the rule of `topk.topk_global` and `topk_per_tensor`.
    """
    n_groups = len(ks)
    device = device or (shards[0].local.device if shards else torch.device("cpu"))
    totals = [0] * n_groups
    for shard, group in zip(shards, groups):
        totals[group] += shard.total
    ks = [min(max(int(k), 0), total) for k, total in zip(ks, totals)]
    # radix select, 8 bits per pass from the top: prefix[g] is the key prefix of group g's k-th largest score
    prefix = [0] * n_groups
    remaining = list(ks)  # entries still to find at or below the current prefix
    above = [0] * n_groups  # entries known to be strictly above the threshold
    active = [k > 0 for k in ks]
    for digit in range(_DIGITS):
        shift = 8 * (_DIGITS - 1 - digit)
        hist = torch.zeros(n_groups, _RADIX, dtype=torch.int64, device=device)
        for shard, group in zip(shards, groups):
            if not active[group]:
                continue
            for _, keys in _local_chunks(shard):
                if digit > 0:
                    keys = keys[(keys >> (shift + 8)) == prefix[group]]
                hist[group] += torch.bincount(((keys >> shift) & 0xFF), minlength=_RADIX).to(device)
        all_reduce_([hist])
        from_top = hist.flip(1).cumsum(1).cpu()
        for group in range(n_groups):
            if not active[group]:
                continue
            j = int(torch.searchsorted(from_top[group], remaining[group]))
            over = int(from_top[group, j - 1]) if j > 0 else 0
            above[group] += over
            remaining[group] -= over
            prefix[group] = prefix[group] * _RADIX + (_RADIX - 1 - j)
    # ties at the threshold: taken in (tensor order, flat index) order across ranks
    ties_here = torch.zeros(len(shards), dtype=torch.int64)
    for i, (shard, group) in enumerate(zip(shards, groups)):
        if active[group]:
            ties_here[i] = sum(int((keys == prefix[group]).sum()) for _, keys in _local_chunks(shard))
    starts = torch.tensor([s.start for s in shards], dtype=torch.int64)
    all_ties, all_starts = _gather_rows(ties_here), _gather_rows(starts)  # [world, tensors]
    taken_before = [0] * n_groups
    chosen = []
    for i, (shard, group) in enumerate(zip(shards, groups)):
        if not active[group]:
            chosen.append(torch.empty(0, dtype=torch.int64, device=device))
            continue
        need = ks[group] - above[group]
        earlier_ranks = int(all_ties[all_starts[:, i] < shard.start, i].sum())
        allowed = max(0, min(int(ties_here[i]), need - taken_before[group] - earlier_ranks))
        taken_before[group] += int(all_ties[:, i].sum())
        picked = []
        for start, keys in _local_chunks(shard):
            take = keys > prefix[group]
            if allowed > 0:
                ties = (keys == prefix[group]).nonzero().squeeze(1)[:allowed]
                allowed -= ties.numel()
                take[ties] = True
            picked.append(take.nonzero().squeeze(1) + (start + shard.start))
        local = torch.cat(picked).to(device) if picked else torch.empty(0, dtype=torch.int64, device=device)
        chosen.append(local)
    return _gather_indices(chosen, device)


def _gather_rows(row: torch.Tensor) -> torch.Tensor:
    """[world, n] from each rank's [n] (int64, CPU-side values)."""
    if not initialized():
        return row.unsqueeze(0)
    device = _collective_device()
    parts = [torch.empty_like(row, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, row.to(device))
    return torch.stack([p.cpu() for p in parts])


def _gather_indices(local: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Every rank's chosen indices of every tensor, concatenated and sorted: the same list on every rank."""
    if not initialized():
        return [idx.sort().values for idx in local]
    counts = torch.tensor([idx.numel() for idx in local], dtype=torch.int64)
    all_counts = _gather_rows(counts)  # [world, tensors]
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


def _collective_device() -> torch.device:
    backend = dist.get_backend()
    if backend == "nccl" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync_shards_requires_grad(model: nn.Module) -> None:
    """Make FSDP2's cached unsharded parameters follow their sharded parameters' requires_grad flag now.

    FSDP2 re-syncs the flag at the next all-gather; doing it here keeps a forward that runs before it (or after a
    burn-in that turned the base weights' gradients on) from building a graph for frozen weights.
    """
    for fsdp_param in _fsdp_params(model):
        unsharded = getattr(fsdp_param, "_unsharded_param", None)
        if unsharded is not None and unsharded.requires_grad != fsdp_param.sharded_param.requires_grad:
            unsharded.requires_grad_(fsdp_param.sharded_param.requires_grad)


def _fsdp_params(model: nn.Module):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            if group is not None:
                yield from group.fsdp_params


def set_sharded_values(root: nn.Module, owner: nn.Module, name: str, values: torch.Tensor) -> None:
    """Give the FSDP2-sharded 1-D parameter `owner.<name>` the full contents `values` (same on every rank).

    `root` is a module containing the `fully_shard` unit that manages the parameter (the outermost model).

    The parameter object keeps its identity (an optimizer built before keeps training it). With the same length
    only this rank's shard is written; a new length re-creates FSDP2's bookkeeping for that one parameter
    (torch's private `FSDPParam`; checked against torch 2.13) and swaps the new sharded tensor into the old object.
    """
    param = owner._parameters[name]
    if param.shape == values.shape:
        shard = Shard.of(param)
        with torch.no_grad():
            shard.local.copy_(values.reshape(-1)[shard.start : shard.start + shard.local.numel()].to(shard.local))
        param.grad = None
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    for group_param_list, index, fsdp_param in _locate(root, owner, name):
        info = fsdp_param._module_info
        info.module._parameters[info.param_name] = nn.Parameter(
            values.detach().to(device=fsdp_param.device, dtype=param.dtype).clone(), requires_grad=param.requires_grad
        )
        offload = CPUOffloadPolicy(pin_memory=fsdp_param.pin_memory) if fsdp_param.offload_to_cpu else OffloadPolicy()
        fresh = FSDPParam(info.module._parameters[info.param_name], info, fsdp_param.mesh_info,
                          fsdp_param.post_forward_mesh_info, fsdp_param.device, None, fsdp_param.mp_policy, offload)
        fsdp_param._post_load_hook_handle.remove()
        if hasattr(fsdp_param, "param_dtype"):  # lazy init has run: set the dtypes it would have set
            fresh.init_dtype_attrs(fsdp_param.mp_policy)
        fresh._param_fqn = fsdp_param._param_fqn
        new_sharded = fresh.sharded_param
        torch.utils.swap_tensors(param, new_sharded)  # `param` (the optimizer's object) now holds the new shard
        fresh.sharded_param = param
        fresh._setattr_on_modules(param)
        group_param_list[index] = fresh
        param.grad = None
        return
    raise SelectionError(f"parameter '{name}' of {type(owner).__name__} is a DTensor but no fully_shard unit "
                         "manages it; shard it with torch.distributed.fsdp.fully_shard.")


def _locate(root: nn.Module, owner: nn.Module, name: str):
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in root.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        if group is None:
            continue
        for index, fsdp_param in enumerate(group.fsdp_params):
            if fsdp_param._module_info.module is owner and fsdp_param._module_info.param_name == name:
                yield group.fsdp_params, index, fsdp_param


def ddp_wrappers_of(model: nn.Module) -> list[nn.Module]:
    """DistributedDataParallel modules whose `.module` is `model` (found through the objects that refer to it)."""
    from torch.nn.parallel import DistributedDataParallel

    found, seen = [], set()
    frontier = [model]
    for _ in range(3):  # model <- DDP's _modules dict <- (DDP's __dict__) <- DDP
        nxt = []
        for obj in frontier:
            for ref in gc.get_referrers(obj):
                if id(ref) in seen:
                    continue
                seen.add(id(ref))
                if isinstance(ref, DistributedDataParallel) and ref.module is model:
                    found.append(ref)
                elif isinstance(ref, dict):
                    nxt.append(ref)
        frontier = nxt
    return list({id(w): w for w in found}.values())


def rebuild_ddp(wrapper: nn.Module) -> None:
    """Rebuild a DistributedDataParallel reducer after parameters changed size (what DDP's unpickling does).

    The old reducer is dropped first: it keeps the parameters' gradient accumulators alive, and those remember the
    old shapes (autograd would refuse the new gradients).
    """
    static_graph = wrapper.static_graph
    wrapper.reducer = None
    wrapper.logger = None
    gc.collect()
    parameters, expect_sparse_gradient = wrapper._build_params_for_reducer()
    mapping = wrapper._build_debug_param_to_name_mapping(parameters)
    wrapper._ddp_init_helper(parameters, expect_sparse_gradient, mapping, static_graph)
    if static_graph:
        wrapper.reducer._set_static_graph()
        wrapper.logger._set_static_graph()
