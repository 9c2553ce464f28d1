"""`BurnInOptions`: every setting of a burn-in, validated once when it is built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..ranking.signals import Signal, signal_named

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _positive_int(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


@dataclass(frozen=True)
class BurnInOptions:
    """How a burn-in runs (see `sam_peft.select_parameters` for each setting); invalid values raise on creation."""

    selection: str
    num_steps: int | None = None
    per_example: bool = False
    hutchinson_samples: int = 1
    dropout: bool = True
    progress: bool = True
    statistics_dtype: torch.dtype | str = torch.float32
    max_grad_norm: float | None = None
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None
    max_statistics_bytes: int | None = None

    def __post_init__(self) -> None:
        signal_named(self.selection)
        if self.num_steps is not None and not _positive_int(self.num_steps):
            raise ValueError(f"num_steps={self.num_steps!r} must be a positive number of batches (or None for all).")
        if not _positive_int(self.hutchinson_samples):
            raise ConfigError(f"hutchinson_samples={self.hutchinson_samples!r} must be a positive integer (probes "
                              "per batch of the sam_hessian signal).")
        dtype = _DTYPES.get(self.statistics_dtype, self.statistics_dtype) if isinstance(self.statistics_dtype, str) \
            else self.statistics_dtype
        if dtype not in (torch.float32, torch.bfloat16):
            raise ConfigError(f"statistics_dtype={self.statistics_dtype!r} must be torch.float32 (default) or "
                              "torch.bfloat16.")
        object.__setattr__(self, "statistics_dtype", dtype)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(f"loss_fn={self.loss_fn!r} must be a callable (model, batch) -> scalar loss tensor.")
        if self.max_grad_norm is not None and not (
                isinstance(self.max_grad_norm, (int, float)) and not isinstance(self.max_grad_norm, bool)
                and self.max_grad_norm > 0):
            raise ConfigError(f"max_grad_norm={self.max_grad_norm!r} must be a positive number (or None: no "
                              "clipping).")
        if self.max_statistics_bytes is not None and not _positive_int(self.max_statistics_bytes):
            raise ConfigError(f"max_statistics_bytes={self.max_statistics_bytes!r} must be a positive number of bytes "
                              "(an int), or None: every statistic in one burn-in pass.")

    @property
    def signal(self) -> Signal:
        return signal_named(self.selection)

    @property
    def per_example_fisher(self) -> bool:
        """Square per-example gradients (the FISH mask) rather than batch ones."""
        return self.per_example and self.selection == "fisher"
