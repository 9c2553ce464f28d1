"""The targeted parameters of a sam-peft adapter: finding the tuner, its layers and their base parameters."""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..errors import NotSelectedError
from ..tuner.layer import Target, tuner_targets
from ..tuner.peft_type import PREFIX


def tuner_of(model: nn.Module):
    """The peft tuner (`SparseDiffModel`) of a PeftModel, a DDP-wrapped PeftModel, or the tuner itself."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    for candidate in (model, getattr(model, "base_model", None)):
        if isinstance(candidate, BaseTuner) and candidate.prefix == PREFIX:
            return candidate
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
    return tuner_targets(tuner_of(model).model, adapter_name)


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
