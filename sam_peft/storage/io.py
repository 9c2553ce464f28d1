"""Atomic file writes and checked safetensors reads."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import DeltaFileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A crash or an exception leaves either the old file or nothing, never a truncated file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        with open(tmp_path, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_path, target)
        with contextlib.suppress(OSError):  # make the rename durable where the platform allows it
            dir_fd = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    write_bytes_atomic(path, text.encode("utf-8"))


CHECKSUM_KEY = "sam_peft_checksums"
_DIGITS = 16


def _digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:_DIGITS]


def _tensor_digest(key: str, tensor: torch.Tensor) -> str:
    flat = tensor.detach().contiguous().cpu().reshape(-1)
    return _digest(key.encode(), str(tensor.dtype).encode(), str(list(tensor.shape)).encode(),
                   flat.view(torch.uint8).numpy().tobytes())


def checksums(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """SHA-256 digests (16 hex digits) of every tensor (name, dtype, shape, bytes), in sorted-name order, of the
    list of names, and of the metadata."""
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    return json.dumps({
        "names": _digest(json.dumps(sorted(tensors)).encode()),
        "tensors": [_tensor_digest(key, tensors[key]) for key in sorted(tensors)],
        "metadata": _digest(json.dumps(meta, sort_keys=True).encode()),
    }, separators=(",", ":"))


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Serialise `tensors` as safetensors, with checksums in the metadata, and write them atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = dict(metadata or {})
    metadata[CHECKSUM_KEY] = checksums(tensors, metadata)
    write_bytes_atomic(path, safetensors_bytes(tensors, metadata=metadata))


def verify_checksums(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Refuse a file whose tensors or metadata differ from the checksums written with it (if any)."""
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is None:  # a file from another writer: only the structural checks apply
        return
    try:
        expected = json.loads(recorded)
        expected_names, expected_meta = expected["names"], expected["metadata"]
        expected_tensors = list(expected["tensors"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DeltaFileError(f"{path} has unreadable checksums in its metadata; the file is corrupted.") from exc
    names = sorted(tensors)
    if _digest(json.dumps(names).encode()) != expected_names or len(expected_tensors) != len(names):
        raise DeltaFileError(f"{path} holds other tensors than it was written with; the file is corrupted or was "
                             "edited. Save the adapter again.")
    for key, digest in zip(names, expected_tensors):
        if _tensor_digest(key, tensors[key]) != digest:
            raise DeltaFileError(f"the bytes of '{key}' in {path} do not match the checksum written with the "
                                 "file; it is corrupted. Re-copy it or save the adapter again.")
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    if _digest(json.dumps(meta, sort_keys=True).encode()) != expected_meta:
        raise DeltaFileError(f"the metadata of {path} does not match the checksum written with the file; it was "
                             "edited or corrupted. Save the adapter again.")


def load_safetensors_checked(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file, turning any parse error into a `DeltaFileError` that names the file."""
    path = Path(path)
    if not path.is_file():
        raise DeltaFileError(f"{path} does not exist; pass the directory or file written by save_pretrained.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for truncated or garbled files
        raise DeltaFileError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc}); it is truncated or "
            "corrupted. Re-copy it or save the adapter again."
        ) from exc
    verify_checksums(path, tensors, metadata)
    return tensors, metadata


def reseal_safetensors(
    path: str | os.PathLike, metadata: dict[str, str],
    transform: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Re-write a safetensors file atomically with `metadata` added to its header, its tensors passed through
    `transform` (if given), and checksums of everything."""
    tensors, existing = load_safetensors_checked(path)
    existing.pop(CHECKSUM_KEY, None)
    if transform is not None:
        tensors = transform(tensors)
    save_safetensors_atomic(tensors, path, metadata={**existing, **metadata})
