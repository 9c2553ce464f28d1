"""The compact on-disk form of sparse entries (format version 2): each tensor's strictly increasing flat indices as
a uint8 stream of Rice-coded gaps, its values as float32 (exact), bfloat16 or float16.

The index stream of a tensor with k entries (k = the length of its values tensor) is, in this order:

* one byte: the Rice parameter L (0..62);
* the low L bits of each gap, packed (bit i of the stream is bit i % 8 of byte i // 8);
* the high part q = gap >> L of each gap in unary: q zero bits, then a one bit, packed the same way and padded
  with zero bits to a whole byte.

The gaps of x_0 < x_1 < ... are x_0 and x_i - x_(i-1) - 1 (all >= 0). L is chosen per tensor to minimise the
stream. Encoding and decoding are vectorised (numpy bit packing and cumulative sums); a malformed stream is refused
with a `DeltaFileError` naming it. The keys stay those of format 1 and of peft's state dict (one indices and one
values tensor per tuned tensor); a uint8 indices tensor is a stream, an int32/int64 one is format 1's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DeltaFileError
from .keys import PREFIX

INDEX_ENCODING = "rice-gaps"  # the `sam_peft_index_encoding` header value of format-2 files
VALUES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MAX_L = 62
_CHUNK = 1 << 20  # entries per chunk when (un)packing the low bits; a multiple of 8 keeps chunks byte-aligned


def check_values_dtype(values_dtype: str) -> str:
    """Return `values_dtype` if it is one of VALUES_DTYPES, else raise `ConfigError`."""
    if not isinstance(values_dtype, str) or values_dtype not in VALUES_DTYPES:
        raise ConfigError(f"values_dtype={values_dtype!r} is unknown; choose one of {list(VALUES_DTYPES)} "
                          "(float32 keeps the values exactly; the others halve their bytes and round them).")
    return values_dtype


# --------------------------------------------------------------------------- one tensor
def _gaps(indices: np.ndarray) -> np.ndarray:
    return np.diff(indices, prepend=np.int64(-1)) - 1


def _rice_parameter(gaps: np.ndarray) -> int:
    """The L in a window around log2(mean gap) that minimises k * L + sum(gap >> L) (the variable bits)."""
    centre = int(np.log2(float(gaps.mean()) + 1.0))
    best, best_bits = 0, None
    for L in range(max(0, centre - 5), min(_MAX_L, centre + 1) + 1):
        bits = gaps.size * L + int((gaps >> L).sum())
        if best_bits is None or bits < best_bits:
            best, best_bits = L, bits
    return best


def _pack_low_bits(gaps: np.ndarray, L: int) -> np.ndarray:
    if L == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(L, dtype=np.int64)
    parts = [np.packbits(((gaps[i : i + _CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1),
                         bitorder="little") for i in range(0, gaps.size, _CHUNK)]
    return np.concatenate(parts)


def _unpack_low_bits(data: np.ndarray, k: int, L: int) -> np.ndarray:
    if L == 0:
        return np.zeros(k, dtype=np.int64)
    weights = np.left_shift(np.int64(1), np.arange(L, dtype=np.int64))
    out = np.empty(k, dtype=np.int64)
    step = _CHUNK * L // 8  # bytes per chunk
    for n, i in enumerate(range(0, k, _CHUNK)):
        count = min(_CHUNK, k - i)
        bits = np.unpackbits(data[n * step : n * step + (count * L + 7) // 8], count=count * L, bitorder="little")
        out[i : i + count] = bits.reshape(count, L).astype(np.int64) @ weights
    return out


def encode_entries(name: str, indices: torch.Tensor, values: torch.Tensor, values_dtype: str = "float32"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 index stream, values as `values_dtype`) of one tensor's strictly increasing indices and values."""
    check_values_dtype(values_dtype)
    idx = indices.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if idx.size != values.numel():
        raise ValueError(f"'{name}' has {idx.size} indices but {values.numel()} values.")
    if idx.size and (idx[0] < 0 or (idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()))):
        raise ValueError(f"indices of '{name}' must be non-negative and strictly increasing to be encoded.")
    exact = values.detach().cpu().reshape(-1).float()
    stored = exact.to(VALUES_DTYPES[values_dtype])
    if values_dtype == "float16" and bool((torch.isfinite(exact) & ~torch.isfinite(stored.float())).any()):
        raise ConfigError(f"values of '{name}' exceed float16's range (±65504); save with values_dtype='bfloat16' "
                          "or 'float32'.")
    if not idx.size:
        return torch.zeros(1, dtype=torch.uint8), stored
    gaps = _gaps(idx)
    L = _rice_parameter(gaps)
    ones = np.cumsum((gaps >> L) + 1) - 1  # the position of each gap's terminating one bit
    unary_bits = np.zeros(int(ones[-1]) + 1, dtype=np.uint8)
    unary_bits[ones] = 1
    stream = np.concatenate([np.array([L], dtype=np.uint8), _pack_low_bits(gaps, L),
                             np.packbits(unary_bits, bitorder="little")])
    return torch.from_numpy(stream), stored


def decode_indices(name: str, stream: torch.Tensor, k: int, key: str | None = None) -> torch.Tensor:
    """The int64 indices of a stream holding k gaps; `DeltaFileError` naming tensor `name` (and the file's `key`)
    if it is malformed. Their range and order are checked by the caller (`check_entries`)."""
    def bad(problem: str) -> DeltaFileError:
        where = f"'{name}'" + (f" (file key '{key}')" if key else "")
        return DeltaFileError(f"the indices of {where} are not a valid encoded index stream ({problem}); the file "
                              "is corrupted. Re-copy it or save the delta again.")

    if stream.dim() != 1:
        raise bad(f"expected a 1-D uint8 tensor, got shape {list(stream.shape)}")
    data = stream.contiguous().numpy()
    if data.size < 1:
        raise bad("no Rice parameter byte")
    L = int(data[0])
    if L > _MAX_L or (k == 0 and L):
        raise bad(f"Rice parameter {L} for {k} entries")
    unary_start = 1 + (k * L + 7) // 8
    if unary_start > data.size:
        raise bad(f"{data.size} bytes, too short for the low bits of {k} gaps")
    unary = data[unary_start:]
    ones = np.flatnonzero(np.unpackbits(unary, bitorder="little"))
    if ones.size != k:
        raise bad(f"{ones.size} unary-coded gaps for {k} values")
    if k == 0:
        return torch.zeros(0, dtype=torch.int64)
    if unary.size != int(ones[-1]) // 8 + 1:
        raise bad("bytes after the last gap")
    high = np.diff(ones, prepend=np.int64(-1)) - 1
    if int(high.max()) >= 1 << (63 - L):
        raise bad("a gap beyond the int64 range")
    gaps = (high.astype(np.int64) << L) | _unpack_low_bits(data[1:unary_start], k, L)
    return torch.from_numpy(np.cumsum(gaps + 1) - 1)  # an overflow wraps and breaks the order: the caller refuses it


# --------------------------------------------------------------------------- whole files
@dataclass(frozen=True)
class KeyScheme:
    """How a file names a tensor's sparse parts: `split(key)` gives (template, kind) for a key of kind "indices" or
    "values" (the template holds a NUL where the kind goes), else None."""

    split: Callable[[str], tuple[str, str] | None]
    name: Callable[[str], str]  # the parameter's name in the base model, from a template

    @staticmethod
    def join(template: str, kind: str) -> str:
        return template.replace("\0", kind)


_KINDS = ("indices", "values")


def _split_adapter(key: str) -> tuple[str, str] | None:
    for kind in _KINDS:
        marker = f".{PREFIX}{kind}."
        if marker in key:
            return key.replace(marker, f".{PREFIX}\0.", 1), kind
    return None


def _split_delta(key: str) -> tuple[str, str] | None:
    head, _, kind = key.rpartition(".")
    return (f"{head}.\0", kind) if key.startswith("sparse.") and head and kind in _KINDS else None


ADAPTER_KEYS = KeyScheme(  # [base_model.model.]<module>.sparsediff_<kind>.<parameter> (peft's keys)
    _split_adapter, lambda t: t.removeprefix("base_model.model.").replace(f".{PREFIX}\0.", ".", 1))
DELTA_KEYS = KeyScheme(_split_delta, lambda t: t.removeprefix("sparse.").removesuffix(".\0"))  # sparse.<name>.<kind>


def _pairs(tensors: dict[str, torch.Tensor], scheme: KeyScheme) -> dict[str, dict[str, str]]:
    pairs: dict[str, dict[str, str]] = {}
    for key in tensors:
        parts = scheme.split(key)
        if parts is not None:
            pairs.setdefault(parts[0], {})[parts[1]] = key
    return pairs


def encode_tensors(tensors: dict[str, torch.Tensor], scheme: KeyScheme, values_dtype: str = "float32"
                   ) -> dict[str, torch.Tensor]:
    """A file's tensors with every (indices, values) pair encoded (index stream, values as `values_dtype`)."""
    out = dict(tensors)
    for template, pair in _pairs(tensors, scheme).items():
        if set(pair) != set(_KINDS):
            raise ValueError(f"'{scheme.join(template, 'indices')}' needs both its indices and values to be "
                             f"encoded; got only {sorted(pair)}.")
        out[pair["indices"]], out[pair["values"]] = encode_entries(
            pair["indices"], tensors[pair["indices"]], tensors[pair["values"]], values_dtype)
    return out


def decode_tensors(tensors: dict[str, torch.Tensor], scheme: KeyScheme) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A file's tensors with every index stream decoded into int64 indices and half-precision values widened to
    float32, and the dtypes the values were stored in. Format 1's int32/int64 indices pass unchanged; a malformed
    stream, or one without its values, raises `DeltaFileError` naming it."""
    out, dtypes = dict(tensors), set()
    for template, pair in _pairs(tensors, scheme).items():
        values = tensors.get(pair.get("values", ""))
        if values is not None and values.dtype in (torch.bfloat16, torch.float16, torch.float32):
            dtypes.add(str(values.dtype).removeprefix("torch."))
            out[pair["values"]] = values.float()
        indices = tensors.get(pair.get("indices", ""))
        if indices is None or indices.dtype != torch.uint8:
            continue
        if values is None or values.dim() != 1:
            raise DeltaFileError(f"the indices of '{scheme.name(template)}' ('{pair['indices']}') are an encoded "
                                 "index stream without a 1-D values tensor "
                                 f"'{scheme.join(template, 'values')}' giving its number of entries; the file is "
                                 "corrupted.")
        out[pair["indices"]] = decode_indices(scheme.name(template), indices, values.numel(), key=pair["indices"])
    return out, dtypes


def encoding_metadata(values_dtype: str) -> dict[str, str]:
    """The header metadata that marks a format-2 file's encoding."""
    return {"sam_peft_index_encoding": INDEX_ENCODING, "sam_peft_values_dtype": check_values_dtype(values_dtype)}
