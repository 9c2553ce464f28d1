"""The selection signals, one registry: what each needs from the burn-in and how it scores an entry.

A signal is data-free (scored from θ0 alone when the adapter is created) or needs burn-in statistics,
accumulated in fp32 per targeted parameter: `grad_sum` (Σ_t g_t), `grad_sq_sum` (Σ_t g_t²) or `hessian_sum`
(Σ z⊙Hz, a Hutchinson estimate of the Hessian diagonal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

HESSIAN_FLOOR = 1e-12


def magnitude_scores(param: torch.Tensor) -> torch.Tensor:
    """|θ0|: keep the largest pretrained weights."""
    return param.detach().abs().to(torch.float32)


def random_scores(param: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform random scores from a seeded generator (a random mask)."""
    return torch.rand(param.shape, generator=generator, dtype=torch.float32).to(param.device)


def sam_scores(grad_sum: torch.Tensor) -> torch.Tensor:
    """(Σ_t g_t)²: the paper's SAM score (Theorem 3 with h_ii bounded by λ_max)."""
    return grad_sum.square()


def fisher_scores(grad_sq_sum: torch.Tensor) -> torch.Tensor:
    """Σ_t g_t²: the empirical Fisher diagonal (FISH mask)."""
    return grad_sq_sum


def sam_hessian_scores(grad_sum: torch.Tensor, hessian_sum: torch.Tensor) -> torch.Tensor:
    """(Σ g)² / |ĥ|: Theorem 3 before the λ_max bound, with a Hutchinson Hessian-diagonal estimate ĥ.

    |ĥ| is floored at 1e-12 so entries with a vanishing curvature estimate do not divide by zero.
    """
    return grad_sum.square() / hessian_sum.abs().clamp_min(HESSIAN_FLOOR)


@dataclass(frozen=True)
class Signal:
    """A selection signal: the burn-in statistics it needs (none: data-free) and its score function."""

    name: str
    statistics: tuple[str, ...]
    score: Callable[..., torch.Tensor] | None  # called with the statistics as keyword arguments
    budgeted: bool = True  # False: keeps a fixed set (bitfit: every bias), not floor(p·N) entries

    @property
    def needs_data(self) -> bool:
        return bool(self.statistics)


SIGNALS: dict[str, Signal] = {
    signal.name: signal
    for signal in (
        Signal("sam", ("grad_sum",), sam_scores),
        Signal("fisher", ("grad_sq_sum",), fisher_scores),
        Signal("sam_hessian", ("grad_sum", "hessian_sum"), sam_hessian_scores),
        Signal("magnitude", (), None),
        Signal("random", (), None),
        Signal("bitfit", (), None, budgeted=False),
    )
}
SELECTIONS = tuple(SIGNALS)
DATA_FREE_SELECTIONS = tuple(name for name, signal in SIGNALS.items() if not signal.needs_data)
