"""Helpers for the tests that save a SAM adapter and read, damage and reload its files (validation, atomic
writes, damaged files, checksums, fuzzing, half precision); the saved adapter itself is conftest's `saved`.

Every safetensors file sam-peft writes (the peft adapter file and a `SparseDelta` file) carries checksums in its
metadata (`sam_peft.storage.io.CHECKSUM_KEY`: a digest of every tensor's name, dtype, shape and bytes, and one of
the rest of the metadata), verified on load before anything else. Files without that key (written by another tool)
get only the structural checks (indices in range and sorted, dtypes, lengths, finite values, counts, the head's
shape, dtype and finiteness). The structural tests therefore rewrite files without the checksum
(`without_checksum`), so the structural checks, not the checksum, are what they exercise; the checksum tests keep
it.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import make_bert
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load as decode_safetensors
from safetensors.torch import save as encode_safetensors
from safetensors.torch import save_file

import sam_peft
from sam_peft.storage.encoding import ADAPTER_KEYS, DELTA_KEYS, decode_tensors
from sam_peft.storage.io import CHECKSUM_KEY, load_safetensors_checked, save_safetensors_atomic

SPARSITY = 0.05
MODEL_FILE, CONFIG_FILE = "adapter_model.safetensors", "adapter_config.json"
PREFIX = "base_model.model."
# The tensor most deterministic cases tamper with: 1024 entries, 51 of them selected at p = 0.05.
NAME = "bert.encoder.layer.0.attention.self.query.weight"
IDX = f"{PREFIX}bert.encoder.layer.0.attention.self.query.sparsediff_indices.weight"
VAL = f"{PREFIX}bert.encoder.layer.0.attention.self.query.sparsediff_values.weight"
HEAD = f"{PREFIX}classifier.weight"
# A tensor with as many entries as NAME (51), to swap with it.
OTHER = "bert.encoder.layer.0.attention.self.key.weight"
# The keys of those tensors in each file format.
KEYS = {
    "adapter": SimpleNamespace(idx=IDX, val=VAL, head=HEAD,
                               other_val=f"{PREFIX}bert.encoder.layer.0.attention.self.key.sparsediff_values.weight"),
    "delta": SimpleNamespace(idx=f"sparse.{NAME}.indices", val=f"sparse.{NAME}.values", head="dense.classifier.weight",
                             other_val=f"sparse.{OTHER}.values"),
}



def decoded_file(path) -> dict[str, torch.Tensor]:
    """The tensors of a saved adapter or SparseDelta file with format-2 records decoded into indices and values."""
    tensors, metadata = load_safetensors_checked(path)
    return decode_tensors(tensors, DELTA_KEYS if metadata.get("kind") == "sam-peft-sparse-delta" else ADAPTER_KEYS)[0]


def as_format1(path: Path) -> Path:
    """Rewrite a saved adapter directory or SparseDelta file in format 1, as sam-peft before format 2 wrote it:
    int32 (int64 for tensors of >= 2**31 entries) indices and float32 values per tensor, `sam_peft_format` 1 and no
    encoding marks in the header (checksums of the format-1 tensors), and `format_version` 1 without `values_dtype`
    in the adapter config."""
    path = Path(path)
    weights = path / MODEL_FILE if path.is_dir() else path
    tensors, metadata = load_safetensors_checked(weights)
    delta = metadata.get("kind") == "sam-peft-sparse-delta"
    tensors, _ = decode_tensors(tensors, DELTA_KEYS if delta else ADAPTER_KEYS)
    sizes = json.loads(metadata["shapes"]) if delta else None
    for key, tensor in tensors.items():
        if key.endswith(".indices") if delta else ".sparsediff_indices." in key:
            numel = 1
            for dim in sizes[key.removeprefix("sparse.").removesuffix(".indices")] if delta else ():
                numel *= dim
            tensors[key] = tensor.to(torch.int64 if numel >= 2**31 else torch.int32)
    metadata = {k: v for k, v in metadata.items()
                if k not in (CHECKSUM_KEY, "sam_peft_index_encoding", "sam_peft_values_dtype")}
    save_safetensors_atomic(tensors, weights, metadata={**metadata, "sam_peft_format": "1"})
    if path.is_dir():
        config = json.loads((path / CONFIG_FILE).read_text())
        config.pop("values_dtype", None)
        (path / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 1}, indent=2, sort_keys=True))
    return path


def randomize(model, seed: int = 0) -> None:
    """Non-zero values and a perturbed head, so that every saved number matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sparsediff_values." in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=g) * 0.1)


def canonical(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """A saved tensor as the loader holds it: indices int64 (for comparison), values float32, head as is."""
    if ".sparsediff_indices." in key or (key.startswith("sparse.") and key.endswith(".indices")):
        return tensor.long()
    if ".sparsediff_values." in key or (key.startswith("sparse.") and key.endswith(".values")):
        return tensor.float()
    return tensor


def content(model) -> dict[str, torch.Tensor]:
    """What a PeftModel would save, keyed like the file."""
    return {k: canonical(k, v.detach().cpu()) for k, v in get_peft_model_state_dict(model).items()}


def delta_content(delta) -> dict[str, torch.Tensor]:
    """The tensors of a SparseDelta, keyed like its file."""
    out = {}
    for name, (indices, values) in delta.entries.items():
        out[f"sparse.{name}.indices"], out[f"sparse.{name}.values"] = indices, values
    out.update({f"dense.{name}": tensor for name, tensor in delta.dense.items()})
    return out


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def changed_keys(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> set[str]:
    return (actual.keys() ^ expected.keys()) | {
        k for k in actual.keys() & expected.keys() if not torch.equal(actual[k], expected[k])}


def base_weights(model) -> dict[str, torch.Tensor]:
    """The base parameters inside a PeftModel (wrapped layers and heads included), cloned."""
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if ".sparsediff_" not in n and ".modules_to_save." not in n}


def without_checksum(metadata: dict[str, str]) -> dict[str, str]:
    """The metadata as a writer without sam-peft's checksums (another tool) would store it."""
    return {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}


def file_metadata(raw: bytes) -> dict[str, str]:
    return dict(json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]]).get("__metadata__", {}))


def strip_checksum(raw: bytes) -> bytes:
    """The same tensors and metadata, written by a writer without checksums."""
    return encode_safetensors(decode_safetensors(raw), metadata=without_checksum(file_metadata(raw)))


class Saved(SimpleNamespace):
    """conftest's `saved` adapter and delta: their directory, bytes, tensors, metadata and expected content."""

    def __repr__(self) -> str:  # keeps hypothesis' reports short
        return "<saved adapter>"


def adapter_copy(saved, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(saved.dir, dest)
    return dest


def load_bytes(saved, tmp_path: Path, fmt: str, data: bytes) -> dict[str, torch.Tensor]:
    """Write `data` as the adapter file (beside the saved config) or as a SparseDelta file and load it; returns
    the loaded tensors keyed like the file."""
    if fmt == "adapter":
        directory = adapter_copy(saved, tmp_path / "adapter")
        (directory / MODEL_FILE).write_bytes(data)
        return content(PeftModel.from_pretrained(make_bert(), directory))
    path = tmp_path / "delta.safetensors"
    path.write_bytes(data)
    return delta_content(sam_peft.SparseDelta.load(path))


def file_of(saved, tmp_path: Path, fmt: str) -> Path:
    """The path load_bytes writes to."""
    return tmp_path / "adapter" / MODEL_FILE if fmt == "adapter" else tmp_path / "delta.safetensors"


def write_adapter(saved, dest: Path, tensors=None, config=None) -> Path:
    """A copy of the saved adapter; `tensors` are written as a writer without checksums would write them."""
    target = adapter_copy(saved, dest)
    if tensors is not None:
        save_file(tensors, str(target / MODEL_FILE), metadata=without_checksum(saved.metadata))
    if config is not None:
        (target / CONFIG_FILE).write_text(json.dumps(config))
    return target


def rewritten(saved, fmt: str, tensors: dict[str, torch.Tensor], checksum: bool = False) -> bytes:
    """`tensors` serialised with the saved file's metadata: by a writer without checksums (the default), or
    keeping the checksums written with the original file (which no longer match what was changed)."""
    metadata = saved.metadata if fmt == "adapter" else saved.delta_metadata
    return encode_safetensors(tensors, metadata=metadata if checksum else without_checksum(metadata))


def changed_tensors(saved, fmt: str = "adapter", **changes) -> dict[str, torch.Tensor]:
    source = saved.tensors if fmt == "adapter" else saved.delta_tensors
    tensors = {k: v.clone() for k, v in source.items()}
    for which, value in changes.items():
        key = getattr(KEYS[fmt], which)
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value(tensors[key])
    return tensors


def set_entry(position, value):
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[position] = value(t) if callable(value) else value
        return t

    return change


def swap01(t: torch.Tensor) -> torch.Tensor:
    return t[[1, 0, *range(2, t.numel())]]


def changed_config(saved, **changes) -> dict:
    config = copy.deepcopy(saved.config)
    for key, value in changes.items():
        config[key] = value(config[key]) if callable(value) else value
    return config


def checksum_error(message: str, path: Path, key: str, removed: bool = False) -> bool:
    """Whether `message` is the checksum's refusal of tensor `key` in `path`: its bytes, or (`removed`) the set of
    tensors, which the checksums record only as a digest of the names, so the refusal can't name the one missing."""
    if removed:
        return f"{path} holds other tensors than it was written with" in message
    return f"the bytes of '{key}' in {path} do not match the checksum" in message


# --------------------------------------------------------------------------- the bytes of a safetensors file


def layout(raw: bytes) -> tuple[int, dict, dict[str, tuple[int, int]]]:
    """(header length, header JSON, {tensor: (start, end) byte span in the file})."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    spans = {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
             for k, v in header.items() if k != "__metadata__"}
    return n, header, spans


def rebuild(raw: bytes, header: dict | bytes) -> bytes:
    """The file with another header (JSON, padded like safetensors does) and the same tensor bytes."""
    n = struct.unpack("<Q", raw[:8])[0]
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def flip(raw: bytes, offset: int, bit: int) -> bytes:
    data = bytearray(raw)
    data[offset] ^= 1 << bit
    return bytes(data)
