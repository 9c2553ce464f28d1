"""Exact top-k over score tensors, per tensor or globally, without concatenating the scores.

The result is the set a full stable descending sort would keep: among equal scores, the lower flat index
wins within a tensor, and the earlier tensor wins across tensors. The k-th largest score is found by a
two-pass radix select on order-preserving integer keys (16 bits per pass), so time is linear in N and the
extra memory is one chunk of keys plus two 65,536-bin histograms.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

CHUNK = 1 << 16  # entries per chunk: bounds the temporary memory (about 2 MB) whatever the tensor size
_BINS = 1 << 16


def _keys(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys ordered like the float32 scores (-0.0 and 0.0 map to the same key)."""
    bits = (scores.to(torch.float32) + 0.0).view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _chunks(tensor: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield start, _keys(flat[start : start + CHUNK])


def _check_finite(named: Iterable[tuple[str, torch.Tensor]]) -> None:
    for name, scores in named:
        flat = scores.detach().reshape(-1)
        if not all(bool(torch.isfinite(flat[i : i + CHUNK]).all()) for i in range(0, flat.numel(), CHUNK)):
            raise ValueError(f"scores of '{name}' contain NaN or infinite values; selection needs finite scores.")


def _threshold(named: list[tuple[str, torch.Tensor]], k: int) -> tuple[int, int]:
    """(key of the k-th largest score, number of scores strictly above it)."""
    high = torch.zeros(_BINS, dtype=torch.long)
    for _, scores in named:
        for _, keys in _chunks(scores):
            high += torch.bincount((keys >> 16) + 32768, minlength=_BINS).cpu()
    from_top = high.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))  # first high bucket (from the top) reaching k
    bucket = _BINS - 1 - j
    above_high = int(from_top[j - 1]) if j > 0 else 0
    low = torch.zeros(_BINS, dtype=torch.long)
    for _, scores in named:
        for _, keys in _chunks(scores):
            in_bucket = keys[((keys >> 16) + 32768) == bucket]
            low += torch.bincount(in_bucket & 0xFFFF, minlength=_BINS).cpu()
    low_from_top = low.flip(0).cumsum(0)
    i = int(torch.searchsorted(low_from_top, k - above_high))
    above = above_high + (int(low_from_top[i - 1]) if i > 0 else 0)
    key = (bucket - 32768) * _BINS + (_BINS - 1 - i)
    return key, above


def topk_global(named: list[tuple[str, torch.Tensor]], k: int) -> dict[str, torch.Tensor]:
    """Exact top-k over all tensors together: {name: sorted int64 flat indices}."""
    named = list(named)
    _check_finite(named)
    total = sum(s.numel() for _, s in named)
    if k < 0:
        raise ValueError(f"k={k} must be non-negative.")
    k = min(k, total)
    if k == 0:
        return {name: torch.empty(0, dtype=torch.long, device=s.device) for name, s in named}
    if k == total:
        return {name: torch.arange(s.numel(), device=s.device) for name, s in named}
    key, above = _threshold(named, k)
    ties_left = k - above
    out = {}
    for name, scores in named:
        picked = []
        for start, keys in _chunks(scores):
            take = keys > key
            if ties_left > 0:
                ties = (keys == key).nonzero().squeeze(1)[:ties_left]
                ties_left -= ties.numel()
                take[ties] = True
            picked.append(take.nonzero().squeeze(1) + start)
        out[name] = torch.cat(picked) if picked else torch.empty(0, dtype=torch.long, device=scores.device)
    return out


def topk_per_tensor(named: list[tuple[str, torch.Tensor]], counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Exact top-`counts[name]` of each tensor on its own: {name: sorted int64 flat indices}.

    Each tensor's k-th largest score comes from `torch.topk`; entries above it are kept, then the ties at
    it in index order.
    """
    named = list(named)
    _check_finite(named)
    out = {}
    for name, scores in named:
        flat = scores.detach().reshape(-1)
        k = min(max(counts[name], 0), flat.numel())
        if k == 0 or k == flat.numel():
            out[name] = torch.arange(k, device=flat.device)
            continue
        flat = flat.to(torch.float32) + 0.0  # one key for -0.0 and 0.0
        threshold = torch.topk(flat, k, sorted=False).values.min()
        above = (flat > threshold).nonzero().squeeze(1)
        ties = (flat == threshold).nonzero().squeeze(1)[: k - above.numel()]
        out[name] = torch.cat([above, ties]).sort().values
    return out
