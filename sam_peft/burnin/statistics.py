"""The burn-in statistics and how gradients are folded into them: hooks, clipping, Hutchinson probes, reductions.

Per targeted parameter a signal needs `grad_sum` (Σ g), `grad_sq_sum` (Σ g²) and/or `hessian_sum` (Σ z⊙Hz); each
is kept in the statistics dtype, shard-sized under FSDP2 (the local part of each reduce-scattered gradient).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ..parallel.collectives import Shard, all_reduce_
from ..ranking.signals import Signal
from ..tuner.targets import Target
from .batches import burn_in_loss

if TYPE_CHECKING:
    from .passes import PassRecord


class Statistics:
    """{kind: {target name: accumulator}} for the kinds a signal needs, of the targets given (a pass's group)."""

    def __init__(self, found: list[Target], signal: Signal, dtype: torch.dtype, sharded: bool) -> None:
        device = found[0].param.device
        self.tensors = {
            kind: {t.name: torch.zeros(Shard.of(t.param).local.shape if sharded else t.shape, dtype=dtype,
                                       device=device) for t in found}
            for kind in signal.statistics
        }

    def __contains__(self, name: str) -> bool:
        return any(name in kind for kind in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Bytes of the accumulators held."""
        return sum(t.numel() * t.element_size() for kind in self.tensors.values() for t in kind.values())

    def fold(self, name: str, grad: torch.Tensor, coef: float = 1.0) -> None:
        """Add one gradient (scaled by a clipping coefficient) to the first-order statistics of `name`."""
        if "grad_sum" in self.tensors:
            self.tensors["grad_sum"][name].add_(grad, alpha=coef)
        if "grad_sq_sum" in self.tensors:
            self.tensors["grad_sq_sum"][name].addcmul_(grad, grad, value=coef * coef)

    def all_reduce(self) -> None:
        """Sum every statistic over ranks (whole weights: each rank accumulated its own batches)."""
        all_reduce_([t for kind in self.tensors.values() for t in kind.values()])

    def pop_scores(self, signal: Signal, name: str) -> torch.Tensor:
        """The signal's scores of one target; its statistics are released."""
        return signal.score(**{kind: self.tensors[kind].pop(name) for kind in signal.statistics})


def fold_hooks(found: list[Target], stats: Statistics) -> list:
    """Hooks that fold each dense gradient into the statistics as soon as it is accumulated, then free it."""

    def hook_for(name: str):
        def hook(param: torch.Tensor) -> None:
            stats.fold(name, param.grad)
            param.grad = None

        return hook

    return [t.param.register_post_accumulate_grad_hook(hook_for(t.name)) for t in found]


def clip_coefficient(grads: list[torch.Tensor], max_grad_norm: float | None, sharded: bool) -> float:
    """min(1, max_grad_norm / ‖g‖) for the batch gradient g of all targeted parameters (as clip_grad_norm_)."""
    if max_grad_norm is None:
        return 1.0
    device = grads[0].device if grads else torch.device("cpu")
    square = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        square += grad.detach().float().square().sum()
    if sharded:  # each rank holds disjoint shards: the global norm needs their sum
        all_reduce_([square])
    return min(1.0, float(max_grad_norm) / (float(square.sqrt()) + 1e-6))


def fold_gradients(found: list[Target], stats: Statistics, max_grad_norm: float | None, sharded: bool,
                   record: PassRecord | None = None) -> None:
    """Fold the batch gradient of every target the statistics hold (its local shard under FSDP2), clipped if asked,
    then free every target's gradient. With a pass `record`, the clipping coefficient is the first pass's."""
    grads = [None if t.param.grad is None else Shard.of(t.param.grad).local for t in found]

    def coefficient() -> float:
        return clip_coefficient([g for g in grads if g is not None], max_grad_norm, sharded)

    coef = coefficient() if record is None else record.coefficient(coefficient)
    for t, grad in zip(found, grads):
        if grad is not None:
            if t.name in stats:
                stats.fold(t.name, grad, coef)
            t.param.grad = None


def hutchinson_step(model: nn.Module, found: list[Target], batch: dict, stats: Statistics, samples: int, step: int,
                    max_grad_norm: float | None = None, loss_fn=None) -> torch.Tensor:
    """One batch of sam_hessian: the gradient into Σg, and `samples` Rademacher probes z into Σ z⊙Hz, for the
    targets the statistics hold (the gradients and probes of every target are drawn: a pass of a few targets
    computes exactly what one pass of all computes). Returns the loss."""
    params = [t.param for t in found]
    loss = burn_in_loss(model, batch, step, loss_fn)
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    coef = clip_coefficient(grads, max_grad_norm, sharded=False)
    for t, g in zip(found, grads):
        if t.name in stats:
            stats.fold(t.name, g.detach(), coef)
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a parameter the loss does not use has none
    hessian = stats.tensors["hessian_sum"]
    for _ in range(samples if live else 0):
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hvps = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[probes[i] for i in live],
                                   retain_graph=True, allow_unused=True)
        for t, z, hv in zip(found, probes, hvps):
            if hv is not None and t.name in hessian:
                hessian[t.name].add_(z * hv / samples)
    return loss
