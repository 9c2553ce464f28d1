"""DiffPruning (Guo et al., ACL 2021), as in Fu et al.'s published code for the paper's comparison.

Each body tensor θ0 (frozen) gets a diff vector w (initialised to 0) and gate logits α (initialised to
sigmoid(N(0, 1)), as in that code). During the relaxed phase (the first `projection_steps` optimizer steps)
the weight is θ0 + z ⊙ w with hard-concrete gates z = clamp(sigmoid(log u − log(1 − u) + α)·(r − l) + l, 0, 1),
u ~ U(0, 1), stretched to (l, r) = (−3, 3); the loss gets `l0_weight` × the mean of the expected L0 norm
sigmoid(α − log(−l / r)). (In evaluation z uses u = 1/2.) Then the diff is projected: each tensor keeps the
floor(p·numel) entries of largest |α| as a fixed mask m, and training continues on θ0 + m ⊙ w.

`reproject_every` (for Fu et al.'s Fig. 3) instead keeps the relaxed phase running and projects the diff
every that many steps: w is zeroed outside the top-|α| entries, which shows the projection discontinuity as
jumps of the training loss. Unlike the authors' code the task head is trained densely, like every other
sparse method here.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn
from torch.nn.utils import parametrize
from transformers import TrainerCallback

from .common import body_parameters, hold_evaluation, top_fraction_mask

logger = logging.getLogger(__name__)
LOW, HIGH = -3.0, 3.0  # the stretch interval (l, r): the code's default clamp


class GatedDiff(nn.Module):
    """Parametrization θ0 ↦ θ0 + z(α) ⊙ w (relaxed) or θ0 + m ⊙ w (projected)."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros_like(like, dtype=torch.float32))
        self.alpha = nn.Parameter(torch.randn_like(like, dtype=torch.float32).sigmoid())
        self.register_buffer("mask", torch.zeros_like(like, dtype=torch.float32))
        self.projected = False

    def gates(self) -> torch.Tensor:
        low, high = LOW, HIGH
        if self.training:
            u = torch.rand_like(self.alpha).clamp_(1e-6, 1 - 1e-6)
            s = torch.sigmoid(torch.log(u) - torch.log1p(-u) + self.alpha)
        else:
            s = torch.sigmoid(self.alpha)
        return (s * (high - low) + low).clamp(0.0, 1.0)

    def expected_l0(self) -> torch.Tensor:
        return torch.sigmoid(self.alpha - math.log(-LOW / HIGH)).sum()

    def forward(self, theta0: torch.Tensor) -> torch.Tensor:
        gate = self.mask if self.projected else self.gates()
        return theta0 + (gate * self.w).to(theta0.dtype)


def attach_gated_diffs(model: nn.Module) -> dict[str, GatedDiff]:
    """Parametrize every body parameter with a `GatedDiff`; the base values are frozen."""
    gated = {}
    for name, param in body_parameters(model).items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        param.requires_grad_(False)
        diff = GatedDiff(param.detach()).to(param.device)
        parametrize.register_parametrization(module, attr, diff, unsafe=True)
        gated[name] = diff
    return gated


def bake(model: nn.Module) -> None:
    """Replace the parametrizations by plain parameters holding θ0 + m ⊙ w (relaxed: the deterministic gates)."""
    was_training = model.training
    model.eval()  # relaxed gates must not be sampled while baking
    with torch.no_grad():
        for module in list(model.modules()):
            if parametrize.is_parametrized(module):
                for attr in list(module.parametrizations.keys()):
                    parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    model.train(was_training)


class DiffPruningCallback(TrainerCallback):
    """Runs the relaxed phase, the projection and the L0 penalty (see the module docstring).

    The penalty is added through `penalty()`, which the training loss calls (see `sam_peft.methods`).
    """

    def __init__(self, gated: dict[str, GatedDiff], sparsity: float, projection_steps: int,
                 l0_weight: float = 1.0, reproject_every: int | None = None) -> None:
        if projection_steps < 1:
            raise ValueError(f"projection_steps must be positive, got {projection_steps}.")
        self.gated = gated
        self.sparsity = sparsity
        self.projection_steps = projection_steps
        self.l0_weight = l0_weight
        self.reproject_every = reproject_every
        self.projections: list[int] = []
        self.last_step = 0
        self.penalty_by_step: dict[int, float] = {}  # recorded in re-projection runs, to plot the task loss alone
        self.total = sum(g.w.numel() for g in gated.values())

    @property
    def relaxed(self) -> bool:
        return not any(g.projected for g in self.gated.values())

    def penalty(self) -> torch.Tensor | None:
        if not self.relaxed or self.l0_weight == 0:
            return None
        return self.l0_weight * sum(g.expected_l0() for g in self.gated.values()) / self.total

    @torch.no_grad()
    def project(self, step: int, keep_relaxed: bool = False) -> None:
        for g in self.gated.values():
            g.mask.copy_(top_fraction_mask(g.alpha.abs(), self.sparsity))
            if keep_relaxed:
                g.w.mul_(g.mask)
            else:
                g.projected = True
                g.alpha.requires_grad_(False)
        self.projections.append(step)

    def finish(self, step: int | None = None) -> None:
        """End of training: a model still relaxed (re-projection runs) gets its final projection."""
        if self.relaxed:
            self.project(self.last_step if step is None else step)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.reproject_every:
            with torch.no_grad():
                penalty = self.penalty()
            self.penalty_by_step[state.global_step + 1] = float(penalty) if penalty is not None else 0.0
        return control

    def on_step_end(self, args, state, control, **kwargs):
        step = self.last_step = state.global_step
        if self.reproject_every:
            if step % self.reproject_every == 0:
                self.project(step, keep_relaxed=True)
                logger.info("DiffPruning: diff re-projected at step %d.", step)
            hold_evaluation(control)
        elif step < self.projection_steps:
            hold_evaluation(control)
        elif self.relaxed:
            self.project(step)
            logger.info("DiffPruning: projected at step %d; mask fixed.", step)
        return control
