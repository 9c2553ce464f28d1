"""The compact on-disk form of sparse entries (format version 2): each tensor's strictly increasing flat indices as
a uint8 stream of coded gaps, its values as float32 (exact), bfloat16 or float16.

The gaps of x_0 < x_1 < ... are x_0 and x_i - x_(i-1) - 1 (all >= 0). A tensor's stream starts with two bytes,
the code and its parameter, then k, the number of entries, as a LEB128 varint (it must equal the length of the
tensor's values), and codes every gap with one of two codes, the one that gives the shorter stream:

* code 0, Rice with parameter L: the low L bits of each gap (fixed width), then the high part q = gap >> L of each
  gap in unary (q zero bits, then a one bit). Near-optimal for geometric gaps (entries spread evenly).
* code 1, exponential Golomb of order m: each gap's bucket b = floor(log2((gap >> m) + 1)) in unary, then each
  gap's b + m suffix bits s = (((gap >> m) + 1 - 2**b) << m) | (gap mod 2**m). Far shorter for clustered
  entries (runs of neighbours and long jumps, as SAM selects).

Each part is a bit stream packed into whole bytes (bit i of a part is bit i % 8 of its byte i // 8; the last byte
is padded with zero bits). The parameter is chosen per tensor to minimise the stream. Encoding and decoding are
vectorised (numpy bit packing, cumulative sums, segment sums); a malformed stream is refused with a
`DeltaFileError` naming it. The keys stay those of format 1 and of peft's state dict (one indices and one values
tensor per tuned tensor); a uint8 indices tensor is a stream, an int32/int64 one is format 1's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, DeltaFileError
from .keys import PREFIX

INDEX_ENCODING = "coded-gaps"  # the `sam_peft_index_encoding` header value of format-2 files
VALUES_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INDEX_CODES = {0: "rice", 1: "exp-golomb"}
_MAX_PARAMETER = 62
_CHUNK = 1 << 20  # entries per chunk when (un)packing variable-width bits (bounds the temporary arrays)


def check_values_dtype(values_dtype: str) -> str:
    """Return `values_dtype` if it is one of VALUES_DTYPES, else raise `ConfigError`."""
    if not isinstance(values_dtype, str) or values_dtype not in VALUES_DTYPES:
        raise ConfigError(f"values_dtype={values_dtype!r} is unknown; choose one of {list(VALUES_DTYPES)} "
                          "(float32 keeps the values exactly; the others halve their bytes and round them).")
    return values_dtype


# --------------------------------------------------------------------------- bit streams
def _floor_log2(v: np.ndarray) -> np.ndarray:
    """floor(log2(v)) of int64 v >= 1, exact (the float estimate corrected by one either way)."""
    b = np.floor(np.log2(v.astype(np.float64))).astype(np.int64)
    b -= (np.left_shift(np.int64(1), b) > v).astype(np.int64)
    b += ((b < 62) & (np.left_shift(np.int64(1), np.minimum(b + 1, 62)) <= v)).astype(np.int64)
    return b


def _pack_unary(counts: np.ndarray) -> np.ndarray:
    ones = np.cumsum(counts + 1) - 1  # each count's terminating one bit
    bits = np.zeros(int(ones[-1]) + 1 if counts.size else 0, dtype=np.uint8)
    bits[ones] = 1
    return np.packbits(bits, bitorder="little")


def _pack_bits(numbers: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The low widths[i] bits of numbers[i], least significant first, concatenated and packed."""
    offsets = np.cumsum(widths) - widths
    bits = np.zeros(int(widths.sum()), dtype=np.uint8)
    for i in range(0, numbers.size, _CHUNK):
        w, o = widths[i : i + _CHUNK], offsets[i : i + _CHUNK]
        owner = np.repeat(np.arange(w.size), w)
        if owner.size:
            pos = np.arange(owner.size, dtype=np.int64) - np.repeat(o - o[0], w)
            bits[o[0] : o[0] + owner.size] = (numbers[i : i + _CHUNK][owner] >> pos) & 1
    return np.packbits(bits, bitorder="little")


def _unpack_bits(bits: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The inverse of `_pack_bits` on the unpacked bits."""
    offsets = np.cumsum(widths) - widths
    out = np.zeros(widths.size, dtype=np.int64)
    for i in range(0, widths.size, _CHUNK):
        w, o = widths[i : i + _CHUNK], offsets[i : i + _CHUNK]
        n = int(w.sum())
        if not n:
            continue
        pos = np.arange(n, dtype=np.int64) - np.repeat(o - o[0], w)
        contributions = np.append(bits[o[0] : o[0] + n].astype(np.int64) << pos, np.int64(0))
        sums = np.add.reduceat(contributions, o - o[0])
        out[i : i + _CHUNK] = np.where(w > 0, sums, 0)
    return out


# --------------------------------------------------------------------------- one tensor
def _gaps(indices: np.ndarray) -> np.ndarray:
    return np.diff(indices, prepend=np.int64(-1)) - 1


def _window(gaps: np.ndarray) -> range:
    centre = int(np.log2(float(gaps.mean()) + 1.0))
    return range(0, min(_MAX_PARAMETER, centre + 1) + 1)


def _rice(gaps: np.ndarray) -> tuple[int, int]:
    """(bits, L) of the best Rice parameter."""
    return min((gaps.size * (L + 1) + int((gaps >> L).sum()), L) for L in _window(gaps))


def _exp_golomb(gaps: np.ndarray) -> tuple[int, int]:
    """(bits, m) of the best exponential-Golomb order."""
    return min((int((2 * _floor_log2((gaps >> m) + 1) + 1).sum()) + gaps.size * m, m) for m in _window(gaps))


def encode_indices(indices: np.ndarray) -> np.ndarray:
    """The uint8 stream of strictly increasing non-negative int64 indices."""
    count = _varint(indices.size)
    if not indices.size:
        return np.concatenate([np.zeros(2, dtype=np.uint8), count])
    gaps = _gaps(indices)
    rice_bits, L = _rice(gaps)
    golomb_bits, m = _exp_golomb(gaps)
    if rice_bits <= golomb_bits:
        body = [_pack_bits(gaps, np.full(gaps.size, L, dtype=np.int64)), _pack_unary(gaps >> L)]
        head = [0, L]
    else:
        v = (gaps >> m) + 1
        b = _floor_log2(v)
        suffix = ((v - np.left_shift(np.int64(1), b)) << m) | (gaps & ((1 << m) - 1))
        body = [_pack_unary(b), _pack_bits(suffix, b + m)]
        head = [1, m]
    return np.concatenate([np.array(head, dtype=np.uint8), count, *body])


def _varint(number: int) -> np.ndarray:
    """LEB128: 7 bits per byte, least significant first, the high bit set on every byte but the last."""
    out = []
    while True:
        out.append((number & 0x7F) | (0x80 if number > 0x7F else 0))
        number >>= 7
        if not number:
            return np.array(out, dtype=np.uint8)


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
    return torch.from_numpy(encode_indices(idx)), stored


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
    if data.size < 2:
        raise bad(f"{data.size} bytes, shorter than its 2-byte code and parameter")
    code, parameter = int(data[0]), int(data[1])
    count, offset = 0, 2
    for shift in range(0, 70, 7):  # the LEB128 count (at most 10 bytes)
        if offset >= data.size:
            raise bad("the entry count is cut off")
        byte = int(data[offset])
        count, offset = count | (byte & 0x7F) << shift, offset + 1
        if not byte & 0x80:
            break
    else:
        raise bad("the entry count runs over 10 bytes")
    if count != k:
        raise bad(f"it holds {count} gaps but its values tensor has {k} values")
    if code not in INDEX_CODES or parameter > _MAX_PARAMETER or (k == 0 and (code or parameter)):
        raise bad(f"code {code} with parameter {parameter} for {k} entries")
    if k == 0:
        if data.size != offset:
            raise bad(f"{data.size - offset} bytes of gaps for no entries")
        return torch.zeros(0, dtype=torch.int64)
    bits = np.unpackbits(data[offset:], bitorder="little")
    if code == 0:
        L = parameter
        low_bits = (k * L + 7) // 8 * 8
        if low_bits > bits.size or bits[k * L : low_bits].any():
            raise bad(f"{data.size} bytes, too short for the low bits of {k} gaps or not zero-padded")
        ones = np.flatnonzero(bits[low_bits:])
        if ones.size != k:
            raise bad(f"{ones.size} unary-coded gaps for {k} values")
        if bits.size - low_bits != (int(ones[-1]) // 8 + 1) * 8:
            raise bad("bytes after the last gap")
        high = np.diff(ones, prepend=np.int64(-1)) - 1
        if int(high.max()) >= 1 << (63 - L):
            raise bad("a gap beyond the int64 range")
        gaps = (high << L) | _unpack_bits(bits, np.full(k, L, dtype=np.int64))
    else:
        m = parameter
        ones = np.flatnonzero(bits)[:k]
        if ones.size != k:
            raise bad(f"{ones.size} unary-coded buckets for {k} values")
        start = (int(ones[-1]) // 8 + 1) * 8
        if bits[int(ones[-1]) + 1 : start].any():
            raise bad("unary buckets not zero-padded")
        buckets = np.diff(ones, prepend=np.int64(-1)) - 1
        if int(buckets.max()) > _MAX_PARAMETER - m:
            raise bad("a gap beyond the int64 range")
        widths = buckets + m
        total = int(widths.sum())
        if bits.size - start != (total + 7) // 8 * 8 or bits[start + total :].any():
            raise bad(f"{(bits.size - start) // 8} bytes of suffixes where {(total + 7) // 8} are coded")
        suffix = _unpack_bits(bits[start:], widths)
        gaps = ((np.left_shift(np.int64(1), buckets) - 1 + (suffix >> m)) << m) | (suffix & ((1 << m) - 1))
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
