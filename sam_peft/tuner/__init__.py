"""The sparse-delta peft tuner: config, layers, autograd ops and model, registered with peft on import."""

from .config import SAMConfig, SparseDiffConfig
from .model import SparseDiffModel
from .peft_type import PEFT_TYPE, PREFIX
from .registration import register

register()

__all__ = ["PEFT_TYPE", "PREFIX", "SAMConfig", "SparseDiffConfig", "SparseDiffModel", "register"]
