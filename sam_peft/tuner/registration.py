"""Registration of the sparse-delta tuner with peft: one call, made when `sam_peft.tuner` is imported.

peft writes every adapter's weights with one module-level function and offers no per-method hook for it. sam-peft
puts a dispatcher there that hands any state dict without sparse-delta tensors to peft's own function unchanged
(LoRA and every other method write byte-identical files), and writes sam-peft adapters atomically with checksums.
Likewise, peft's state-dict loader is wrapped only to turn the KeyError of an incomplete sam-peft adapter file
into a `DeltaFileError`; every other call and result passes through unchanged. The rest (identity metadata,
checksum verification on load, clear errors) runs in sam-peft's own config and tuner hooks, for its own adapters.
"""

from __future__ import annotations

import peft.peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import register_peft_method

from ..errors import DeltaFileError
from ..storage.io import save_safetensors_atomic
from ..storage.keys import holds_delta
from .config import SparseDiffConfig
from .model import SparseDiffModel
from .peft_type import METHOD_NAME, PEFT_TYPE, PREFIX


def _dispatch_save_file(original):
    def save_file(tensors, filename, metadata=None):
        if holds_delta(tensors):
            return save_safetensors_atomic(tensors, filename, metadata=metadata)
        return original(tensors, filename, metadata=metadata)

    save_file.__wrapped__ = original
    return save_file


def _refine_missing_key_error(original):
    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        try:
            return original(model, peft_model_state_dict, adapter_name, *args, **kwargs)
        except KeyError as exc:
            config = getattr(model, "peft_config", {}).get(adapter_name)
            if getattr(config, "peft_type", None) != PEFT_TYPE:
                raise
            raise DeltaFileError(f"the adapter file has no tensor {exc}; it is incomplete (e.g. its trained head "
                                 "is missing). Save the adapter again.") from exc

    set_peft_model_state_dict.__wrapped__ = original
    return set_peft_model_state_dict


def register() -> None:
    """Register the tuner with peft (idempotent)."""
    if PEFT_TYPE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=METHOD_NAME, config_cls=SparseDiffConfig, model_cls=SparseDiffModel, prefix=PREFIX)
    if not hasattr(peft.peft_model.safe_save_file, "__wrapped__"):
        peft.peft_model.safe_save_file = _dispatch_save_file(peft.peft_model.safe_save_file)
    if not hasattr(peft.peft_model.set_peft_model_state_dict, "__wrapped__"):
        peft.peft_model.set_peft_model_state_dict = _refine_missing_key_error(peft.peft_model.set_peft_model_state_dict)
