"""The targeted parameters of a sam-peft adapter: finding the tuner, each target's layer, values and indices."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .layer import SparseDiffLayer, own_parameters
from .peft_type import PREFIX


@dataclass(frozen=True)
class Target:
    """One targeted base parameter of an adapter: its name in the base model, the layer wrapping it, its own name
    there, and the adapter whose delta it carries."""

    name: str
    layer: SparseDiffLayer
    attr: str
    adapter: str

    @property
    def param(self) -> nn.Parameter:
        """The base parameter (θ0)."""
        return own_parameters(self.layer.get_base_layer())[self.attr]

    @property
    def shape(self) -> torch.Size:
        """The logical shape of the base parameter (what the flat indices address; a quantized weight's (out, in))."""
        return self.layer.parameter_shape(self.attr)

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def quantized(self) -> bool:
        """Whether the base parameter is stored quantized (it takes no gradient; see `quantized_layers`)."""
        return self.layer.is_quantized(self.attr)

    def dense(self) -> torch.Tensor:
        """θ0 as a float tensor of the logical shape (dequantized: a fresh tensor, if stored quantized)."""
        return self.layer.dense_parameter(self.attr)

    @property
    def values(self) -> nn.Parameter:
        """The adapter's trainable fp32 values of this parameter."""
        return self.layer.sparsediff_values[self.adapter][self.attr]

    @property
    def indices(self) -> torch.Tensor:
        """The adapter's sorted flat indices of this parameter (int32 or int64 buffer)."""
        return self.layer.sparsediff_indices[self.adapter][self.attr]


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
    """`adapter_name`, or the active adapter when None; refuses a name the tuner does not hold."""
    if adapter_name is None:
        adapter_name = tuner.active_adapters[0]
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"adapter '{adapter_name}' does not exist; adapters: {sorted(tuner.peft_config)}.")
    return adapter_name


def targets(model: nn.Module, adapter_name: str) -> list[Target]:
    """The base parameters that carry a delta of `adapter_name`, in module order (`model`: a PeftModel, a
    DDP-wrapped one, or the tuner)."""
    return [
        Target(f"{module.module_key}.{attr}", module, attr, adapter_name)
        for module in tuner_of(model).model.modules()
        if isinstance(module, SparseDiffLayer) and adapter_name in module.sparsediff_values
        for attr in module.sparsediff_values[adapter_name]
    ]


def selected_indices(model: nn.Module, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """{base parameter name (as in the base model's named_parameters()): sorted 1-D LongTensor of flat indices}."""
    tuner = tuner_of(model)
    adapter_name = resolve_adapter(tuner, adapter_name)
    tuner.peft_config[adapter_name].require_selected(adapter_name, "reading its indices")
    return {t.name: t.indices.long().cpu() for t in targets(tuner, adapter_name)}


_LAYER_RE = re.compile(r"\.(\d+)\.")


def layer_and_kind(name: str) -> tuple[str, str]:
    """Split a parameter name into (layer index or 'other', module kind), e.g. ('3', 'attention.self.query.weight')."""
    match = _LAYER_RE.search(name)
    if match is None:
        parts = name.split(".")
        return "other", ".".join(parts[-3:]) if len(parts) > 3 else name
    return match.group(1), name[match.end():]
