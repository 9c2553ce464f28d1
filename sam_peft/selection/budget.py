"""Entry budgets: how many entries a tensor (or all targeted tensors together) may tune."""

from __future__ import annotations

from fractions import Fraction

import torch

from .scores import SIGNALS
from .topk import topk_global, topk_per_tensor


def per_tensor_budget(sparsity: float, numel: int) -> int:
    """floor(p·numel), with p taken as the exact decimal the user wrote (no float round-down)."""
    return int(Fraction(repr(float(sparsity))) * numel)


def default_count(config, param: torch.Tensor) -> int:
    """Placeholder size before selection: floor(p·numel) for per-tensor allocation, else 0."""
    if config.allocation == "per_tensor" and SIGNALS[config.selection].budgeted:
        return per_tensor_budget(config.sparsity, param.numel())
    return 0


def choose(config, named_scores: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Exact top-k of the scores under the config's sparsity and allocation."""
    if config.allocation == "global":
        total = sum(s.numel() for _, s in named_scores)
        return topk_global(named_scores, per_tensor_budget(config.sparsity, total))
    counts = {name: per_tensor_budget(config.sparsity, s.numel()) for name, s in named_scores}
    return topk_per_tensor(named_scores, counts)
