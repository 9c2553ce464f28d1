"""Scores from which entries are selected: data-free ones, and those computed from burn-in statistics."""

from __future__ import annotations

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


def sam_hessian_scores(grad_sum: torch.Tensor, hessian_diag: torch.Tensor) -> torch.Tensor:
    """(Σ g)² / |ĥ|: Theorem 3 before the λ_max bound, with a Hutchinson Hessian-diagonal estimate ĥ.

    |ĥ| is floored at 1e-12 so entries with a vanishing curvature estimate do not divide by zero.
    """
    return grad_sum.square() / hessian_diag.abs().clamp_min(HESSIAN_FLOOR)
