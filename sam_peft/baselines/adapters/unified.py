"""He et al.'s unified view (ICLR 2022) as peft tuners: sequential / parallel adapters, prefix tuning and MAM.

He et al. view adapters, prefix tuning and LoRA as modifications Δh of hidden states. This module implements:

- `AdapterConfig` (peft type UNIFIED_ADAPTER): a bottleneck Δh = s · f(z W_down) W_up beside (``"parallel"``,
  z = the sublayer's input x: h ← h + s·f(x W_down) W_up) or after (``"sequential"``, z = the sublayer's output h)
  the attention sublayer, the feed-forward (FFN) sublayer, or both. W_up starts at zero, so the adapted model
  starts equal to the base model.
- `PrefixConfig` (peft type UNIFIED_PREFIX): prefix tuning (Li & Liang 2021): l learned key and value vectors
  per attention layer, prepended to every sequence's keys and values (attended by every query, causal or not).
  They start as the keys and values the model computes for l seeded random vocabulary tokens (Li & Liang's
  initialisation with real-word activations), so they start at the scale of the model's own activations.
- `MAMConfig` (peft type UNIFIED_MAM): the paper's "Mix-And-Match" adapter, prefix tuning on attention plus a
  scaled parallel adapter on the FFN, held by one tuner (peft cannot put a prompt-learning method and a tuner on
  one model).

peft's own `PrefixTuningConfig` needs `past_key_values` in the model's forward, which BERT- and Llama-family
classification models of transformers 5 no longer accept ("Model does not support past key values which are
required for prefix tuning"), so prefix tuning is implemented here: the attention module is wrapped and given a
small cache object whose `update` prepends the prefix to the keys and values, and the attention mask gets l
"attend" columns. Supported: BERT-family encoders (`...layer.N.attention.self`, `.attention.output`,
`.output`; checked: BERT, MiniLM, RoBERTa) and Llama-family decoders (`...layers.N.self_attn`, `.mlp`; checked:
Llama, Mistral, Qwen2) with eager or SDPA attention.

Where the modification sits (BERT-family, post-LayerNorm): a parallel adapter is added to the sublayer's output
before the residual connection and LayerNorm, LN(h + s·f(x W_down) W_up + x), as in He et al.'s code; it wraps
the sublayer's output module (`attention.output`, `output`) and passes x + Δh as its residual input, which is
exactly that. A sequential adapter wraps the output projection (`attention.output.dense`, `output.dense`) as the
`bottleneck` tuner does. Llama-family: adapters wrap `self_attn` / `mlp`, whose output h gets h + Δh.

Importing this module registers the three types with peft; save with `save_pretrained`, load with
`PeftModel.from_pretrained(base, directory)` after `import sam_peft.baselines.adapters`. Adapters and prefixes
are not linear in the base weights: merging raises (`unload()` removes them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import register_peft_method
from torch import nn

from ...errors import ConfigError
from ...tuner.peft_type import extend_peft_type
from .bottleneck import ACTIVATIONS

PREFIX = "unified_"  # parameter-name prefix shared by the three types (one tuner implementation)
ADAPTER_NAME, PREFIX_NAME, MAM_NAME = "unified_adapter", "unified_prefix", "unified_mam"
ADAPTER_PEFT_TYPE = extend_peft_type(ADAPTER_NAME)
PREFIX_PEFT_TYPE = extend_peft_type(PREFIX_NAME)
MAM_PEFT_TYPE = extend_peft_type(MAM_NAME)
STYLES = ("parallel", "sequential")
PREFIX_INITS = ("tokens", "normal")
PLACEMENTS = ("attention", "ffn", "both")
# Module-name patterns per model family: role -> regex (re.fullmatch on the module's name in the model).
FAMILIES = {
    "bert": {
        "detect": r"(.*\.)?layer\.\d+\.attention\.self",
        "prefix": r"(.*\.)?layer\.\d+\.attention\.self",
        ("parallel", "attention"): r"(.*\.)?layer\.\d+\.attention\.output",
        ("parallel", "ffn"): r"(.*\.)?layer\.\d+\.output",
        ("sequential", "attention"): r"(.*\.)?layer\.\d+\.attention\.output\.dense",
        ("sequential", "ffn"): r"(.*\.)?layer\.\d+\.output\.dense",
    },
    "llama": {
        "detect": r"(.*\.)?layers\.\d+\.self_attn",
        "prefix": r"(.*\.)?layers\.\d+\.self_attn",
        ("parallel", "attention"): r"(.*\.)?layers\.\d+\.self_attn",
        ("parallel", "ffn"): r"(.*\.)?layers\.\d+\.mlp",
        ("sequential", "attention"): r"(.*\.)?layers\.\d+\.self_attn",
        ("sequential", "ffn"): r"(.*\.)?layers\.\d+\.mlp",
    },
}


def _check_positive_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer{' or None' if allow_none else ''}, got {value!r}.")


def _check_adapter_options(style: str, placement: str, r, scaling, non_linearity: str, prefix: str = "") -> None:
    if style not in STYLES:
        raise ConfigError(f"{prefix}style={style!r} is unknown; use one of {list(STYLES)}.")
    if placement not in PLACEMENTS:
        raise ConfigError(f"{prefix}placement={placement!r} is unknown; use one of {list(PLACEMENTS)}.")
    _check_positive_int(f"{prefix}r", r, allow_none=True)
    if scaling is not None and (isinstance(scaling, bool) or not isinstance(scaling, (int, float))
                                or not math.isfinite(scaling) or scaling <= 0):
        raise ConfigError(f"{prefix}scaling must be a positive finite number or None, got {scaling!r}.")
    if non_linearity not in ACTIVATIONS:
        raise ConfigError(f"non_linearity={non_linearity!r} is unknown; use one of {sorted(ACTIVATIONS)}.")


def _check_prefix_init(prefix_init: str, init_std) -> None:
    if prefix_init not in PREFIX_INITS:
        raise ConfigError(f"prefix_init={prefix_init!r} is unknown; use one of {list(PREFIX_INITS)}.")
    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not math.isfinite(init_std) \
            or init_std < 0:
        raise ConfigError(f"init_std must be a finite number >= 0, got {init_std!r}.")


class _UnifiedConfigBase(PeftConfig):
    """What the tuner reads from every config: `plan()` -> (prefix length or 0, adapter dict or None)."""

    def plan(self) -> tuple[int, dict | None]:  # pragma: no cover - overridden
        raise NotImplementedError


@dataclass
class AdapterConfig(_UnifiedConfigBase):
    """Configuration of bottleneck adapters in He et al.'s unified view: parallel (scaled PA) or sequential.

    Args:
        style (`str`): "parallel" (h ← h + s·f(x W_down) W_up, x the sublayer's input; He et al.'s PA) or
            "sequential" (h ← h + s·f(h W_down) W_up on the sublayer's output; Houlsby et al.).
        placement (`str`): "attention" (beside/after the attention sublayer), "ffn" (the feed-forward sublayer)
            or "both" (two adapters per layer).
        r (`int | None`): bottleneck width. None: hidden size // 2 of the model (192 for MiniLM's 384; the
            paper's MAM used r = 512 at hidden size 1024), resolved when the adapter is created and saved.
        scaling (`float | None`): the scale s of the adapter output. None: 4.0 for "parallel" (the paper's
            scaled PA) and 1.0 for "sequential".
        non_linearity (`str`): f: "relu" (the paper's), "swish", "gelu" or "tanh".
        modules_to_save (`list[str] | None`): modules trained densely (the task head; automatic for SEQ_CLS).
    """

    style: str = field(default="parallel", metadata={"help": "parallel (He et al.'s PA) or sequential"})
    placement: str = field(default="ffn", metadata={"help": "attention, ffn or both"})
    r: int | None = field(default=None, metadata={"help": "bottleneck width; None: hidden size // 2"})
    scaling: float | None = field(default=None, metadata={"help": "scale s; None: 4 parallel, 1 sequential"})
    non_linearity: str = field(default="relu", metadata={"help": "relu, swish, gelu or tanh"})
    target_modules: str | None = field(default=None, metadata={"help": "set from the model; not set by hand"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained densely"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ADAPTER_PEFT_TYPE
        _check_adapter_options(self.style, self.placement, self.r, self.scaling, self.non_linearity)
        if self.scaling is None:
            self.scaling = 4.0 if self.style == "parallel" else 1.0

    def plan(self) -> tuple[int, dict | None]:
        return 0, {"style": self.style, "placement": self.placement, "r": self.r, "scaling": float(self.scaling),
                   "non_linearity": self.non_linearity}


@dataclass
class PrefixConfig(_UnifiedConfigBase):
    """Configuration of prefix tuning (Li & Liang 2021) for BERT- and Llama-family models.

    Args:
        num_virtual_tokens (`int`): the prefix length l: l key and l value vectors per attention layer (per
            key/value head), prepended to the keys and values of every sequence. He et al. use l = 30 in MAM.
        prefix_init (`str`): "tokens" (default): the keys and values the base model computes for l random
            vocabulary tokens (seeded by `seed`; Li & Liang's real-word initialisation); "normal": N(0, init_std²).
            Unlike the adapters, a prefix changes the attention output from the start (each query gives part of
            its attention to the prefix).
        init_std (`float`): std of the "normal" initialisation.
        seed (`int`): seed of the "tokens" initialisation's token choice.
        modules_to_save (`list[str] | None`): modules trained densely (the task head; automatic for SEQ_CLS).
    """

    num_virtual_tokens: int = field(default=30, metadata={"help": "prefix length l"})
    prefix_init: str = field(default="tokens", metadata={"help": "tokens (real-token activations) or normal"})
    init_std: float = field(default=0.02, metadata={"help": "std of the 'normal' prefix initialisation"})
    seed: int = field(default=0, metadata={"help": "seed of the 'tokens' initialisation"})
    target_modules: str | None = field(default=None, metadata={"help": "set from the model; not set by hand"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained densely"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PREFIX_PEFT_TYPE
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        _check_prefix_init(self.prefix_init, self.init_std)

    def plan(self) -> tuple[int, dict | None]:
        return self.num_virtual_tokens, None


@dataclass
class MAMConfig(_UnifiedConfigBase):
    """Configuration of MAM (He et al.): prefix tuning on attention plus a scaled parallel adapter on the FFN.

    Args:
        num_virtual_tokens (`int`): prefix length l (the paper's 30).
        r (`int | None`): width of the FFN parallel adapter. None: hidden size // 2, the paper's ratio (r = 512
            at hidden size 1024), i.e. 192 for MiniLM (hidden 384); resolved when the adapter is created.
        scaling (`float`): the adapter's scale s (the paper's 4).
        non_linearity (`str`): the adapter's f ("relu").
        prefix_init (`str`): "tokens" (real-token activations, default) or "normal" (see `PrefixConfig`).
        init_std (`float`): std of the "normal" prefix initialisation.
        seed (`int`): seed of the "tokens" initialisation's token choice.
        modules_to_save (`list[str] | None`): modules trained densely (the task head; automatic for SEQ_CLS).
    """

    num_virtual_tokens: int = field(default=30, metadata={"help": "prefix length l"})
    r: int | None = field(default=None, metadata={"help": "FFN adapter width; None: hidden size // 2"})
    scaling: float = field(default=4.0, metadata={"help": "scale s of the FFN adapter"})
    non_linearity: str = field(default="relu", metadata={"help": "relu, swish, gelu or tanh"})
    prefix_init: str = field(default="tokens", metadata={"help": "tokens (real-token activations) or normal"})
    init_std: float = field(default=0.02, metadata={"help": "std of the 'normal' prefix initialisation"})
    seed: int = field(default=0, metadata={"help": "seed of the 'tokens' initialisation"})
    target_modules: str | None = field(default=None, metadata={"help": "set from the model; not set by hand"})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained densely"})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MAM_PEFT_TYPE
        _check_positive_int("num_virtual_tokens", self.num_virtual_tokens)
        _check_adapter_options("parallel", "ffn", self.r, self.scaling, self.non_linearity)
        _check_prefix_init(self.prefix_init, self.init_std)

    def plan(self) -> tuple[int, dict | None]:
        return self.num_virtual_tokens, {"style": "parallel", "placement": "ffn", "r": self.r,
                                         "scaling": float(self.scaling), "non_linearity": self.non_linearity}


def _family(model: nn.Module) -> dict:
    names = [name for name, _ in model.named_modules()]
    for patterns in FAMILIES.values():
        if any(re.fullmatch(patterns["detect"], name) for name in names):
            return patterns
    raise ConfigError("the unified-view tuners support BERT-family encoders (modules '...layer.N.attention.self') "
                      "and Llama-family decoders ('...layers.N.self_attn', '...layers.N.mlp'); this model has "
                      "neither.")


def _roles(config: _UnifiedConfigBase, family: dict) -> dict[str, str]:
    """role ("prefix", "parallel", "sequential") -> the regex of the modules that carry it."""
    prefix_length, adapter = config.plan()
    roles = {}
    if prefix_length:
        roles["prefix"] = family["prefix"]
    if adapter is not None:
        places = ("attention", "ffn") if adapter["placement"] == "both" else (adapter["placement"],)
        roles[adapter["style"]] = "|".join(f"(?:{family[(adapter['style'], p)]})" for p in places)
    return roles


class _PrefixCache:
    """Stands in for a transformers `Cache` in one attention call: prepends the prefix to the keys and values."""

    def __init__(self, key: torch.Tensor, value: torch.Tensor, inner=None) -> None:
        self.key, self.value, self.inner = key, value, inner

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.inner is not None:  # a real cache (generation) keeps only the real tokens
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        return (torch.cat([self.key.to(key_states.dtype), key_states], dim=2),
                torch.cat([self.value.to(value_states.dtype), value_states], dim=2))


class _CaptureCache:
    """Stands in for a `Cache` in one attention call and records the keys and values (prefix initialisation)."""

    def __init__(self, store: dict) -> None:
        self.store = store

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.store["key"], self.store["value"] = key_states.detach(), value_states.detach()
        return key_states, value_states


def _extend_mask(mask, length: int, queries: int, past: int, causal: bool, device):
    """The attention mask with `length` leading columns that every query attends (the prefix)."""
    if mask is None:
        if not causal:
            return None  # no padding, bidirectional: every query attends every key, the prefix too
        keys = past + queries
        real = torch.arange(keys, device=device)[None, :] <= (past + torch.arange(queries, device=device))[:, None]
        return torch.cat([torch.ones(queries, length, dtype=torch.bool, device=device), real], dim=1)[None, None]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        raise ConfigError("prefix tuning needs a 4-D attention mask (eager or sdpa attention); load the model with "
                          "attn_implementation='sdpa' or 'eager'.")
    attend = True if mask.dtype == torch.bool else 0
    pad = torch.full((*mask.shape[:-1], length), attend, dtype=mask.dtype, device=mask.device)
    return torch.cat([pad, mask], dim=-1)


class UnifiedLayer(nn.Module, BaseTunerLayer):
    """Wraps a sublayer (or its output module) with per-adapter prefixes and bottleneck adapters.

    The wrapped module's kind decides how: "linear" (a projection: Δh from its output; sequential adapters),
    "residual" (a BERT-family output module called as (h, x): its residual input becomes x + Δh(x); parallel
    adapters) or "sublayer" (an attention or FFN module called with x whose output h becomes h + Δh; attention
    modules also take prefixes).
    """

    adapter_layer_names = ("unified_down", "unified_up", "unified_prefix_key", "unified_prefix_value")
    other_param_names = ("unified_act", "unified_settings")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, roles: set[str], hidden: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.unified_down = nn.ModuleDict()
        self.unified_up = nn.ModuleDict()
        self.unified_act = nn.ModuleDict()
        self.unified_prefix_key = nn.ParameterDict()
        self.unified_prefix_value = nn.ParameterDict()
        self.unified_settings: dict[str, dict] = {}
        self._capture: dict | None = None  # set while the prefix initialisation records keys and values
        if isinstance(base_layer, nn.Linear):
            self.kind = "linear"
        elif hasattr(base_layer, "LayerNorm") and hasattr(base_layer, "dense"):
            self.kind = "residual"
        else:
            self.kind = "sublayer"
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, roles, hidden)

    def _reference_param(self) -> torch.Tensor:
        return next(self.base_layer.parameters())

    def update_layer(self, adapter_name: str, config, roles: set[str], hidden: int) -> None:
        prefix_length, adapter = config.plan()
        reference = self._reference_param()
        settings = {"prefix": False, "style": None, "scaling": 1.0}
        if "prefix" in roles:
            heads, head_dim = self._kv_shape()
            shape = (1, heads, prefix_length, head_dim)
            std = float(getattr(config, "init_std", 0.02))
            for store in (self.unified_prefix_key, self.unified_prefix_value):
                store[adapter_name] = nn.Parameter(torch.randn(shape, device=reference.device) * std)
            settings["prefix"] = True
        style = next((s for s in STYLES if s in roles), None)
        if style is not None:
            if style == "sequential" and self.kind == "residual" or style == "parallel" and self.kind == "linear":
                raise ConfigError(f"a {style} adapter cannot wrap a {type(self.base_layer).__name__} module.")
            width = adapter["r"] or max(1, hidden // 2)
            down, up = nn.Linear(hidden, width), nn.Linear(width, hidden)
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.weight)  # Δh = 0 at the start: the adapted model equals the base model
            nn.init.zeros_(up.bias)
            self.unified_down[adapter_name] = down.to(reference.device)
            self.unified_up[adapter_name] = up.to(reference.device)
            self.unified_act[adapter_name] = ACTIVATIONS[adapter["non_linearity"]]()
            settings.update(style=style, scaling=adapter["scaling"])
        self.unified_settings[adapter_name] = settings
        self.set_adapter(self.active_adapters)

    def _kv_shape(self) -> tuple[int, int]:
        base = self.base_layer
        head_dim = getattr(base, "head_dim", None) or getattr(base, "attention_head_size", None)
        key = getattr(base, "k_proj", None) or getattr(base, "key", None)
        if head_dim is None or not isinstance(key, nn.Linear) or getattr(base, "layer_idx", None) is None:
            raise ConfigError(f"prefix tuning needs an attention module with key projection, head size and layer "
                              f"index; {type(base).__name__} has not.")
        return key.out_features // head_dim, head_dim

    def _delta(self, name: str, z: torch.Tensor) -> torch.Tensor:
        down = self.unified_down[name]
        out = self.unified_up[name](self.unified_act[name](down(z.to(down.weight.dtype))))
        return (self.unified_settings[name]["scaling"] * out).to(z.dtype)

    def _active(self) -> list[str]:
        if self.disable_adapters:
            return []
        return [n for n in self.active_adapters if n in self.unified_settings]

    def forward(self, *args, **kwargs):
        if self._capture is not None:  # the base model's own keys and values, no prefix or adapter
            if self.unified_prefix_key:
                kwargs = {**kwargs, "cache": _CaptureCache(self._capture)}
            return self.base_layer(*args, **kwargs)
        active = self._active()
        if not active:
            return self.base_layer(*args, **kwargs)
        adapters = [n for n in active if self.unified_settings[n]["style"] is not None]
        if self.kind == "linear":
            out = self.base_layer(*args, **kwargs)
            for name in adapters:
                out = out + self._delta(name, out)
            return out
        if self.kind == "residual":  # BERT-family output module: forward(hidden_states, input_tensor)
            hidden, residual = (args + (None, None))[:2]
            hidden = kwargs.pop("hidden_states", hidden)
            residual = kwargs.pop("input_tensor", residual)
            change = sum(self._delta(name, residual) for name in adapters)
            return self.base_layer(hidden, residual + change, *args[2:], **kwargs)
        x = args[0] if args else kwargs["hidden_states"]
        prefixes = [n for n in active if self.unified_settings[n]["prefix"]]
        if prefixes:
            kwargs = self._with_prefix(prefixes, x, args, kwargs)
        out = self.base_layer(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        for name in adapters:
            style = self.unified_settings[name]["style"]
            first = first + self._delta(name, x if style == "parallel" else first)
        return (first, *out[1:]) if isinstance(out, tuple) else first

    def _with_prefix(self, names: list[str], x: torch.Tensor, args: tuple, kwargs: dict) -> dict:
        if len(args) > 1:
            raise ConfigError("prefix tuning expects the attention module to be called with keyword arguments "
                              "after hidden_states (as BERT- and Llama-family layers of transformers 5 do).")
        kwargs = dict(kwargs)
        batch, queries = x.shape[0], x.shape[1]
        key = torch.cat([self.unified_prefix_key[n] for n in names], dim=2).expand(batch, -1, -1, -1)
        value = torch.cat([self.unified_prefix_value[n] for n in names], dim=2).expand(batch, -1, -1, -1)
        cache_kw = "past_key_values" if "past_key_values" in kwargs and "cache" not in kwargs else "cache"
        inner = kwargs.get(cache_kw)
        layer_idx = self.base_layer.layer_idx
        past = inner.get_seq_length(layer_idx) if inner is not None else 0
        kwargs["attention_mask"] = _extend_mask(kwargs.get("attention_mask"), key.shape[2], queries, past,
                                                bool(getattr(self.base_layer, "is_causal", False)), x.device)
        kwargs[cache_kw] = _PrefixCache(key, value, inner)
        return kwargs

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("adapters and prefixes cannot be merged into the base weights; keep the adapter, "
                                  "or call unload() to remove it.")

    def unmerge(self) -> None:
        return None  # never merged


class UnifiedModel(BaseTuner):
    """peft tuner of `AdapterConfig`, `PrefixConfig` and `MAMConfig` (see the module docstring)."""

    prefix: str = PREFIX
    tuner_layer_cls = UnifiedLayer
    target_module_mapping: dict = {}

    def _prepare_adapter_config(self, peft_config, model_config: dict):
        roles = _roles(peft_config, _family(self.model))
        peft_config.target_modules = "|".join(f"(?:{rx})" for rx in roles.values())
        hidden = model_config.get("hidden_size")
        if getattr(peft_config, "r", 0) is None:  # resolved (and saved) for this model
            if not hidden:
                raise ConfigError("r=None needs the model config's hidden_size; pass r explicitly.")
            peft_config.r = max(1, hidden // 2)
        return peft_config

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        roles = {role for role, rx in _roles(peft_config, _family(self.model)).items() if re.fullmatch(rx, current_key)}
        hidden = self.model.config.hidden_size
        if isinstance(target, UnifiedLayer):
            target.update_layer(adapter_name, peft_config, roles, hidden)
            return
        new_module = UnifiedLayer(target, adapter_name, peft_config, roles, hidden)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        config = self.peft_config[adapter_name]
        if config.plan()[0] and config.prefix_init == "tokens" and not config.inference_mode \
                and not any(p.is_meta for p in model.parameters()):
            self._prefix_from_tokens(model, adapter_name, config)

    @torch.no_grad()
    def _prefix_from_tokens(self, model: nn.Module, adapter_name: str, config) -> None:
        """Set the prefix to the keys and values the base model computes for l seeded random vocabulary tokens."""
        layers = [m for m in model.modules() if isinstance(m, UnifiedLayer) and adapter_name in m.unified_prefix_key]
        embeddings = model.get_input_embeddings()
        generator = torch.Generator().manual_seed(config.seed)
        ids = torch.randint(0, embeddings.num_embeddings, (1, config.num_virtual_tokens), generator=generator)
        backbone = getattr(model, "base_model", model)  # the encoder/decoder without its task head
        training = model.training
        for layer in (m for m in model.modules() if isinstance(m, UnifiedLayer)):
            layer._capture = {}
        try:
            model.eval()
            backbone(input_ids=ids.to(embeddings.weight.device), use_cache=False)
            for layer in layers:
                for store, key in ((layer.unified_prefix_key, "key"), (layer.unified_prefix_value, "value")):
                    store[adapter_name].copy_(layer._capture[key].to(store[adapter_name].dtype))
        finally:
            for layer in (m for m in model.modules() if isinstance(m, UnifiedLayer)):
                layer._capture = None
            model.train(training)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)  # the wrapped modules need no weight sharing or device moves

    def _check_merge_allowed(self):
        raise NotImplementedError("adapters and prefixes cannot be merged; use unload().")


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    for name, config_cls in ((ADAPTER_NAME, AdapterConfig), (PREFIX_NAME, PrefixConfig), (MAM_NAME, MAMConfig)):
        if extend_peft_type(name) not in PEFT_TYPE_TO_CONFIG_MAPPING:
            register_peft_method(name=name, config_cls=config_cls, model_cls=UnifiedModel, prefix=PREFIX)


_register()
