"""Refusing damaged or foreign adapters: every damaged entry, truncated file, inconsistent config, damaged head
or re-encoded tensor is refused naming what is wrong, and an adapter for another base model (other
architecture, weights or shapes) is refused unless the fingerprint override allows other weights.

The files are rewritten without sam-peft's checksums (as another tool would write them), so the structural
checks are what these tests exercise; see saved_files.py and test_checksums.py.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import ENV, make_bert, make_roberta
from peft import PeftModel, get_peft_model
from saved_files import (
    CONFIG_FILE,
    HEAD,
    IDX,
    KEYS,
    MODEL_FILE,
    NAME,
    PREFIX,
    SPARSITY,
    VAL,
    adapter_copy,
    assert_same,
    canonical,
    changed_config,
    changed_tensors,
    checksum_error,
    content,
    file_of,
    layout,
    load_bytes,
    rebuild,
    rewritten,
    set_entry,
    swap01,
    without_checksum,
    write_adapter,
)

import sam_peft

TENSOR_CASES = {
    "index out of range": (dict(idx=set_entry(-1, 1024)), ["outside [0, 1024)"]),
    "negative index": (dict(idx=set_entry(0, -1)), ["outside [0, 1024)"]),
    "unsorted indices": (dict(idx=swap01), ["not strictly increasing"]),
    "duplicated index": (dict(idx=set_entry(1, lambda t: t[0])), ["not strictly increasing"]),
    "float indices": (dict(idx=lambda t: t.float()), ["int32/int64", "torch.float32"]),
    "2-D indices": (dict(idx=lambda t: t.reshape(1, -1)), ["1-D", "[1, 51]"]),
    "values too short": (dict(val=lambda t: t[:-1]), ["51 indices but 50 values"]),
    "values too long": (dict(val=lambda t: torch.cat([t, t[:1]])), ["51 indices but 52 values"]),
    "NaN value": (dict(val=set_entry(3, float("nan"))), ["NaN or infinity"]),
    "infinite value": (dict(val=set_entry(3, float("-inf"))), ["NaN or infinity"]),
    "integer values": (dict(val=lambda t: t.to(torch.int32)), ["float tensor", "torch.int32"]),
    "missing indices": (dict(idx=None), ["no delta for"]),
    "missing values": (dict(val=None), ["no delta for"]),
}
MISSING_IN_DELTA = ["lacks the indices or values"]  # SparseDelta.load's words for the two "missing" cases


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
@pytest.mark.parametrize("fmt", ["adapter", "delta"])
@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_damaged_entries_are_refused_naming_the_tensor(saved, tmp_path, case, fmt, checksum):
    changes, fragments = TENSOR_CASES[case]
    data = rewritten(saved, fmt, changed_tensors(saved, fmt, **changes), checksum)
    with pytest.raises(sam_peft.DeltaFileError) as info:
        load_bytes(saved, tmp_path, fmt, data)
    message = str(info.value)
    if checksum:  # verified before the structure: it names the tensor by its key in the file
        [(which, change)] = changes.items()
        key = getattr(KEYS[fmt], which)
        assert checksum_error(message, file_of(saved, tmp_path, fmt), key, removed=change is None), message
        return
    assert f"'{NAME}'" in message
    if fmt == "delta" and case.startswith("missing"):
        fragments = MISSING_IN_DELTA
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("keep", [0, 8, 100, 0.5, -1], ids=["empty", "8-bytes", "in-header", "half", "minus-1"])
def test_truncated_adapter_file_is_refused_naming_the_file(saved, tmp_path, keep):
    target = adapter_copy(saved, tmp_path / "adapter")
    size = len(saved.raw)
    keep = int(size * keep) if isinstance(keep, float) else keep % size
    (target / MODEL_FILE).write_bytes(saved.raw[:keep])
    with pytest.raises(sam_peft.DeltaFileError) as info:
        PeftModel.from_pretrained(make_bert(), target)
    assert str(target / MODEL_FILE) in str(info.value) and "truncated" in str(info.value)


def _bump_count(counts: dict) -> dict:
    return {**counts, NAME: counts[NAME] + 1}


NOT_INTEGER = "must be an integer"
CONFIG_CASES = {
    "count too high": (dict(counts=_bump_count), sam_peft.DeltaFileError,
                       [f"'{NAME}' has 51 entries in the file but 52 in the adapter config"]),
    "count missing": (dict(counts=lambda c: {k: v for k, v in c.items() if k != NAME}), sam_peft.DeltaFileError,
                      [f"'{NAME}' has 51 entries in the file but 0"]),
    "negative count": (dict(counts=lambda c: {**c, NAME: -1}), sam_peft.ConfigError, ["non-negative", "-1"]),
    "format_version 99": (dict(format_version=99), sam_peft.ConfigError, ["format_version=99", "upgrade"]),
    "format_version '1'": (dict(format_version="1"), sam_peft.ConfigError, ["format_version='1'", NOT_INTEGER]),
    "format_version true": (dict(format_version=True), sam_peft.ConfigError, ["format_version=True", NOT_INTEGER]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_inconsistent_adapter_config_is_refused(saved, tmp_path, case):
    changes, error, fragments = CONFIG_CASES[case]
    target = write_adapter(saved, tmp_path / "adapter", config=changed_config(saved, **changes))
    with pytest.raises(error) as info:
        PeftModel.from_pretrained(make_bert(), target)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_base_identity_is_recorded_in_the_config_and_the_file(saved):
    for key in ("base_architecture", "base_fingerprint", "base_shapes_digest"):
        assert saved.config[key] and saved.metadata[key] == saved.config[key], key
    assert saved.config["base_architecture"] == "BertForSequenceClassification"
    assert re.fullmatch("[0-9a-f]{32}", saved.config["base_shapes_digest"])
    assert saved.delta_loaded.metadata["base_fingerprint"] == saved.config["base_fingerprint"]


@pytest.mark.parametrize("override", [False, True], ids=["strict", "env-override"])
def test_other_architecture_is_refused_even_with_the_override(saved, monkeypatch, override):
    if override:
        monkeypatch.setenv(ENV, "1")
    with pytest.raises(sam_peft.BaseModelMismatchError) as info:
        PeftModel.from_pretrained(make_roberta(), saved.dir)
    assert "BertForSequenceClassification" in str(info.value)
    assert "RobertaForSequenceClassification" in str(info.value)


def test_other_weights_are_refused_unless_overridden(saved, monkeypatch):
    with pytest.raises(sam_peft.BaseModelMismatchError, match=f"fingerprint.*{ENV}=1"):
        PeftModel.from_pretrained(make_bert(seed=1), saved.dir)
    monkeypatch.setenv(ENV, "1")
    loaded = PeftModel.from_pretrained(make_bert(seed=1), saved.dir)
    assert_same(content(loaded), saved.expected)


OTHER_SHAPES = "recorded on base parameters of other names or shapes"


def test_base_with_other_shapes_is_refused(saved):
    with pytest.raises(sam_peft.BaseModelMismatchError, match=OTHER_SHAPES):
        PeftModel.from_pretrained(make_bert(hidden_size=48), saved.dir)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None], ids=["with-head", "no-head"])
def test_override_never_allows_other_shapes(tmp_path, monkeypatch, task_type):
    model = get_peft_model(make_bert(), sam_peft.SparseDiffConfig(sparsity=SPARSITY, selection="random",
                                                                  task_type=task_type))
    model.save_pretrained(tmp_path)
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(sam_peft.BaseModelMismatchError, match=OTHER_SHAPES):
        PeftModel.from_pretrained(make_bert(hidden_size=48), tmp_path)


def test_override_never_allows_other_shapes_for_a_config_without_the_digest(tmp_path, monkeypatch):
    model = get_peft_model(make_bert(), sam_peft.SparseDiffConfig(sparsity=SPARSITY, selection="random"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["base_shapes_digest"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(sam_peft.SamPeftError, match="shape"):
        PeftModel.from_pretrained(make_bert(hidden_size=48), tmp_path)


def _retype_in_header(raw: bytes, key: str, dtype: str, checksum: bool = False) -> bytes:
    """The file with `key` declared as `dtype` (same bytes), from a writer without checksums by default."""
    _, header, _ = layout(raw)
    header[key]["dtype"] = dtype
    if not checksum:
        header["__metadata__"] = without_checksum(header["__metadata__"])
    return rebuild(raw, header)


# The head as loaded into the model (peft's key for the trained copy of classifier.weight).
HEAD_IN_MODEL = f"'{PREFIX}classifier.modules_to_save.default.weight'"
HEAD_CASES = {
    "missing": (lambda s, c: rewritten(s, "adapter", changed_tensors(s, head=None), c),
                ["has no tensor", f"'{HEAD}'", "head is missing"]),
    "NaN": (lambda s, c: rewritten(s, "adapter", changed_tensors(s, head=set_entry((0, 0), float("nan"))), c),
            [HEAD_IN_MODEL, "contains NaN or infinity"]),
    "infinite": (lambda s, c: rewritten(s, "adapter", changed_tensors(s, head=set_entry((1, 3), float("inf"))), c),
                 [HEAD_IN_MODEL, "contains NaN or infinity"]),
    "reshaped": (lambda s, c: rewritten(s, "adapter", changed_tensors(s, head=lambda t: t.reshape(-1)), c),
                 [HEAD_IN_MODEL, "has shape [64] in the adapter file but [2, 32] in the model"]),
    "int32 in header": (lambda s, c: _retype_in_header(s.raw, HEAD, "I32", c),
                        [HEAD_IN_MODEL, "is stored as torch.int32", "not a float"]),
}


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
@pytest.mark.parametrize("case", list(HEAD_CASES))
def test_damaged_head_is_refused(saved, tmp_path, case, checksum):
    make, fragments = HEAD_CASES[case]
    with pytest.raises(sam_peft.DeltaFileError) as info:
        load_bytes(saved, tmp_path, "adapter", make(saved, checksum))
    message = str(info.value)
    if checksum:
        assert checksum_error(message, file_of(saved, tmp_path, "adapter"), HEAD, removed=case == "missing"), message
        return
    for fragment in fragments:
        assert fragment in message, message


DELTA_HEAD_CASES = {
    "NaN": lambda t: set_entry((0, 0), float("nan"))(t),
    "infinite": lambda t: set_entry((1, 3), float("-inf"))(t),
    "int32": lambda t: t.to(torch.int32),
}


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
@pytest.mark.parametrize("case", list(DELTA_HEAD_CASES))
def test_damaged_delta_head_is_refused(saved, tmp_path, case, checksum):
    data = rewritten(saved, "delta", changed_tensors(saved, "delta", head=DELTA_HEAD_CASES[case]), checksum)
    with pytest.raises(sam_peft.DeltaFileError) as info:
        load_bytes(saved, tmp_path, "delta", data)
    message = str(info.value)
    if checksum:
        assert checksum_error(message, file_of(saved, tmp_path, "delta"), KEYS["delta"].head), message
    else:
        assert "dense tensor 'classifier.weight'" in message and "not a finite float tensor" in message, message


REENCODINGS = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int16, torch.uint8, torch.float32]


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
@pytest.mark.parametrize("dtype", REENCODINGS, ids=str)
@pytest.mark.parametrize("which", ["idx", "val"])
def test_reencoded_entries_are_refused_or_lossless(saved, tmp_path, which, dtype, checksum):
    """A sparse tensor re-encoded in another dtype: by a writer without checksums, refused or loaded exactly as its
    bytes say; keeping the checksums, refused unless the dtype (hence every byte) is unchanged."""
    tensors = changed_tensors(saved, **{which: lambda t: t.to(dtype)})
    key = IDX if which == "idx" else VAL
    if checksum:
        data = rewritten(saved, "adapter", tensors, checksum=True)
        if dtype == saved.tensors[key].dtype:
            assert_same(load_bytes(saved, tmp_path, "adapter", data), saved.expected)
            return
        with pytest.raises(sam_peft.DeltaFileError) as info:
            load_bytes(saved, tmp_path, "adapter", data)
        assert checksum_error(str(info.value), file_of(saved, tmp_path, "adapter"), key), str(info.value)
        return
    target = write_adapter(saved, tmp_path / "adapter", tensors=tensors)
    try:
        loaded = content(PeftModel.from_pretrained(make_bert(), target))
    except sam_peft.DeltaFileError as exc:
        assert f"'{NAME}'" in str(exc)
        assert dtype not in ((torch.int64,) if which == "idx" else (torch.float64, torch.float32)), exc
        return
    assert dtype.is_floating_point == (which == "val") and dtype not in (torch.int16, torch.uint8)
    assert_same(loaded, {k: canonical(k, v) for k, v in tensors.items()})
    if not torch.equal(loaded[key], saved.expected[key]):  # float16 / bfloat16 values: accepted, rounded
        assert which == "val" and dtype in (torch.float16, torch.bfloat16)
