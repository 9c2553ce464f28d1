"""The peft type of the sparse-delta tuner (its state-dict prefix is the file format's: `storage.keys`).

peft's `register_peft_method` needs a member of its `PeftType` enum, so the enum is extended (once per name).
"""

from __future__ import annotations

from peft.utils import PeftType

from ..storage.keys import METHOD_NAME, PREFIX

__all__ = ["METHOD_NAME", "PEFT_TYPE", "PREFIX", "extend_peft_type"]


def extend_peft_type(name: str) -> PeftType:
    """Add `name` (upper case) to peft's `PeftType` enum, once, and return the member."""
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


PEFT_TYPE = extend_peft_type(METHOD_NAME)
