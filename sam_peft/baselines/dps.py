"""DPS (Zhang et al., NeurIPS 2022): dynamic parameter selection, after the authors' `DPSDense` code.

Training is cut into stages of `stage_steps` optimizer steps that alternate. In an odd stage (the first one
included) every weight is updated and the squared gradients of each Linear weight of the body are
accumulated. At the start of the following even stage, each such weight keeps the fraction `keep` of its
entries with the largest accumulated squared gradient (the authors' default keeps 70 %: reserve_p = 0.3) and
only those entries receive gradients during that stage. The authors' stage length is 5 % of the training steps
and they train with dropout 0. Other parameters (embeddings, LayerNorm, biases, the head) are always
updated. DPS changes every weight, so its result is a dense model, not a sparse delta.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import TrainerCallback

from .common import HEAD_MODULES, top_fraction_mask

logger = logging.getLogger(__name__)


def dps_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights DPS selects in: those of the body's Linear layers."""
    out = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module_name.split(".")[0] not in HEAD_MODULES \
                and module.weight.requires_grad:
            out[f"{module_name}.weight"] = module.weight
    if not out:
        raise ValueError("DPS found no trainable Linear weight outside the task head.")
    return out


class DPSCallback(TrainerCallback):
    """Alternate dense stages (accumulating squared gradients) and sub-network stages (masked gradients)."""

    def __init__(self, model: nn.Module, stage_steps: int, keep: float = 0.7) -> None:
        if stage_steps < 1:
            raise ValueError(f"stage_steps must be positive, got {stage_steps}.")
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}.")
        self.weights = dps_weights(model)
        self.stage_steps = stage_steps
        self.keep = keep
        self.scores = {name: torch.zeros_like(w, dtype=torch.float32) for name, w in self.weights.items()}
        self.masks: dict[str, torch.Tensor] | None = None
        self.selections = 0
        self._handles = [w.register_hook(self._hook(name)) for name, w in self.weights.items()]

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if self.masks is None:
                if self.scores[name].device != grad.device:
                    self.scores[name] = self.scores[name].to(grad.device)
                self.scores[name].add_(grad.detach().float().square())
                return grad
            return grad * self.masks[name]

        return hook

    @staticmethod
    def stage_of(step: int, stage_steps: int) -> int:
        """1-based stage of the optimizer step that follows `step` completed steps."""
        return step // stage_steps + 1

    def on_step_begin(self, args, state, control, **kwargs):
        stage = self.stage_of(state.global_step, self.stage_steps)
        starting = state.global_step % self.stage_steps == 0
        if stage % 2 == 1:  # dense stage: accumulate from scratch
            if starting:
                self.masks = None
                for score in self.scores.values():
                    score.zero_()
        elif starting or self.masks is None:  # sub-network stage: select once, at its start
            self.masks = {n: top_fraction_mask(s, self.keep).to(s.dtype) for n, s in self.scores.items()}
            self.selections += 1
        return control

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return control
