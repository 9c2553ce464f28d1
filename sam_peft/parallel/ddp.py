"""DistributedDataParallel: finding the wrappers of a module and rebuilding their reducer after parameters resized."""

from __future__ import annotations

import gc

from torch import nn


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
