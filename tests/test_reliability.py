"""Reliability: clear errors for bad inputs, atomic writes, refusal of damaged or foreign adapters (fixed cases and
hypothesis fuzzing of the saved files), a bit-identical resume after a crash (real subprocesses), and merging
into half-precision bases.

Every safetensors file sam-peft writes (the peft adapter file and a `SparseDelta` file) carries checksums in its
metadata (`sam_peft.storage.io.CHECKSUM_KEY`: a digest of every tensor's name, dtype, shape and bytes, and one of
the rest of the metadata), verified on load before anything else. Files without that key (written by another tool)
get only the structural checks (indices in range and sorted, dtypes, lengths, finite values, counts, the head's
shape, dtype and finiteness). The structural tests therefore rewrite files without the checksum
(`without_checksum`), so the structural checks, not the checksum, are what they exercise; the checksum tests keep
it.

Fuzzing oracle. A damaged file must either be refused with a `sam_peft.SamPeftError`, or load exactly what its
bytes say, and only when those bytes still form a well-formed adapter (same tensors, shapes and dtype kinds, finite
floats). For a file written with checksums, loading must give back exactly the saved content: any other load is a
failure. The same fuzzing also runs on checksum-less copies of the files (so the structural checks stay fuzzed);
there, a well-formed file whose numbers differ from the original (a bit flip inside a tensor's data, two equally
sized tensors swapped in the header, an edited metadata value of a SparseDelta) can't be detected by design, so
such loads are allowed and counted with `hypothesis.event` (see `--hypothesis-show-statistics`), and a bit flip
must change only the tensor it hit.

Known library bugs are strict xfails whose reason names the cause.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import load as decode_safetensors
from safetensors.torch import load_file, save_file
from safetensors.torch import save as encode_safetensors
from transformers import BertConfig, BertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification

import sam_peft
from sam_peft.storage.delta import METADATA_KEYS
from sam_peft.storage.io import CHECKSUM_KEY, checksums

REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB, HIDDEN, SEQ, BATCH = 100, 32, 8, 4
SPARSITY = 0.05
ENV = "SAM_PEFT_ALLOW_FINGERPRINT_MISMATCH"
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

FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FUZZ_REGION = settings(FUZZ, max_examples=16)  # per region of the file: 80 bit flips per format and variant


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


# --------------------------------------------------------------------------- models and data


def bert_config(hidden: int = HIDDEN) -> dict:
    return dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0, num_labels=2)


def make_bert(seed: int = 0, hidden: int = HIDDEN) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(pad_token_id=0, **bert_config(hidden))).eval()


def make_roberta(seed: int = 0) -> RobertaForSequenceClassification:
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **bert_config())).eval()


def make_batches(n: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, 2, (BATCH,), generator=g)} for _ in range(n)]


def sam_model(base=None, **overrides):
    config = dict(sparsity=SPARSITY, task_type="SEQ_CLS")
    config.update(overrides)
    return get_peft_model(make_bert() if base is None else base, sam_peft.SAMConfig(**config))


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


class _Saved(SimpleNamespace):
    def __repr__(self) -> str:  # keeps hypothesis' reports short
        return "<saved adapter>"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A selected, trained-looking SAM adapter saved with save_pretrained, and the same delta as a SparseDelta."""
    root = tmp_path_factory.mktemp("saved")
    model = sam_model()
    sam_peft.select_parameters(model, make_batches(2), dropout=False, progress=False)
    randomize(model)
    model.save_pretrained(root / "adapter")
    delta = sam_peft.SparseDelta.from_peft(model)
    delta.save(root / "delta.safetensors")
    raw, delta_raw = (root / "adapter" / MODEL_FILE).read_bytes(), (root / "delta.safetensors").read_bytes()
    delta_loaded = sam_peft.SparseDelta.load(root / "delta.safetensors")
    return _Saved(
        dir=root / "adapter", raw=raw, tensors=load_file(str(root / "adapter" / MODEL_FILE)),
        metadata=file_metadata(raw), expected=content(model),
        config=json.loads((root / "adapter" / CONFIG_FILE).read_text()),
        delta_path=root / "delta.safetensors", delta_raw=delta_raw, delta=delta, delta_loaded=delta_loaded,
        delta_tensors=load_file(str(root / "delta.safetensors")), delta_metadata=file_metadata(delta_raw),
        delta_expected=delta_content(delta_loaded),
    )


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


# =========================================================================== 1. validation errors


@pytest.mark.parametrize("sparsity", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "x", None], ids=repr)
def test_invalid_sparsity_is_a_config_error_naming_it(sparsity):
    with pytest.raises(sam_peft.ConfigError, match=re.escape(f"sparsity={sparsity!r} is invalid")) as info:
        sam_peft.SAMConfig(sparsity=sparsity)
    assert "(0, 1]" in str(info.value)
    assert isinstance(info.value, ValueError)  # generic handlers keep working


@pytest.mark.parametrize("field, value", [("selection", "sam2"), ("allocation", "per_layer")])
def test_unknown_choice_is_a_config_error_listing_the_options(field, value):
    with pytest.raises(sam_peft.ConfigError, match=f"{field}='{value}' is unknown") as info:
        sam_peft.SAMConfig(**{field: value})
    assert ("'magnitude'" if field == "selection" else "'global'") in str(info.value)


def test_unknown_selection_override_names_it():
    model = sam_model()
    with pytest.raises(sam_peft.ConfigError, match="selection='sam2' is unknown") as info:
        sam_peft.select_parameters(model, make_batches(1), selection="sam2", progress=False)
    assert "'magnitude'" in str(info.value)
    assert model.peft_config["default"].counts is None
    assert model.peft_config["default"].selection == "sam"


@pytest.mark.parametrize("patterns", [["nope"], "nope"], ids=["list", "regex"])
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_patterns_matching_nothing_say_what_was_searched(field, patterns):
    with pytest.raises(sam_peft.ConfigError) as info:
        sam_model(**{field: patterns})
    message = str(info.value)
    assert f"{field}=" in message and "nope" in message
    assert "searched" in message and "bert.embeddings" in message


def test_empty_dataloader_is_a_selection_error():
    model = sam_model()
    with pytest.raises(sam_peft.SelectionError, match="empty"):
        sam_peft.select_parameters(model, [], progress=False)
    assert model.peft_config["default"].counts is None


def test_fewer_batches_than_num_steps_warns(caplog):
    model = sam_model()
    with caplog.at_level(logging.WARNING, logger="sam_peft"):
        report = sam_peft.select_parameters(model, make_batches(2), num_steps=5, dropout=False, progress=False)
    assert report.steps == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("5" in m and "2" in m for m in warnings), warnings


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_nan_loss_is_a_selection_error_naming_the_step():
    model = sam_model()
    flags = _flags(model)
    calls = []

    def poison(module, args, output):  # the third batch's forward produces NaN
        calls.append(None)
        return output * float("nan") if len(calls) == 3 else output

    handle = model.get_base_model().bert.pooler.register_forward_hook(poison)
    try:
        with pytest.raises(sam_peft.SelectionError, match=r"loss is nan at step 2"):
            sam_peft.select_parameters(model, make_batches(4), dropout=False, progress=False)
    finally:
        handle.remove()
    assert model.peft_config["default"].counts is None
    assert _flags(model) == flags
    assert all(p.grad is None for p in model.parameters())


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with NaN gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_nan_gradient_with_finite_loss_is_a_selection_error_naming_the_tensor():
    model = sam_model()
    losses = []
    handle = model.get_base_model().bert.pooler.register_forward_hook(lambda m, a, out: _NaNGradient.apply(out))
    loss_hook = model.register_forward_hook(lambda m, a, out: losses.append(float(out.loss.detach())))
    try:
        with pytest.raises(sam_peft.SelectionError, match=r"burn-in gradient of '([\w.]+)' is NaN") as info:
            sam_peft.select_parameters(model, make_batches(2), dropout=False, progress=False)
    finally:
        handle.remove()
        loss_hook.remove()
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    named = re.search(r"gradient of '([\w.]+)'", str(info.value)).group(1)
    assert named in dict(make_bert().named_parameters())
    assert model.peft_config["default"].counts is None


def _meta_base(kind: str):
    if kind == "torch.device":
        with torch.device("meta"):
            return make_bert()
    from accelerate import init_empty_weights

    with init_empty_weights():
        return make_bert()


@pytest.mark.parametrize("kind", ["torch.device", "init_empty_weights"])
def test_meta_device_base_is_a_selection_error(kind, saved):
    """Nothing to fingerprint on the meta device: the adapter is created, selecting on it is refused clearly."""
    model = sam_model(_meta_base(kind))
    config = model.peft_config["default"]
    assert config.base_fingerprint is None
    assert config.base_shapes_digest == saved.config["base_shapes_digest"]  # shapes are known without data
    with pytest.raises(sam_peft.SelectionError, match="meta device"):
        sam_peft.select_parameters(model, make_batches(1), progress=False)
    assert config.counts is None


def test_adding_an_existing_adapter_name_is_refused():
    model = sam_model()
    before = content(model)
    with pytest.raises(ValueError, match="'default' already exists"):
        model.add_adapter("default", sam_peft.SAMConfig(sparsity=0.1, task_type="SEQ_CLS"))
    assert model.peft_config["default"].sparsity == SPARSITY
    assert_same(content(model), before)


# =========================================================================== 2. atomic files

INJECTED = "injected failure"


def _break_writes(monkeypatch, where: str, file_name: str) -> list:
    """Make the atomic write of `file_name` fail at `where`; returns a list that records each failure."""
    hits = []
    if where == "replace":
        real_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            if Path(dst).name == file_name:
                hits.append(dst)
                raise OSError(28, f"No space left on device ({INJECTED})")
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
    elif where == "fsync":
        def fsync(fd):
            hits.append(fd)
            raise OSError(5, f"Input/output error ({INJECTED})")

        monkeypatch.setattr(os, "fsync", fsync)
    else:  # half of the bytes reach the temporary file, then the disk is full
        real_write = Path.write_bytes

        def write_bytes(self, data):
            if self.name.startswith(f".{file_name}"):
                hits.append(self)
                real_write(self, data[: len(data) // 2])
                raise OSError(28, f"No space left on device ({INJECTED})")
            return real_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", write_bytes)
    return hits


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failed_save_pretrained_keeps_the_old_adapter(saved, tmp_path, monkeypatch, where):
    target = adapter_copy(saved, tmp_path / "adapter")
    before = {name: (target / name).read_bytes() for name in (MODEL_FILE, CONFIG_FILE)}
    newer = sam_model(sparsity=0.1)
    sam_peft.select_parameters(newer, make_batches(1, seed=5), dropout=False, progress=False)
    randomize(newer, seed=3)
    hits = _break_writes(monkeypatch, where, MODEL_FILE)
    with pytest.raises(OSError, match=INJECTED):
        newer.save_pretrained(target)
    monkeypatch.undo()
    assert hits, f"the failure injected at {where!r} was never reached: update this test to the writer"
    for name, data in before.items():
        assert (target / name).read_bytes() == data, name
    assert _leftovers(target) == []
    assert_same(content(PeftModel.from_pretrained(make_bert(), target)), saved.expected)


def test_save_failing_between_the_two_files_never_loads_a_mixture(saved, tmp_path, monkeypatch):
    """The weights are replaced, the config is not: the pair disagrees, and loading says so."""
    target = adapter_copy(saved, tmp_path / "adapter")
    newer = sam_model(sparsity=0.1)
    sam_peft.select_parameters(newer, make_batches(1, seed=5), dropout=False, progress=False)
    hits = _break_writes(monkeypatch, "replace", CONFIG_FILE)
    with pytest.raises(OSError, match=INJECTED):
        newer.save_pretrained(target)
    monkeypatch.undo()
    assert hits and _leftovers(target) == []
    with pytest.raises(sam_peft.DeltaFileError, match="different saves"):
        PeftModel.from_pretrained(make_bert(), target)


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_failed_delta_save_keeps_the_old_file(saved, tmp_path, monkeypatch, where):
    path = tmp_path / "delta.safetensors"
    path.write_bytes(saved.delta_raw)
    other = saved.delta.scale(2.0)
    hits = _break_writes(monkeypatch, where, path.name)
    with pytest.raises(OSError, match=INJECTED):
        other.save(path)
    monkeypatch.undo()
    assert hits, f"the failure injected at {where!r} was never reached: update this test to the writer"
    assert path.read_bytes() == saved.delta_raw
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_have_normal_permissions(saved, tmp_path, umask):
    model = sam_model(selection="random")
    old = os.umask(umask)
    try:
        model.save_pretrained(tmp_path / "adapter")
        saved.delta.save(tmp_path / "delta.safetensors")
    finally:
        os.umask(old)
    for path in (tmp_path / "adapter" / MODEL_FILE, tmp_path / "adapter" / CONFIG_FILE, tmp_path / "delta.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, (path.name, oct(path.stat().st_mode))


# =========================================================================== 3. refusing damaged or foreign adapters


def _write_adapter(saved, dest: Path, tensors=None, config=None) -> Path:
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


def _tensors(saved, fmt: str = "adapter", **changes) -> dict[str, torch.Tensor]:
    source = saved.tensors if fmt == "adapter" else saved.delta_tensors
    tensors = {k: v.clone() for k, v in source.items()}
    for which, value in changes.items():
        key = getattr(KEYS[fmt], which)
        if value is None:
            del tensors[key]
        else:
            tensors[key] = value(tensors[key])
    return tensors


def _set(position, value):
    def change(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[position] = value(t) if callable(value) else value
        return t

    return change


def _swap01(t: torch.Tensor) -> torch.Tensor:
    return t[[1, 0, *range(2, t.numel())]]


def _config(saved, **changes) -> dict:
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


TENSOR_CASES = {
    "index out of range": (dict(idx=_set(-1, 1024)), ["outside [0, 1024)"]),
    "negative index": (dict(idx=_set(0, -1)), ["outside [0, 1024)"]),
    "unsorted indices": (dict(idx=_swap01), ["not strictly increasing"]),
    "duplicated index": (dict(idx=_set(1, lambda t: t[0])), ["not strictly increasing"]),
    "float indices": (dict(idx=lambda t: t.float()), ["int32/int64", "torch.float32"]),
    "2-D indices": (dict(idx=lambda t: t.reshape(1, -1)), ["1-D", "[1, 51]"]),
    "values too short": (dict(val=lambda t: t[:-1]), ["51 indices but 50 values"]),
    "values too long": (dict(val=lambda t: torch.cat([t, t[:1]])), ["51 indices but 52 values"]),
    "NaN value": (dict(val=_set(3, float("nan"))), ["NaN or infinity"]),
    "infinite value": (dict(val=_set(3, float("-inf"))), ["NaN or infinity"]),
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
    data = rewritten(saved, fmt, _tensors(saved, fmt, **changes), checksum)
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
    target = _write_adapter(saved, tmp_path / "adapter", config=_config(saved, **changes))
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
        PeftModel.from_pretrained(make_bert(hidden=48), saved.dir)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None], ids=["with-head", "no-head"])
def test_override_never_allows_other_shapes(tmp_path, monkeypatch, task_type):
    model = get_peft_model(make_bert(), sam_peft.SparseDiffConfig(sparsity=SPARSITY, selection="random",
                                                                  task_type=task_type))
    model.save_pretrained(tmp_path)
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(sam_peft.BaseModelMismatchError, match=OTHER_SHAPES):
        PeftModel.from_pretrained(make_bert(hidden=48), tmp_path)


def test_override_never_allows_other_shapes_for_a_config_without_the_digest(tmp_path, monkeypatch):
    model = get_peft_model(make_bert(), sam_peft.SparseDiffConfig(sparsity=SPARSITY, selection="random"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    del config["base_shapes_digest"]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    monkeypatch.setenv(ENV, "1")
    with pytest.raises(sam_peft.SamPeftError, match="shape"):
        PeftModel.from_pretrained(make_bert(hidden=48), tmp_path)


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
    "missing": (lambda s, c: rewritten(s, "adapter", _tensors(s, head=None), c),
                ["has no tensor", f"'{HEAD}'", "head is missing"]),
    "NaN": (lambda s, c: rewritten(s, "adapter", _tensors(s, head=_set((0, 0), float("nan"))), c),
            [HEAD_IN_MODEL, "contains NaN or infinity"]),
    "infinite": (lambda s, c: rewritten(s, "adapter", _tensors(s, head=_set((1, 3), float("inf"))), c),
                 [HEAD_IN_MODEL, "contains NaN or infinity"]),
    "reshaped": (lambda s, c: rewritten(s, "adapter", _tensors(s, head=lambda t: t.reshape(-1)), c),
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
    "NaN": lambda t: _set((0, 0), float("nan"))(t),
    "infinite": lambda t: _set((1, 3), float("-inf"))(t),
    "int32": lambda t: t.to(torch.int32),
}


@pytest.mark.parametrize("checksum", [False, True], ids=["no-checksum", "checksum"])
@pytest.mark.parametrize("case", list(DELTA_HEAD_CASES))
def test_damaged_delta_head_is_refused(saved, tmp_path, case, checksum):
    data = rewritten(saved, "delta", _tensors(saved, "delta", head=DELTA_HEAD_CASES[case]), checksum)
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
    tensors = _tensors(saved, **{which: lambda t: t.to(dtype)})
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
    target = _write_adapter(saved, tmp_path / "adapter", tensors=tensors)
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


# --------------------------------------------------------------------------- checksums


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


# =========================================================================== 4. fuzzing the saved files


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


def decode(data: bytes) -> dict[str, torch.Tensor] | None:
    try:
        return decode_safetensors(data)
    except Exception:
        return None


def well_formed(decoded: dict[str, torch.Tensor] | None, original: dict[str, torch.Tensor]) -> bool:
    """The same tensors with the same shapes, integer indices, float values, the head's dtype, finite floats."""
    if decoded is None or decoded.keys() != original.keys():
        return False
    for key, tensor in original.items():
        got = decoded[key]
        if got.shape != tensor.shape:
            return False
        if ".sparsediff_indices." in key:
            ok = got.dtype in (torch.int32, torch.int64)
        elif ".sparsediff_values." in key:
            ok = got.dtype.is_floating_point
        else:
            ok = got.dtype == tensor.dtype
        if not ok or (got.dtype.is_floating_point and not bool(torch.isfinite(got).all())):
            return False
    return True


def _refused(exc: Exception) -> SimpleNamespace:
    event("refused")
    return SimpleNamespace(outcome="refused", changed=set(), error=str(exc))


def _loaded(changed: set[str], checksum: bool) -> SimpleNamespace:
    if checksum:  # the hard rule for files written with checksums
        assert not changed, f"a file written with checksums loaded different content: {sorted(changed)}"
    outcome = "undetected change" if changed else "identical"
    event(outcome)
    return SimpleNamespace(outcome=outcome, changed=changed, error=None)


def check_adapter_load(saved, directory: Path, data: bytes, checksum: bool) -> SimpleNamespace:
    """Load tampered adapter bytes under the fuzzing oracle; returns the outcome, the keys whose content changed,
    and the error of a refusal. `checksum`: whether the undamaged file carried checksums."""
    if not directory.exists():
        adapter_copy(saved, directory)
    (directory / MODEL_FILE).write_bytes(data)
    decoded = decode(data)
    try:
        model = PeftModel.from_pretrained(make_bert(), directory)
    except sam_peft.SamPeftError as exc:
        return _refused(exc)
    # Any other exception type propagates and fails the test.
    assert well_formed(decoded, saved.tensors), "a malformed adapter file loaded without error"
    expected = {k: canonical(k, v) for k, v in decoded.items()}
    assert_same(content(model), expected)  # it loads exactly what the bytes say ...
    numels = {n: p.numel() for n, p in make_bert().named_parameters()}
    for key, indices in expected.items():  # ... and only valid entries
        if ".sparsediff_indices." in key:
            module, attr = key.removeprefix(PREFIX).split(".sparsediff_indices.")
            assert indices.numel() == 0 or 0 <= int(indices.min()) <= int(indices.max()) < numels[f"{module}.{attr}"]
            assert bool((indices[1:] > indices[:-1]).all()), key
    return _loaded({k for k in expected if not torch.equal(expected[k], saved.expected[k])}, checksum)


def check_delta_load(saved, path: Path, data: bytes, checksum: bool) -> SimpleNamespace:
    """Load tampered SparseDelta bytes under the fuzzing oracle; returns the outcome, what changed ("entries",
    "shapes", "dense names", "dense values", "metadata <key>") and the error of a refusal."""
    path.write_bytes(data)
    try:
        delta = sam_peft.SparseDelta.load(path)
    except sam_peft.SamPeftError as exc:
        return _refused(exc)
    decoded = decode(data)
    assert decoded is not None, "an unreadable file loaded without error"
    metadata = file_metadata(data)
    # It holds exactly what the bytes say ...
    shapes = json.loads(metadata["shapes"])
    assert delta.shapes == shapes
    assert delta.metadata == {k: v for k, v in metadata.items() if k in METADATA_KEYS}  # unknown keys dropped
    assert set(delta.entries) == set(shapes)
    for name, (indices, values) in delta.entries.items():
        assert torch.equal(indices, decoded[f"sparse.{name}.indices"].long()), name
        assert torch.equal(values, decoded[f"sparse.{name}.values"].float()), name
        numel = int(torch.tensor(shapes[name]).prod())
        # ... and only what is valid.
        assert indices.dim() == 1 and values.shape == indices.shape and bool(torch.isfinite(values).all())
        assert indices.numel() == 0 or (int(indices.min()) >= 0 and int(indices.max()) < numel)
        assert bool((indices[1:] > indices[:-1]).all())
    assert delta.dense.keys() == {k.removeprefix("dense.") for k in decoded if k.startswith("dense.")}
    for name, tensor in delta.dense.items():
        assert torch.equal(tensor, decoded[f"dense.{name}"]) and bool(torch.isfinite(tensor).all())
    changed = set()
    original = saved.delta_loaded
    if delta.entries.keys() != original.entries.keys() or any(
            not torch.equal(a, b) for n in original.entries for a, b in zip(delta.entries[n], original.entries[n])):
        changed.add("entries")
    if delta.shapes != original.shapes:
        changed.add("shapes")
    if delta.dense.keys() != original.dense.keys():
        changed.add("dense names")
    elif any(not torch.equal(delta.dense[n], original.dense[n]) for n in original.dense):
        changed.add("dense values")
    for key in set(delta.metadata) | set(original.metadata):
        if delta.metadata.get(key) != original.metadata.get(key):
            changed.add(f"metadata {key}")
    result = _loaded(changed, checksum)
    # Without checksums: a changed identity is caught when the delta is applied; anything else applies and is
    # removed exactly.
    base = make_bert()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    identity_changed = changed & {"shapes", "dense names"} or (
        "metadata base_fingerprint" in changed and delta.metadata.get("base_fingerprint"))
    if identity_changed:
        with pytest.raises(sam_peft.BaseModelMismatchError):
            delta.apply_to(base)
    else:
        delta.remove_from(delta.apply_to(base))
    assert_same({n: p.detach() for n, p in base.named_parameters()}, before)
    for what in sorted(changed):
        event(f"undetected: {what}")
    return result


def _regions(fmt: str, raw: bytes, checksum: bool) -> SimpleNamespace:
    n, _, spans = layout(raw)
    if fmt == "adapter":
        kinds = {"indices": lambda k: ".sparsediff_indices." in k, "values": lambda k: ".sparsediff_values." in k,
                 "head": lambda k: ".sparsediff_" not in k}
    else:
        kinds = {"indices": lambda k: k.startswith("sparse.") and k.endswith(".indices"),
                 "values": lambda k: k.startswith("sparse.") and k.endswith(".values"),
                 "head": lambda k: k.startswith("dense.")}
    # The name of the checksum key in the header: a flip there is test_damaged_checksum_key_name_... (a known gap).
    skip = (0, 0)
    if checksum:
        start = raw.index(json.dumps(CHECKSUM_KEY).encode(), 8)
        skip = (start, start + len(CHECKSUM_KEY) + 2)
    return SimpleNamespace(raw=raw, header=(8, 8 + n), skip=skip, spans=spans,
                           tensors={kind: sorted(filter(test, spans)) for kind, test in kinds.items()})


@pytest.fixture(scope="module")
def files(saved):
    """{(format, checksum): the saved file (with its checksums, or rewritten without them) and its regions}."""
    return {(fmt, checksum): _regions(fmt, raw if checksum else strip_checksum(raw), checksum)
            for fmt, raw in (("adapter", saved.raw), ("delta", saved.delta_raw)) for checksum in (True, False)}


CHECKSUM_VARIANTS = pytest.mark.parametrize("checksum", [True, False], ids=["checksum", "no-checksum"])
REGIONS = pytest.mark.parametrize("region", ["prefix", "header", "indices", "values", "head"])


def _draw_offset(data, file, region: str) -> tuple[int, str | None]:
    """A byte of `region`, and the tensor it belongs to (for the tensor regions)."""
    if region == "prefix":
        return data.draw(st.integers(0, 7), label="offset"), None
    if region == "header":
        (start, end), (skip_start, skip_end) = file.header, file.skip
        return data.draw(st.integers(start, end - 1).filter(lambda o: not skip_start <= o < skip_end),
                         label="offset"), None
    key = data.draw(st.sampled_from(file.tensors[region]), label="tensor")
    start, end = file.spans[key]
    return data.draw(st.integers(start, end - 1), label="offset"), key


@CHECKSUM_VARIANTS
@REGIONS
@FUZZ_REGION
@given(data=st.data(), bit=st.integers(0, 7))
def test_fuzz_adapter_bit_flip(saved, files, tmp_path, data, region, bit, checksum):
    file = files["adapter", checksum]
    offset, key = _draw_offset(data, file, region)
    result = check_adapter_load(saved, tmp_path / "fuzz", flip(file.raw, offset, bit), checksum)
    event(f"{region}: {result.outcome}")
    if region == "prefix":
        assert result.outcome == "refused"
    elif region == "header":  # tensor bytes can't change; with checksums, neither can anything else
        assert result.outcome != "undetected change"
    elif checksum:
        assert result.outcome == "refused" and f"the bytes of '{key}'" in result.error, result
    else:  # without checksums a flip that leaves a well-formed tensor is undetectable, but it changes nothing else
        assert result.changed <= {key}


@pytest.mark.parametrize("fmt", ["adapter", "delta"])
@CHECKSUM_VARIANTS
@FUZZ
@given(data=st.data(), kind=st.sampled_from(["indices", "values"]))
def test_fuzz_overwrite_one_entry(saved, files, tmp_path, fmt, checksum, data, kind):
    """Any int32 written over one index, or any float32 (NaN and infinities included) over one value."""
    file = files[fmt, checksum]
    key = data.draw(st.sampled_from(file.tensors[kind]), label="tensor")
    start, end = file.spans[key]
    position = data.draw(st.integers(0, (end - start) // 4 - 1), label="position")
    if kind == "indices":
        number = struct.pack("<i", data.draw(st.integers(-(2**31), 2**31 - 1), label="index"))
    else:
        value = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.floats(width=32))
        number = struct.pack("<f", data.draw(value, label="value"))
    corrupted = file.raw[: start + 4 * position] + number + file.raw[start + 4 * position + 4 :]
    if fmt == "adapter":
        result = check_adapter_load(saved, tmp_path / "fuzz", corrupted, checksum)
        allowed = {key}
    else:
        result = check_delta_load(saved, tmp_path / "fuzz.safetensors", corrupted, checksum)
        allowed = {"entries"}
    event(f"{kind}: {result.outcome}")
    if checksum and corrupted != file.raw:
        assert result.outcome == "refused" and f"the bytes of '{key}'" in result.error, result
    elif checksum:  # the same number written over itself
        assert result.outcome == "identical"
    else:
        assert result.changed <= allowed


@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_fuzz_adapter_truncation(saved, tmp_path, fraction):
    directory = tmp_path / "fuzz"
    if not directory.exists():
        adapter_copy(saved, directory)
    (directory / MODEL_FILE).write_bytes(saved.raw[: int(fraction * len(saved.raw))])
    with pytest.raises(sam_peft.DeltaFileError) as info:
        PeftModel.from_pretrained(make_bert(), directory)
    assert str(directory / MODEL_FILE) in str(info.value)


DTYPE_NAMES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL", "F8_E4M3",
               "XX"]
HEADER_OPS = ["dtype", "shape", "rename", "drop", "offsets", "swap", "metadata", "garbage"]


@st.composite
def header_tampering(draw, raw: bytes, keys: list[str]) -> tuple[str, bytes]:
    """A structural change of the header (tensor entries of `keys`, or the metadata); the tensor bytes are kept."""
    n, header, spans = layout(raw)
    op = draw(st.sampled_from(HEADER_OPS))
    key = draw(st.sampled_from(keys))
    entry = header[key]
    if op == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPE_NAMES))
    elif op == "shape":
        entry["shape"] = draw(st.lists(st.integers(0, 2 * VOCAB), max_size=3))
    elif op == "rename":
        header[key + draw(st.sampled_from(["x", ".", "_1"]))] = header.pop(key)
    elif op == "drop":
        del header[key]
    elif op == "offsets":
        which = draw(st.integers(0, 1))
        entry["data_offsets"][which] = max(0, entry["data_offsets"][which] + draw(st.integers(-8, 8)))
    elif op == "swap":  # two tensors with the same number of bytes trade places
        size = spans[key][1] - spans[key][0]
        partners = sorted(k for k in spans if k != key and spans[k][1] - spans[k][0] == size)
        if partners:
            other = header[draw(st.sampled_from(partners))]
            entry["data_offsets"], other["data_offsets"] = other["data_offsets"], entry["data_offsets"]
    elif op == "metadata":
        meta = header.setdefault("__metadata__", {})
        change = draw(st.sampled_from(["delete", "edit", "add"]))
        if change == "delete":
            header.pop("__metadata__")
        elif change == "edit" and meta:
            meta[draw(st.sampled_from(sorted(meta)))] = draw(st.text(max_size=12))
        else:
            meta[draw(st.text(min_size=1, max_size=8))] = draw(st.text(max_size=12))
    else:
        return op, rebuild(raw, draw(st.binary(max_size=64)))
    return op, rebuild(raw, header)


@CHECKSUM_VARIANTS
@FUZZ
@given(data=st.data())
def test_fuzz_adapter_header_tampering(saved, files, tmp_path, data, checksum):
    file = files["adapter", checksum]
    op, tampered = data.draw(header_tampering(file.raw, sorted(file.spans)))
    result = check_adapter_load(saved, tmp_path / "fuzz", tampered, checksum)  # with checksums: never a change
    event(f"{op}: {result.outcome}")
    if op not in ("swap", "offsets"):  # only moving tensor bytes around can change well-formed content
        assert result.outcome != "undetected change"


# --------------------------------------------------------------------------- SparseDelta files


@CHECKSUM_VARIANTS
@REGIONS
@FUZZ_REGION
@given(data=st.data(), bit=st.integers(0, 7))
def test_fuzz_delta_bit_flip(saved, files, tmp_path, data, region, bit, checksum):
    file = files["delta", checksum]
    offset, key = _draw_offset(data, file, region)
    result = check_delta_load(saved, tmp_path / "fuzz.safetensors", flip(file.raw, offset, bit), checksum)
    event(f"{region}: {result.outcome}")
    if region == "prefix":
        assert result.outcome == "refused"
    elif region == "header":  # tensor bytes can't change; without checksums names, shapes and metadata can
        assert not result.changed & {"entries", "dense values"}
    elif checksum:
        assert result.outcome == "refused" and f"the bytes of '{key}'" in result.error, result
    else:  # undetectable without checksums when the tensor stays well formed, but nothing else changes
        assert result.changed <= ({"dense values"} if region == "head" else {"entries"})


@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_fuzz_delta_truncation(saved, tmp_path, fraction):
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(saved.delta_raw[: int(fraction * len(saved.delta_raw))])
    with pytest.raises(sam_peft.DeltaFileError) as info:
        sam_peft.SparseDelta.load(path)
    assert str(path) in str(info.value)


@CHECKSUM_VARIANTS
@FUZZ
@given(data=st.data())
def test_fuzz_delta_header_tampering(saved, files, tmp_path, data, checksum):
    file = files["delta", checksum]
    op, tampered = data.draw(header_tampering(file.raw, sorted(file.spans)))
    result = check_delta_load(saved, tmp_path / "fuzz.safetensors", tampered, checksum)  # checksums: no change
    event(f"{op}: {result.outcome}")
    # Without checksums, dropping or renaming a dense tensor and editing metadata go undetected (a delta file does
    # not list its dense tensors); only moving tensor bytes around can change the numbers.
    if op not in ("swap", "offsets"):
        assert not result.changed & {"entries", "dense values"}


# =========================================================================== 5. a crash during training


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys

    import torch

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    import sam_peft

    mode, output_dir, final_dir, report_path = sys.argv[1:5]


    class Data(torch.utils.data.Dataset):
        def __init__(self, n=48, seed=11):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(1, 100, (n, 8), generator=g)
            self.labels = torch.randint(0, 2, (n,), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "attention_mask": torch.ones(8, dtype=torch.long),
                    "labels": self.labels[i]}


    class Crash(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 4:  # right after checkpoint-4 is written: die like a killed process
                os.kill(os.getpid(), signal.SIGKILL)


    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, pad_token_id=0, num_labels=2)
    model = get_peft_model(BertForSequenceClassification(config),
                           sam_peft.SAMConfig(sparsity=0.05, task_type="SEQ_CLS"))
    sam = sam_peft.SAMCallback(burn_in_steps=2, dropout=False)
    args = TrainingArguments(output_dir=output_dir, max_steps=6, save_steps=2, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Data(),
                      callbacks=[sam] + ([Crash()] if mode == "crash" else []))
    trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    model.save_pretrained(final_dir)
    with open(report_path, "w") as f:
        json.dump({"report_is_none": sam.report is None, "global_step": trainer.state.global_step,
                   "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}, f)
    """
)


def _start(script: Path, tmp_path: Path, mode: str, run: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop(ENV, None)
    args = [sys.executable, str(script), mode, str(tmp_path / run), str(tmp_path / f"{run}-final"),
            str(tmp_path / f"{run}-{mode}.json")]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> str:
    try:
        return proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    crashed, uninterrupted = _start(script, tmp_path, "crash", "a"), _start(script, tmp_path, "plain", "b")
    crash_log, plain_log = _finish(crashed), _finish(uninterrupted)
    assert crashed.returncode == -signal.SIGKILL, crash_log[-3000:]
    assert uninterrupted.returncode == 0, plain_log[-3000:]
    checkpoints = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("checkpoint-"))
    assert checkpoints == ["checkpoint-2", "checkpoint-4"] and not (tmp_path / "a-final").exists()

    resumed = _start(script, tmp_path, "resume", "a")
    resume_log = _finish(resumed)
    assert resumed.returncode == 0, resume_log[-3000:]
    report = json.loads((tmp_path / "a-resume.json").read_text())
    reference = json.loads((tmp_path / "b-plain.json").read_text())
    assert report["report_is_none"], "the resumed run selected its entries again"
    assert not reference["report_is_none"]
    assert report["global_step"] == reference["global_step"] == 6
    assert report["losses"] == reference["losses"]

    final = load_file(str(tmp_path / "a-final" / MODEL_FILE))
    expected = load_file(str(tmp_path / "b-final" / MODEL_FILE))
    assert final.keys() == expected.keys()
    for key in expected:  # bit-identical: indices and values
        assert final[key].dtype == expected[key].dtype and torch.equal(final[key], expected[key]), key
    values = [t for k, t in expected.items() if ".sparsediff_values." in k]
    assert sum(int(torch.count_nonzero(v)) for v in values) > 0  # it really trained
    configs = [json.loads((tmp_path / run / CONFIG_FILE).read_text()) for run in ("a-final", "b-final")]
    assert configs[0]["counts"] == configs[1]["counts"]
    assert configs[0]["base_fingerprint"] == configs[1]["base_fingerprint"]


# =========================================================================== 6. half precision


def _half_model(dtype: torch.dtype):
    model = get_peft_model(make_bert().to(dtype), sam_peft.SparseDiffConfig(
        sparsity=SPARSITY, selection="magnitude", task_type="SEQ_CLS"))
    randomize(model)
    return model


@pytest.mark.filterwarnings("ignore:Already unmerged")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_values_are_float32_and_unmerge_restores_the_base(dtype):
    model = _half_model(dtype)
    values = {n: p for n, p in model.named_parameters() if ".sparsediff_values." in n}
    assert values and all(p.dtype == torch.float32 for p in values.values())
    assert all(p.dtype == dtype for p in base_weights(model).values())
    before = base_weights(model)
    inputs = make_batches(1)[0]
    inputs.pop("labels")
    with torch.no_grad():
        unmerged_out = model(**inputs).logits
    model.merge_adapter()
    merged = base_weights(model)
    assert any(not torch.equal(merged[n], before[n]) for n in before)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, unmerged_out, rtol=0.05, atol=0.05)
    model.unmerge_adapter()
    eps = torch.finfo(dtype).eps
    v_max = max(float(v.detach().abs().max()) for v in values.values() if v.numel())
    for name, restored in base_weights(model).items():
        bound = 2 * eps * (float(before[name].float().abs().max()) + v_max)
        assert float((restored.float() - before[name].float()).abs().max()) <= bound, name


@pytest.mark.parametrize(
    "dtype, huge, refused",
    [(torch.float16, 1e30, True), (torch.bfloat16, 3.4e38, True), (torch.bfloat16, 1e30, False)],
    ids=["fp16-1e30", "bf16-3.4e38", "bf16-1e30-fits"],
)
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_overflow_and_leaves_the_base_unchanged(dtype, huge, refused, how):
    model = _half_model(dtype)
    names = [n for n, p in model.named_parameters() if ".sparsediff_values." in n and p.numel()]
    with torch.no_grad():  # the last layer overflows: every earlier layer would merge first
        model.get_parameter(names[-1])[0] = huge
    before = base_weights(model)
    merge = (lambda: model.merge_adapter(safe_merge=True)) if how == "merge_adapter" else (
        lambda: model.merge_and_unload(safe_merge=True))
    if not refused:  # 1e30 is finite in bfloat16
        merge()
        return
    with pytest.raises(ValueError, match="non-finite") as info:
        merge()
    assert "unchanged" in str(info.value)
    assert_same(base_weights(model), before)
    assert not any(getattr(m, "merged", False) for m in model.modules())


def test_selecting_an_inference_mode_adapter_is_refused(tmp_path):
    model = get_peft_model(make_bert(), sam_peft.SAMConfig(sparsity=SPARSITY))
    sam_peft.select_parameters(model, make_batches(1), dropout=False, progress=False)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_bert(), tmp_path)  # is_trainable=False: values frozen
    with pytest.raises(sam_peft.SelectionError, match="inference mode"):
        sam_peft.select_parameters(loaded, make_batches(1), progress=False)
