"""Atomic writes: a save that fails at any point keeps the previous adapter or delta file whole, never leaves a
mixture of old and new files or temporary files behind, and writes files with normal permissions."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import make_batches, make_bert, sam_model
from peft import PeftModel
from saved_files import (
    CONFIG_FILE,
    MODEL_FILE,
    adapter_copy,
    assert_same,
    content,
    randomize,
)

import sam_peft

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
