"""Mixout (Lee et al., ICLR 2020): stochastically reset weights to their pretrained values during training.

In training, every entry of a Linear weight is replaced by its pretrained value u with probability p and the
result rescaled so its expectation is the current weight w:  mixout(w) = u + B ⊙ (w − u) / (1 − p), with
B ~ Bernoulli(1 − p). This is dropout applied to w − u around u, so the gradient reaching w is B / (1 − p)
times the gradient of the mixed weight. In evaluation the weight is w. As in Lee et al.'s experiments, mixout
replaces dropout (dropout probabilities are set to 0) and every Linear layer is mixed, the task head with its
own initial weights as u.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MixoutLinear(nn.Linear):
    """An `nn.Linear` whose weight is mixed with a fixed target (its pretrained value) in training."""

    mixout_p: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.training and self.mixout_p > 0:
            target = self.mixout_target
            weight = target + F.dropout(weight - target, self.mixout_p, training=True)
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, mixout_p={self.mixout_p}"


def apply_mixout(model: nn.Module, p: float = 0.9, disable_dropout: bool = True) -> int:
    """Turn every `nn.Linear` of `model` into a `MixoutLinear` (in place); returns how many were converted.

    The target of each layer is a copy of its current weight (a non-persistent buffer, so checkpoints and
    `state_dict` keys are unchanged). `disable_dropout` sets every dropout probability to 0.
    """
    if isinstance(p, bool) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"mixout probability must be in [0, 1), got {p!r}.")
    if disable_dropout:
        set_dropout(model, 0.0)
    converted = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MixoutLinear
            module.mixout_p = float(p)
            module.register_buffer("mixout_target", module.weight.detach().clone(), persistent=False)
            converted += 1
    return converted


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every `nn.Dropout` module (attention dropout included in BERT-family models)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p


def remove_mixout(model: nn.Module) -> None:
    """Turn `MixoutLinear` layers back into plain `nn.Linear` (the trained weights stay)."""
    for module in model.modules():
        if isinstance(module, MixoutLinear):
            del module.mixout_target
            del module.mixout_p
            module.__class__ = nn.Linear
