"""Installing chosen indices into the layers, and the data-free selections made when an adapter is created."""

from __future__ import annotations

import copy

import torch
from peft.utils.other import ModulesToSaveWrapper

from ..errors import ConfigError
from ..parallel.collectives import is_sharded
from ..parallel.fsdp import set_sharded_values
from ..ranking.budget import budget
from ..ranking.signals import SIGNALS
from ..ranking.topk import top_entries
from .combine import Combination
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


def add_combined(tuner, adapter_name: str, combination: Combination) -> None:
    """Add adapter `adapter_name` holding `combination` of selected adapters: on every targeted tensor, the union of
    their indices with the combined values (`combine.Combination`). Its config records where it came from."""
    if adapter_name in tuner.peft_config:
        raise ConfigError(f"adapter '{adapter_name}' already exists; choose a new name or delete_adapter it first.")
    for name in combination.adapters:
        if name not in tuner.peft_config:
            raise ConfigError(f"adapter '{name}' does not exist; the model holds {sorted(tuner.peft_config)}.")
        tuner.peft_config[name].require_selected(name, "combining it")
    wrapped = [m for m in tuner.model.modules() if isinstance(m, ModulesToSaveWrapper)
               and sum(a in m.modules_to_save for a in combination.adapters) > 1]
    if wrapped:
        raise ConfigError(f"{len(wrapped)} modules_to_save module(s) (e.g. the task head) are trained densely by "
                          "several of these adapters; dense heads cannot be combined entry-wise (peft refuses the "
                          "same for LoRA). Combine adapters that do not share a head.")
    names = [[t.name for t in targets(tuner, a)] for a in combination.adapters]
    for adapter, found in zip(combination.adapters[1:], names[1:]):
        if set(found) != set(names[0]):
            differ = sorted(set(found) ^ set(names[0]))
            raise ConfigError(f"adapters '{combination.adapters[0]}' and '{adapter}' target different parameters "
                              f"(e.g. {differ[:3]}); combine adapters with the same target_modules.")
    entries = {name: [None] * len(combination.adapters) for name in names[0]}
    for j, adapter in enumerate(combination.adapters):
        for target in targets(tuner, adapter):
            entries[target.name][j] = (target.indices, target.values)
    generator = torch.Generator().manual_seed(combination.seed)
    combined = {name: combination.combine(parts, generator) for name, parts in entries.items()}
    config = copy.deepcopy(tuner.peft_config[combination.adapters[0]])
    config.counts = {name: int(indices.numel()) for name, (indices, _) in combined.items()}
    config.combined_from = combination.record()
    tuner.peft_config[adapter_name] = config
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        for target in targets(tuner, adapter_name):
            indices, values = combined[target.name]
            target.layer.set_entries(adapter_name, target.attr, indices, values)
        _copy_dense_heads(tuner, adapter_name, combination.adapters)
    except BaseException:
        if adapter_name in tuner.peft_config:
            tuner.delete_adapter(adapter_name)
        raise
    sync_trainable(tuner, adapter_name)


def _copy_dense_heads(tuner, adapter_name: str, sources: tuple[str, ...]) -> None:
    """A head trained densely (modules_to_save) by exactly one source adapter is copied as it is."""
    for wrapper in tuner.model.modules():
        if isinstance(wrapper, ModulesToSaveWrapper) and adapter_name in wrapper.modules_to_save:
            owners = [a for a in sources if a in wrapper.modules_to_save]
            if owners:
                wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[owners[0]].state_dict())
