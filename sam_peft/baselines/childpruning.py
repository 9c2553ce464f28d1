"""ChildPruning as Fu et al. (2023, §2.2.3) describe it: train the full model and iteratively project it onto
the feasible set of sparse fine-tuned models to find the child network, then train that child network.

Warm-up (the first `projection_steps` optimizer steps): after every `every`-th optimizer step, each body
tensor keeps its floor(p·numel) entries that moved most from the pretrained value, |θ − θ0|, and the others
are reset to θ0 (a projection onto the L0 ball around θ0). After the warm-up the last mask is fixed: after
each step every entry outside it is reset to θ0, so the result is exactly a sparse delta (unlike gradient
masking with decoupled weight decay, which lets "frozen" entries drift). The task head is trained densely.
The projection is what Fu et al. call discontinuous: a small change of θ can change the mask entirely.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import TrainerCallback

from .common import body_parameters, hold_evaluation, top_fraction_mask

logger = logging.getLogger(__name__)


class ProjectionCallback(TrainerCallback):
    """Iterative magnitude projection of θ − θ0 during a warm-up, then a fixed mask (see the module docstring).

    Args:
        model: the dense model being trained (its current weights are θ0).
        sparsity: fraction p of each body tensor that may differ from θ0.
        projection_steps: warm-up length in optimizer steps (no evaluation or checkpoint meanwhile).
        every: project after every `every`-th warm-up step (1: every step).
    """

    def __init__(self, model: nn.Module, sparsity: float, projection_steps: int, every: int = 1) -> None:
        if projection_steps < 1 or every < 1:
            raise ValueError("projection_steps and every must be positive.")
        self.params = body_parameters(model)
        self.theta0 = {name: p.detach().clone() for name, p in self.params.items()}
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = sparsity
        self.projection_steps = projection_steps
        self.every = every
        self.projections = 0

    @torch.no_grad()
    def project(self) -> None:
        """Recompute the masks from |θ − θ0| and reset every entry outside them to θ0."""
        for name, param in self.params.items():
            self.masks[name] = top_fraction_mask((param - self.theta0[name]).abs(), self.sparsity)
        self.projections += 1
        self.enforce()

    @torch.no_grad()
    def enforce(self) -> None:
        for name, param in self.params.items():
            param.copy_(torch.where(self.masks[name], param, self.theta0[name]))

    def on_train_begin(self, args, state, control, **kwargs):
        # The Trainer has moved the model to its device by now.
        self.theta0 = {n: t.to(self.params[n].device) for n, t in self.theta0.items()}
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step < self.projection_steps:
            if step % self.every == 0:
                self.project()
            hold_evaluation(control)
        elif step == self.projection_steps or not self.masks:
            self.project()
            logger.info("ChildPruning: mask fixed at step %d after %d projections.", step, self.projections)
        else:
            self.enforce()
        return control

    def changed_entries(self) -> int:
        return sum(int((p != self.theta0[n]).sum()) for n, p in self.params.items())
