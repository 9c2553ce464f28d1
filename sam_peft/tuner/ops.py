"""Autograd for sparse deltas on large weights, without a dense composed copy.

Two ways to run a weight W with a sparse delta Δ (flat indices, fp32 values):

- **written in** (the fast path): for the duration of the kernel, W holds θ0 + Δ at the indices (k entries
  written, then θ0 written back, under the layer's lock), so the forward is the frozen model's own matmul and no
  one ever sees W other than θ0. Backward computes the input gradient the same way and the values' gradient on
  the rows × columns sub-block that holds entries, from the touched input columns only (all autograd keeps of
  the input).
- **separate sparse term** (several active adapters, or a weight that cannot be written): y = base(x) + x Δᵀ,
  with x Δᵀ computed on the same sub-block.

Both follow `torch.autocast`: the matmuls run in the autocast (or weight) dtype, the values and their gradients
stay fp32. Nothing is cached outside the call, so a forward under `inference_mode` or `no_grad` leaves no state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

# Restrict a side of the weight gradient to the touched rows/columns only when it saves at least this much.
_RESTRICT_BELOW = 0.9
_ALIGN = 16


def add_rounded_once(theta0: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """θ0 + values, added in fp32 (or wider) and rounded once to θ0's dtype: the one rule by which every path forms
    the tuned weights (the written-in kernels, the generic layer, the bias, merging, `SparseDelta`, torch.compile),
    so all of them see the same weights bit for bit. Differentiable in both when gradients are wanted."""
    values = values.to(theta0.device)
    if torch.is_grad_enabled() and (values.requires_grad or theta0.requires_grad) or torch.compiler.is_compiling():
        wide = torch.promote_types(theta0.dtype, torch.float32)
        return (theta0.to(wide) + values.to(wide)).to(theta0.dtype)
    return torch.add(theta0, values, out=torch.empty_like(theta0))  # one kernel: computes wide, rounds once


def not_a_view(out: torch.Tensor, *kept: torch.Tensor | None) -> torch.Tensor:
    """What a custom autograd Function may return as `out`: never a view or alias of another tensor.

    Autograd forbids in-place changes of a Function's output that is a view (Longformer divides the query
    projection's output in place; `F.linear` on a 3-D input returns a view of its 2-D result). A view of a tensor
    made inside the forward becomes a detached alias of it (no copy: nothing else holds that tensor); an output that
    shares memory with an input or a saved tensor (`kept`) is copied, since an in-place change would corrupt it.
    """
    if torch.compiler.is_compiling():  # a traced graph has no such views (and fake tensors have no storage)
        return out
    storage = out.untyped_storage().data_ptr()
    if any(_plain(t) and t.untyped_storage().data_ptr() == storage for t in kept):
        return out.clone()
    return out.detach() if out._is_view() else out


def _plain(t: torch.Tensor | None) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def compose(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A new tensor equal to `weight` with θ0 + values (`add_rounded_once`) at the flat `indices` (unique),
    differentiable in the values."""
    flat = weight.reshape(-1)
    return flat.index_put((indices,), add_rounded_once(flat.index_select(0, indices), values)).view_as(weight)


def tensor_version(t: torch.Tensor) -> int:
    """Autograd's version counter of `t` (0 for an inference tensor, which has none)."""
    return 0 if t.is_inference() else t._version


def _first_order_only(backward):
    """`once_differentiable` (a graph of this backward would differentiate through θ0, since W holds θ0 + Δ only
    while a kernel runs), without its cost on the usual path: grad mode is off in a backward unless create_graph."""
    guarded = once_differentiable(backward)

    @functools.wraps(backward)
    def run(ctx, *grads):
        return guarded(ctx, *grads) if torch.is_grad_enabled() else backward(ctx, *grads)

    return run


@dataclass(frozen=True)
class BlockStructure:
    """Where the selected entries of a 2-D weight (rows × cols) lie: touched rows, columns, positions in that block."""

    rows: torch.Tensor | None  # sorted touched rows, None = all rows
    cols: torch.Tensor | None  # sorted touched columns, None = all columns
    positions: torch.Tensor  # flat position of each entry inside the rows × cols block
    n_rows: int
    n_cols: int

    @staticmethod
    def build(indices: torch.Tensor, shape: tuple[int, int]) -> BlockStructure:
        """Built once per set of indices (it syncs with the host); never in a training step."""
        n_rows, n_cols = shape
        row, col = indices // n_cols, indices % n_cols
        rows, row_local = _touched(row, n_rows)
        cols, col_local = _touched(col, n_cols)
        width = n_cols if cols is None else cols.numel()
        positions = row_local * width + col_local
        if len(positions) and (n_rows if rows is None else rows.numel()) * width < 2**31:
            positions = positions.to(torch.int32)  # 4 bytes per entry kept per layer, not 8
        return BlockStructure(rows, cols, positions, n_rows, n_cols)

    @property
    def block_shape(self) -> tuple[int, int]:
        return (self.n_rows if self.rows is None else self.rows.numel(),
                self.n_cols if self.cols is None else self.cols.numel())

    def take_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.rows is None else t.index_select(-1, self.rows)

    def take_cols(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cols is None else t.index_select(-1, self.cols)

    def gather_gradient(self, row_side: torch.Tensor, col_side: torch.Tensor) -> torch.Tensor:
        """Entries of `row_sideᵀ @ col_side` (tokens × rows-block, tokens × cols-block) at the entries' positions."""
        return (row_side.t() @ col_side).reshape(-1).index_select(0, self.positions)

    def dense_block(self, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows × cols block of Δ (duplicates, from several adapters, are summed)."""
        block = torch.zeros(self.block_shape, dtype=dtype, device=values.device)
        return block.view(-1).index_put_((self.positions,), values.to(dtype), accumulate=True).view(self.block_shape)


def _touched(position: torch.Tensor, size: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(sorted touched positions, each entry's slot among them), or (None, position) when restricting saves little.

    For sizes of 256 and more the set is padded with untouched positions to a multiple of 16, so the sub-block's
    matmuls get aligned shapes and the fast tensor-core kernels (odd widths fall back to slow ones, 4x slower on an
    H200); padded rows or columns hold no entry.
    """
    touched = torch.unique(position)
    align = _ALIGN if size >= 16 * _ALIGN else 1  # small tensors: exact sets
    padded = -(-touched.numel() // align) * align
    if padded >= _RESTRICT_BELOW * size:
        return None, position
    if padded > touched.numel():
        free = torch.ones(size, dtype=torch.bool, device=position.device)
        free[touched] = False
        extra = free.nonzero().squeeze(1)[: padded - touched.numel()]
        touched = torch.cat([touched, extra]).sort().values
    return touched, torch.searchsorted(touched, position)


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    """x Wᵀ + b for an nn.Linear weight (out × in), or x W + b for a Conv1D weight (in × out), each computed as the
    module's own forward computes it (`F.linear`; `torch.addmm` for Conv1D, which rounds once where x W then + b
    rounds twice: in bf16 the two differ), so the wrapped model gives the base model's numbers bit for bit."""
    if not transposed:
        return F.linear(x, weight, bias)
    if bias is None:
        return x @ weight
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], weight.shape[-1])


@dataclass(frozen=True, eq=False)
class DeltaSlot:
    """Where a delta is written into a weight: the weight, its int64 flat indices, θ0 at them, the layer's lock,
    and the weight's storage and version when θ0 was read (a later change of either makes
    the layer read θ0 again). It holds no view of W's storage, so a replaced weight's memory is not kept alive."""

    weight: torch.Tensor
    indices: torch.Tensor
    theta0: torch.Tensor
    lock: object
    key: tuple

    @staticmethod
    def weight_key(weight: torch.Tensor) -> tuple:
        return (weight.data_ptr(), tensor_version(weight), weight.dtype, weight.device)

    @staticmethod
    def build(weight: torch.Tensor, indices: torch.Tensor, lock) -> DeltaSlot:
        theta0 = weight.data.view(-1).index_select(0, indices)
        return DeltaSlot(weight, indices, theta0, lock, DeltaSlot.weight_key(weight))

    def written(self, values: torch.Tensor) -> torch.Tensor:
        """What W holds at the indices while the delta is written in: θ0 + values (`add_rounded_once`)."""
        return add_rounded_once(self.theta0, values.detach())


class delta_written:  # noqa: N801  (used as a context manager, like a function)
    """`with delta_written(slot, written):` W holds `written` (θ0 + Δ) at the slot's indices inside the block and θ0
    again after it: O(k) each way, bit-exact. Writes go through a view of `.data` (no autograd history, and W's
    version counter does not move), so nothing that autograd records may keep W for later: the Functions' backward
    passes are `once_differentiable`. The lock keeps two threads that share the module from seeing each other's
    writes. A plain class rather than a generator: it runs several hundred times per training step."""

    __slots__ = ("slot", "written", "flat", "theta0")

    def __init__(self, slot: DeltaSlot, written: torch.Tensor):
        self.slot, self.written = slot, written

    def __enter__(self) -> None:
        slot = self.slot
        slot.lock.acquire()
        try:
            self.flat = slot.weight.data.view(-1)
            if DeltaSlot.weight_key(slot.weight) == slot.key:
                self.theta0 = slot.theta0
            else:  # W was replaced or changed in place since the slot was built: its current values are θ0
                self.theta0 = self.flat.index_select(0, slot.indices)
            self.flat.index_copy_(0, slot.indices, self.written)
        except BaseException:
            slot.lock.release()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.flat.index_copy_(0, self.slot.indices, self.theta0)
        finally:
            self.slot.lock.release()


class WrittenDeltaMatmul(torch.autograd.Function):
    """y = x (θ0 + Δ)ᵀ + b computed with Δ written into W; the values' gradient comes from the sub-block."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, structure, transposed, slot):
        written = slot.written(values)
        with delta_written(slot, written):
            out = matmul(x, weight, bias, transposed)
        ctx.compute_dtype = out.dtype  # the autocast (or weight) dtype: backward computes in it, no autocast needed
        x_side, ctx.take_in_backward = _input_side(x, structure, transposed, out.dtype, values.requires_grad)
        ctx.save_for_backward(x_side, written)
        ctx.slot = slot
        ctx.structure, ctx.transposed, ctx.x_shape = structure, transposed, x.shape
        return not_a_view(out, x, weight, bias)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        x_side, written = ctx.saved_tensors
        go2 = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            with delta_written(ctx.slot, written):
                grad_x = _input_gradient(ctx, go2, ctx.slot.weight)
        return grad_x, None, *_bias_and_values_gradients(ctx, go2, x_side), None, None, None


def _input_gradient(ctx, go2: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient of the matmul Functions, through the weight as the forward read it (θ0 + Δ)."""
    weight = weight.to(ctx.compute_dtype)
    return (go2 @ (weight.t() if ctx.transposed else weight)).view(ctx.x_shape)


def _bias_and_values_gradients(ctx, go2: torch.Tensor, x_side: torch.Tensor | None) -> tuple:
    """(bias gradient, fp32 values gradient) of the matmul Functions, each None when not needed."""
    grad_bias = go2.sum(0) if ctx.needs_input_grad[2] else None
    grad_values = None
    if ctx.needs_input_grad[3]:
        grad_values = _values_gradient(ctx.structure, ctx.transposed, x_side, ctx.take_in_backward, go2)
    return grad_bias, grad_values


def _input_side(x: torch.Tensor, structure: BlockStructure, transposed: bool, dtype: torch.dtype,
                needed: bool) -> tuple[torch.Tensor | None, bool]:
    """What backward keeps of x for the values' gradient, and whether it still has to take the columns.

    Linear: entries sit at (output row, input column); Conv1D (in × out): (input row, output column). Keep only the
    input columns the entries need, unless that copy would be half of x or more: then keep x itself (no copy; often
    saved by its other consumers anyway) and take the columns in backward.
    """
    if not needed:
        return None, False
    x2 = x.reshape(-1, x.shape[-1])
    taken = structure.rows if transposed else structure.cols
    if taken is not None and 2 * taken.numel() < x2.shape[1]:
        return x2.index_select(1, taken).to(dtype), False
    return x2, True


def _values_gradient(structure: BlockStructure, transposed: bool, x_side: torch.Tensor, take: bool,
                     go2: torch.Tensor) -> torch.Tensor:
    """The fp32 gradient of the values from the rows × cols block of the weight gradient (go2: tokens × out)."""
    if take:
        x_side = structure.take_rows(x_side) if transposed else structure.take_cols(x_side)
    x_side = x_side.to(go2.dtype)
    g_side = structure.take_cols(go2) if transposed else structure.take_rows(go2)
    row_side, col_side = (x_side, g_side) if transposed else (g_side, x_side)
    return structure.gather_gradient(row_side, col_side).float()


def write_at(param: torch.Tensor, indices: torch.Tensor, new: torch.Tensor) -> None:
    """param's flat (row-major) `indices` ← `new`, in place; a non-contiguous param (e.g. a transposed view) is
    written through a contiguous copy."""
    data = param.data
    if data.is_contiguous():
        data.view(-1).index_copy_(0, indices, new)
    else:
        data.copy_(data.contiguous().view(-1).index_copy_(0, indices, new).view_as(data))


class ComposedDeltaMatmul(torch.autograd.Function):
    """The traceable twin of `WrittenDeltaMatmul`, used under `torch.compile`: the kernel reads a new tensor
    W' = W with θ0 + Δ at the indices (one weight-sized temporary, rebuilt in backward rather than saved), so the
    graph holds no lock and no in-place write; the values' gradient comes from the same sub-block."""

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, structure, transposed):
        out = matmul(x, compose(weight.detach(), indices, values.detach()), bias, transposed)
        ctx.compute_dtype = out.dtype
        x_side, ctx.take_in_backward = _input_side(x, structure, transposed, out.dtype, ctx.needs_input_grad[3])
        ctx.save_for_backward(x_side, weight, indices, values)
        ctx.structure, ctx.transposed, ctx.x_shape = structure, transposed, x.shape
        return not_a_view(out, x, weight, bias)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        x_side, weight, indices, values = ctx.saved_tensors
        go2 = grad_out.reshape(-1, grad_out.shape[-1]).to(ctx.compute_dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _input_gradient(ctx, go2, compose(weight.detach(), indices, values.detach()))
        return grad_x, None, *_bias_and_values_gradients(ctx, go2, x_side), None, None, None


class SparseTermMatmul(torch.autograd.Function):
    """x Δᵀ (Linear) or x Δ (Conv1D) for a sparse Δ, computed on its rows × cols block only."""

    @staticmethod
    def forward(ctx, x, values, structure, transposed, out_features):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        block = structure.dense_block(values, dtype)  # (block rows, block cols)
        if transposed:  # Conv1D: W is in × out; x[:, rows] @ block -> out[:, cols]
            x_side = structure.take_rows(x2)
            part = x_side @ block
            scatter = structure.cols
        else:  # Linear: W is out × in; x[:, cols] @ blockᵀ -> out[:, rows]
            x_side = structure.take_cols(x2)
            part = x_side @ block.t()
            scatter = structure.rows
        if scatter is None:
            out = part
        else:
            out = torch.zeros(x2.shape[0], out_features, dtype=dtype, device=x.device).index_copy_(1, scatter, part)
        ctx.save_for_backward(x_side if values.requires_grad else None, block if x.requires_grad else None)
        ctx.structure, ctx.transposed, ctx.x_shape, ctx.x_dtype = structure, transposed, x.shape, x.dtype
        return not_a_view(out.view(*x.shape[:-1], out_features), x, values)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        x_side, block = ctx.saved_tensors
        structure = ctx.structure
        go2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_values = None
        g_side = structure.take_cols(go2) if ctx.transposed else structure.take_rows(go2)
        if ctx.needs_input_grad[0]:
            part = g_side.to(block.dtype) @ (block.t() if ctx.transposed else block)
            gather = structure.rows if ctx.transposed else structure.cols
            if gather is None:
                grad_x = part
            else:
                grad_x = torch.zeros(go2.shape[0], ctx.x_shape[-1], dtype=part.dtype, device=part.device)
                grad_x.index_copy_(1, gather, part)
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g_side = g_side.to(x_side.dtype)
            row_side, col_side = (x_side, g_side) if ctx.transposed else (g_side, x_side)
            grad_values = structure.gather_gradient(row_side, col_side).float()
        return grad_x, grad_values, None, None, None


def sparse_term(x: torch.Tensor, values: torch.Tensor, structure: BlockStructure, transposed: bool,
                out_features: int) -> torch.Tensor:
    """x Δᵀ (or x Δ for Conv1D) on the delta's sub-block; see `SparseTermMatmul`."""
    return SparseTermMatmul.apply(x, values, structure, transposed, out_features)


@dataclass(frozen=True)
class EmbeddingStructure:
    """Where the entries of an embedding table lie, for a delta term and a values gradient sized by the batch.

    Each entry sits at (`entry_row`, `entry_col`); `entry_live` is 0 for entries on the padding row, which gets no
    gradient, as in dense training. Nothing the size of the table's touched rows is built per step: a table of
    128 k rows × 4096 with entries on most rows would need a 2 GiB scratch; the batch's tokens need at most the size
    of the output gradient.
    """

    entry_row: torch.Tensor
    entry_col: torch.Tensor
    entry_live: torch.Tensor
    n_rows: int

    @staticmethod
    def build(indices: torch.Tensor, shape: tuple[int, int], padding_idx: int | None) -> EmbeddingStructure:
        """Built once per set of indices; never in a training step."""
        n_rows, dim = shape
        live = torch.ones(indices.numel(), dtype=torch.float32, device=indices.device)
        if padding_idx is not None:
            live[(indices // dim) == padding_idx % n_rows] = 0.0
        return EmbeddingStructure((indices // dim).long(), (indices % dim).long(), live, n_rows)

    def batch_slots(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(each token's slot, each entry's slot, number of slots) for this batch, with fixed-size scatters (no
        host sync): a token's slot is that of one token with the same id; entries on rows absent from the batch
        share the spare last slot."""
        ids = input_ids.reshape(-1)
        tokens = ids.numel()
        slot_of_row = torch.full((self.n_rows,), tokens, dtype=torch.long, device=ids.device)
        slot_of_row[ids] = torch.arange(tokens, device=ids.device)  # repeated ids: any one of them, read back below
        return slot_of_row.index_select(0, ids), slot_of_row.index_select(0, self.entry_row), tokens + 1


class WrittenDeltaEmbedding(torch.autograd.Function):
    """Embedding lookup in W holding θ0 + Δ; the values' gradient sums the output gradients of the tokens of each
    entry's row (see `EmbeddingStructure`)."""

    @staticmethod
    def forward(ctx, input_ids, weight, values, structure, slot, options):
        ctx.save_for_backward(input_ids)
        ctx.structure = structure
        with delta_written(slot, slot.written(values)):
            return not_a_view(F.embedding(input_ids, weight, **options), weight)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_out):
        (input_ids,) = ctx.saved_tensors
        s = ctx.structure
        grad_values = None
        if ctx.needs_input_grad[2]:
            token_slot, entry_slot, n_slots = s.batch_slots(input_ids)
            sums = torch.zeros(n_slots, grad_out.shape[-1], dtype=torch.float32, device=grad_out.device)
            sums.index_add_(0, token_slot, grad_out.reshape(-1, grad_out.shape[-1]).float())
            grad_values = sums[entry_slot, s.entry_col] * s.entry_live
        return None, None, grad_values, None, None, None


def written_delta_embedding(input_ids, weight, values, structure: EmbeddingStructure, slot: DeltaSlot,
                            **options) -> torch.Tensor:
    """Embedding lookup with the delta written into the table; see `WrittenDeltaEmbedding`."""
    if torch.is_grad_enabled() and values.requires_grad:
        return WrittenDeltaEmbedding.apply(input_ids, weight, values, structure, slot, options)
    with delta_written(slot, slot.written(values)):
        return F.embedding(input_ids, weight, **options)


def sparse_delta_embedding(
    input_ids: torch.Tensor, weight: torch.Tensor, values: torch.Tensor, structure: EmbeddingStructure, **options
) -> torch.Tensor:
    """Embedding lookup through `weight` + a separate sparse delta: the table plus Δ's rows of the batch's tokens."""
    out = F.embedding(input_ids, weight, **options)
    live = values * structure.entry_live.to(values.dtype) + (values * (1 - structure.entry_live)).detach()
    token_slot, entry_slot, n_slots = structure.batch_slots(input_ids)
    rows = torch.zeros(n_slots, weight.shape[1], dtype=out.dtype, device=out.device)
    rows = rows.index_put((entry_slot, structure.entry_col), live.to(out.dtype), accumulate=True)
    return out + rows.index_select(0, token_slot).view_as(out)


def composed_delta_matmul(x, weight, bias, values, indices, structure, transposed) -> torch.Tensor:
    """Linear map through W with the delta put in as a new tensor; see `ComposedDeltaMatmul` (torch.compile)."""
    return ComposedDeltaMatmul.apply(x, weight, bias, values, indices, structure, transposed)


def written_delta_matmul(x, weight, bias, values, structure, transposed, slot: DeltaSlot) -> torch.Tensor:
    """Linear map with the delta written into the weight; see `WrittenDeltaMatmul`."""
    needs_grad = values.requires_grad or x.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        return WrittenDeltaMatmul.apply(x, weight, bias, values, structure, transposed, slot)
    with delta_written(slot, slot.written(values)):
        return matmul(x, weight, bias, transposed)
