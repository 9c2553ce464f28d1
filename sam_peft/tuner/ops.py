"""Autograd for sparse deltas: compose base + delta on the fly, never keep a dense composed copy for backward.

For a weight W (frozen) and a sparse delta (flat indices, values), the output uses W + Δ, but autograd saves
only the input, W itself and the delta. The values' gradient is the dense weight gradient gathered at the
indices; it is computed only on the sub-block of rows × columns that hold a selected entry, so rows and
columns without one cost nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Restrict a side of the weight gradient to the touched rows/columns only when it saves at least this much.
_RESTRICT_BELOW = 0.9


def compose(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to `weight` with `values` added at the flat `indices` (differentiable in values)."""
    return weight.reshape(-1).index_add(0, indices, values.to(weight.dtype)).view_as(weight)


_scratch = threading.local()


def compose_scratch(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`compose` into one reusable buffer per (device, dtype): no fresh allocation (and page faults) per call.

    The result is only valid until the next call; callers use it at once and never keep it.
    """
    key = (weight.device, weight.dtype)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < weight.numel():
        buffer = buffers[key] = torch.empty(weight.numel(), dtype=weight.dtype, device=weight.device)
    out = buffer[: weight.numel()].view_as(weight)
    out.copy_(weight)
    out.view(-1).index_add_(0, indices, values.detach().to(weight.dtype))
    return out


@dataclass(frozen=True)
class BlockStructure:
    """Where the selected entries of a 2-D weight lie: the touched rows, columns, and positions in that block."""

    rows: torch.Tensor | None  # sorted touched rows, None = all rows
    cols: torch.Tensor | None  # sorted touched columns, None = all columns
    positions: torch.Tensor  # flat position of each entry inside the rows × cols block

    @staticmethod
    def build(indices: torch.Tensor, shape: tuple[int, int]) -> BlockStructure:
        n_rows, n_cols = shape
        row, col = indices // n_cols, indices % n_cols
        rows, row_local = torch.unique(row, return_inverse=True)
        cols, col_local = torch.unique(col, return_inverse=True)
        if rows.numel() >= _RESTRICT_BELOW * n_rows:
            rows, row_local = None, row
        if cols.numel() >= _RESTRICT_BELOW * n_cols:
            cols, col_local = None, col
        width = n_cols if cols is None else cols.numel()
        return BlockStructure(rows, cols, row_local * width + col_local)

    def gather_gradient(self, row_side: torch.Tensor, col_side: torch.Tensor) -> torch.Tensor:
        """Entries of `row_side.T @ col_side` (tokens × rows, tokens × cols) at the selected positions."""
        if self.rows is not None:
            row_side = row_side.index_select(1, self.rows)
        if self.cols is not None:
            col_side = col_side.index_select(1, self.cols)
        return (row_side.t() @ col_side).reshape(-1).index_select(0, self.positions)


class SparseDeltaMatmul(torch.autograd.Function):
    """y = x (W + Δ)ᵀ + b for nn.Linear (W: out × in), or y = x (W + Δ) + b for Conv1D (W: in × out)."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, structure, transposed):
        composed = compose_scratch(weight, indices, values)
        out = matmul(x, composed, bias, transposed)
        ctx.save_for_backward(x, weight, values, indices)
        ctx.structure = structure
        ctx.transposed = transposed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        grad_x = grad_bias = grad_values = None
        if ctx.needs_input_grad[0]:
            composed = compose_scratch(weight, indices, values)
            grad_x = grad_out @ (composed.t() if ctx.transposed else composed)
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = go2.sum(0)
        if ctx.needs_input_grad[3]:
            x2 = x.reshape(-1, x.shape[-1])
            row_side, col_side = (x2, go2) if ctx.transposed else (go2, x2)
            grad_values = ctx.structure.gather_gradient(row_side, col_side).to(values.dtype)
        return grad_x, None, grad_bias, grad_values, None, None, None


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x Wᵀ + b for an nn.Linear weight (out × in), or x W + b for a Conv1D weight (in × out)."""
    if not transposed:
        return F.linear(x, weight, bias)
    out = x @ weight
    return out if bias is None else out + bias


def sparse_delta_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    structure: BlockStructure,
    transposed: bool = False,
) -> torch.Tensor:
    """Linear map through `weight` + sparse delta; see `SparseDeltaMatmul`."""
    if torch.is_grad_enabled() and (values.requires_grad or x.requires_grad or
                                    (bias is not None and bias.requires_grad)):
        return SparseDeltaMatmul.apply(x, weight, bias, values, indices, structure, transposed)
    return matmul(x, compose_scratch(weight, indices, values), bias, transposed)


def sparse_delta_embedding(
    input_ids: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, **kwargs
) -> torch.Tensor:
    """Embedding lookup through `weight` + sparse delta, touching only the rows present in `input_ids`.

    The delta rows of the tokens in the batch are built in a compact (unique tokens × dim) buffer; autograd
    keeps only O(tokens × dim) state, and entries whose row is not in the batch get a zero gradient.
    """
    dim = weight.shape[1]
    out = F.embedding(input_ids, weight, **kwargs)
    unique, inverse = torch.unique(input_ids, return_inverse=True)
    slot = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
    slot[unique] = torch.arange(unique.numel(), device=weight.device)
    entry_slot = slot[indices // dim]
    present = (entry_slot >= 0).nonzero().squeeze(1)
    entry_values = values.index_select(0, present).to(weight.dtype)
    padding_idx = kwargs.get("padding_idx")
    if padding_idx is not None:  # the padding row gets no gradient, as in dense training
        in_padding_row = (indices.index_select(0, present) // dim) == (padding_idx % weight.shape[0])
        entry_values = torch.where(in_padding_row, entry_values.detach(), entry_values)
    flat = entry_slot.index_select(0, present) * dim + indices.index_select(0, present) % dim
    rows = torch.zeros(unique.numel() * dim, dtype=weight.dtype, device=weight.device)
    rows = rows.index_add(0, flat, entry_values)
    return out + rows.view(-1, dim)[inverse]
