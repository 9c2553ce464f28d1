"""Reading a saved adapter directory without a model: summary for `inspect`, and a `SparseDelta`."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from ..errors import DeltaFileError
from ..ranking.signals import SIGNALS
from ..storage.encoding import ADAPTER_KEYS, decode_tensors
from ..storage.identity import identity_metadata
from ..storage.io import load_safetensors_checked
from ..storage.keys import split_saved_key
from ..storage.validation import check_entries
from ..tuner.peft_type import PEFT_TYPE
from ..tuner.targets import layer_and_kind
from .delta import METADATA_KEYS, SparseDelta

PEFT_PREFIX = "base_model.model."


def resolve_adapter_dir(path: str | Path) -> Path:
    """The adapter directory itself, or the `adapter/` folder inside the output directory of `sam-peft train`."""
    path = Path(path)
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").exists():
        return path / "adapter"
    return path


def _read(adapter_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str], Path, int]:
    """(config, tensors with format-2 records decoded, header metadata, directory, bytes of the sparse entries)."""
    adapter_dir = resolve_adapter_dir(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise DeltaFileError(f"{config_path} not found; pass a directory written by save_pretrained or sam-peft train.")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise DeltaFileError(f"{config_path} is not valid JSON ({exc}); the file is corrupted.") from exc
    if not isinstance(config, dict) or config.get("peft_type") != PEFT_TYPE.value:
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise DeltaFileError(f"{adapter_dir} holds a peft adapter of type {kind}, not a sam-peft sparse delta "
                             f"({PEFT_TYPE.value}); load it with peft.PeftModel.from_pretrained instead.")
    path = adapter_dir / "adapter_model.safetensors"
    tensors, metadata = load_safetensors_checked(path)
    entry_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items() if ADAPTER_KEYS.split(k) is not None)
    try:
        tensors, _ = decode_tensors(tensors, ADAPTER_KEYS)
    except DeltaFileError as exc:
        raise DeltaFileError(f"{path}: {exc}") from exc
    return config, tensors, metadata, adapter_dir, entry_bytes


def split_entries(tensors: dict[str, torch.Tensor]):
    """{base name: (indices, values)} and {base name: dense tensor} from peft state-dict keys."""
    sparse, dense = {}, {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        parts = split_saved_key(name)
        if parts is None:
            dense[name.replace(".modules_to_save.", ".")] = tensor
        else:
            module, kind, attr = parts
            sparse.setdefault(f"{module}.{attr}", {})[kind] = tensor
    return sparse, dense


def adapter_summary(adapter_dir: str | Path) -> dict:
    """Counts, bytes, densities per layer and module kind, fingerprint and selection settings of an adapter."""
    config, tensors, metadata, adapter_dir, entry_bytes = _read(adapter_dir)
    sparse, dense = split_entries(tensors)
    counts = config.get("counts") or {}
    per_layer, per_kind = defaultdict(int), defaultdict(int)
    for name, parts in sparse.items():
        layer, kind = layer_and_kind(name)
        per_layer[layer] += parts["indices"].numel()
        per_kind[kind] += parts["indices"].numel()
    entries = sum(p["indices"].numel() for p in sparse.values())
    file_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    return {
        "directory": str(adapter_dir),
        "format_version": int(config.get("format_version") or 1),
        "index_encoding": metadata.get("sam_peft_index_encoding", "int32/int64 indices (format 1)"),
        "values_dtype": metadata.get("sam_peft_values_dtype", "float32"),
        "file_bytes": file_bytes,
        "entries": entries,
        "bytes_per_entry": round(file_bytes / entries, 3) if entries else None,
        "entry_bytes": entry_bytes,
        "dense_params": sum(t.numel() for t in dense.values()),
        "dense_bytes": sum(t.numel() * t.element_size() for t in dense.values()),
        "tensors_with_delta": sum(1 for p in sparse.values() if p["indices"].numel()),
        "selection": config.get("selection"),
        "allocation": config.get("allocation"),
        "sparsity": config.get("sparsity") if _budgeted(config.get("selection")) else None,  # bitfit: every bias
        "base_model": config.get("base_model_name_or_path"),
        "base_architecture": config.get("base_architecture"),
        "base_fingerprint": config.get("base_fingerprint") or metadata.get("base_fingerprint"),
        "counts_match_config": counts.keys() == sparse.keys() and all(
            counts[n] == p["indices"].numel() for n, p in sparse.items()),
        "per_layer": dict(per_layer),
        "per_kind": dict(per_kind),
    }


def _budgeted(selection: str | None) -> bool:
    signal = SIGNALS.get(selection)
    return signal is None or signal.budgeted


def delta_from_adapter_dir(adapter_dir: str | Path):
    """A `SparseDelta` (sparse entries + dense head) from a saved sam-peft adapter directory."""
    config, tensors, _, _, _ = _read(adapter_dir)
    sparse, dense = split_entries(tensors)
    entries = {}
    for name, parts in sparse.items():
        if set(parts) != {"indices", "values"}:
            raise DeltaFileError(f"adapter file lacks the indices or values of '{name}'.")
        check_entries(name, parts["indices"], parts["values"], 2**62)
        entries[name] = (parts["indices"].long(), parts["values"].float())
    metadata = {k: v for k, v in identity_metadata(config).items() if k in METADATA_KEYS}
    return SparseDelta(entries, {}, dense, metadata)
