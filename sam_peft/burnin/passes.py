"""Burn-in in several passes under a statistics memory budget (`max_statistics_bytes`).

The targeted tensors are split, in order, into groups whose statistics fit the budget; each pass replays the same
batches from the same random state (the global CPU/CUDA/Python/NumPy generators and the dataloader's own
generators are restored) and keeps the statistics of one group only. The first pass records each step's loss (and
each clipping coefficient); every later pass must reproduce the losses bit for bit, or the selection is refused.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, SelectionError
from ..parallel.collectives import Shard, any_rank
from ..ranking.signals import Signal
from ..tuner.targets import Target
from .batches import batch_count

logger = logging.getLogger(__name__)


def statistics_bytes(target: Target, signal: Signal, dtype: torch.dtype, sharded: bool) -> int:
    """Bytes of the statistics `signal` keeps for one target (its local shard under FSDP2)."""
    numel = Shard.of(target.param).local.numel() if sharded else target.numel
    return numel * dtype.itemsize * len(signal.statistics)


def plan_passes(found: list[Target], signal: Signal, dtype: torch.dtype, sharded: bool,
                max_bytes: int | None) -> list[list[Target]]:
    """The targets of each pass: consecutive runs, in target order, each filled up to `max_bytes` of statistics
    (one pass holding every target when `max_bytes` is None or large enough). Refuses a budget below the
    statistics of the largest single target."""
    sizes = [statistics_bytes(t, signal, dtype, sharded) for t in found]
    if max_bytes is None or sum(sizes) <= max_bytes:
        return [list(found)]
    largest = max(range(len(found)), key=sizes.__getitem__)
    if sizes[largest] > max_bytes:
        target = found[largest]
        numel = sizes[largest] // (dtype.itemsize * len(signal.statistics))
        raise ConfigError(
            f"max_statistics_bytes={max_bytes:,} is smaller than the statistics of the targeted tensor "
            f"'{target.name}' ({sizes[largest]:,} bytes: {numel:,} entries × {dtype.itemsize} bytes × "
            f"{len(signal.statistics)} statistic(s) of '{signal.name}'); a pass holds at least one whole tensor's "
            f"statistics: pass max_statistics_bytes ≥ {sizes[largest]:,}, or statistics_dtype=torch.bfloat16 to "
            "halve them."
        )
    groups: list[list[Target]] = [[]]
    held = 0
    for target, size in zip(found, sizes):
        if groups[-1] and held + size > max_bytes:
            groups.append([])
            held = 0
        groups[-1].append(target)
        held += size
    return groups


def check_replayable(dataloader, num_steps: int | None, passes: int, max_bytes: int) -> None:
    """Refuse burn-in data that cannot be read again from its start: an iterator (a generator) is consumed by the
    first pass, and a stream without a length may never end."""
    need = f"max_statistics_bytes={max_bytes:,} needs {passes} burn-in passes over the same batches"
    if isinstance(dataloader, Iterator):
        raise ConfigError(
            f"{need}, but the burn-in data is a {type(dataloader).__name__}, an iterator that can be read only "
            "once: pass a re-iterable dataloader (a torch DataLoader, a list of batches), or a larger "
            "max_statistics_bytes (None: one pass)."
        )
    if num_steps is None and batch_count(dataloader) is None:
        raise ConfigError(
            f"{need}, but the burn-in dataloader ({type(dataloader).__name__}) has no length, so a pass may never "
            "end: pass num_steps (SAMCallback(burn_in_steps=...)), with a stream that yields the same batches each "
            "time it is iterated."
        )


def _dataloader_generators(dataloader) -> list[torch.Generator]:
    """The torch generators a DataLoader draws its order from (its own, its sampler's, its batch sampler's)."""
    sampler = getattr(dataloader, "sampler", None)
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    candidates = [getattr(dataloader, "generator", None), getattr(sampler, "generator", None),
                  getattr(batch_sampler, "generator", None),
                  getattr(getattr(batch_sampler, "sampler", None), "generator", None)]
    unique = {id(g): g for g in candidates if isinstance(g, torch.Generator)}
    return list(unique.values())


class RandomState:
    """The random state a pass starts from: the global torch generators (CPU, and every CUDA device once CUDA is
    initialised), Python's and NumPy's global generators, and the dataloader's own generators."""

    def __init__(self, dataloader) -> None:
        self.generators = [(g, g.get_state()) for g in _dataloader_generators(dataloader)]
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.python = random.getstate()
        self.numpy = _numpy_random()
        self.numpy_state = self.numpy.get_state() if self.numpy is not None else None

    def restore(self) -> None:
        for generator, state in self.generators:
            generator.set_state(state)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            self.numpy.set_state(self.numpy_state)


def _numpy_random():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with transformers
        return None
    return numpy.random


@dataclass
class PassRecord:
    """What the first pass saw, for the later passes to replay and check: each backward's loss and clipping
    coefficient."""

    losses: list[torch.Tensor] = field(default_factory=list)  # the first pass's
    coefficients: list[float] = field(default_factory=list)  # the first pass's
    replaying: bool = False
    seen: list[torch.Tensor] = field(default_factory=list)  # this later pass's losses
    replayed: int = 0  # coefficients this later pass has used

    def loss(self, loss: torch.Tensor) -> None:
        """Record (first pass) or keep for checking (later passes) one backward's loss."""
        (self.seen if self.replaying else self.losses).append(loss.detach().reshape(()).clone())

    def coefficient(self, compute) -> float:
        """The clipping coefficient of the next backward: `compute()` in the first pass, replayed in later ones."""
        if not self.replaying:
            self.coefficients.append(compute())
            return self.coefficients[-1]
        self.replayed += 1
        return self.coefficients[self.replayed - 1]

    def end_pass(self, number: int, device: torch.device) -> None:
        """After pass `number` (1-based): the first pass's record is kept; a later pass must have seen the same
        losses, bit for bit, on every rank."""
        seen, self.seen, self.replayed = self.seen, [], 0
        if not self.replaying:
            self.replaying = True
            return
        same = len(seen) == len(self.losses) and all(torch.equal(a, b) for a, b in zip(self.losses, seen))
        if any_rank(not same, device):
            where = next((i for i, (a, b) in enumerate(zip(self.losses, seen)) if not torch.equal(a, b)), None)
            detail = ("another rank's losses differed" if same else
                      f"{len(seen)} losses against {len(self.losses)}" if where is None else
                      f"loss {where} is {seen[where].item()!r} against {self.losses[where].item()!r}")
            raise SelectionError(
                f"burn-in pass {number} did not replay the first pass ({detail}): the batches or the model's "
                "randomness changed between passes. Pass a dataloader that yields the same batches each time it is "
                "iterated (a map-style dataset, a seeded sampler), deterministic kernels "
                "(torch.use_deterministic_algorithms(True)), or max_statistics_bytes=None (one pass)."
            )
