"""Format 2: each tuned tensor's indices as a uint8 stream of Rice-coded gaps beside its values; optional bfloat16 /
float16 values; format-1 files still load; newer formats are refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_batches, make_bert, sam_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load as decode_safetensors
from safetensors.torch import load_file
from saved_files import (
    CONFIG_FILE,
    MODEL_FILE,
    NAME,
    as_format1,
    assert_same,
    content,
    delta_content,
    file_metadata,
    flip,
    layout,
    randomize,
    strip_checksum,
)

import sam_peft
from sam_peft.deltas.adapter_dir import adapter_summary
from sam_peft.storage.encoding import ADAPTER_KEYS, decode_indices, decode_tensors, encode_entries
from sam_peft.storage.identity import FORMAT_VERSION

IDX = f"base_model.model.{NAME.removesuffix('.weight')}.sparsediff_indices.weight"
DELTA_IDX = f"sparse.{NAME}.indices"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A selected, randomised SAM adapter saved by this sam-peft (format 2), its SparseDelta file, and the model."""
    root = tmp_path_factory.mktemp("format2")
    model = sam_model()
    sam_peft.select_parameters(model, make_batches(2), dropout=False, progress=False)
    randomize(model)
    model.save_pretrained(root / "adapter")
    delta = sam_peft.SparseDelta.from_peft(model)
    delta.save(root / "delta.safetensors")
    return model, delta, root


# --------------------------------------------------------------------------- one tensor
def _sorted_unique(rng, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.unique(rng.integers(0, n, size=k, dtype=np.int64)))


def _cases():
    rng = np.random.default_rng(0)
    return {
        "empty": torch.zeros(0, dtype=torch.int64),
        "single at 0": torch.tensor([0]),
        "single at the end": torch.tensor([999_999]),
        "first index 0": torch.cat([torch.tensor([0]), _sorted_unique(rng, 10**6, 4000) + 1]),
        "p = 0.005": _sorted_unique(rng, 1_000_000, 5000),
        "gaps > 65535": torch.cumsum(torch.from_numpy(rng.integers(1, 2**20, size=300)), 0),
        "every entry": torch.arange(1000),
        "clustered rows": torch.cat([torch.arange(r * 4096, r * 4096 + 300) for r in (0, 7, 8, 500)]),
        "int64 range": torch.tensor([0, 2**31, 2**40 + 3, 2**62, 2**63 - 2]),
        "mixed tiny and huge gaps": torch.cat([torch.arange(2000), torch.tensor([2**50, 2**50 + 1])]),
    }


CASES = _cases()


@pytest.mark.parametrize("values_dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_exact(case, values_dtype):
    indices = CASES[case]
    g = torch.Generator().manual_seed(1)
    # float32 values from random bit patterns (subnormals, -0.0, extremes), finite ones kept; small ones for fp16
    bits = torch.randint(-(2**31), 2**31 - 1, (indices.numel(),), generator=g, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32)
    values = torch.where(torch.isfinite(values), values, torch.zeros(()))
    if values_dtype == "float16":
        values = values.clamp(-60000, 60000)
    stream, stored = encode_entries("t", indices, values, values_dtype)
    assert stream.dtype == torch.uint8 and stream.dim() == 1 and stored.dtype == getattr(torch, values_dtype)
    decoded, dtypes = decode_tensors({"sparse.t.indices": stream, "sparse.t.values": stored},
                                     sam_peft.storage.encoding.DELTA_KEYS)
    assert dtypes == {values_dtype}
    got_indices, got_values = decoded["sparse.t.indices"], decoded["sparse.t.values"]
    assert got_indices.dtype == torch.int64 and got_values.dtype == torch.float32
    assert torch.equal(got_indices, indices.long())
    expected = values.to(getattr(torch, values_dtype)).float()
    assert torch.equal(got_values.view(torch.int32), expected.view(torch.int32))  # bit-identical, -0.0 included


def test_stream_size_near_the_gap_entropy():
    """At p = 0.005 of a 1M-entry tensor (mean gap 200) the indices take ~1.15 bytes per entry, not 4."""
    indices = _sorted_unique(np.random.default_rng(2), 1_000_000, 5000)
    stream, _ = encode_entries("t", indices, torch.zeros(indices.numel()))
    assert stream.numel() / indices.numel() < 1.2, stream.numel() / indices.numel()
    assert int(stream[0]) == 0  # Rice


def test_encoding_refuses_unsorted_indices_and_unknown_dtypes():
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_entries("t", torch.tensor([3, 3]), torch.zeros(2))
    with pytest.raises(ValueError, match="strictly increasing"):
        encode_entries("t", torch.tensor([-1, 3]), torch.zeros(2))
    with pytest.raises(sam_peft.ConfigError, match="values_dtype='int8'"):
        encode_entries("t", torch.tensor([1]), torch.zeros(1), "int8")
    with pytest.raises(sam_peft.ConfigError, match="float16's range"):
        encode_entries("t", torch.tensor([1]), torch.tensor([1e6]), "float16")


SPREAD = torch.arange(3, 4000, 37)  # even gaps: Rice (code 0)
CLUSTERED = torch.cat([torch.arange(100, 140), torch.arange(90_000, 90_050)])  # runs and a jump: exp-Golomb (1)


def _valid(indices: torch.Tensor) -> torch.Tensor:
    return encode_entries("w", indices, torch.zeros(indices.numel()))[0]


def _edit(offset: int, value: int):
    def change(r: torch.Tensor) -> torch.Tensor:
        r = r.clone()
        r[offset] = value
        return r
    return change


def _append(r: torch.Tensor) -> torch.Tensor:
    return torch.cat([r, torch.zeros(1, dtype=torch.uint8)])


NAMED = "base_model.model.x.sparsediff_indices.w"
# case: (indices encoded, damage, number of values, words of the refusal)
BAD_STREAMS = {
    "2-D": (SPREAD, lambda r: r.reshape(1, -1), 109, "1-D uint8"),
    "one byte": (SPREAD, lambda r: r[:1], 109, "shorter than its 2-byte code"),
    "count cut off": (SPREAD, lambda r: r[:2], 109, "the entry count is cut off"),
    "count runs over": (SPREAD, lambda r: torch.cat([r[:2], torch.full((11,), 0x80, dtype=torch.uint8)]), 109,
                        "runs over 10 bytes"),
    "more values than gaps": (SPREAD, lambda r: r, 110, "holds 109 gaps but its values tensor has 110"),
    "fewer values than gaps": (CLUSTERED, lambda r: r, 89, "holds 90 gaps but its values tensor has 89"),
    "unknown code": (SPREAD, _edit(0, 2), 109, "code 2"),
    "parameter too large": (CLUSTERED, _edit(1, 63), 90, "parameter 63"),
    "parameter without entries": (torch.zeros(0, dtype=torch.int64), _edit(1, 3), 0, "parameter 3 for 0 entries"),
    "bytes for no entries": (torch.zeros(0, dtype=torch.int64), _append, 0, "1 bytes of gaps for no entries"),
    "rice: truncated": (SPREAD, lambda r: r[:-1], 109, "unary-coded gaps for 109 values"),
    "rice: too short for the low bits": (SPREAD, lambda r: r[:5], 109, "too short for the low bits"),
    "rice: trailing byte": (SPREAD, _append, 109, "bytes after the last gap"),
    "golomb: a bucket's one bits cleared": (CLUSTERED, _edit(3, 0), 90, "unary buckets not zero-padded"),
    "golomb: truncated suffixes": (CLUSTERED, lambda r: r[:-1], 90, "bytes of suffixes"),
    "golomb: trailing byte": (CLUSTERED, _append, 90, "bytes of suffixes"),
    "golomb: bucket beyond int64": (CLUSTERED, lambda r: torch.cat([r[:3], torch.zeros(9, dtype=torch.uint8),
                                                                     r[3:]]), 90, "beyond the int64 range"),
}


def test_the_two_codes_are_chosen_by_size():
    assert int(_valid(SPREAD)[0]) == 0 and int(_valid(CLUSTERED)[0]) == 1


@pytest.mark.parametrize("case", list(BAD_STREAMS))
def test_malformed_stream_is_refused_naming_it(case):
    indices, damage, k, words = BAD_STREAMS[case]
    with pytest.raises(sam_peft.DeltaFileError) as info:
        decode_indices(NAMED, damage(_valid(indices)), k)
    assert f"'{NAMED}'" in str(info.value) and words in str(info.value), info.value


def test_stream_without_its_values_is_refused():
    with pytest.raises(sam_peft.DeltaFileError, match="without a 1-D values tensor"):
        decode_tensors({NAMED: _valid(SPREAD)}, ADAPTER_KEYS)
    with pytest.raises(ValueError, match="needs both its indices and values"):
        sam_peft.storage.encoding.encode_tensors({NAMED: torch.tensor([1])}, ADAPTER_KEYS)


# --------------------------------------------------------------------------- files
def test_adapter_file_is_format_2_and_loads_exactly(written, tmp_path):
    model, _, root = written
    raw = (root / "adapter" / MODEL_FILE).read_bytes()
    metadata = file_metadata(raw)
    assert (metadata["sam_peft_format"], metadata["sam_peft_index_encoding"], metadata["sam_peft_values_dtype"]) == (
        str(FORMAT_VERSION), "coded-gaps", "float32")
    assert json.loads((root / "adapter" / CONFIG_FILE).read_text())["format_version"] == FORMAT_VERSION == 2
    tensors = decode_safetensors(raw)
    assert tensors[IDX].dtype == torch.uint8 and tensors[IDX.replace("indices", "values")].dtype == torch.float32
    assert "counts" not in metadata  # the values' shapes give them
    # peft's keys: as many tensors as the state dict; checksums cover the streams (a digest of every stored tensor)
    assert tensors.keys() == content(model).keys()
    assert len(json.loads(metadata["sam_peft_checksums"])["tensors"]) == len(tensors)
    assert_same(content(PeftModel.from_pretrained(make_bert(), root / "adapter")), content(model))


def test_delta_file_is_format_2_and_loads_exactly(written):
    _, delta, root = written
    raw = (root / "delta.safetensors").read_bytes()
    metadata = file_metadata(raw)
    assert (metadata["sam_peft_format"], metadata["sam_peft_values_dtype"]) == ("2", "float32")
    assert decode_safetensors(raw)[DELTA_IDX].dtype == torch.uint8
    assert_same(delta_content(sam_peft.SparseDelta.load(root / "delta.safetensors")), delta_content(delta))


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
def test_format_1_files_still_load(written, tmp_path, fmt):
    """Files in the layout of format 1 (constructed here from a format-2 save) load the same content."""
    model, delta, root = written
    if fmt == "adapter":
        old = as_format1(_copy(root / "adapter", tmp_path / "old"))
        tensors = load_file(str(old / MODEL_FILE))
        assert tensors[IDX].dtype == torch.int32
        assert json.loads((old / CONFIG_FILE).read_text())["format_version"] == 1
        loaded = PeftModel.from_pretrained(make_bert(), old)
        assert_same(content(loaded), content(model))
        loaded.save_pretrained(tmp_path / "again")  # re-saved: format 2
        assert json.loads((tmp_path / "again" / CONFIG_FILE).read_text())["format_version"] == 2
        assert file_metadata((tmp_path / "again" / MODEL_FILE).read_bytes())["sam_peft_format"] == "2"
        assert_same(content(PeftModel.from_pretrained(make_bert(), tmp_path / "again")), content(model))
    else:
        path = tmp_path / "old.safetensors"
        path.write_bytes((root / "delta.safetensors").read_bytes())
        as_format1(path)
        assert file_metadata(path.read_bytes())["sam_peft_format"] == "1"
        assert load_file(str(path))[f"sparse.{NAME}.indices"].dtype == torch.int32
        assert_same(delta_content(sam_peft.SparseDelta.load(path)), delta_content(delta))


def _copy(source: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(source, dest)
    return dest


def test_newer_format_is_refused(written, tmp_path):
    _, _, root = written
    directory = _copy(root / "adapter", tmp_path / "newer")
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(sam_peft.ConfigError, match=f"format_version={FORMAT_VERSION + 1}.*upgrade"):
        PeftModel.from_pretrained(make_bert(), directory)
    tensors = load_file(str(root / "delta.safetensors"))
    metadata = {k: v for k, v in file_metadata((root / "delta.safetensors").read_bytes()).items()
                if k != "sam_peft_checksums"}
    path = tmp_path / "newer.safetensors"
    sam_peft.storage.io.save_safetensors_atomic(tensors, path, {**metadata, "sam_peft_format": str(FORMAT_VERSION + 1)})
    with pytest.raises(sam_peft.DeltaFileError, match="Upgrade sam-peft"):
        sam_peft.SparseDelta.load(path)


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
@pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
def test_corrupted_stream_is_refused_naming_the_tensor(written, tmp_path, fmt, checksum):
    """The code byte of an index stream set to an unknown code: the checksum names the stream; without checksums
    decoding refuses it, naming it."""
    _, _, root = written
    source = root / "adapter" / MODEL_FILE if fmt == "adapter" else root / "delta.safetensors"
    raw = source.read_bytes()
    key = IDX if fmt == "adapter" else DELTA_IDX
    start, _ = layout(raw)[2][key]
    data = bytearray(raw)
    data[start] = 9
    data = bytes(data) if checksum else strip_checksum(bytes(data))
    if fmt == "adapter":
        directory = _copy(root / "adapter", tmp_path / "bad")
        (directory / MODEL_FILE).write_bytes(data)
        with pytest.raises(sam_peft.DeltaFileError) as info:
            PeftModel.from_pretrained(make_bert(), directory)
    else:
        path = tmp_path / "bad.safetensors"
        path.write_bytes(data)
        with pytest.raises(sam_peft.DeltaFileError) as info:
            sam_peft.SparseDelta.load(path)
    message = str(info.value)
    assert f"'{key}'" in message, message
    assert ("do not match the checksum" if checksum else "not a valid encoded index stream") in message, message


FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ
@given(data=st.data(), bit=st.integers(0, 7))
def test_fuzz_stream_bit_flip_without_checksums(written, tmp_path, data, bit):
    """Without checksums, any bit flip in an index stream is refused or changes only that tensor's indices (gaps
    that still decode to valid sorted indices); loaded indices are always valid."""
    model, delta, root = written
    raw = strip_checksum((root / "delta.safetensors").read_bytes())
    spans = layout(raw)[2]
    key = data.draw(st.sampled_from(sorted(k for k in spans if k.endswith(".indices"))), label="stream")
    start, end = spans[key]
    offset = data.draw(st.integers(start, end - 1), label="offset")
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(flip(raw, offset, bit))
    try:
        loaded = sam_peft.SparseDelta.load(path)
    except sam_peft.SamPeftError as exc:
        assert f"'{key}'" in str(exc) or f"'{key.removeprefix('sparse.').removesuffix('.indices')}'" in str(exc)
        event("refused")
        return
    name = key.removeprefix("sparse.").removesuffix(".indices")
    changed = {n for n in delta.entries
               if any(not torch.equal(a, b) for a, b in zip(loaded.entries[n], delta.entries[n]))}
    assert changed <= {name} and torch.equal(loaded.entries[name][1], delta.entries[name][1])
    indices = loaded.entries[name][0]
    assert indices.numel() == 0 or (int(indices.min()) >= 0 and bool((indices[1:] > indices[:-1]).all()))
    event("changed" if changed else "identical")


# --------------------------------------------------------------------------- half-precision values
@pytest.mark.parametrize("values_dtype", ["bfloat16", "float16"])
def test_half_precision_values_are_opt_in_marked_and_loaded_rounded(written, tmp_path, values_dtype):
    model, delta, _ = written
    model.peft_config["default"].values_dtype = values_dtype
    try:
        model.save_pretrained(tmp_path / "adapter")
    finally:
        model.peft_config["default"].values_dtype = "float32"
    raw = (tmp_path / "adapter" / MODEL_FILE).read_bytes()
    assert file_metadata(raw)["sam_peft_values_dtype"] == values_dtype
    assert json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())["values_dtype"] == values_dtype
    assert decode_tensors(decode_safetensors(raw), ADAPTER_KEYS)[1] == {values_dtype}
    loaded = content(PeftModel.from_pretrained(make_bert(), tmp_path / "adapter"))
    expected = content(model)
    dtype = getattr(torch, values_dtype)
    for key, tensor in expected.items():
        want = tensor.to(dtype).float() if ".sparsediff_values." in key else tensor
        assert torch.equal(loaded[key], want), key  # indices and head exact, values rounded once
    assert any(not torch.equal(loaded[k], expected[k]) for k in expected if ".sparsediff_values." in k)
    full = (tmp_path / "adapter" / MODEL_FILE).stat().st_size
    model.save_pretrained(tmp_path / "fp32")
    assert full < (tmp_path / "fp32" / MODEL_FILE).stat().st_size

    path = delta.save(tmp_path / "delta.safetensors", values_dtype=values_dtype)
    assert file_metadata(path.read_bytes())["sam_peft_values_dtype"] == values_dtype
    back = sam_peft.SparseDelta.load(path)
    for name, (indices, values) in delta.entries.items():
        assert torch.equal(back.entries[name][0], indices) and torch.equal(back.entries[name][1],
                                                                             values.to(dtype).float())


def test_unknown_values_dtype_is_refused(written, tmp_path):
    with pytest.raises(sam_peft.ConfigError, match="values_dtype='fp8'"):
        sam_peft.SparseDiffConfig(values_dtype="fp8")
    with pytest.raises(sam_peft.ConfigError, match="values_dtype='half'"):
        written[1].save(tmp_path / "d.safetensors", values_dtype="half")


def test_inspect_summary_shows_the_encoding(written, tmp_path):
    _, _, root = written
    summary = adapter_summary(root / "adapter")
    size = (root / "adapter" / MODEL_FILE).stat().st_size
    assert (summary["format_version"], summary["index_encoding"], summary["values_dtype"]) == (2, "coded-gaps",
                                                                                               "float32")
    assert summary["bytes_per_entry"] == round(size / summary["entries"], 3)
    old = adapter_summary(as_format1(_copy(root / "adapter", tmp_path / "old")))
    assert old["format_version"] == 1 and old["values_dtype"] == "float32" and old["entries"] == summary["entries"]
    assert old["file_bytes"] > size  # format 2 is smaller, on this tiny model too (not the MiniLM measurement)


def _reference_decode(stream: bytes, k: int) -> list[int]:
    """docs/format.md's index stream, decoded bit by bit (the oracle of the vectorised decoder)."""
    code, parameter = stream[0], stream[1]
    count, offset, shift = 0, 2, 0
    while True:  # LEB128
        count |= (stream[offset] & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not stream[offset - 1] & 0x80:
            break
    assert count == k
    bits = [(byte >> i) & 1 for byte in stream[offset:] for i in range(8)]
    position = 0

    def number(width: int) -> int:
        nonlocal position
        value = sum(bits[position + i] << i for i in range(width))
        position += width
        return value

    def unary() -> int:
        nonlocal position
        count = 0
        while bits[position] == 0:
            count, position = count + 1, position + 1
        position += 1
        return count

    def to_byte() -> None:
        nonlocal position
        position = -(-position // 8) * 8

    if code == 0:
        lows = [number(parameter) for _ in range(k)]
        to_byte()
        gaps = [(unary() << parameter) | low for low in lows]
    else:
        buckets = [unary() for _ in range(k)]
        to_byte()
        gaps = []
        for b in buckets:
            suffix = number(b + parameter)
            gaps.append(((2**b - 1 + (suffix >> parameter)) << parameter) | (suffix % 2**parameter))
    to_byte()
    assert position == len(bits)
    out, previous = [], -1
    for gap in gaps:
        previous += gap + 1
        out.append(previous)
    return out


def test_streams_follow_the_documented_layout(written):
    _, delta, root = written
    tensors = load_file(str(root / "delta.safetensors"))
    codes = set()
    for name, (indices, values) in delta.entries.items():
        stream = tensors[f"sparse.{name}.indices"].numpy().tobytes()
        codes.add(stream[0])
        assert _reference_decode(stream, indices.numel()) == indices.tolist(), name
        assert torch.equal(tensors[f"sparse.{name}.values"], values)
    for case in ("p = 0.005", "clustered rows", "int64 range", "mixed tiny and huge gaps", "single at 0"):
        indices = CASES[case]
        stream = _valid(indices).numpy().tobytes()
        codes.add(stream[0])
        assert _reference_decode(stream, indices.numel()) == indices.tolist(), case
    assert codes == {0, 1}
