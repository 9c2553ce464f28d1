"""Installing chosen entries into the layers, and the data-free selections made when an adapter is created."""

from __future__ import annotations

import torch

from ..selection.budget import choose
from ..selection.distributed import is_sharded, set_sharded_values
from ..selection.scores import magnitude_scores, random_scores
from .layer import VALUES_DTYPE, tuner_targets


def install(tuner, adapter_name: str, chosen: dict[str, torch.Tensor], root: torch.nn.Module | None = None) -> bool:
    """Install {base parameter name: sorted flat indices}; values become zeros (or random if init_weights=False).

    Value parameters keep their identity. FSDP2-sharded values (DTensors) are rewritten shard by shard; `root` is
    the module whose `fully_shard` units manage them (default: the tuner's model). Returns whether any values
    parameter changed length (a DDP wrapper built before must then be rebuilt).
    """
    config = tuner.peft_config[adapter_name]
    generator = torch.Generator().manual_seed(config.seed)
    counts = {}
    resized = False
    for target in tuner_targets(tuner.model, adapter_name):
        indices = chosen.get(target.name, torch.empty(0, dtype=torch.long))
        values = None
        if not config.init_weights:
            values = torch.randn(indices.numel(), generator=generator) * 0.02
        owner = target.layer.sparsediff_values[adapter_name]
        resized |= owner[target.attr].numel() != indices.numel()
        if is_sharded(owner[target.attr]):
            target.layer.set_indices(adapter_name, target.attr, indices)
            full = torch.zeros(indices.numel(), dtype=VALUES_DTYPE) if values is None else values
            set_sharded_values(tuner.model if root is None else root, owner, target.attr, full)
            target.layer.invalidate_caches()
        else:
            target.layer.set_entries(adapter_name, target.attr, indices, values)
        counts[target.name] = int(indices.numel())
    config.counts = counts
    sync_trainable(tuner, adapter_name, enable=True)
    return resized


def sync_trainable(tuner, adapter_name: str, enable: bool = False) -> None:
    """Once an adapter's entries are chosen, an empty values tensor (no entry in that parameter) is not trainable:
    it could never change or get a gradient. `enable`: the non-empty ones of an active, trainable adapter are."""
    config = tuner.peft_config[adapter_name]
    if config.counts is None:
        return  # placeholders, sized before the selection: they all stay trainable
    enable = enable and adapter_name in tuner.active_adapters and not config.inference_mode
    for target in tuner_targets(tuner.model, adapter_name):
        values = target.layer.sparsediff_values[adapter_name][target.attr]
        if values.numel() == 0:
            values.requires_grad_(False)
        elif enable:
            values.requires_grad_(True)


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
