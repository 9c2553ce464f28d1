"""Helpers shared by the dense baselines: which parameters they act on, per-tensor top-k masks, and a
callback flag that keeps the Trainer from evaluating or checkpointing during a method's warm-up phase."""

from __future__ import annotations

import torch
from torch import nn

from ..ranking.budget import budget
from ..ranking.topk import top_entries

HEAD_MODULES = ("classifier", "score")


def body_parameters(model: nn.Module, head_modules: tuple[str, ...] = HEAD_MODULES,
                    trainable_only: bool = True) -> dict[str, nn.Parameter]:
    """The parameters of the pretrained body (all except the task head's; by default only trainable ones)."""
    out = {}
    for name, param in model.named_parameters():
        if name.split(".")[0] in head_modules or (trainable_only and not param.requires_grad):
            continue
        out[name] = param
    if not out:
        raise ValueError("the model has no trainable parameters outside its task head.")
    return out


def top_fraction_mask(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """A boolean mask (shape of `scores`) of the floor(fraction·numel) largest scores.

    The same budget and exact top-k as SAM's selection (`sam_peft.ranking.budget`, `.topk`): among equal
    scores the lower flat index wins, and non-finite scores are refused.
    """
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    mask[top_entries([("scores", scores)], budget(fraction, "per_tensor", [scores.numel()]))["scores"]] = True
    return mask.view_as(scores)


def hold_evaluation(control) -> None:
    """Skip the evaluation and checkpoint the Trainer planned for this step (during a warm-up phase)."""
    control.should_evaluate = False
    control.should_save = False
