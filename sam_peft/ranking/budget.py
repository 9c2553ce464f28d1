"""Entry budgets: how many entries each group of tensors keeps, for both allocations."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

ALLOCATIONS = ("per_tensor", "global")


def entry_budget(sparsity: float, numel: int) -> int:
    """floor(p·numel), with p taken as the exact decimal the user wrote (no float round-down)."""
    return int(Fraction(repr(float(sparsity))) * numel)


@dataclass(frozen=True)
class Budget:
    """Tensors grouped for a top-k: `groups[i]` is tensor i's group, `ks[g]` the entries group g keeps."""

    groups: tuple[int, ...]
    ks: tuple[int, ...]


def budget(sparsity: float, allocation: str, sizes: Sequence[int]) -> Budget:
    """The budget of tensors of these sizes: "per_tensor" keeps floor(p·nᵢ) of each tensor (one group per tensor),
    "global" keeps floor(p·Σnᵢ) over all of them together (one group)."""
    if allocation == "global":
        return Budget((0,) * len(sizes), (entry_budget(sparsity, sum(sizes)),))
    if allocation == "per_tensor":
        return Budget(tuple(range(len(sizes))), tuple(entry_budget(sparsity, n) for n in sizes))
    raise ValueError(f"allocation={allocation!r} is unknown; choose one of {list(ALLOCATIONS)}.")


def placeholder_count(sparsity: float, allocation: str, budgeted: bool, numel: int) -> int:
    """Entries a tensor holds before its selection: its per-tensor budget, else 0 (a global or unbudgeted selection
    sizes it when it runs)."""
    return budget(sparsity, allocation, [numel]).ks[0] if allocation == "per_tensor" and budgeted else 0
