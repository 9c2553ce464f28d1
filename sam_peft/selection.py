"""Targeted parameters of an adapter, entry budgets, and installing a selection into the layers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from .errors import NotSelectedError
from .layer import SparseDiffLayer, own_parameters
from .scores import magnitude_scores, random_scores
from .topk import topk_global, topk_per_tensor


@dataclass(frozen=True)
class Target:
    """One targeted base parameter: its name in the base model, the layer wrapping it and its own name there."""

    name: str
    layer: SparseDiffLayer
    attr: str

    @property
    def param(self) -> nn.Parameter:
        return own_parameters(self.layer.get_base_layer())[self.attr]


def default_count(config, param: torch.Tensor) -> int:
    """Placeholder size before selection: floor(p·numel) for per-tensor allocation, else 0."""
    if config.allocation == "per_tensor" and config.selection != "bitfit":
        return per_tensor_budget(config.sparsity, param.numel())
    return 0


def per_tensor_budget(sparsity: float, numel: int) -> int:
    """floor(p·numel), with p taken as the exact decimal the user wrote (no float round-down)."""
    return int(Fraction(repr(float(sparsity))) * numel)


def tuner_of(model: nn.Module):
    """The peft tuner (`SparseDiffModel`) of a PeftModel, a DDP-wrapped PeftModel, or the tuner itself."""
    from .model import SparseDiffModel

    model = getattr(model, "module", model)  # DistributedDataParallel
    if isinstance(model, SparseDiffModel):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, SparseDiffModel):
        return base
    raise TypeError(
        f"{type(model).__name__} has no sam-peft adapter; create one with "
        "peft.get_peft_model(model, sam_peft.SAMConfig(...)) after `import sam_peft`."
    )


def resolve_adapter(tuner, adapter_name: str | None) -> str:
    if adapter_name is None:
        adapter_name = tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"adapter '{adapter_name}' does not exist; adapters: {sorted(tuner.peft_config)}.")
    return adapter_name


def targets(model: nn.Module, adapter_name: str) -> list[Target]:
    """Targeted base parameters of an adapter, in base-model parameter order."""
    tuner = tuner_of(model)
    found = []
    for module in tuner.model.modules():
        if isinstance(module, SparseDiffLayer) and adapter_name in module.sparsediff_values:
            for attr in module.sparsediff_values[adapter_name]:
                found.append(Target(f"{module.module_key}.{attr}", module, attr))
    return found


def install(model: nn.Module, adapter_name: str, chosen: dict[str, torch.Tensor]) -> None:
    """Install {base parameter name: sorted flat indices}; values become zeros (or random if init_weights=False)."""
    tuner = tuner_of(model)
    config = tuner.peft_config[adapter_name]
    generator = torch.Generator().manual_seed(config.seed)
    counts = {}
    for target in targets(model, adapter_name):
        indices = chosen.get(target.name, torch.empty(0, dtype=torch.long))
        values = None
        if not config.init_weights:
            values = torch.randn(indices.numel(), generator=generator) * 0.02
        target.layer.set_entries(adapter_name, target.attr, indices, values)
        counts[target.name] = int(indices.numel())
    config.counts = counts


def select_data_free(model: nn.Module, adapter_name: str) -> None:
    """Choose entries for the data-free selections (magnitude, random, bitfit) and install them."""
    config = tuner_of(model).peft_config[adapter_name]
    found = targets(model, adapter_name)
    if config.selection == "bitfit":
        chosen = {
            t.name: torch.arange(t.param.numel(), device=t.param.device) for t in found if _is_bias(t.name)
        }
        install(model, adapter_name, chosen)
        return
    generator = torch.Generator().manual_seed(config.seed)

    def score(t: Target) -> torch.Tensor:
        if config.selection == "magnitude":
            return magnitude_scores(t.param)
        return random_scores(t.param, generator)

    install(model, adapter_name, choose(config, [(t.name, score(t)) for t in found]))


def choose(config, named_scores: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Exact top-k of the scores under the config's sparsity and allocation."""
    if config.allocation == "global":
        total = sum(s.numel() for _, s in named_scores)
        return topk_global(named_scores, per_tensor_budget(config.sparsity, total))
    counts = {name: per_tensor_budget(config.sparsity, s.numel()) for name, s in named_scores}
    return topk_per_tensor(named_scores, counts)


def _is_bias(name: str) -> bool:
    return name == "bias" or name.endswith(".bias")


def selected_indices(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{base parameter name (as in the base model's named_parameters()): sorted 1-D LongTensor of flat indices}."""
    tuner = tuner_of(model)
    adapter_name = resolve_adapter(tuner, adapter_name)
    if tuner.peft_config[adapter_name].counts is None:
        raise NotSelectedError(
            f"adapter '{adapter_name}' uses selection='{tuner.peft_config[adapter_name].selection}' and has "
            "not been selected yet; run sam_peft.select_parameters(model, dataloader) first."
        )
    return {
        t.name: t.layer.sparsediff_indices[adapter_name][t.attr].long().cpu() for t in targets(model, adapter_name)
    }


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_and_kind(name: str) -> tuple[str, str]:
    """Split a parameter name into (layer index or 'other', module kind), e.g. ('3', 'attention.self.query.weight')."""
    match = _LAYER_RE.search(name)
    if match is None:
        parts = name.split(".")
        return "other", ".".join(parts[-3:]) if len(parts) > 3 else name
    return match.group(1), name[match.end():]
