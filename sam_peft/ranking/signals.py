"""The selection signals, one registry: what each needs and how it scores an entry.

A signal scores entries from burn-in statistics, accumulated per targeted parameter (`grad_sum` Σ_t g_t,
`grad_sq_sum` Σ_t g_t², `hessian_sum` Σ z⊙Hz, a Hutchinson estimate of the Hessian diagonal), or, when data-free,
from the pretrained weights θ0 alone; an unbudgeted signal keeps whole tensors instead of floor(p·N) entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ConfigError

HESSIAN_FLOOR = 1e-12


def magnitude_scores(param: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
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


def is_bias(name: str) -> bool:
    """Whether a parameter name names a bias."""
    return name == "bias" or name.endswith(".bias")


@dataclass(frozen=True)
class Signal:
    """A selection signal: exactly one of `score` (from burn-in statistics, called with them as keyword
    arguments), `weight_score` (data-free: `(θ0, generator) -> scores`) or `keeps` (unbudgeted: every entry of the
    parameters whose name it accepts)."""

    name: str
    statistics: tuple[str, ...] = ()
    score: Callable[..., torch.Tensor] | None = None
    weight_score: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    keeps: Callable[[str], bool] | None = None

    def __post_init__(self) -> None:
        if sum(f is not None for f in (self.score, self.weight_score, self.keeps)) != 1 or \
                bool(self.statistics) != (self.score is not None):
            raise ValueError(f"signal {self.name!r} needs statistics with a score, or a weight_score, or keeps.")

    @property
    def needs_data(self) -> bool:
        return bool(self.statistics)

    @property
    def budgeted(self) -> bool:
        """Keeps floor(p·N) entries (False: keeps a fixed set, e.g. bitfit's every bias)."""
        return self.keeps is None


SIGNALS: dict[str, Signal] = {
    signal.name: signal
    for signal in (
        Signal("sam", ("grad_sum",), score=sam_scores),
        Signal("fisher", ("grad_sq_sum",), score=fisher_scores),
        Signal("sam_hessian", ("grad_sum", "hessian_sum"), score=sam_hessian_scores),
        Signal("magnitude", weight_score=magnitude_scores),
        Signal("random", weight_score=random_scores),
        Signal("bitfit", keeps=is_bias),
    )
}
SELECTIONS = tuple(SIGNALS)
DATA_FREE_SELECTIONS = tuple(name for name, signal in SIGNALS.items() if not signal.needs_data)


def signal_named(name: str) -> Signal:
    """The signal called `name`, or a `ConfigError` naming the choices."""
    if name not in SIGNALS:
        raise ConfigError(f"selection={name!r} is unknown; choose one of {list(SELECTIONS)}.")
    return SIGNALS[name]
