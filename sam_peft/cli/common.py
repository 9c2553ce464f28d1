"""Helpers shared by the subcommands: plain tables, the metrics.json of a run, and what a directory holds.

`sam-peft train` writes `OUT/adapter/` for every method: a sparse delta (sam, fisher, ..., bitfit), another peft
adapter (lora, adapter and the other bottleneck/unified tuners) or a full model (full and the dense baselines).
`identify` tells them apart and, for a directory none of the subcommands can use, says what it is instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DeltaFileError
from ..tuner.peft_type import PEFT_TYPE

SPARSE_DELTA, PEFT_ADAPTER, FULL_MODEL = "sparse delta", "peft adapter", "full model"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
              "vocab.json", "spiece.model", "tokenizer.model")


def print_table(rows: list[tuple[str, object]]) -> None:
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{str(key):<{width}}  {value}")


def run_info(adapter_dir: Path) -> dict:
    for candidate in (adapter_dir / "metrics.json", adapter_dir.parent / "metrics.json"):
        if candidate.is_file():
            try:
                return json.loads(candidate.read_text())
            except json.JSONDecodeError:
                return {}
    return {}


@dataclass
class Artifact:
    """A directory that `sam-peft train` (or save_pretrained) wrote: what it is and its config."""

    kind: str  # SPARSE_DELTA, PEFT_ADAPTER or FULL_MODEL
    path: Path
    config: dict = field(default_factory=dict)  # adapter_config.json or config.json
    run: dict = field(default_factory=dict)  # the run's metrics.json, if any

    @property
    def peft_type(self) -> str | None:
        return self.config.get("peft_type") if self.kind != FULL_MODEL else None

    @property
    def method(self) -> str | None:
        return self.run.get("method")

    def describe(self) -> str:
        """e.g. "a peft adapter (BOTTLENECK, written by `sam-peft train --method adapter`)"."""
        what = {SPARSE_DELTA: "a sam-peft sparse delta", PEFT_ADAPTER: f"a peft adapter ({self.peft_type})",
                FULL_MODEL: f"a full model ({', '.join(self.config.get('architectures') or ['unknown class'])})"}
        text = what[self.kind]
        if self.method:
            text += f", written by `sam-peft train --method {self.method}`"
        return text

    def base_model(self, explicit: str | None) -> str:
        """The base model to load: `explicit`, else the one the run recorded, else the packaged default."""
        from ..training import PACKAGED_MODEL, default_model_path

        if explicit:
            return explicit
        recorded = (self.run.get("settings") or {}).get("model") or self.run.get("model")
        if recorded and recorded != PACKAGED_MODEL:
            return recorded
        return default_model_path()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DeltaFileError(f"{path} is not valid JSON ({exc}); the file is corrupted.") from exc
    if not isinstance(data, dict):
        raise DeltaFileError(f"{path} holds a JSON {type(data).__name__}, not an object; the file is corrupted.")
    return data


def identify(path: str | Path) -> Artifact:
    """What `path` holds (a run's output directory stands for its `adapter/` folder); raises `DeltaFileError`
    saying what the directory is when it is none of a sparse delta, a peft adapter or a full model."""
    path = Path(path)
    if (path / "adapter").is_dir() and not (path / "adapter_config.json").exists():
        path = path / "adapter"
    if (path / "adapter_config.json").is_file():
        config = _read_json(path / "adapter_config.json")
        kind = SPARSE_DELTA if config.get("peft_type") == PEFT_TYPE.value else PEFT_ADAPTER
        if kind == PEFT_ADAPTER and not config.get("peft_type"):
            raise DeltaFileError(f"{path} has an adapter_config.json without a peft_type: it is not a peft adapter "
                                 "directory (or its config is damaged).")
        return Artifact(kind, path, config, run_info(path))
    if (path / "config.json").is_file() and any((path / name).is_file() for name in _WEIGHTS):
        return Artifact(FULL_MODEL, path, _read_json(path / "config.json"), run_info(path))
    raise DeltaFileError(f"{path} is {describe_unusable(path)}; pass a directory written by `sam-peft train` "
                         "(or its adapter/ folder), by save_pretrained, or a full model directory.")


def describe_unusable(path: Path) -> str:
    """What a directory that is neither an adapter nor a model is, in words."""
    if not path.exists():
        return "not there (no such file or directory; no adapter_config.json)"
    if path.is_file():
        return f"a file ({path.suffix or 'no suffix'}), not a directory{_file_hint(path)}"
    names = sorted(p.name for p in path.iterdir())
    if not names:
        return "an empty directory (no adapter_config.json, no model)"
    if (path / "metrics.json").is_file() and not (path / "adapter").exists():
        return "the output directory of a `sam-peft train` run without its adapter/ folder (removed, or the run " \
               "did not finish)"
    if (path / "config.json").is_file():
        return "a model configuration without weights (config.json but no model.safetensors)"
    if all(name in _TOKENIZER for name in names):
        return "a tokenizer only (no adapter_config.json, no model weights)"
    if any(name.startswith("checkpoint-") for name in names):
        return "a Trainer checkpoints folder (use the run's adapter/ folder)"
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    return f"a directory without adapter_config.json or config.json (it holds: {shown})"


def _file_hint(path: Path) -> str:
    if path.suffix in (".safetensors", ".json", ".bin"):
        return f" (its directory {path.parent} may be what you meant)"
    return ""
