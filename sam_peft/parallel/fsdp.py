"""FSDP2 (`fully_shard`) internals the selection needs: re-syncing flags and giving a sharded 1-D parameter new
contents (or a new length) while the parameter object keeps its identity."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SelectionError
from .collectives import Shard


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
