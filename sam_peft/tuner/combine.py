"""Combining sparse deltas of one tensor: a weighted sum over the union of their entries, or a sign-aware merge.

Every combination works on the union U of the deltas' indices, as a small (deltas × |U|) table, never on a dense
tensor:

- `linear`: Σ_j w_j Δ_j.
- `ties` (TIES-merging, Yadav et al. 2023): trim each delta to its `density` fraction of largest-magnitude
  entries, elect each entry's sign as the sign of Σ_j Δ_j (`majority_sign_method="total"`) or of Σ_j sign(Δ_j)
  (`"frequency"`), and average the weighted entries that agree with it (a disjoint mean).
- `dare_linear` (DARE, Yu et al. 2024): drop each entry with probability 1 − `density` (seeded), rescale the kept
  ones by 1 / `density`, then sum as `linear`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError

COMBINATIONS = ("linear", "ties", "dare_linear")
SIGN_METHODS = ("total", "frequency")


@dataclass(frozen=True)
class Combination:
    """How deltas are combined; `record()` is what a combined adapter stores about its origin."""

    adapters: tuple[str, ...]
    weights: tuple[float, ...]
    combination_type: str = "linear"
    density: float | None = None
    majority_sign_method: str = "total"
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.adapters:
            raise ConfigError("combining needs at least one delta.")
        if len(self.weights) != len(self.adapters):
            raise ConfigError(f"got {len(self.weights)} weights for {len(self.adapters)} deltas; give one weight "
                              "per delta.")
        if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in self.weights):
            raise ConfigError(f"weights must be finite numbers, got {list(self.weights)}.")
        if self.combination_type not in COMBINATIONS:
            raise ConfigError(f"combination_type={self.combination_type!r} is not supported for sparse deltas; "
                              f"choose one of {list(COMBINATIONS)}.")
        if self.combination_type == "linear":
            if self.density is not None:
                raise ConfigError("density applies to 'ties' and 'dare_linear' only; leave it out for 'linear'.")
        elif self.density is None or not 0 < self.density <= 1:
            raise ConfigError(f"combination_type={self.combination_type!r} needs a density in (0, 1], got "
                              f"{self.density!r}.")
        if self.majority_sign_method not in SIGN_METHODS:
            raise ConfigError(f"majority_sign_method={self.majority_sign_method!r}; choose one of "
                              f"{list(SIGN_METHODS)}.")

    def record(self) -> dict:
        return {"adapters": list(self.adapters), "weights": [float(w) for w in self.weights],
                "combination_type": self.combination_type, "density": self.density,
                "majority_sign_method": self.majority_sign_method if self.combination_type == "ties" else None,
                "seed": self.seed if self.combination_type == "dare_linear" else None}

    def combine(self, parts: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted int64 union of indices, fp32 values) of one tensor; `parts[j]` is delta j's (indices, values)
        there, or None where it has no entry. `generator` draws DARE's drops (seeded from `seed` if None)."""
        present = [(j, p) for j, p in enumerate(parts) if p is not None and p[0].numel()]
        device = present[0][1][1].device if present else torch.device("cpu")
        if not present:
            return torch.empty(0, dtype=torch.long, device=device), torch.empty(0, dtype=torch.float32, device=device)
        union, inverse = torch.unique(torch.cat([i.long() for _, (i, _) in present]), sorted=True,
                                      return_inverse=True)
        table = torch.zeros(len(parts), union.numel(), dtype=torch.float32, device=device)
        start = 0
        for j, (indices, values) in present:
            table[j, inverse[start : start + indices.numel()]] = values.detach().float()
            start += indices.numel()
        weights = torch.tensor(self.weights, dtype=torch.float32, device=device).unsqueeze(1)
        if self.combination_type == "dare_linear":
            if generator is None:
                generator = torch.Generator().manual_seed(self.seed)
            keep = torch.rand(table.shape, generator=generator).to(device) < self.density
            return union, (table * keep / self.density * weights).sum(0)
        if self.combination_type == "linear":
            return union, (table * weights).sum(0)
        table = _trim(table, self.density)
        votes = table if self.majority_sign_method == "total" else table.sign()
        elected = torch.where(votes.sum(0) >= 0, 1.0, -1.0)
        agree = table.sign() == elected
        count = agree.sum(0).clamp_min(1)
        return union, (table * weights * agree).sum(0) / count


def _trim(table: torch.Tensor, density: float) -> torch.Tensor:
    """Keep, in each row, the ceil(density · nnz) entries of largest magnitude (ties to the lower position)."""
    out = torch.zeros_like(table)
    for j, row in enumerate(table):
        nonzero = int((row != 0).sum())
        keep = math.ceil(density * nonzero)
        if keep:
            order = torch.sort(row.abs(), descending=True, stable=True).indices[:keep]
            out[j, order] = row[order]
    return out
