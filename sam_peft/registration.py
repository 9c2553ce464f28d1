"""Registration of the sparse-delta tuner with peft.

peft's `register_peft_method` requires a member of its `PeftType` enum, so the enum is extended first.
peft's `save_pretrained` writes the adapter file in place with fixed metadata; sam-peft routes that write
through an atomic writer that also records the base model's identity for sparse-delta adapters.
"""

from __future__ import annotations

import contextvars
import os

import peft.peft_model
import peft.utils.save_and_load
from peft.utils import PeftType, register_peft_method

METHOD_NAME = "sparsediff"
PREFIX = METHOD_NAME + "_"


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to peft's `PeftType` enum, once."""
    member_name = name.upper()
    if member_name in PeftType.__members__:
        return PeftType[member_name]
    member = str.__new__(PeftType, member_name)
    member._name_ = member_name
    member._value_ = member_name
    member.__objclass__ = PeftType
    member.__init__()
    PeftType._member_map_[member_name] = member
    PeftType._value2member_map_[member_name] = member
    PeftType._member_names_.append(member_name)
    type.__setattr__(PeftType, member_name, member)
    return member


PEFT_TYPE = _extend_peft_type(METHOD_NAME)
BOTTLENECK_PEFT_TYPE = _extend_peft_type("bottleneck")

# The PeftModel being saved, so the adapter-file writer can record its base model's identity.
_SAVING_MODEL: contextvars.ContextVar = contextvars.ContextVar("sam_peft_saving_model", default=None)


def _atomic_peft_save_file(tensors, filename, metadata=None):
    """Drop-in for safetensors' `save_file` inside peft: atomic, with base identity for sparse deltas."""
    from .io import save_safetensors_atomic
    from .model import identity_metadata

    metadata = dict(metadata or {})
    saving = _SAVING_MODEL.get()
    if saving is not None and any(f".{PREFIX}indices." in key for key in tensors):
        model, save_directory = saving
        file_dir = os.path.dirname(os.path.abspath(filename))
        if file_dir == os.path.abspath(save_directory):
            adapter_name = "default"
        else:  # peft writes adapter `name` into save_directory/name
            adapter_name = os.path.basename(file_dir)
        if adapter_name in model.peft_config:
            metadata.update(identity_metadata(model.peft_config[adapter_name]))
    save_safetensors_atomic(tensors, filename, metadata=metadata)


def _checked_peft_load_file(filename, device="cpu"):
    """Drop-in for safetensors' `load_file` inside peft: a clear error that names a damaged file."""
    from .io import load_safetensors_checked

    tensors, _ = load_safetensors_checked(filename)
    return {key: tensor.to(device) for key, tensor in tensors.items()}


def _wrap_set_state_dict(original):
    def set_peft_model_state_dict(model, peft_model_state_dict, adapter_name="default", *args, **kwargs):
        config = getattr(model, "peft_config", {}).get(adapter_name)
        try:
            return original(model, peft_model_state_dict, adapter_name, *args, **kwargs)
        except KeyError as exc:
            if getattr(config, "peft_type", None) != PEFT_TYPE:
                raise
            from .errors import DeltaFileError

            raise DeltaFileError(f"the adapter file has no tensor {exc}; it is incomplete (e.g. its trained head "
                                 "is missing). Save the adapter again.") from exc

    set_peft_model_state_dict.__wrapped__ = original
    return set_peft_model_state_dict


def _wrap_save_pretrained(original):
    def save_pretrained(self, save_directory, *args, **kwargs):
        token = _SAVING_MODEL.set((self, save_directory))
        try:
            return original(self, save_directory, *args, **kwargs)
        finally:
            _SAVING_MODEL.reset(token)

    save_pretrained.__doc__ = original.__doc__
    save_pretrained.__wrapped__ = original
    return save_pretrained


def register() -> None:
    """Register the tuner with peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .bottleneck import PREFIX as BOTTLENECK_PREFIX
    from .bottleneck import BottleneckConfig, BottleneckModel
    from .config import SparseDiffConfig
    from .model import SparseDiffModel

    if PEFT_TYPE in PEFT_TYPE_TO_CONFIG_MAPPING:
        return
    register_peft_method(name=METHOD_NAME, config_cls=SparseDiffConfig, model_cls=SparseDiffModel, prefix=PREFIX)
    register_peft_method(name="bottleneck", config_cls=BottleneckConfig, model_cls=BottleneckModel,
                         prefix=BOTTLENECK_PREFIX)
    peft.peft_model.safe_save_file = _atomic_peft_save_file
    peft.utils.save_and_load.safe_load_file = _checked_peft_load_file
    if not hasattr(peft.peft_model.set_peft_model_state_dict, "__wrapped__"):
        peft.peft_model.set_peft_model_state_dict = _wrap_set_state_dict(peft.peft_model.set_peft_model_state_dict)
    if not hasattr(peft.peft_model.PeftModel.save_pretrained, "__wrapped__"):
        peft.peft_model.PeftModel.save_pretrained = _wrap_save_pretrained(peft.peft_model.PeftModel.save_pretrained)
