"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) as a peft tuner: the paper's Adapter baseline.

Each targeted Linear gets, per adapter, a residual bottleneck on its output: h + up(act(down(h))), with
`up` initialised to zero so the adapted model starts exactly equal to the base model (the "equivalent model"
of Fu et al., Fig. 1a). Placement "houlsby" targets the attention output and the feed-forward output
projections of every transformer layer (two adapters per layer); "pfeiffer" only the feed-forward output
(one per layer). The adapter sits on the projection's output, before its dropout and the residual LayerNorm.

AdapterHub (the library the paper used) requires transformers 4.x, so this small tuner stands in for it:
`get_peft_model(model, BottleneckConfig(placement="houlsby"))`; importing this module registers it with peft.
Adapters are non-linear: they cannot be merged into the base weights (merge raises; `unload()` removes them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import register_peft_method
from torch import nn

from ...errors import ConfigError
from ...tuner.peft_type import extend_peft_type

METHOD_NAME = "bottleneck"
PREFIX = METHOD_NAME + "_"
BOTTLENECK_PEFT_TYPE = extend_peft_type(METHOD_NAME)
PLACEMENTS = {
    # Module names of BERT-family encoders (BERT, RoBERTa, ...): attention output and FFN output projections.
    "houlsby": r".*\.layer\.\d+\.(attention\.output|output)\.dense$",
    "pfeiffer": r".*\.layer\.\d+\.output\.dense$",
}
ACTIVATIONS = {"relu": nn.ReLU, "swish": nn.SiLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass
class BottleneckConfig(PeftConfig):
    """Configuration of bottleneck adapters.

    Args:
        placement (`str`): "houlsby" (after attention and after feed-forward, 2 per layer) or "pfeiffer"
            (after feed-forward only). Sets the default `target_modules` for BERT-family encoders.
        reduction_factor (`int`): bottleneck width = hidden size // reduction_factor (AdapterHub's default 16).
        non_linearity (`str`): "relu", "swish", "gelu" or "tanh".
        target_modules (`str | list[str] | None`): Linear modules to adapt (names or a regex); None uses
            `placement`'s pattern for BERT-family encoders.
        modules_to_save (`list[str] | None`): modules trained densely (the task head; automatic for SEQ_CLS).
    """

    placement: str = field(default="houlsby", metadata={"help": "houlsby or pfeiffer"})
    reduction_factor: int = field(default=16, metadata={"help": "bottleneck width = hidden // reduction_factor"})
    non_linearity: str = field(default="relu", metadata={"help": "relu, swish, gelu or tanh"})
    target_modules: str | list[str] | None = field(default=None, metadata={"help": "Linear modules to adapt"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained densely"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BOTTLENECK_PEFT_TYPE
        if self.placement not in PLACEMENTS:
            raise ConfigError(f"placement={self.placement!r} is unknown; use one of {sorted(PLACEMENTS)}.")
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity={self.non_linearity!r} is unknown; use one of {sorted(ACTIVATIONS)}.")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, int) \
                or self.reduction_factor < 1:
            raise ConfigError(f"reduction_factor must be a positive integer, got {self.reduction_factor!r}.")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)


class BottleneckLayer(nn.Module, BaseTunerLayer):
    """A Linear module followed by one residual bottleneck per adapter."""

    adapter_layer_names = ("bottleneck_down", "bottleneck_up")
    other_param_names = ("bottleneck_act",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: BottleneckConfig) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ConfigError(f"bottleneck adapters wrap nn.Linear modules, not {type(base_layer).__name__}; "
                              "choose Linear modules in target_modules.")
        self.base_layer = base_layer
        self.bottleneck_down = nn.ModuleDict()
        self.bottleneck_up = nn.ModuleDict()
        self.bottleneck_act = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: BottleneckConfig) -> None:
        width = self.base_layer.out_features
        hidden = max(1, width // config.reduction_factor)
        down = nn.Linear(width, hidden)
        up = nn.Linear(hidden, width)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        nn.init.zeros_(down.bias)
        nn.init.zeros_(up.weight)  # starts as the identity: the adapted model equals the base model
        nn.init.zeros_(up.bias)
        self.bottleneck_down[adapter_name] = down
        self.bottleneck_up[adapter_name] = up
        self.bottleneck_act[adapter_name] = ACTIVATIONS[config.non_linearity]()
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return out
        for name in self.active_adapters:
            if name not in self.bottleneck_down:
                continue
            down = self.bottleneck_down[name]
            h = out.to(down.weight.dtype)
            out = out + self.bottleneck_up[name](self.bottleneck_act[name](down(h))).to(out.dtype)
        return out

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("bottleneck adapters are non-linear and cannot be merged into the base weights; "
                                  "keep the adapter, or call unload() to remove it.")

    def unmerge(self) -> None:
        return None  # never merged


class BottleneckModel(BaseTuner):
    """peft tuner inserting bottleneck adapters (see the module docstring)."""

    prefix: str = PREFIX
    tuner_layer_cls = BottleneckLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config: BottleneckConfig, model_config: dict) -> BottleneckConfig:
        if peft_config.target_modules is None:
            peft_config.target_modules = PLACEMENTS[peft_config.placement]
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BottleneckLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = BottleneckLayer(target, adapter_name, peft_config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise NotImplementedError("bottleneck adapters are non-linear and cannot be merged; use unload().")


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if BOTTLENECK_PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=METHOD_NAME, config_cls=BottleneckConfig, model_cls=BottleneckModel, prefix=PREFIX)


_register()
