"""Installing chosen entries into the layers, and the data-free selections made when an adapter is created."""

from __future__ import annotations

import torch

from ..selection.budget import choose
from ..selection.scores import magnitude_scores, random_scores
from .layer import tuner_targets


def install(tuner, adapter_name: str, chosen: dict[str, torch.Tensor]) -> None:
    """Install {base parameter name: sorted flat indices}; values become zeros (or random if init_weights=False)."""
    config = tuner.peft_config[adapter_name]
    generator = torch.Generator().manual_seed(config.seed)
    counts = {}
    for target in tuner_targets(tuner.model, adapter_name):
        indices = chosen.get(target.name, torch.empty(0, dtype=torch.long))
        values = None
        if not config.init_weights:
            values = torch.randn(indices.numel(), generator=generator) * 0.02
        target.layer.set_entries(adapter_name, target.attr, indices, values)
        counts[target.name] = int(indices.numel())
    config.counts = counts


def select_data_free(tuner, adapter_name: str) -> None:
    """Choose entries for the data-free selections (magnitude, random, bitfit) and install them."""
    config = tuner.peft_config[adapter_name]
    found = tuner_targets(tuner.model, adapter_name)
    if config.selection == "bitfit":
        chosen = {
            t.name: torch.arange(t.param.numel(), device=t.param.device) for t in found if _is_bias(t.name)
        }
        install(tuner, adapter_name, chosen)
        return
    generator = torch.Generator().manual_seed(config.seed)
    score = {"magnitude": magnitude_scores, "random": lambda p: random_scores(p, generator)}[config.selection]
    install(tuner, adapter_name, choose(config, [(t.name, score(t.param)) for t in found]))


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")
