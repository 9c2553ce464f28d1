"""The burn-in on quantized weights: no `.grad` can exist on a packed weight, so each quantized layer's weight
gradient gᵀx is computed in its backward, from the output gradient and the saved input, in chunks of rows that are
folded into the statistics at once (`quantized_layers.fold_weight_gradient`): no dense weight gradient larger than
one chunk ever exists. Float targets of the same model keep the usual hooks.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from ..errors import SelectionError
from ..tuner.quantized_layers import fold_weight_gradient
from ..tuner.targets import Target
from .options import BurnInOptions
from .statistics import Statistics


def check_quantized_burn_in(found: list[Target], options: BurnInOptions, sharded: bool) -> None:
    """Refuse, before any work, what a burn-in cannot compute on quantized weights."""
    quantized = [t.name for t in found if t.quantized]
    if not quantized:
        return
    where = f"{len(quantized)} targeted weights are quantized (e.g. '{quantized[0]}')"
    if options.selection == "sam_hessian":
        raise SelectionError(f"{where}: sam_hessian needs a double backward through the weights, which a quantized "
                             "weight cannot give. Use selection='sam' or 'fisher' (or 'magnitude', on the "
                             "dequantized weights), or select on the unquantized model.")
    if options.max_grad_norm is not None:
        raise SelectionError(f"{where}: their gradients are folded into the statistics chunk by chunk during "
                             "backward, before the norm of the whole batch gradient is known, so max_grad_norm "
                             "clipping is not available; pass max_grad_norm=None.")
    if sharded:
        raise SelectionError(f"{where}: a burn-in on quantized weights under FSDP is not supported; select before "
                             "sharding.")


def fold_rows(stats: Statistics, name: str, start: int, chunk: torch.Tensor) -> None:
    """Add rows [start, start + len(chunk)) of one batch's weight gradient to the statistics of `name`."""
    rows = slice(start, start + chunk.shape[0])
    if "grad_sum" in stats.tensors:
        stats.tensors["grad_sum"][name][rows].add_(chunk)
    if "grad_sq_sum" in stats.tensors:
        stats.tensors["grad_sq_sum"][name][rows].addcmul_(chunk, chunk)


def _sink(stats: Statistics, name: str, go2: torch.Tensor, x2: torch.Tensor) -> None:
    fold_weight_gradient(go2, x2, partial(fold_rows, stats, name))


@contextlib.contextmanager
def gradient_sinks(found: list[Target], stats: Statistics, group: list[Target] | None = None):
    """While inside, every quantized target's layer runs the burn-in kernel, with an anchor that requires grad so
    backward reaches it even where nothing upstream needs a gradient; the layers of `group` (default: all of
    `found`) fold their weight gradient into `stats` during backward. Every pass of a burn-in in several passes
    thus runs the same kernels in every layer (bitsandbytes' own forward can return another dtype under autocast,
    which would change the losses a later pass must replay), whichever group it keeps."""
    kept = {t.name for t in (found if group is None else group)}
    layers = [(t.layer, t.name, t.param.device) for t in found if t.quantized]
    try:
        for layer, name, device in layers:
            anchor = torch.zeros((), device=device, requires_grad=True)
            layer._gradient_sink = (anchor, partial(_sink, stats, name) if name in kept else None)
        yield
    finally:
        for layer, _, _ in layers:
            layer._gradient_sink = None
