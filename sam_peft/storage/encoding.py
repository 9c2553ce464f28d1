"""The compact on-disk form of a tensor's sparse entries (format version 2): one uint8 record per tensor holding
its values and its Rice-coded index gaps.

A record is, in this order (all little-endian):

* a 16-byte header: the number of entries k (uint64), the values dtype code (uint8: 0 float32, 1 bfloat16,
  2 float16), the Rice parameter L (uint8, 0..62) and 6 zero bytes;
* the k values in that dtype;
* the low L bits of each gap, packed (bit i of the stream is bit i % 8 of byte i // 8);
* the high part q = gap >> L of each gap in unary: q zero bits, then a one bit, packed the same way and padded
  with zero bits to a whole byte.

The gaps of the strictly increasing flat indices x_0 < x_1 < ... are x_0 and x_i - x_(i-1) - 1 (all >= 0). L is
chosen per tensor to minimise the record's size. Encoding and decoding are vectorised (numpy bit packing and
cumulative sums); a record that is malformed in any way is refused with a `DeltaFileError` naming it.
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
_CODES = {"float32": 0, "bfloat16": 1, "float16": 2}
_NAMES = {code: name for name, code in _CODES.items()}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
_HEADER = 16
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
                   ) -> torch.Tensor:
    """The uint8 record of one tensor's (strictly increasing indices, values), values stored as `values_dtype`."""
    check_values_dtype(values_dtype)
    idx = indices.detach().cpu().reshape(-1).to(torch.int64).numpy()
    if idx.size != values.numel():
        raise ValueError(f"'{name}' has {idx.size} indices but {values.numel()} values.")
    if idx.size and (idx[0] < 0 or (idx.size > 1 and not bool((idx[1:] > idx[:-1]).all()))):
        raise ValueError(f"indices of '{name}' must be non-negative and strictly increasing to be encoded.")
    stored = values.detach().cpu().reshape(-1).float().to(VALUES_DTYPES[values_dtype])
    if values_dtype == "float16" and bool((torch.isfinite(values.detach().cpu().float())
                                           & ~torch.isfinite(stored.float())).any()):
        raise ConfigError(f"values of '{name}' exceed float16's range (±65504); save with values_dtype='bfloat16' "
                          "or 'float32'.")
    value_bytes = (stored.view(torch.int16) if stored.element_size() == 2 else stored.view(torch.int32)).numpy()
    value_bytes = value_bytes.astype(value_bytes.dtype.newbyteorder("<"), copy=False).view(np.uint8)
    k = idx.size
    gaps = _gaps(idx) if k else np.zeros(0, dtype=np.int64)
    L = _rice_parameter(gaps) if k else 0
    header = np.zeros(_HEADER, dtype=np.uint8)
    header[:8] = np.array([k], dtype="<u8").view(np.uint8)
    header[8], header[9] = _CODES[values_dtype], L
    if k:
        high = gaps >> L
        ones = np.cumsum(high + 1) - 1  # the position of each gap's terminating one bit
        unary_bits = np.zeros(int(ones[-1]) + 1, dtype=np.uint8)
        unary_bits[ones] = 1
        unary = np.packbits(unary_bits, bitorder="little")
    else:
        unary = np.zeros(0, dtype=np.uint8)
    record = np.concatenate([header, value_bytes, _pack_low_bits(gaps, L), unary])
    return torch.from_numpy(record)


def decode_entries(name: str, record: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(int64 indices, float32 values, values dtype name) of one record; `DeltaFileError` naming `name` if the
    record is malformed. The indices' range and order are checked by the caller (`check_entries`)."""
    def bad(problem: str) -> DeltaFileError:
        return DeltaFileError(f"the sparse entries '{name}' are not a valid encoded record ({problem}); the file "
                              "is corrupted. Re-copy it or save the delta again.")

    if record.dtype != torch.uint8 or record.dim() != 1:
        raise bad(f"expected a 1-D uint8 tensor, got {record.dtype} with shape {list(record.shape)}")
    data = record.contiguous().numpy()
    if data.size < _HEADER:
        raise bad(f"{data.size} bytes, shorter than its {_HEADER}-byte header")
    k = int(data[:8].view("<u8")[0])
    code, L = int(data[8]), int(data[9])
    if code not in _NAMES:
        raise bad(f"unknown values dtype code {code}")
    if L > _MAX_L or data[10:_HEADER].any():
        raise bad(f"Rice parameter {L} or reserved header bytes {data[10:_HEADER].tolist()} out of range")
    values_dtype = _NAMES[code]
    itemsize = _ITEMSIZE[values_dtype]
    if k > (data.size - _HEADER) // itemsize:
        raise bad(f"it claims {k} entries but holds {data.size} bytes")
    low_start = _HEADER + k * itemsize
    unary_start = low_start + (k * L + 7) // 8
    if unary_start > data.size:
        raise bad(f"{data.size} bytes, too short for {k} values and their low bits")
    raw_values = data[_HEADER:low_start]
    if values_dtype == "float32":
        values = torch.from_numpy(raw_values.view("<f4").astype(np.float32))
    elif values_dtype == "float16":
        values = torch.from_numpy(raw_values.view("<f2").astype(np.float16)).float()
    else:
        values = torch.from_numpy(raw_values.view("<i2").astype(np.int16)).view(torch.bfloat16).float()
    unary = data[unary_start:]
    ones = np.flatnonzero(np.unpackbits(unary, bitorder="little"))
    if ones.size != k:
        raise bad(f"{ones.size} unary-coded gaps for {k} entries")
    if k == 0:
        if L:
            raise bad(f"Rice parameter {L} without entries")
        return torch.zeros(0, dtype=torch.int64), values, values_dtype
    if unary.size != int(ones[-1]) // 8 + 1:
        raise bad("bytes after the last gap")
    high = np.diff(ones, prepend=np.int64(-1)) - 1
    if int(high.max()) >= 1 << (63 - L):
        raise bad("a gap beyond the int64 range")
    gaps = (high.astype(np.int64) << L) | _unpack_low_bits(data[low_start:unary_start], k, L)
    indices = np.cumsum(gaps + 1) - 1  # an overflow would wrap and break the order, which the caller refuses
    return torch.from_numpy(indices), values, values_dtype


# --------------------------------------------------------------------------- whole files
@dataclass(frozen=True)
class KeyScheme:
    """How a file names a tensor's sparse parts: `split(key)` gives (template, kind) for a key of kind "indices",
    "values" or "entries" (the template holds a NUL where the kind goes), else None."""

    split: Callable[[str], tuple[str, str] | None]

    @staticmethod
    def join(template: str, kind: str) -> str:
        return template.replace("\0", kind)


_KINDS = ("indices", "values", "entries")


def _split_adapter(key: str) -> tuple[str, str] | None:
    for kind in _KINDS:
        marker = f".{PREFIX}{kind}."
        if marker in key:
            return key.replace(marker, f".{PREFIX}\0.", 1), kind
    return None


def _split_delta(key: str) -> tuple[str, str] | None:
    head, _, kind = key.rpartition(".")
    return (f"{head}.\0", kind) if key.startswith("sparse.") and head and kind in _KINDS else None


ADAPTER_KEYS = KeyScheme(_split_adapter)  # <module>.sparsediff_<kind>.<parameter> (peft's keys)
DELTA_KEYS = KeyScheme(_split_delta)  # sparse.<parameter>.<kind> (SparseDelta files)


def encode_tensors(tensors: dict[str, torch.Tensor], scheme: KeyScheme, values_dtype: str = "float32"
                   ) -> dict[str, torch.Tensor]:
    """Every (indices, values) pair of a file's tensors replaced by its record (kind "entries"); the rest as is.
    Records already encoded are kept."""
    out, pairs = {}, {}
    for key, tensor in tensors.items():
        parts = scheme.split(key)
        if parts is None or parts[1] == "entries":
            out[key] = tensor
        else:
            pairs.setdefault(parts[0], {})[parts[1]] = tensor
    for template, pair in pairs.items():
        key = scheme.join(template, "entries")
        if set(pair) != {"indices", "values"} or key in out:
            raise ValueError(f"'{key}' needs exactly its indices and values to be encoded; got {sorted(pair)}"
                             + (" and a record" if key in out else "") + ".")
        out[key] = encode_entries(key, pair["indices"], pair["values"], values_dtype)
    return out


def decode_tensors(tensors: dict[str, torch.Tensor], scheme: KeyScheme) -> tuple[dict[str, torch.Tensor], set[str]]:
    """A file's tensors with every record replaced by its int64 indices and float32 values (format 1's keys), and
    the values dtypes the records were stored in. Tensors of format 1 pass unchanged."""
    out, dtypes = {}, set()
    for key, tensor in tensors.items():
        parts = scheme.split(key)
        if parts is None or parts[1] != "entries":
            out[key] = tensor
            continue
        indices, values, values_dtype = decode_entries(key, tensor)
        dtypes.add(values_dtype)
        for kind, part in (("indices", indices), ("values", values)):
            target = scheme.join(parts[0], kind)
            if target in tensors:
                raise DeltaFileError(f"the file holds both the record '{key}' and '{target}'; it is corrupted.")
            out[target] = part
    return out, dtypes


def encoding_metadata(values_dtype: str) -> dict[str, str]:
    """The header metadata that marks a format-2 file's encoding."""
    return {"sam_peft_index_encoding": INDEX_ENCODING, "sam_peft_values_dtype": check_values_dtype(values_dtype)}
