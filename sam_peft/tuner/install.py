"""Installing chosen indices into the layers, and the data-free selections made when an adapter is created."""

from __future__ import annotations

import torch

from ..parallel.collectives import is_sharded
from ..parallel.fsdp import set_sharded_values
from ..ranking.budget import budget
from ..ranking.signals import SIGNALS
from ..ranking.topk import top_entries
from .layer import VALUES_DTYPE
from .targets import targets


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
    for target in targets(tuner, adapter_name):
        indices = chosen.get(target.name, torch.empty(0, dtype=torch.long))
        values = None
        if not config.init_weights:
            values = torch.randn(indices.numel(), generator=generator) * 0.02
        resized |= target.values.numel() != indices.numel()
        if is_sharded(target.values):
            target.layer.set_indices(adapter_name, target.attr, indices)
            full = torch.zeros(indices.numel(), dtype=VALUES_DTYPE) if values is None else values
            set_sharded_values(tuner.model if root is None else root, target.layer.sparsediff_values[adapter_name],
                               target.attr, full)
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
    if not config.is_selected:
        return  # placeholders, sized before the selection: they all stay trainable
    enable = enable and adapter_name in tuner.active_adapters and not config.inference_mode
    for target in targets(tuner, adapter_name):
        if target.values.numel() == 0:
            target.values.requires_grad_(False)
        elif enable:
            target.values.requires_grad_(True)


def select_data_free(tuner, adapter_name: str) -> None:
    """Choose and install the entries of a data-free signal: from θ0's scores (`Signal.weight_score`) under the
    config's budget, or every entry of the parameters it keeps (`Signal.keeps`, e.g. bitfit's biases)."""
    config = tuner.peft_config[adapter_name]
    signal = SIGNALS[config.selection]
    found = targets(tuner, adapter_name)
    if signal.keeps is not None:
        chosen = {t.name: torch.arange(t.numel, device=t.param.device) for t in found if signal.keeps(t.name)}
    else:
        generator = torch.Generator().manual_seed(config.seed)
        named_scores = [(t.name, signal.weight_score(t.dense(), generator)) for t in found]  # dequantized θ0
        chosen = top_entries(named_scores, budget(config.sparsity, config.allocation, [t.numel for t in found]))
    install(tuner, adapter_name, chosen)
