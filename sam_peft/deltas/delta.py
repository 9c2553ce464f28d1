"""`SparseDelta`: a task's sparse delta outside peft objects — extract, apply/remove in place, combine, save."""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from ..errors import BaseModelMismatchError, DeltaFileError
from ..storage.encoding import DELTA_KEYS, check_values_dtype, decode_tensors, encode_tensors, encoding_metadata
from ..storage.identity import (
    FORMAT_VERSION,
    BaseIdentity,
    architecture_of,
    check_same_base,
    identity_metadata,
    weights_fingerprint,
)
from ..storage.io import load_safetensors_checked, save_safetensors_atomic
from ..storage.validation import check_entries, index_dtype
from ..tuner.combine import Combination
from ..tuner.ops import add_rounded_once, tensor_version, write_at
from ..tuner.quantized_layers import DenseWeights, is_quantized_tensor
from ..tuner.targets import resolve_adapter, targets, tuner_of
from .packing import flat_view

DELTA_FILE_KIND = "sam-peft-sparse-delta"
# model -> {parameter names: (fingerprint, their versions)} for states whose fingerprint was computed; a later
# check at the same versions (nothing written since, or a SparseDelta restored it exactly) needs no re-hash.
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> a footprint of each delta applied to it and not yet removed, oldest first: a delta is removed only when
# no later one changed its entries. Footprints hold indices only, never a delta (its values, backups, dense head).
_APPLIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FLAT = "\0flat"  # backup key of the packed (single gather/scatter) path
METADATA_KEYS = ("base_architecture", "base_fingerprint", "selection", "allocation", "sparsity", "sam_peft_format",
                 "combined_from", "base_quantization")


@dataclass(frozen=True, eq=False)
class _Footprint:
    """Which entries an applied delta changed: its token (identity), indices per parameter, dense tensor names."""

    token: object
    indices: dict[str, torch.Tensor]
    dense: frozenset[str]

    def overlaps(self, other: _Footprint) -> bool:
        if self.dense & (other.dense | other.indices.keys()) or other.dense & self.indices.keys():
            return True
        return any(bool(torch.isin(self.indices[n], other.indices[n].to(self.indices[n].device)).any())
                   for n in self.indices.keys() & other.indices.keys())


@dataclass
class SparseDelta:
    """Sparse entries {parameter name: (sorted int64 flat indices, float32 values)} plus dense replacements
    (the task head) and the base model's identity.

    `apply_to` adds the entries to a plain model in place in O(k) and remembers the overwritten entries, so
    `remove_from` restores the base exactly.
    """

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]]
    shapes: dict[str, list[int]]
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # model -> what `apply_to` overwrote; model -> the shapes whose structure was checked (weak: a model collected
    # and another created at the same address is never taken for it)
    _backups: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)
    _plan: tuple | None = field(default=None, repr=False, compare=False)
    _checked: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary, repr=False, compare=False)
    _token: object = field(default_factory=object, repr=False, compare=False)

    # ------------------------------------------------------------ creation
    @classmethod
    def from_peft(cls, model: nn.Module, adapter_name: str = "default") -> SparseDelta:
        """Extract an adapter's delta (and its modules_to_save head) from a PeftModel."""
        tuner = tuner_of(model)
        adapter_name = resolve_adapter(tuner, adapter_name)
        config = tuner.peft_config[adapter_name]
        config.require_selected(adapter_name, "extracting its delta")
        entries, shapes = {}, {}
        for t in targets(tuner, adapter_name):
            entries[t.name] = (t.indices.detach().long().cpu().clone(), t.values.detach().float().cpu().clone())
            shapes[t.name] = list(t.shape)
        dense = {}
        for name, module in tuner.model.named_modules():
            if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
                for pname, param in module.modules_to_save[adapter_name].named_parameters():
                    dense[f"{name}.{pname}"] = param.detach().cpu().clone()
        metadata = {k: v for k, v in identity_metadata(config).items() if k in METADATA_KEYS}
        return cls(entries, shapes, dense, metadata)

    @property
    def num_entries(self) -> int:
        return sum(i.numel() for i, _ in self.entries.values())

    # ------------------------------------------------------------ applying
    def _check_base(self, model: nn.Module, params: dict[str, torch.Tensor], verify_fingerprint: bool) -> None:
        shapes = tuple(tuple(params[n].shape) for n in self.entries if n in params)
        if self._checked.get(model) != shapes:
            self._check_structure(params)
            self._checked[model] = shapes
        # every entry's name and shape was compared with the model's above (`shapes=None`)
        check_same_base(BaseIdentity.recorded_in(self.metadata), architecture_of(model),
                        lambda: self._fingerprint(model, params), "this delta", verify_fingerprint=verify_fingerprint)

    def _check_structure(self, params: dict[str, torch.Tensor]) -> None:
        missing = [n for n in list(self.entries) + list(self.dense) if n not in params]
        if missing:
            raise BaseModelMismatchError(f"the model has no parameter(s) {missing[:5]}; this delta belongs to "
                                         "another architecture.")
        quantized = [n for n in list(self.entries) + list(self.dense) if is_quantized_tensor(params[n])]
        if quantized:
            raise BaseModelMismatchError(
                f"'{quantized[0]}' is stored quantized in this model ({len(quantized)} targeted parameters are): a "
                "SparseDelta writes entries in place, which a quantized weight cannot hold. Apply it to the "
                "unquantized base, or load the adapter with PeftModel.from_pretrained on the quantized one."
            )
        for name, shape in self.shapes.items():
            if list(params[name].shape) != list(shape):
                raise BaseModelMismatchError(
                    f"'{name}' has shape {list(params[name].shape)} in the model but {shape} in the delta; "
                    "a delta can only be applied to the base model it was trained on.")
        for name, (indices, _) in self.entries.items():
            if indices.numel() and int(indices.max()) >= params[name].numel():
                raise BaseModelMismatchError(f"indices of '{name}' exceed its {params[name].numel()} entries; "
                                             "the delta belongs to another model.")
        for name, tensor in self.dense.items():
            if params[name].shape != tensor.shape:
                raise BaseModelMismatchError(f"'{name}' has shape {list(params[name].shape)} in the model but "
                                             f"{list(tensor.shape)} in the delta.")
    def _fingerprint(self, model: nn.Module, params: dict[str, torch.Tensor]) -> str:
        """The fingerprint of the model's weights at this delta's names, cached while nothing wrote to them."""
        names = tuple(self.entries)
        versions = _weights_state(params, names)
        known = _VERIFIED.setdefault(model, {}).get(names)
        if known is not None and known[1] == versions:
            return known[0]
        record = json.loads(self.metadata["base_quantization"]) if self.metadata.get("base_quantization") else None
        actual = weights_fingerprint(DenseWeights({n: partial(params.__getitem__, n) for n in names}, record))
        _VERIFIED[model][names] = (actual, versions)
        return actual

    def _flat_plan(self, params: dict[str, torch.Tensor]):
        """(flat storage view, global indices, values) when the targets are packed (see `pack_parameters`)."""
        names = list(self.entries)
        layout = flat_view([params[n].data for n in names])
        if layout is None:
            return None
        flat, offsets = layout
        key = (flat.data_ptr(), tuple(offsets))
        if self._plan is None or self._plan[0] != key:
            indices = torch.cat([self.entries[n][0].to(flat.device) + off for n, off in zip(names, offsets)])
            values = torch.cat([self.entries[n][1] for n in names]).to(flat.device)
            self._plan = (key, indices, values)
        return flat, self._plan[1], self._plan[2]

    def _touch(self, params: dict[str, torch.Tensor]) -> None:
        for name in self.entries:  # writes through a flat view do not bump the parameters' version counters
            torch.autograd.graph.increment_version(params[name])

    def apply_to(self, model: nn.Module, *, verify_fingerprint: bool = True) -> nn.Module:
        """Add the delta to `model`'s parameters in place (O(k)); `remove_from` undoes it exactly.

        On a model packed with `sam_peft.pack_parameters`, all entries move with one gather and one scatter.
        """
        if model in self._backups:
            raise ValueError("this delta is already applied to this model; remove_from(model) first.")
        params = dict(model.named_parameters())
        self._check_base(model, params, verify_fingerprint)
        backup = {}
        plan = self._flat_plan(params)
        with torch.no_grad():
            if plan is not None:
                flat, indices, values = plan
                backup[_FLAT] = flat.index_select(0, indices)
                flat.index_copy_(0, indices, add_rounded_once(backup[_FLAT], values))
                self._touch(params)
            for name, (indices, values) in ([] if plan is not None else self.entries.items()):
                param = params[name]
                idx = indices.to(param.device)
                backup[name] = param.data.reshape(-1).index_select(0, idx)
                write_at(param, idx, add_rounded_once(backup[name], values))
            for name, tensor in self.dense.items():
                backup[name] = params[name].data.clone()
                params[name].data.copy_(tensor.to(params[name].device, params[name].dtype))
        self._backups[model] = (backup, _VERIFIED.get(model, {}).get(tuple(self.entries)))
        _APPLIED.setdefault(model, []).append(self._footprint())
        return model

    def remove_from(self, model: nn.Module) -> nn.Module:
        """Restore the entries `apply_to` changed (bit-exact).

        Deltas stacked on one model that change the same entries are removed in reverse order of applying (the
        restored entries would otherwise undo the later delta); a removal out of that order is refused.
        """
        if model not in self._backups:
            raise ValueError("this delta is not applied to this model; nothing to remove.")
        stack = _APPLIED.get(model, [])
        position = next((i for i, f in enumerate(stack) if f.token is self._token), None)
        if position is not None:
            mine = stack[position]
            blocking = next((f for f in stack[position + 1:] if mine.overlaps(f)), None)
            if blocking is not None:
                held = sum(i.numel() for i in blocking.indices.values())
                raise ValueError(f"a delta applied after this one changes some of the same entries (it holds "
                                 f"{held:,} entries); remove it first: deltas stacked on one model come off in "
                                 "reverse order of applying.")
            del stack[position]
        backup, verified = self._backups.pop(model)
        params = dict(model.named_parameters())
        with torch.no_grad():
            if _FLAT in backup:
                flat, indices, _ = self._flat_plan(params)
                flat.index_copy_(0, indices, backup[_FLAT])
                self._touch(params)
            for name, (indices, _) in ([] if _FLAT in backup else self.entries.items()):
                write_at(params[name], indices.to(params[name].device), backup[name])
            for name in self.dense:
                params[name].data.copy_(backup[name])
        if verified is not None:  # restored bit-exactly: the state verified before apply_to, at new versions
            names = tuple(self.entries)
            _VERIFIED.setdefault(model, {})[names] = (verified[0], _weights_state(params, names))
        return model

    def _footprint(self) -> _Footprint:
        return _Footprint(self._token, {n: i for n, (i, _) in self.entries.items()}, frozenset(self.dense))

    # ------------------------------------------------------------ arithmetic
    def scale(self, factor: float) -> SparseDelta:
        """A new delta with every value (and dense head) multiplied by `factor`."""
        entries = {n: (i.clone(), v * factor) for n, (i, v) in self.entries.items()}
        return SparseDelta(entries, dict(self.shapes), {n: t * factor for n, t in self.dense.items()},
                           dict(self.metadata))

    def __mul__(self, factor: float) -> SparseDelta:
        return self.scale(factor)

    __rmul__ = __mul__

    def __add__(self, other: SparseDelta) -> SparseDelta:
        """Task arithmetic: the union of the entries, values summed where both deltas have one."""
        for name in set(self.shapes) & set(other.shapes):
            if self.shapes[name] != other.shapes[name]:
                raise BaseModelMismatchError(f"'{name}' has different shapes in the two deltas.")
        if self.metadata.get("base_fingerprint") != other.metadata.get("base_fingerprint"):
            raise BaseModelMismatchError("the deltas were recorded on different base models.")
        entries = {}
        for name in list(dict.fromkeys(list(self.entries) + list(other.entries))):
            parts = [d.entries[name] for d in (self, other) if name in d.entries]
            indices = torch.cat([i for i, _ in parts])
            values = torch.cat([v for _, v in parts])
            merged, inverse = torch.unique(indices, sorted=True, return_inverse=True)
            entries[name] = (merged, torch.zeros(merged.numel()).index_add_(0, inverse, values))
        dense = dict(self.dense)
        for name, tensor in other.dense.items():
            dense[name] = dense[name] + tensor if name in dense else tensor.clone()
        return SparseDelta(entries, {**other.shapes, **self.shapes}, dense, dict(self.metadata))

    @classmethod
    def combine(cls, deltas: list[SparseDelta], weights: list[float], combination_type: str = "linear", *,
                density: float | None = None, majority_sign_method: str = "total", seed: int = 0) -> SparseDelta:
        """The deltas combined tensor by tensor over the union of their entries, as `add_weighted_adapter` does:
        "linear", "ties" or "dare_linear" (see `sam_peft.tuner.combine`). A dense tensor (head) held by one delta is
        kept as it is; held by several, it is refused (dense heads do not combine entry-wise)."""
        combination = Combination(tuple(f"delta {j}" for j in range(len(deltas))), tuple(weights), combination_type,
                                  density, majority_sign_method, seed)
        shapes: dict[str, list[int]] = {}
        for delta in deltas:
            for name, shape in delta.shapes.items():
                if shapes.setdefault(name, shape) != shape:
                    raise BaseModelMismatchError(f"'{name}' has different shapes in the deltas.")
        if len({d.metadata.get("base_fingerprint") for d in deltas}) > 1:
            raise BaseModelMismatchError("the deltas were recorded on different base models.")
        dense: dict[str, torch.Tensor] = {}
        for delta in deltas:
            for name, tensor in delta.dense.items():
                if name in dense:
                    raise ValueError(f"dense tensor '{name}' (a head trained densely) is held by several deltas; "
                                     "dense heads cannot be combined entry-wise.")
                dense[name] = tensor.clone()
        generator = torch.Generator().manual_seed(seed)
        names = list(dict.fromkeys(name for d in deltas for name in d.entries))
        entries = {name: combination.combine([d.entries.get(name) for d in deltas], generator) for name in names}
        record = {**combination.record(), "adapters": None}
        metadata = {**deltas[0].metadata, "combined_from": json.dumps(record, sort_keys=True)}
        return cls(entries, shapes, dense, metadata)

    # ------------------------------------------------------------ files
    def save(self, path: str | Path, values_dtype: str = "float32") -> Path:
        """Write the delta as one safetensors file (format 2), atomically.

        `values_dtype`: "float32" (default) keeps the values exactly; "bfloat16" or "float16" store them rounded in
        half the bytes (`load` returns them as float32).
        """
        check_values_dtype(values_dtype)
        path = Path(path)
        missing = [name for name in self.entries if name not in self.shapes]
        if missing:
            raise ValueError(f"the shapes of {missing[:3]} are unknown (a delta read from an adapter directory "
                             "carries none): build it with SparseDelta.from_peft on the model, or save the adapter "
                             "with save_pretrained instead.")
        tensors = {}
        for name, (indices, values) in self.entries.items():
            tensors[f"sparse.{name}.indices"] = indices.to(index_dtype(math.prod(self.shapes[name])))
            tensors[f"sparse.{name}.values"] = values.float()
        for name, tensor in self.dense.items():
            tensors[f"dense.{name}"] = tensor
        metadata = {**self.metadata, "kind": DELTA_FILE_KIND, "sam_peft_format": str(FORMAT_VERSION),
                    "shapes": json.dumps(self.shapes, sort_keys=True), **encoding_metadata(values_dtype)}
        save_safetensors_atomic(encode_tensors(tensors, DELTA_KEYS, values_dtype), path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseDelta:
        """Read and validate a file written by `save` (format 2, or format 1 of earlier versions)."""
        tensors, metadata = load_safetensors_checked(path)
        if metadata.get("kind") != DELTA_FILE_KIND:
            raise DeltaFileError(f"{path} is not a sam-peft sparse delta file (no kind={DELTA_FILE_KIND} metadata).")
        version = metadata.get("sam_peft_format", "")
        if not version.isdigit() or int(version) > FORMAT_VERSION:
            raise DeltaFileError(f"{path} has format version {version!r}; this sam-peft reads ≤ {FORMAT_VERSION}. "
                                 "Upgrade sam-peft.")
        try:
            shapes = json.loads(metadata["shapes"])
            if not isinstance(shapes, dict) or not all(
                    isinstance(s, list) and all(isinstance(d, int) and d >= 0 for d in s) for s in shapes.values()):
                raise ValueError("shapes must map names to lists of sizes")
        except (KeyError, ValueError) as exc:
            raise DeltaFileError(f"{path} has unreadable shape metadata ({exc}); the file is corrupted.") from exc
        try:
            tensors, _ = decode_tensors(tensors, DELTA_KEYS)
        except DeltaFileError as exc:
            raise DeltaFileError(f"{path}: {exc}") from exc
        entries, dense = {}, {}
        for name, shape in shapes.items():
            indices = tensors.pop(f"sparse.{name}.indices", None)
            values = tensors.pop(f"sparse.{name}.values", None)
            if indices is None or values is None:
                raise DeltaFileError(f"{path} lacks the indices or values of '{name}'; the file is corrupted.")
            numel = 1
            for dim in shape:
                numel *= dim
            check_entries(name, indices, values, numel)
            entries[name] = (indices.long(), values.float())
        for key in list(tensors):
            if key.startswith("dense."):
                dense[key[len("dense."):]] = tensors.pop(key)
        if tensors:
            raise DeltaFileError(f"{path} holds unexpected tensors {sorted(tensors)[:5]}; the file is corrupted.")
        for name, tensor in dense.items():
            if not tensor.dtype.is_floating_point or not torch.isfinite(tensor).all():
                raise DeltaFileError(f"dense tensor '{name}' in {path} is not a finite float tensor.")
        keep = {k: v for k, v in metadata.items() if k in METADATA_KEYS}
        return cls(entries, shapes, dense, keep)


def _weights_state(params: dict[str, torch.Tensor], names: tuple[str, ...]) -> tuple:
    """What the cached fingerprint of these parameters is valid for: each one's storage and version (a tensor
    assigned or loaded in its place has another storage; an in-place change moves the version)."""
    return tuple((params[n].data_ptr(), tensor_version(params[n])) for n in names)
