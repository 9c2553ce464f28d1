"""`select_parameters`: check that the adapter can be selected, run the burn-in at θ0 (no update), score, choose
the exact top-k and install it."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, SelectionError
from ..parallel.collectives import Shard, any_rank, check_engine, initialized
from ..parallel.ddp import ddp_wrappers_of, rebuild_ddp
from ..parallel.fsdp import sync_shards_requires_grad
from ..ranking.budget import budget
from ..ranking.signals import SIGNALS
from ..ranking.topk import RunningTop, radix_select, top_entries
from ..tuner.install import install, select_data_free
from ..tuner.layer import SparseDiffLayer, running_statistics
from ..tuner.targets import Target, resolve_adapter, targets, tuner_of
from .batches import batches, burn_in_loss, examples, move
from .options import BurnInOptions
from .passes import PassRecord, RandomState, check_replayable, plan_passes, statistics_bytes
from .quantized import check_quantized_burn_in, gradient_sinks
from .report import SelectionReport
from .statistics import Statistics, fold_gradients, fold_hooks, hutchinson_step

logger = logging.getLogger(__name__)


def select_parameters(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    num_steps: int | None = None,
    *,
    adapter_name: str | None = None,
    selection: str | None = None,
    per_example: bool = False,
    hutchinson_samples: int = 1,
    dropout: bool = True,
    progress: bool = True,
    statistics_dtype: torch.dtype | str = torch.float32,
    max_grad_norm: float | None = None,
    loss_fn: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    max_statistics_bytes: int | None = None,
) -> SelectionReport:
    """Run the burn-in at θ0, score every targeted entry, keep the exact top-k, install the indices.

    Args:
        model: a PeftModel with a sam-peft adapter (DDP-wrapped models are unwrapped).
        dataloader: batches as dicts the model accepts, labels included (a DataLoader). Not needed for the
            data-free selections (magnitude, random, bitfit).
        num_steps: batches to use (all when None: give it for a stream that never ends). Fewer available batches
            log a warning; none is an error.
        adapter_name: the adapter to select (default: the active one).
        selection: override of the config's selection signal.
        per_example: for "fisher", sum squared per-example gradients (FISH mask) instead of batch ones.
        hutchinson_samples: Rademacher probes per batch for "sam_hessian".
        dropout: run the burn-in in train mode (dropout on, as the paper's code) or eval mode.
        progress: show a progress bar.
        statistics_dtype: dtype of the accumulated statistics, torch.float32 (default) or torch.bfloat16 (half the
            memory; see docs/distributed.md for its effect on the selected set).
        max_grad_norm: clip each burn-in batch gradient (all targeted parameters together) to this global L2 norm
            before adding it, as the paper's code did with 1.0. None (default): sum the raw gradients, which lets
            each gradient be folded in and freed as soon as it is computed; clipping keeps one batch gradient of
            all targeted parameters until the norm is known.
        loss_fn: `(model, batch) -> scalar loss` to score instead of the model's own loss (`outputs.loss`, or the
            first element of a tuple output): pass the loss training uses when it is not the model's (a Trainer's
            `compute_loss_func`, label smoothing, a TRL `loss_type`), or for a model that returns none.
        max_statistics_bytes: the most bytes of burn-in statistics held at once (None: all in one pass). When the
            statistics of all targets exceed it, the burn-in runs in several passes over the same batches, each
            keeping the statistics of a run of consecutive targets that fits, and selects exactly the entries one
            pass selects, at the cost of one burn-in per pass. The data must be re-iterable (not an iterator; a
            stream needs `num_steps`) and each pass must replay the first bit for bit (same batches, same random
            state, which is restored before each pass; checked on the losses). Not under FSDP2.

    Returns:
        A `SelectionReport`. The values of the selected entries are zero (the model equals the base model).

    Under `torch.distributed` with whole weights (DDP, or none) each rank accumulates over its own batches and the
    statistics are summed over ranks, so every rank installs the same indices as one process over all the batches.
    Under FSDP2 (`fully_shard`) each rank keeps the statistics of its own shard, from the gradients FSDP already
    reduce-scattered (a step's gradient is that of all ranks' batches together), and the top-k runs across shards
    without gathering any score tensor (`ranking.topk.radix_select`). DeepSpeed ZeRO-3 is refused.
    """
    tuner = tuner_of(model)
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    options = BurnInOptions(selection or config.selection, num_steps, per_example, hutchinson_samples, dropout,
                            progress, statistics_dtype, max_grad_norm, loss_fn, max_statistics_bytes)
    previous = config.selection
    config.selection = options.selection
    try:
        return _select(model, tuner, adapter_name, dataloader, options)
    except BaseException:
        config.selection = previous  # the override is recorded only with the entries it chose
        raise


def _select(model, tuner, adapter_name: str, dataloader, options: BurnInOptions) -> SelectionReport:
    config = tuner.peft_config[adapter_name]
    found = targets(tuner, adapter_name)
    _check_ready(tuner, adapter_name, found)
    start = time.perf_counter()
    if config.is_data_free:
        select_data_free(tuner, adapter_name)
        return SelectionReport.build(tuner, adapter_name, steps=0, seconds=time.perf_counter() - start)
    if dataloader is None:
        raise ValueError(f"selection='{config.selection}' needs data: pass a dataloader of training batches.")
    sharded = _check_engine(found, options)
    check_quantized_burn_in(found, options, sharded)
    groups = _plan(found, dataloader, options, sharded)
    peft_model = getattr(model, "module", model)
    if len(groups) == 1:
        burn_in_start = time.perf_counter()
        stats, steps = run_burn_in(peft_model, found, dataloader, options, sharded)
        burn_in_seconds = time.perf_counter() - burn_in_start
        held = stats.nbytes
        named_scores = _scores(stats, options, found)
        chosen = _choose(config, found, named_scores, sharded)
        kept = None if sharded else _kept(named_scores, chosen)
    else:
        chosen, kept, steps, burn_in_seconds, held = _select_in_passes(
            peft_model, found, groups, dataloader, options, config)
    _install(model, peft_model, tuner, adapter_name, chosen, resize_ddp=not sharded)
    return SelectionReport.build(tuner, adapter_name, steps=steps, seconds=time.perf_counter() - start,
                                 burn_in_seconds=burn_in_seconds, kept=kept, passes=len(groups),
                                 statistics_bytes=held)


def _plan(found: list[Target], dataloader, options: BurnInOptions, sharded: bool) -> list[list[Target]]:
    """The targets of each burn-in pass (one pass unless `max_statistics_bytes` asks for more); refuses what
    cannot run in several."""
    groups = plan_passes(found, options.signal, options.statistics_dtype, sharded, options.max_statistics_bytes)
    if len(groups) == 1:
        return groups
    if sharded:
        raise ConfigError(
            f"max_statistics_bytes={options.max_statistics_bytes:,} needs {len(groups)} burn-in passes, which FSDP2 "
            "does not support: each rank already keeps only its own shard's statistics. Use more ranks, "
            "statistics_dtype=torch.bfloat16, a larger max_statistics_bytes, or select before sharding."
        )
    check_replayable(dataloader, options.num_steps, len(groups), options.max_statistics_bytes)
    return groups


def _select_in_passes(peft_model, found: list[Target], groups: list[list[Target]], dataloader,
                      options: BurnInOptions, config) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, float, int]:
    """The selection of one burn-in pass, made in one pass per group over the same batches from the same random
    state: each group's top-k (per tensor), or the running global top-k merged pass by pass. Returns the chosen
    indices, the kept scores, the steps of a pass, the burn-in seconds of all passes and the largest statistics."""
    total_bytes = sum(statistics_bytes(t, options.signal, options.statistics_dtype, False) for t in found)
    logger.info("burn-in in %d passes over the same batches: max_statistics_bytes=%s, statistics of all targets "
                "%s bytes", len(groups), f"{options.max_statistics_bytes:,}", f"{total_bytes:,}")
    device = found[0].param.device
    entry_budget = budget(config.sparsity, config.allocation, [t.numel for t in found])
    running = RunningTop(entry_budget.ks[0], device) if config.allocation == "global" else None
    chosen: dict[str, torch.Tensor] = {}
    kept: list[torch.Tensor] = []
    record, state = PassRecord(), RandomState(dataloader)
    seconds, largest, steps = 0.0, 0, 0
    for number, group in enumerate(groups, 1):
        if number > 1:
            state.restore()
        began = time.perf_counter()
        stats, steps = run_burn_in(peft_model, found, dataloader, options, sharded=False, group=group, record=record,
                                   label=f"burn-in {number}/{len(groups)}")
        seconds += time.perf_counter() - began
        record.end_pass(number, device)
        largest = max(largest, stats.nbytes)
        named_scores = _scores(stats, options, group)
        if running is not None:
            running.add(named_scores)
        else:
            picked = top_entries(named_scores, budget(config.sparsity, "per_tensor", [t.numel for t in group]))
            chosen.update(picked)
            kept.append(_kept(named_scores, picked))
        del stats, named_scores  # the next pass holds its own group's statistics only, not this group's scores
    if running is not None:
        chosen = dict(zip((t.name for t in found), running.chosen([t.numel for t in found])))
        return chosen, running.scores.cpu(), steps, seconds, largest
    return chosen, torch.cat(kept), steps, seconds, largest


def _kept(named_scores, chosen: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scores of the chosen entries, as float32 on the CPU."""
    return torch.cat([s.reshape(-1)[chosen[n].to(s.device)].float().cpu() for n, s in named_scores])


# ------------------------------------------------------------------------------------------- 1. readiness
def _check_ready(tuner, adapter_name: str, found: list[Target]) -> None:
    """Refuse, before any work, an adapter that cannot be selected: merged, frozen, targeting nothing usable, or
    with a budget that keeps no entry."""
    config = tuner.peft_config[adapter_name]
    if any(isinstance(m, SparseDiffLayer) and m.merged for m in tuner.model.modules()):
        raise SelectionError("an adapter is merged into the base weights; unmerge_adapter() before selecting.")
    if config.inference_mode:
        raise SelectionError(f"adapter '{adapter_name}' is in inference mode (its values are frozen, e.g. loaded "
                             "without is_trainable=True); load it with is_trainable=True to select and train it.")
    if not found:
        raise SelectionError("the adapter targets no parameter; check target_modules / exclude_modules.")
    if all(t.param.device.type == "meta" for t in found):
        raise SelectionError("all targeted parameters are on the meta device; load real weights before selecting.")
    if not any(t.param.dtype.is_floating_point or t.quantized for t in found):
        raise SelectionError("no targeted parameter is a float tensor (a quantized model?); gradients cannot be "
                             "taken: select on a float16/bfloat16/float32 model.")
    if SIGNALS[config.selection].budgeted:
        _check_budget(config, found)


def _check_budget(config, found: list[Target]) -> None:
    """A budgeted selection that would tune no entry at all is refused before any burn-in work."""
    sizes = [t.numel for t in found]
    if max(budget(config.sparsity, config.allocation, sizes).ks) == 0:
        total = sum(sizes) if config.allocation == "global" else max(sizes)
        scope = "all targeted tensors together" if config.allocation == "global" else "the largest targeted tensor"
        raise SelectionError(
            f"sparsity={config.sparsity} selects no entry: {scope} has {total} entries, and floor(p × {total}) = 0. "
            f"Use sparsity ≥ {1 / total:.3g}, target larger modules, or allocation='global'."
        )


def _check_engine(found: list[Target], options: BurnInOptions) -> bool:
    """Whether the targets are FSDP2 shards; refuses what sharded gradients cannot give."""
    sharded = check_engine([t.param for t in found]) == "fsdp"
    if sharded and (options.per_example or options.selection == "sam_hessian"):
        raise SelectionError(
            "under FSDP each burn-in gradient arrives reduce-scattered over all ranks' batches, so per-example "
            "Fisher and the Hutchinson double backward (sam_hessian) are not available; use selection='sam' or "
            "'fisher' (batch gradients), or select before sharding."
        )
    return sharded


# ------------------------------------------------------------------------------------------- 2. the burn-in
def run_burn_in(peft_model: nn.Module, found: list[Target], dataloader, options: BurnInOptions, sharded: bool,
                group: list[Target] | None = None, record: PassRecord | None = None,
                label: str = "burn-in") -> tuple[Statistics, int]:
    """The statistics of `options.signal` over the burn-in batches at θ0 (no update), summed over ranks; and the
    number of batches read. With a `group` (one pass of several) only its targets' statistics are kept, and the
    pass `record` replays the first pass's clipping coefficients and checks its losses."""
    group = found if group is None else group
    stats = Statistics(group, options.signal, options.statistics_dtype, sharded)
    with _burn_in_mode(peft_model, found, options.dropout), gradient_sinks(found, stats, group):
        if options.selection == "sam_hessian":
            steps = _hutchinson_pass(peft_model, found, dataloader, options, stats, record, label)
        else:
            steps = _gradient_pass(peft_model, found, group, dataloader, options, stats, sharded, record, label)
    if sharded:
        sync_shards_requires_grad(peft_model)  # FSDP2 gradients were reduce-scattered already
    else:
        stats.all_reduce()
    return stats, steps


def _gradient_pass(model, found: list[Target], group: list[Target], dataloader, options: BurnInOptions,
                   stats: Statistics, sharded: bool, record: PassRecord | None, label: str) -> int:
    """Backward per batch (per example for FISH); without clipping and with whole weights each gradient is folded
    in (and freed) the moment it is ready, otherwise the batch gradient is folded after backward (clipping needs
    its norm; FSDP2 hands over reduce-scattered shards after its own hooks).

    In a pass of several (`record`), the forward is the one pass's (every target requires grad, so the same
    kernels run), and the backward computes only the gradients of the group's targets (`backward(inputs=...)`),
    except in the first pass when clipping needs every target's gradient norm; later passes reuse its
    coefficients."""
    device = found[0].param.device
    iterator, total = batches(dataloader, options.num_steps, warn=record is None or not record.replaying)
    clipping = options.max_grad_norm is not None
    hooked = not clipping and not sharded
    needed = found if record is None or (clipping and not record.replaying) else group
    # a quantized weight takes no gradient: backward reaches its layer through the anchor its gradient sink holds
    inputs = None if record is None else list({id(t.param): t.param for t in needed if not t.quantized}.values()) \
        + [t.layer._gradient_sink[0] for t in needed if t.quantized]
    plain = [t for t in group if not t.quantized]  # quantized weights fold in their own backward
    handles = fold_hooks(plain, stats) if hooked else []  # removed below, whatever happens
    steps = 0
    try:
        for batch in tqdm(iterator, total=total, desc=label, disable=not options.progress):
            batch = move(batch, device)
            for piece in (examples(batch) if options.per_example_fisher else [batch]):
                loss = burn_in_loss(model, piece, steps, options.loss_fn)
                if record is not None:
                    record.loss(loss)
                _backward(loss, inputs)
                if not hooked:
                    fold_gradients(needed, stats, options.max_grad_norm, sharded, record)
            steps += 1
    finally:
        for handle in handles:
            handle.remove()
    return _checked_steps(steps, options.num_steps, total)


def _backward(loss: torch.Tensor, inputs: list[torch.Tensor] | None) -> None:
    """`loss.backward()`, into `inputs` only when given; reentrant activation checkpointing refuses `inputs`."""
    try:
        loss.backward(inputs=inputs)
    except RuntimeError as error:
        if inputs is None or "checkpoint" not in str(error).lower():
            raise
        raise SelectionError(
            "a burn-in in several passes (max_statistics_bytes) takes each pass's gradients with "
            "backward(inputs=...), which reentrant activation checkpointing refuses: enable it with "
            "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}), select before "
            "enabling it, or pass a larger max_statistics_bytes (one pass)."
        ) from error


def _hutchinson_pass(model, found: list[Target], dataloader, options: BurnInOptions, stats: Statistics,
                     record: PassRecord | None, label: str) -> int:
    """Gradient and Hessian probes per batch; a pass of several computes them for every target (the probes and
    the Hessian-vector products involve them all) and keeps its group's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = found[0].param.device
    iterator, total = batches(dataloader, options.num_steps, warn=record is None or not record.replaying)
    steps = 0
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        for batch in tqdm(iterator, total=total, desc=label, disable=not options.progress):
            loss = hutchinson_step(model, found, move(batch, device), stats, options.hutchinson_samples, steps,
                                   options.max_grad_norm, options.loss_fn)
            if record is not None:
                record.loss(loss)
            steps += 1
    return _checked_steps(steps, options.num_steps, total)


def _checked_steps(steps: int, num_steps: int | None, total: int | None) -> int:
    if steps == 0:
        raise SelectionError("the burn-in dataloader yielded no batch; pass training batches to select from.")
    if num_steps is not None and steps < num_steps and total is None:
        logger.warning("burn-in asked for %d steps but the data ran out after %d; using %d.", num_steps, steps, steps)
    return steps


@contextlib.contextmanager
def _burn_in_mode(peft_model: nn.Module, found: list[Target], dropout: bool):
    """Base weights require grad, everything else does not, adapters off; all restored afterwards, every module's
    train/eval flag included (a base put in eval mode keeps its dropouts off), and the running statistics of
    normalization layers (BatchNorm's running mean and variance, which forwards in train mode update): the
    selection leaves the model as it was."""
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    statistics = [(buffer, buffer.detach().clone()) for buffer in running_statistics(peft_model)]
    layers = {id(t.layer): t.layer for t in found}.values()
    disabled = [(layer, layer._disable_adapters) for layer in layers]
    modes = [(module, module.training) for module in peft_model.modules()]
    found = [t for t in found if not t.quantized]  # a quantized weight takes no gradient (see burnin.quantized)
    grads = [(t.param, t.param.grad) for t in found]  # the caller's: kept out of the statistics, given back after
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for t in found:
            t.param.grad = None
            t.param.requires_grad_(True)
        for layer in layers:
            layer._disable_adapters = True
        peft_model.train(dropout)
        yield
    finally:
        for param, grad in grads:
            param.grad = grad
        for p, flag in flags:
            p.requires_grad_(flag)
        for layer, flag in disabled:
            layer._disable_adapters = flag
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in statistics:
                buffer.copy_(saved)


# ------------------------------------------------------------------------------------------- 3. choosing
def _scores(stats: Statistics, options: BurnInOptions, found: list[Target]) -> list[tuple[str, torch.Tensor]]:
    """Each target's scores (the statistics are released one by one); refuses non-finite gradients on any rank."""
    named_scores = [(t.name, stats.pop_scores(options.signal, t.name)) for t in found]
    bad = next((name for name, score in named_scores if not torch.isfinite(score).all()), None)
    if any_rank(bad is not None, found[0].param.device):
        raise SelectionError(
            f"the burn-in gradient of '{bad or 'a parameter on another rank'}' is NaN or infinite; lower the "
            "learning-rate-independent inputs (check for bad labels, fp16 overflow or a diverging model) and run "
            "the burn-in again."
        )
    return named_scores


def _choose(config, found: list[Target], named_scores, sharded: bool) -> dict[str, torch.Tensor]:
    """The exact top-k under the config's budget: over whole tensors, or over every rank's shards (FSDP2), the same
    indices on every rank."""
    entry_budget = budget(config.sparsity, config.allocation, [t.numel for t in found])
    if not sharded:
        return top_entries(named_scores, entry_budget)
    shards = [Shard(score, Shard.of(t.param).start, t.param.numel()) for t, (_, score) in zip(found, named_scores)]
    return {t.name: idx for t, idx in zip(found, radix_select(shards, entry_budget))}


# ------------------------------------------------------------------------------------------- 4. installing
def _install(model, peft_model, tuner, adapter_name: str, chosen: dict[str, torch.Tensor], resize_ddp: bool) -> None:
    """Install the chosen indices; a DDP wrapper built before, whose values changed length or trainability, gets a
    new reducer."""
    before = _value_layout(tuner, adapter_name)
    install(tuner, adapter_name, chosen, root=peft_model)
    if resize_ddp and initialized() and before != _value_layout(tuner, adapter_name):
        for wrapper in [model] if model is not peft_model else ddp_wrappers_of(peft_model):
            rebuild_ddp(wrapper)


def _value_layout(tuner, adapter_name: str) -> list[tuple[int, bool]]:
    """(length, requires_grad) of each values tensor: what a DDP reducer is built from."""
    return [(t.values.numel(), t.values.requires_grad) for t in targets(tuner, adapter_name)]
