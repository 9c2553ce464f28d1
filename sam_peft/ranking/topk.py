"""Exact top-k over score tensors, in one process or split across ranks, without concatenating or gathering scores.

One radix select serves every case: per-tensor budgets (one group per tensor), a global budget (one group), whole
tensors in one process, or FSDP2 shards on several ranks. Scores become order-preserving 32-bit keys; three passes
(11, 11 and 10 bits from the top) find each group's k-th largest key from 2,048-bin histograms (summed over ranks
when the scores are sharded). The result is the set a stable descending sort of the group's scores concatenated in
tensor order would keep: among equal scores the earlier tensor, then the lower flat index wins. Time is linear in
N, and the extra memory is one chunk of keys plus a histogram per group; only the chosen indices are ever gathered.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch

from ..parallel.collectives import Shard, all_reduce_, gather_rows, gather_sorted_indices
from .budget import Budget

CHUNK = 1 << 18  # entries per chunk: bounds the temporary memory (a few MB) whatever the tensor size
_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, bits) of each pass, from the top
_BINS = 1 << 11
_SIGN = -(1 << 31)


def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 scores, as signed integers (-0.0 and 0.0 share a key)."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _digit(keys: torch.Tensor, shift: int, bits: int) -> torch.Tensor:
    """Bits [shift, shift + bits) of the keys read as unsigned (sign bit flipped), as int64 bin numbers."""
    return (((keys ^ _SIGN) >> shift) & ((1 << bits) - 1)).long()


def _chunks(shard: Shard) -> Iterator[tuple[int, torch.Tensor]]:
    flat = shard.local.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, order_keys(flat[start : start + CHUNK])


def check_finite(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Refuse scores with NaN or infinite values, naming the tensor."""
    for name, scores in named:
        flat = scores.detach().reshape(-1)
        if not all(bool(torch.isfinite(flat[i : i + CHUNK]).all()) for i in range(0, flat.numel(), CHUNK)):
            raise ValueError(f"scores of '{name}' contain NaN or infinite values; selection needs finite scores.")


def top_entries(named_scores: Sequence[tuple[str, torch.Tensor]], budget: Budget) -> dict[str, torch.Tensor]:
    """Exact top-k of whole score tensors in one process: {name: sorted int64 flat indices}."""
    if any(k < 0 for k in budget.ks):
        raise ValueError(f"budgets {budget.ks} must be non-negative.")
    check_finite(named_scores)
    shards = [Shard(scores, 0, scores.numel()) for _, scores in named_scores]
    chosen = radix_select(shards, budget, across_ranks=False)
    return {name: indices for (name, _), indices in zip(named_scores, chosen)}


def radix_select(shards: Sequence[Shard], budget: Budget, device: torch.device | None = None,
                 across_ranks: bool = True) -> list[torch.Tensor]:
    """Exact top-k over tensors split across ranks (`Shard`: this rank's part of each tensor, in the same order on
    every rank), grouped by `budget`. Returns, for each tensor, its chosen global flat indices (sorted int64), the
    same on every rank. `across_ranks=False`: this process's tensors alone, whatever process group exists (whole,
    replicated tensors: nothing is communicated)."""
    groups, n_groups = budget.groups, len(budget.ks)
    device = device or (shards[0].local.device if shards else torch.device("cpu"))
    totals = [0] * n_groups
    for shard, group in zip(shards, groups):
        totals[group] += shard.total
    ks = [min(max(int(k), 0), total) for k, total in zip(budget.ks, totals)]
    prefix, above = _thresholds(shards, groups, ks, device, across_ranks)
    chosen = _take(shards, groups, ks, prefix, above, device, across_ranks)
    return gather_sorted_indices(chosen, device) if across_ranks else [c.sort().values for c in chosen]


def _thresholds(shards, groups, ks, device, across_ranks: bool) -> tuple[list[int], list[int]]:
    """Per group: the (signed) key of its k-th largest score and how many scores lie strictly above it."""
    n_groups = len(ks)
    prefix = [0] * n_groups  # the unsigned key bits found so far
    remaining = list(ks)  # entries still to find at or below the current prefix
    above = [0] * n_groups
    found_bits = 0
    for shift, bits in _DIGITS:
        hist = torch.zeros(n_groups, _BINS, dtype=torch.int64, device=device)
        for shard, group in zip(shards, groups):
            if ks[group] == 0:
                continue
            for _, keys in _chunks(shard):
                if found_bits:
                    keys = keys[_digit(keys, shift + bits, found_bits) == prefix[group]]
                hist[group] += torch.bincount(_digit(keys, shift, bits), minlength=_BINS).to(device)
        if across_ranks:
            all_reduce_([hist])
        from_top = hist[:, : 1 << bits].flip(1).cumsum(1).cpu()
        for group in range(n_groups):
            if ks[group] == 0:
                continue
            j = int(torch.searchsorted(from_top[group], remaining[group]))
            over = int(from_top[group, j - 1]) if j > 0 else 0
            above[group] += over
            remaining[group] -= over
            prefix[group] = (prefix[group] << bits) + ((1 << bits) - 1 - j)
        found_bits += bits
    return [p + _SIGN for p in prefix], above


def _take(shards, groups, ks, prefix, above, device, across_ranks: bool) -> list[torch.Tensor]:
    """This rank's chosen entries of each tensor: every key above its group's threshold, then the ties at it in
    (tensor order, flat index) order across ranks."""
    ties_here = torch.zeros(len(shards), dtype=torch.int64)
    for i, (shard, group) in enumerate(zip(shards, groups)):
        if ks[group] > 0:
            ties_here[i] = int(sum((keys == prefix[group]).sum() for _, keys in _chunks(shard)))
    starts = torch.tensor([s.start for s in shards], dtype=torch.int64)
    rows = gather_rows if across_ranks else (lambda row: row.unsqueeze(0))
    all_ties, all_starts = rows(ties_here), rows(starts)  # [world, tensors]
    taken_before = [0] * len(ks)
    chosen = []
    for i, (shard, group) in enumerate(zip(shards, groups)):
        if ks[group] == 0:
            chosen.append(torch.empty(0, dtype=torch.int64, device=device))
            continue
        need = ks[group] - above[group]
        earlier_ranks = int(all_ties[all_starts[:, i] < shard.start, i].sum())
        allowed = max(0, min(int(ties_here[i]), need - taken_before[group] - earlier_ranks))
        taken_before[group] += int(all_ties[:, i].sum())
        picked = []
        for start, keys in _chunks(shard):
            take = keys > prefix[group]
            if allowed > 0:
                ties = (keys == prefix[group]).nonzero().squeeze(1)[:allowed]
                allowed -= ties.numel()
                take[ties] = True
            picked.append(take.nonzero().squeeze(1) + (start + shard.start))
        chosen.append(torch.cat(picked).to(device) if picked else torch.empty(0, dtype=torch.int64, device=device))
    return chosen


class RunningTop:
    """The global top-k over score tensors seen a few at a time, in tensor order (`add`), keeping only the k best
    candidates so far: their float32 scores and global flat positions (12 bytes each), in position order.

    `chosen(sizes)` is the set `top_entries` with one group of k picks over all the tensors at once, ties included:
    the candidates kept so far precede every new tensor in the concatenated order, so one `radix_select` over
    [candidates, new tensors...] applies the same rule (earlier tensor, then lower flat index) to all of them.
    """

    def __init__(self, k: int, device: torch.device) -> None:
        if k < 0:
            raise ValueError(f"budget {k} must be non-negative.")
        self.k = k
        self.scores = torch.empty(0, dtype=torch.float32, device=device)
        self.positions = torch.empty(0, dtype=torch.int64, device=device)
        self.seen = 0  # entries of the tensors added so far

    def add(self, named_scores: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Merge the next tensors (in order) into the candidates."""
        check_finite(named_scores)
        flats = [self.scores] + [scores.detach().reshape(-1) for _, scores in named_scores]
        shards = [Shard(flat, 0, flat.numel()) for flat in flats]
        device = self.scores.device
        chosen = radix_select(shards, Budget((0,) * len(shards), (self.k,)), device, across_ranks=False)
        offsets, start = [], self.seen
        for flat in flats[1:]:
            offsets.append(start)
            start += flat.numel()
        self.scores = torch.cat([flat[idx.to(flat.device)].to(device, torch.float32)
                                 for flat, idx in zip(flats, chosen)])
        self.positions = torch.cat([self.positions[chosen[0]]]
                                   + [idx + offset for idx, offset in zip(chosen[1:], offsets)])
        self.seen = start

    def chosen(self, sizes: Sequence[int]) -> list[torch.Tensor]:
        """The chosen flat indices (sorted int64) of each tensor added, of these sizes in order."""
        if sum(sizes) != self.seen:
            raise ValueError(f"sizes {list(sizes)} cover {sum(sizes)} entries, not the {self.seen} added.")
        out, start = [], 0
        for size in sizes:
            bounds = torch.tensor([start, start + size], device=self.positions.device)
            lo, hi = torch.searchsorted(self.positions, bounds)
            out.append(self.positions[int(lo) : int(hi)] - start)
            start += size
        return out
