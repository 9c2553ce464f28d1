"""Adapter tuners of the baselines, registered with peft when their module is imported."""

from .bottleneck import BottleneckConfig, BottleneckModel
from .unified import AdapterConfig, MAMConfig, PrefixConfig, UnifiedModel

__all__ = ["AdapterConfig", "BottleneckConfig", "BottleneckModel", "MAMConfig", "PrefixConfig", "UnifiedModel"]
