"""Adapter tuners of the baselines, registered with peft when their module is imported."""

from .bottleneck import BottleneckConfig, BottleneckModel

__all__ = ["BottleneckConfig", "BottleneckModel"]
