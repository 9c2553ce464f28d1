"""Checksums: every file sam-peft writes records a digest of each tensor and of its metadata, and any change
to a file written with them is refused naming what changed; without them the same damage loads undetected."""

from __future__ import annotations

import json
import re
import struct

import pytest
import torch
from conftest import make_bert
from safetensors.torch import load as decode_safetensors
from safetensors.torch import load_file, save_file
from safetensors.torch import save as encode_safetensors
from saved_files import (
    KEYS,
    NAME,
    assert_same,
    changed_keys,
    file_metadata,
    file_of,
    flip,
    layout,
    load_bytes,
    rebuild,
    strip_checksum,
    without_checksum,
)

import sam_peft
from sam_peft.storage.io import CHECKSUM_KEY, checksums


def _leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def test_written_files_carry_checksums_of_every_tensor_and_the_metadata(saved):
    for raw, tensors in ((saved.raw, saved.tensors), (saved.delta_raw, saved.delta_tensors)):
        metadata = file_metadata(raw)
        # Written from exactly the tensors and metadata in the file ...
        assert metadata[CHECKSUM_KEY] == checksums(tensors, metadata)
        digests = _leaves(json.loads(metadata[CHECKSUM_KEY]))
        # ... as 16-hex SHA-256 digests, at least one per tensor (the name is part of each) and one of the metadata.
        assert all(isinstance(d, str) and re.fullmatch("[0-9a-f]{16}", d) for d in digests), digests
        assert len(set(digests)) >= len(tensors) + 1


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
def test_file_without_checksums_loads_the_same_content(saved, tmp_path, fmt):
    raw = saved.raw if fmt == "adapter" else saved.delta_raw
    plain = strip_checksum(raw)
    assert CHECKSUM_KEY not in file_metadata(plain)
    assert_same(load_bytes(saved, tmp_path, fmt, plain), saved.expected if fmt == "adapter" else saved.delta_expected)
    if fmt == "delta":
        assert sam_peft.SparseDelta.load(tmp_path / "delta.safetensors").metadata == saved.delta_loaded.metadata


def _value_bit(raw: bytes, keys) -> tuple[bytes, list[str]]:
    """The lowest mantissa bit of the first value: it stays finite, so only the checksum can tell."""
    start, _ = layout(raw)[2][keys.val]
    return flip(raw, start, 0), [keys.val]


def _index_bit(raw: bytes, keys) -> tuple[bytes, list[str]]:
    """Bit 0 of an index whose neighbours leave room for it: still in range and strictly increasing."""
    start, end = layout(raw)[2][keys.idx]
    indices = struct.unpack(f"<{(end - start) // 4}i", raw[start:end])
    bounds = [-1, *indices, 1024]
    position = next(i for i, index in enumerate(indices) if bounds[i] < index ^ 1 < bounds[i + 2])
    return flip(raw, start + 4 * position, 0), [keys.idx]


def _head_bit(raw: bytes, keys) -> tuple[bytes, list[str]]:
    start, _ = layout(raw)[2][keys.head]
    return flip(raw, start, 0), [keys.head]


def _swap_values(raw: bytes, keys) -> tuple[bytes, list[str]]:
    """Two value tensors of 51 float32 each trade places in the header."""
    _, header, _ = layout(raw)
    a, b = header[keys.val], header[keys.other_val]
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    return rebuild(raw, header), [keys.val, keys.other_val]


def _edit_metadata(key: str, value: str):
    def edit(raw: bytes, keys) -> tuple[bytes, list[str]]:
        _, header, _ = layout(raw)
        assert header["__metadata__"][key] != value
        header["__metadata__"][key] = value
        return rebuild(raw, header), []

    return edit


def _add_tensor(raw: bytes, keys) -> tuple[bytes, list[str]]:
    extra = f"{keys.head}.extra"
    return encode_safetensors({**decode_safetensors(raw), extra: torch.zeros(3)}, metadata=file_metadata(raw)), [extra]


def _remove_tensor(raw: bytes, keys) -> tuple[bytes, list[str]]:
    tensors = decode_safetensors(raw)
    del tensors[keys.val]
    return encode_safetensors(tensors, metadata=file_metadata(raw)), [keys.val]


def _garble_checksums(raw: bytes, keys) -> tuple[bytes, list[str]]:
    _, header, _ = layout(raw)
    header["__metadata__"][CHECKSUM_KEY] = header["__metadata__"][CHECKSUM_KEY][:-2]
    return rebuild(raw, header), []


TENSOR_MISMATCH, METADATA_MISMATCH = "do not match the checksum", "the metadata of {path} does not match the checksum"
OTHER_TENSORS, UNREADABLE = "holds other tensors than it was written with", "has unreadable checksums"
# case: (damage the bytes of a checksum-carrying file, what the refusal says)
CHECKSUM_CASES = {
    "value bit": (_value_bit, TENSOR_MISMATCH),
    "index bit": (_index_bit, TENSOR_MISMATCH),
    "head bit": (_head_bit, TENSOR_MISMATCH),
    "swapped tensors": (_swap_values, TENSOR_MISMATCH),
    "selection edited": (_edit_metadata("selection", "fisher"), METADATA_MISMATCH),
    "base_fingerprint edited": (_edit_metadata("base_fingerprint", "0" * 32), METADATA_MISMATCH),
    "tensor added": (_add_tensor, OTHER_TENSORS),
    "tensor removed": (_remove_tensor, OTHER_TENSORS),
    "checksums garbled": (_garble_checksums, UNREADABLE),
}


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
@pytest.mark.parametrize("case", list(CHECKSUM_CASES))
def test_checksums_refuse_any_change_naming_it(saved, tmp_path, fmt, case):
    damage, words = CHECKSUM_CASES[case]
    data, names = damage(saved.raw if fmt == "adapter" else saved.delta_raw, KEYS[fmt])
    with pytest.raises(sam_peft.DeltaFileError) as info:
        load_bytes(saved, tmp_path, fmt, data)
    message, path = str(info.value), file_of(saved, tmp_path, fmt)
    assert str(path) in message and words.format(path=path) in message, message
    if words == TENSOR_MISMATCH:  # named: the first damaged tensor in sorted order
        assert f"the bytes of '{min(names)}' in {path} do not match" in message, message


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
@pytest.mark.parametrize("case", ["value bit", "index bit", "head bit", "swapped tensors"])
def test_without_checksums_the_same_damage_loads_undetected(saved, tmp_path, fmt, case):
    """The design limit the checksums close: from a writer without checksums, the same bytes are well formed, so
    they load, differing from the saved adapter in exactly the damaged tensors."""
    data, names = CHECKSUM_CASES[case][0](saved.raw if fmt == "adapter" else saved.delta_raw, KEYS[fmt])
    loaded = load_bytes(saved, tmp_path, fmt, strip_checksum(data))
    assert changed_keys(loaded, saved.expected if fmt == "adapter" else saved.delta_expected) == set(names)


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
def test_damaged_checksum_key_name_loads_the_saved_content_or_is_refused(saved, tmp_path, fmt):
    raw = saved.raw if fmt == "adapter" else saved.delta_raw
    start = raw.index(json.dumps(CHECKSUM_KEY).encode(), 8) + 1
    data = flip(raw, start + len("sam_peft_ch"), 0)  # 'e' -> 'd'
    assert CHECKSUM_KEY not in file_metadata(data)
    try:
        loaded = load_bytes(saved, tmp_path, fmt, data)
    except sam_peft.SamPeftError:
        return
    assert_same(loaded, saved.expected if fmt == "adapter" else saved.delta_expected)
    if fmt == "delta":
        assert sam_peft.SparseDelta.load(tmp_path / "delta.safetensors").metadata == saved.delta_loaded.metadata


def test_delta_metadata_tampering_is_caught_on_apply(saved, tmp_path):
    """From a writer without checksums, shapes and fingerprint are unchecked metadata: loading takes them, applying
    refuses them. (With the checksums, loading refuses them: test_checksums_refuse_any_change_naming_it.)"""
    for key, value in (("shapes", json.dumps({**saved.delta.shapes, NAME: [33, 32]})), ("base_fingerprint", "0" * 32)):
        path = tmp_path / f"{key}.safetensors"
        save_file(load_file(str(saved.delta_path)), str(path), metadata={**without_checksum(saved.delta_metadata),
                                                                         key: value})
        delta = sam_peft.SparseDelta.load(path)
        assert (delta.shapes[NAME] == [33, 32]) if key == "shapes" else (delta.metadata[key] == value)
        with pytest.raises(sam_peft.BaseModelMismatchError):
            delta.apply_to(make_bert())
