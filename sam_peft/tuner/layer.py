"""Sparse-delta tuner layers: each wraps one base module and keeps, per adapter and per own parameter,
sorted flat `indices` (an integer buffer) and trainable `values` (a 1-D float32 parameter, the master copy).

`SparseDiffLayer` is the generic path (each tuned parameter composed as θ0 + Δ for the call, for small tensors and
module kinds without a fast path); `weight_layers` holds Linear, Conv1D and Embedding, which run their large weight
with the delta written in for the duration of each kernel.
"""

from __future__ import annotations

import functools
import inspect
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call
from torch.nn.utils.stateless import _reparametrize_module

from ..ranking.budget import placeholder_count
from ..ranking.signals import SIGNALS
from ..storage.validation import index_dtype
from .mixed import MixedBatch, mixed_batch_forward
from .ops import add_rounded_once, compose, tensor_version, write_at

VALUES_DTYPE = torch.float32


def own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a module owns directly (not those of its children)."""
    return {name: p for name, p in module._parameters.items() if p is not None}


RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def keeps_running_statistics(module: nn.Module) -> bool:
    """Whether a module keeps running statistics that a forward in train mode updates (BatchNorm, InstanceNorm with
    `track_running_stats`, and any module with such buffers)."""
    return any(module._buffers.get(name) is not None for name in RUNNING_STATISTICS)


def running_statistics(model: nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers of every module of `model` (see `keeps_running_statistics`), each once."""
    found = {}
    for module in model.modules():
        for name in RUNNING_STATISTICS:
            buffer = module._buffers.get(name)
            if buffer is not None:
                found[id(buffer)] = buffer
    return list(found.values())


class SparseDiffLayer(nn.Module, BaseTunerLayer):
    """A base module plus sparse deltas on its own parameters (generic path: dense composition).

    Subclasses override `_forward_with_deltas` with on-the-fly composition for large weights.
    """

    adapter_layer_names = ("sparsediff_values",)
    other_param_names = ("sparsediff_indices",)
    # A tuned parameter read through the wrapper (`layer.weight`, as RecurrentGemma's and Mamba's decoding read their
    # depthwise conv's weight) is θ0 + Δ of the active adapters: the generic path composes it for each call anyway.
    # Layers with a fast path (a large weight with the delta written in for each kernel) give θ0 (see `_read`).
    _reads_compose = True
    _methods_compose = True  # see `__getattr__`

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, module_key: str, skip: frozenset[str] = frozenset()
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_key = module_key
        self.skip = skip  # own parameters that are not tuned (shared with another module)
        self._merge_backup: dict[str, dict[str, torch.Tensor]] = {}
        self.sparsediff_values = nn.ModuleDict()
        self.sparsediff_indices = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self._cache: dict[tuple, tuple[tuple, Any]] = {}
        # serialises what swaps or writes the base module's tensors for a call (functional_call, written deltas)
        self._lock = threading.Lock()
        self._epoch = 0  # moves whenever entries, adapters or loaded tensors change: forward plans are rebuilt
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_post_hook(_entries_changed)
        self._writes_to_base = True  # from now on, see `__setattr__`

    @property
    def in_features(self) -> int | None:
        """The wrapped module's input size (None for kinds without one, e.g. LayerNorm), as peft layers expose."""
        return _features(self.get_base_layer())[0]

    @property
    def out_features(self) -> int | None:
        """The wrapped module's output size (None for kinds without one)."""
        return _features(self.get_base_layer())[1]

    def __getattr__(self, name: str) -> Any:
        """Attributes the wrapper lacks are read from the wrapped module (`stride`, `padding`, `padding_idx`,
        `num_embeddings`, ...), as code that holds the module expects. A method the wrapped module's own class
        defines (not one of torch's) runs with the active deltas in its parameters, as `forward` does: ProphetNet
        calls `position_embeddings._forward(...)` beside `position_embeddings(...)`."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name.startswith("__"):
                raise
            if name in base._parameters:
                return self._read(name)
            value = getattr(base, name)
            if self._methods_compose and inspect.ismethod(value) and value.__self__ is base \
                    and not _defined_by_torch(type(base), name):
                return functools.wraps(value)(functools.partial(self._call_with_deltas, value))
            return value

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped module's weight as its forward sees it (see `_read`)."""
        base = self.get_base_layer()
        return base.qweight if hasattr(base, "qweight") else self._read("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        """The wrapped module's bias as its forward sees it (see `_read`)."""
        return self._read("bias")

    def _read(self, name: str) -> Any:
        """Parameter `name` of the wrapped module, read through the wrapper: on the generic path θ0 + Δ of the active
        adapters (a new tensor, differentiable in the values) where it carries a delta, so code that reads it
        directly computes what the forward computes, and what merging gives. Layers with a fast path, and
        parameters that are not plain (sharded, quantized), give the parameter itself."""
        value = getattr(self.get_base_layer(), name)
        if not self._reads_compose or type(value) is not nn.Parameter or name not in self.tuned_parameters():
            return value
        adapters = [] if self.merged or self.disable_adapters else self._active_with_entries()
        return self._composed(adapters, name, value) if adapters else value

    def _call_with_deltas(self, method: Callable, *args: Any, **kwargs: Any) -> Any:
        """`method` of the wrapped module, run with θ0 + Δ of the active adapters in its tuned parameters."""
        adapters = [] if self.merged or self.disable_adapters else self._active_with_entries()
        if not adapters:
            return method(*args, **kwargs)
        base = self.get_base_layer()
        if torch.compiler.is_compiling():
            params = {name: self._composed(adapters, name, p) for name, p in self.tuned_parameters().items()}
            with _reparametrize_module(base, params):
                return method(*args, **kwargs)
        with self._lock:  # the parameters are swapped for the call: read and swap as one
            params = {name: self._composed(adapters, name, p) for name, p in self.tuned_parameters().items()}
            with _reparametrize_module(base, params):
                return method(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        """A write to an attribute of the wrapped module (one the wrapper does not hold itself) goes to the wrapped
        module, where reads find it (`__getattr__`) and its forward uses it: models that set state on their
        submodules at run time (RecurrentGemma's `rg_lru.recurrent_states`) keep working once these are wrapped."""
        if self._owner_of(name) is not self:
            setattr(self.__dict__["_modules"]["base_layer"], name, value)
            return
        super().__setattr__(name, value)

    def __delattr__(self, name: str) -> None:
        if self._owner_of(name) is not self:
            delattr(self.__dict__["_modules"]["base_layer"], name)
            return
        super().__delattr__(name)

    def _owner_of(self, name: str) -> nn.Module:
        """The wrapped module if it holds attribute `name` and the wrapper does not (its own attributes, parameters,
        buffers, submodules, and what its class defines, such as properties with a setter, stay its own); else the
        wrapper."""
        own = self.__dict__
        declared = getattr(type(self), name, None)
        read_only = isinstance(declared, property) and declared.fset is None  # `weight`, `bias`: the base's
        if not own.get("_writes_to_base", False) or name in own or (declared is not None and not read_only):
            return self
        if any(name in own.get(kind, {}) for kind in ("_parameters", "_buffers", "_modules")):
            return self
        base = own["_modules"].get("base_layer")
        if base is None:
            return self
        if name in base.__dict__ or any(name in base.__dict__.get(kind, {})
                                        for kind in ("_parameters", "_buffers", "_modules")):
            return base
        # a class-level default (often None) or a property of the model's own class
        if any(name in vars(klass) for klass in type(base).__mro__) and not _defined_by_torch(type(base), name) \
                and not callable(getattr(type(base), name)):
            return base
        return self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_cache"] = {}  # derived from the indices (and holds the lock): rebuilt on first use
        state.pop("_plan", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()
        self.invalidate_caches()

    # ----------------------------------------------------------------- state
    def tuned_parameters(self) -> dict[str, nn.Parameter]:
        """The base layer's own parameters that carry a delta."""
        return {n: p for n, p in own_parameters(self.get_base_layer()).items() if n not in self.skip}

    def parameter_shape(self, name: str) -> torch.Size:
        """The logical shape of own parameter `name`: what its flat indices address (a quantized weight's (out, in),
        not its packed storage)."""
        return self.tuned_parameters()[name].shape

    def is_quantized(self, name: str) -> bool:
        """Whether own parameter `name` is stored quantized (no gradient, no in-place writes; see
        `quantized_layers`)."""
        return False

    def dense_parameter(self, name: str) -> torch.Tensor:
        """θ0 of own parameter `name` as a float tensor of its logical shape (dequantized if stored quantized)."""
        return self.tuned_parameters()[name]

    def update_layer(self, adapter_name: str, config) -> None:
        """Create the (placeholder) delta of a new adapter; sizes come from `config.counts` when known."""
        values, indices = nn.ParameterDict(), BufferDict(persistent=True)
        for name, param in self.tuned_parameters().items():
            full_name = f"{self.module_key}.{name}"
            if config.is_selected:
                count = int(config.counts.get(full_name, 0))
            else:
                count = placeholder_count(config.sparsity, config.allocation, SIGNALS[config.selection].budgeted,
                                          self.parameter_shape(name).numel())
            values[name] = nn.Parameter(torch.zeros(count, dtype=VALUES_DTYPE, device=param.device))
            indices[name] = torch.arange(count, dtype=index_dtype(self.parameter_shape(name).numel()),
                                         device=param.device)
        self.sparsediff_values[adapter_name] = values
        self.sparsediff_indices[adapter_name] = indices
        self.invalidate_caches()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_entries(self, adapter_name: str, name: str, indices: torch.Tensor, values: torch.Tensor | None = None):
        """Install sorted flat `indices` for parameter `name`; values become `values` (or zeros).

        The values parameter keeps its identity (its `.data` is replaced), so an optimizer that already holds
        it trains the new entries.
        """
        param = self.tuned_parameters()[name]
        value_param = self.sparsediff_values[adapter_name][name]
        new = torch.zeros(indices.numel(), dtype=VALUES_DTYPE, device=param.device) if values is None else values
        value_param.data = new.detach().to(device=param.device, dtype=VALUES_DTYPE).clone()
        value_param.grad = None
        self.set_indices(adapter_name, name, indices)  # last: it rebuilds the structures from indices and values

    def set_indices(self, adapter_name: str, name: str, indices: torch.Tensor) -> nn.Parameter:
        """Install sorted flat `indices` for parameter `name` (its values are set by the caller); returns the base
        parameter. Everything derived from the old indices is dropped."""
        param = self.tuned_parameters()[name]
        numel = self.parameter_shape(name).numel()
        self.sparsediff_indices[adapter_name][name] = indices.to(index_dtype(numel)).to(param.device)
        self.invalidate_caches()
        return param

    def invalidate_caches(self, rebuild: bool = True) -> None:
        """Drop what was derived from the entries or the tensors (structures, θ0 slots, the forward plan) and
        rebuild the structures, so that a graph compiled later finds them (`rebuild=False`: the first forward that
        needs them builds them; inference never does)."""
        self._cache.clear()
        self._epoch += 1
        if rebuild:
            self._build_structures()

    def _build_structures(self) -> None:
        """Build what a forward of the active adapters derives from their indices, so that a graph compiled later
        finds it: here the union of several adapters' indices (layers with a fast path add their structures)."""
        active = self._active_with_entries()
        if len(active) < 2:
            return
        for name in self.tuned_parameters():
            numel = self.parameter_shape(name).numel()
            indices = [self.sparsediff_indices[a][name] for a in active if name in self.sparsediff_indices[a]]
            if all(i.device.type != "meta" and (i.numel() == 0 or bool((i.min() >= 0) & (i.max() < numel)))
                   for i in indices):
                self._delta(active, name)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._build_structures()  # another active adapter (or combination) has its own structures

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.invalidate_caches()

    def entries(self, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{own parameter name: (indices, values)} of one adapter."""
        return {
            name: (self.sparsediff_indices[adapter_name][name], values)
            for name, values in self.sparsediff_values[adapter_name].items()
        }

    def _cached(self, key: tuple, version: Callable[[], tuple], build: Callable[[], Any]):
        """A value derived from the indices, rebuilt when `version()` changes; never an inference tensor, so a first
        forward under `inference_mode` cannot poison later training.

        Under torch.compile the graph reads a built value without checking its version (every change of the
        entries, tensors or device clears the cache, and the compiler guards on what the graph read); a missing one
        is built outside the graph, and the next call compiles a graph that finds it.
        """
        hit = self._cache.get(key)
        if torch.compiler.is_compiling():
            return hit[1] if hit is not None else self._build_outside_graph(key, version, build)
        if hit is None or hit[0] != version():
            hit = self._build(key, version, build)
        return hit[1]

    def _build(self, key: tuple, version: Callable[[], tuple], build: Callable[[], Any]) -> tuple:
        with torch.inference_mode(False), torch.no_grad():
            hit = (version(), build())
        self._cache[key] = hit
        return hit

    @torch.compiler.disable
    def _build_outside_graph(self, key: tuple, version: Callable[[], tuple], build: Callable[[], Any]):
        return self._build(key, version, build)[1]

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self.invalidate_caches()  # structures and θ0 slots belonged to the old device / dtype
        return result

    def _delta(self, adapters: list[str], name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(unique int64 indices, values) of the active adapters' delta on one parameter, or None if empty; several
        adapters' values are summed in fp32 where their indices meet (θ0 + Δ is then rounded once, as for one)."""
        parts = [
            (self.sparsediff_indices[a][name], self.sparsediff_values[a][name])
            for a in adapters
            if a in self.sparsediff_values and name in self.sparsediff_values[a]
            and self.sparsediff_values[a][name].numel() > 0
        ]
        if not parts:
            return None
        if len(parts) == 1:
            indices, values = parts[0]
            if torch.compiler.is_compiling():  # a graph recomputes the int64 indices (O(k)) rather than caching them
                return indices.long(), values
            version = (tensor_version(indices), indices.data_ptr(), indices.numel())
            return self._cached(("idx", tuple(adapters), name), lambda: version, lambda: indices.long()), values
        union, inverse = self._cached(
            ("union", tuple(adapters), name),
            lambda: tuple((tensor_version(idx), idx.data_ptr(), idx.numel()) for idx, _ in parts),
            lambda: torch.unique(torch.cat([i for i, _ in parts]).long(), sorted=True, return_inverse=True),
        )
        summed = torch.zeros(union.numel(), dtype=VALUES_DTYPE, device=union.device)
        return union, summed.index_add(0, inverse, torch.cat([v for _, v in parts]).to(VALUES_DTYPE))

    # ----------------------------------------------------------------- forward
    def _active_with_entries(self) -> list[str]:
        return [
            a for a in self.active_adapters
            if a in self.sparsediff_values and any(v.numel() for v in self.sparsediff_values[a].values())
        ]

    def forward(self, *args: Any, adapter_names: Sequence[str] | MixedBatch | None = None, **kwargs: Any) -> Any:
        """The base module's forward with θ0 + Δ of the active adapters; with `adapter_names` (one adapter name or
        `"__base__"` per row), each row with its own adapter (see `mixed`)."""
        if adapter_names is not None:
            batch = adapter_names if isinstance(adapter_names, MixedBatch) else MixedBatch.of(adapter_names)
            return mixed_batch_forward(self, batch, args, kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        adapters = [] if self.merged else self._active_with_entries()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        return self._forward_with_deltas(adapters, *args, **kwargs)

    def _composed(self, adapters: list[str], name: str, param: torch.Tensor) -> torch.Tensor:
        delta = self._delta(adapters, name)
        return param if delta is None else compose(param, *delta)

    def _forward_with_deltas(self, adapters: list[str], *args: Any, **kwargs: Any) -> Any:
        base = self.get_base_layer()
        if torch.compiler.is_compiling():  # a graph swaps nothing at run time: no lock needed
            params = {name: self._composed(adapters, name, p) for name, p in self.tuned_parameters().items()}
            return functional_call(base, params, args, kwargs, strict=False)
        with self._lock:  # functional_call swaps the module's parameters for the call: read and swap as one
            # FSDP (use_orig_params) puts the gathered tensors in the module's __dict__, shadowing _parameters
            shadowed = {n: base.__dict__[n] for n in self.tuned_parameters() if n in base.__dict__}
            current = {**self.tuned_parameters(), **shadowed}
            params = {name: self._composed(adapters, name, p) for name, p in current.items()}
            if not shadowed:
                return functional_call(base, params, args, kwargs, strict=False)
            try:
                base.__dict__.update({n: params[n] for n in shadowed})
                rest = {n: t for n, t in params.items() if n not in shadowed}
                return functional_call(base, rest, args, kwargs, strict=False)
            finally:
                base.__dict__.update(shadowed)

    # ----------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str, name: str = "weight") -> torch.Tensor:
        """The dense delta of one parameter (default: the weight) of an adapter."""
        param = self.tuned_parameters()[name]
        indices, values = self.entries(adapter_name)[name]
        return compose(torch.zeros_like(param), indices.long(), values.detach())

    def check_merge(self, adapter_names: list[str]) -> None:
        """Raise if merging these adapters would give non-finite base values (nothing is changed)."""
        base_params = self.tuned_parameters()
        for adapter in adapter_names:
            if adapter not in self.sparsediff_values:
                continue
            for name, (indices, values) in self.entries(adapter).items():
                flat = base_params[name].data.reshape(-1)
                merged = add_rounded_once(flat.index_select(0, indices.long()), values.detach())
                if not torch.isfinite(merged).all():
                    raise ValueError(
                        f"Merging adapter '{adapter}' into {self.module_key}.{name} gives non-finite values "
                        "(overflow in the base dtype or a broken delta); the base is unchanged."
                    )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base parameters in place (O(k)); `safe_merge` refuses non-finite results.

        The overwritten entries are kept, so `unmerge` restores the base bit-exactly in every dtype.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if safe_merge:
            self.check_merge(adapter_names)
        base_params = self.tuned_parameters()
        for adapter in adapter_names:
            if adapter not in self.sparsediff_values:
                continue
            backup = {}
            with torch.no_grad():
                for name, (indices, values) in self.entries(adapter).items():
                    idx = indices.long()
                    backup[name] = base_params[name].data.reshape(-1).index_select(0, idx)
                    write_at(base_params[name], idx, add_rounded_once(backup[name], values))
                    torch.autograd.graph.increment_version(base_params[name])  # cached θ0 is stale now
            self._merge_backup[adapter] = backup
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the entries that `merge` overwrote (bit-exact), most recent merge first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base_params = self.tuned_parameters()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            backup = self._merge_backup.pop(adapter, {})
            with torch.no_grad():
                for name, saved in backup.items():
                    indices = self.sparsediff_indices[adapter][name].long()
                    write_at(base_params[name], indices, saved)
                    torch.autograd.graph.increment_version(base_params[name])


_FEATURE_ATTRIBUTES = (("in_features", "out_features"), ("in_channels", "out_channels"),
                       ("num_embeddings", "embedding_dim"), ("embed_dim", "embed_dim"))


def _features(module: nn.Module) -> tuple[int | None, int | None]:
    for first, second in _FEATURE_ATTRIBUTES:
        if hasattr(module, first) and hasattr(module, second):
            return getattr(module, first), getattr(module, second)
    return None, None


def _defined_by_torch(cls: type, name: str) -> bool:
    """Whether the class in `cls`'s MRO that defines attribute `name` is one of torch's (`nn.Module`'s methods,
    `nn.Embedding.reset_parameters`, ...): those run on the wrapped module as they are."""
    owner = next((klass for klass in cls.__mro__ if name in vars(klass)), None)
    return owner is None or owner.__module__.split(".")[0] == "torch"


def _entries_changed(module: SparseDiffLayer, incompatible_keys: Any) -> None:
    module.invalidate_caches()
