"""The burn-in: gradient statistics at θ0 without any update, then scoring and exact top-k selection."""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, SelectionError
from ..tuner.entries import install, select_data_free
from .budget import choose, per_tensor_budget
from .distributed import (
    Shard,
    all_reduce_,
    any_rank,
    check_engine,
    ddp_wrappers_of,
    initialized,
    rebuild_ddp,
    sync_shards_requires_grad,
    topk_sharded,
)
from .report import SelectionReport
from .scores import SELECTIONS, SIGNALS
from .targets import Target, resolve_adapter, targets, tuner_of

logger = logging.getLogger(__name__)


@dataclass
class _Statistics:
    """Per-target accumulators: Σg (sam, sam_hessian), Σg² (fisher), Σ z⊙Hz (sam_hessian)."""

    grad_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    hessian_sum: dict[str, torch.Tensor] = field(default_factory=dict)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for kind in ("grad_sum", "grad_sq_sum", "hessian_sum"):
            for name, tensor in getattr(self, kind).items():
                yield f"{kind}:{name}", tensor


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

    Returns:
        A `SelectionReport`. The values of the selected entries are zero (the model equals the base model).

    Under `torch.distributed` with whole weights (DDP, or none) each rank accumulates over its own batches and the
    statistics are summed over ranks, so every rank installs the same indices as one process over all the batches.
    Under FSDP2 (`fully_shard`) each rank keeps the statistics of its own shard, from the gradients FSDP already
    reduce-scattered (a step's gradient is that of all ranks' batches together), and the top-k runs across shards
    without gathering any score tensor (`selection.distributed`). DeepSpeed ZeRO-3 is refused.
    """
    tuner = tuner_of(model)
    adapter_name = resolve_adapter(tuner, adapter_name)
    config = tuner.peft_config[adapter_name]
    if selection is not None and selection not in SELECTIONS:
        raise ConfigError(f"selection={selection!r} is unknown; choose one of {list(SELECTIONS)}.")
    if isinstance(hutchinson_samples, bool) or not isinstance(hutchinson_samples, int) or hutchinson_samples < 1:
        raise ConfigError(f"hutchinson_samples={hutchinson_samples!r} must be a positive integer (probes per batch "
                          "of the sam_hessian signal).")
    previous = config.selection
    config.selection = selection or previous
    try:
        return _select(model, tuner, adapter_name, config, dataloader, num_steps, per_example=per_example,
                       hutchinson_samples=hutchinson_samples, dropout=dropout, progress=progress,
                       statistics_dtype=statistics_dtype, max_grad_norm=max_grad_norm, loss_fn=loss_fn)
    except BaseException:
        config.selection = previous  # the override is recorded only with the entries it chose
        raise


def _select(model, tuner, adapter_name: str, config, dataloader, num_steps, *, per_example: bool,
            hutchinson_samples: int, dropout: bool, progress: bool, statistics_dtype, max_grad_norm,
            loss_fn) -> SelectionReport:
    if any(getattr(m, "merged", False) for m in tuner.model.modules() if hasattr(m, "sparsediff_values")):
        raise SelectionError("an adapter is merged into the base weights; unmerge_adapter() before selecting.")
    if config.inference_mode:
        raise SelectionError(f"adapter '{adapter_name}' is in inference mode (its values are frozen, e.g. loaded "
                             "without is_trainable=True); load it with is_trainable=True to select and train it.")
    found = targets(tuner, adapter_name)
    _check_targets(found)
    _check_budget(config, found)
    start = time.perf_counter()
    if config.is_data_free:
        select_data_free(tuner, adapter_name)
        return SelectionReport.build(tuner, adapter_name, steps=0, seconds=time.perf_counter() - start)
    if dataloader is None:
        raise ValueError(f"selection='{config.selection}' needs data: pass a dataloader of training batches.")

    statistics_dtype = _statistics_dtype(statistics_dtype)
    if loss_fn is not None and not callable(loss_fn):
        raise ConfigError(f"loss_fn={loss_fn!r} must be a callable (model, batch) -> scalar loss tensor.")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ConfigError(f"max_grad_norm={max_grad_norm!r} must be a positive number (or None: no clipping).")
    engine = check_engine([t.param for t in found])
    if engine == "fsdp" and (per_example or config.selection == "sam_hessian"):
        raise SelectionError(
            "under FSDP each burn-in gradient arrives reduce-scattered over all ranks' batches, so per-example "
            "Fisher and the Hutchinson double backward (sam_hessian) are not available; use selection='sam' or "
            "'fisher' (batch gradients), or select before sharding."
        )
    peft_model = getattr(model, "module", model)
    stats = _Statistics()
    burn_in_start = time.perf_counter()
    with _burn_in_mode(peft_model, tuner, found, dropout):
        steps = _accumulate(peft_model, found, dataloader, num_steps, config.selection, stats,
                            per_example=per_example, hutchinson_samples=hutchinson_samples, progress=progress,
                            dtype=statistics_dtype, max_grad_norm=max_grad_norm, engine=engine, loss_fn=loss_fn)
    if engine == "fsdp":
        sync_shards_requires_grad(peft_model)
    else:
        _all_reduce(stats)
    burn_in_seconds = time.perf_counter() - burn_in_start
    named_scores = [(t.name, _score(config.selection, stats, t.name)) for t in found]
    bad = next((name for name, score in named_scores if not torch.isfinite(score).all()), None)
    if any_rank(bad is not None, found[0].param.device):
        raise SelectionError(
            f"the burn-in gradient of '{bad or 'a parameter on another rank'}' is NaN or infinite; lower the "
            "learning-rate-independent inputs (check for bad labels, fp16 overflow or a diverging model) and run "
            "the burn-in again."
        )
    if engine == "fsdp":
        chosen = _choose_sharded(config, found, named_scores)
        named_scores = None  # local shards: no score summary
    else:
        chosen = choose(config, named_scores)
    before = _value_layout(tuner, adapter_name)
    install(tuner, adapter_name, chosen, root=peft_model)
    if before != _value_layout(tuner, adapter_name) and engine == "replicated" and initialized():
        # the values changed length or trainability under a DDP wrapper built before: give it a new reducer
        wrappers = [model] if model is not peft_model else ddp_wrappers_of(peft_model)
        for wrapper in wrappers:
            rebuild_ddp(wrapper)
    del stats
    return SelectionReport.build(tuner, adapter_name, steps=steps, seconds=time.perf_counter() - start,
                                 burn_in_seconds=burn_in_seconds, scores=named_scores, chosen=chosen)


def _value_layout(tuner, adapter_name: str) -> list[tuple[int, bool]]:
    """(length, requires_grad) of each values tensor: what a DDP reducer is built from."""
    return [(v.numel(), v.requires_grad) for v in (t.layer.sparsediff_values[adapter_name][t.attr]
                                                    for t in targets(tuner, adapter_name))]


def _statistics_dtype(dtype) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    resolved = names.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if resolved not in (torch.float32, torch.bfloat16):
        raise ConfigError(f"statistics_dtype={dtype!r} must be torch.float32 (default) or torch.bfloat16.")
    return resolved


def _choose_sharded(config, found: list[Target], named_scores) -> dict[str, torch.Tensor]:
    """Exact top-k over the local score shards of every rank (FSDP2): the same indices on every rank."""
    shards = [Shard(score, Shard.of(t.param).start, t.param.numel()) for t, (_, score) in zip(found, named_scores)]
    if config.allocation == "global":
        groups = [0] * len(shards)
        ks = [per_tensor_budget(config.sparsity, sum(s.total for s in shards))]
    else:
        groups = list(range(len(shards)))
        ks = [per_tensor_budget(config.sparsity, s.total) for s in shards]
    chosen = topk_sharded(shards, groups, ks)
    return {t.name: idx for t, idx in zip(found, chosen)}


def _check_targets(found: list[Target]) -> None:
    if not found:
        raise SelectionError("the adapter targets no parameter; check target_modules / exclude_modules.")
    if all(t.param.device.type == "meta" for t in found):
        raise SelectionError("all targeted parameters are on the meta device; load real weights before selecting.")
    if not any(t.param.dtype.is_floating_point for t in found):
        raise SelectionError("no targeted parameter is a float tensor (a quantized model?); gradients cannot be "
                             "taken: select on a float16/bfloat16/float32 model.")


def _check_budget(config, found: list[Target]) -> None:
    """A budgeted selection that would tune no entry at all is refused before any burn-in work."""
    if not SIGNALS[config.selection].budgeted:
        return
    sizes = [t.param.numel() for t in found]
    total = sum(sizes) if config.allocation == "global" else max(sizes)
    if per_tensor_budget(config.sparsity, total) == 0:
        scope = "all targeted tensors together" if config.allocation == "global" else "the largest targeted tensor"
        raise SelectionError(
            f"sparsity={config.sparsity} selects no entry: {scope} has {total} entries, and floor(p × {total}) = 0. "
            f"Use sparsity ≥ {1 / total:.3g}, target larger modules, or allocation='global'."
        )


@contextlib.contextmanager
def _burn_in_mode(peft_model: nn.Module, tuner, found: list[Target], dropout: bool):
    """Base weights require grad, everything else does not, adapters off; all restored afterwards."""
    flags = [(p, p.requires_grad) for p in peft_model.parameters()]
    layers = {id(t.layer): t.layer for t in found}.values()
    disabled = [(layer, layer._disable_adapters) for layer in layers]
    was_training = peft_model.training
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
        peft_model.train(was_training)


def _batches(dataloader, num_steps: int | None) -> tuple[Iterator, int | None]:
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0):
        raise ValueError(f"num_steps={num_steps!r} must be a positive number of batches (or None for all).")
    total = batch_count(dataloader)
    if total == 0:
        raise SelectionError("the burn-in dataloader is empty; pass training batches to select from.")
    if total is None and num_steps is None:
        logger.warning("the burn-in dataloader (%s) has no length: the burn-in runs until it is exhausted; pass "
                       "num_steps if it is a stream that never ends.", type(dataloader).__name__)
    if num_steps is not None and total is not None and total < num_steps:
        logger.warning("burn-in asked for %d steps but the dataloader has %d batches; using %d.",
                       num_steps, total, total)
    if total is None:
        return itertools.islice(iter(dataloader), num_steps), None
    return itertools.islice(iter(dataloader), num_steps), min(num_steps or total, total)


def batch_count(dataloader) -> int | None:
    """len(dataloader), or None when it has none (a DataLoader over an IterableDataset raises TypeError)."""
    try:
        return len(dataloader)
    except TypeError:
        return None


def _move(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    if not isinstance(batch, Mapping):
        raise SelectionError(
            f"a burn-in batch is a {type(batch).__name__}, not a dict of model inputs; pass a dataloader whose "
            "batches are dicts with the model's keyword arguments and labels (e.g. a DataLoader over a tokenized "
            "dataset with transformers' DataCollatorWithPadding)."
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss(model: nn.Module, batch: dict, step: int, loss_fn=None) -> torch.Tensor:
    loss = _model_loss(model(**batch)) if loss_fn is None else loss_fn(model, batch)
    if loss is None:
        raise SelectionError(
            f"the model returned no loss for a burn-in batch with keys {sorted(batch)}: include the labels, or "
            "pass loss_fn=(model, batch) -> loss (SAMCallback(loss_fn=...)) computing the loss training uses."
        )
    if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
        shape = f" of shape {list(loss.shape)}" if isinstance(loss, torch.Tensor) else ""
        raise SelectionError(f"the burn-in loss must be a scalar tensor; got a {type(loss).__name__}{shape}.")
    if not torch.isfinite(loss):
        raise SelectionError(f"the burn-in loss is {loss.item()} at step {step}; check the inputs and labels, "
                             "and the model's dtype (fp16 overflows easily).")
    return loss


def _model_loss(out) -> torch.Tensor | None:
    """`outputs.loss`, or the first element of a tuple output when it is a scalar (transformers' convention when
    labels are given, `return_dict=False`), as the Trainer reads it."""
    if isinstance(out, Mapping):
        return out.get("loss")
    if isinstance(out, (tuple, list)):
        first = out[0] if out else None
        return first if isinstance(first, torch.Tensor) and first.dim() == 0 else None
    return getattr(out, "loss", None)


def _accumulate(model, found, dataloader, num_steps, selection, stats, *, per_example, hutchinson_samples,
                progress, dtype=torch.float32, max_grad_norm=None, engine="replicated", loss_fn=None) -> int:
    device = found[0].param.device
    for t in found:
        shape = Shard.of(t.param).local.shape if engine == "fsdp" else t.param.shape
        for kind in SIGNALS[selection].statistics:
            getattr(stats, kind)[t.name] = torch.zeros(shape, dtype=dtype, device=device)
    batches, total = _batches(dataloader, num_steps)
    steps = 0
    if selection == "sam_hessian":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
            for batch in tqdm(batches, total=total, desc="burn-in", disable=not progress):
                _hutchinson_step(model, found, _move(batch, device), stats, hutchinson_samples, steps, max_grad_norm,
                                 loss_fn)
                steps += 1
    else:
        # without clipping and with whole weights, each gradient is folded in (and freed) the moment it is ready;
        # otherwise the batch gradient is folded after backward (clipping needs its norm; FSDP2 hands over
        # reduce-scattered shards after its own hooks)
        hooked = max_grad_norm is None and engine == "replicated"
        handles = [_fold_hook(t, selection, stats) for t in found] if hooked else []
        try:
            for batch in tqdm(batches, total=total, desc="burn-in", disable=not progress):
                batch = _move(batch, device)
                for piece in (_examples(batch) if per_example and selection == "fisher" else [batch]):
                    _loss(model, piece, steps, loss_fn).backward()
                    if not hooked:
                        _fold_gradients(found, selection, stats, max_grad_norm, engine)
                steps += 1
        finally:
            for handle in handles:
                handle.remove()
    if steps == 0:
        raise SelectionError("the burn-in dataloader yielded no batch; pass training batches to select from.")
    if num_steps is not None and steps < num_steps and total is None:
        logger.warning("burn-in asked for %d steps but the data ran out after %d; using %d.", num_steps, steps, steps)
    return steps


def _fold_hook(target: Target, selection: str, stats: _Statistics):
    """Fold each dense gradient into the statistic as soon as it is accumulated, then free it."""
    stat = (stats.grad_sum if selection == "sam" else stats.grad_sq_sum)[target.name]
    square = selection == "fisher"

    def hook(param: torch.Tensor) -> None:
        grad = param.grad
        if square:
            stat.addcmul_(grad, grad)
        else:
            stat.add_(grad)
        param.grad = None

    return target.param.register_post_accumulate_grad_hook(hook)


def _clip_coefficient(grads: list[torch.Tensor], max_grad_norm: float | None, engine: str) -> float:
    """min(1, max_grad_norm / ‖g‖) for the batch gradient g of all targeted parameters (as clip_grad_norm_)."""
    if max_grad_norm is None:
        return 1.0
    device = grads[0].device if grads else torch.device("cpu")
    square = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        square += grad.detach().float().square().sum()
    if engine == "fsdp":  # each rank holds disjoint shards: the global norm needs their sum
        all_reduce_([square])
    return min(1.0, float(max_grad_norm) / (float(square.sqrt()) + 1e-6))


def _fold_gradients(found: list[Target], selection: str, stats: _Statistics, max_grad_norm, engine: str) -> None:
    """Fold the batch gradient of every target (its local shard under FSDP2), clipped if asked, then free it."""
    params = [t.param for t in found]
    grads = [None if p.grad is None else Shard.of(p.grad).local for p in params]
    coef = _clip_coefficient([g for g in grads if g is not None], max_grad_norm, engine)
    square = selection == "fisher"
    target_stats = stats.grad_sq_sum if square else stats.grad_sum
    for t, param, grad in zip(found, params, grads):
        if grad is None:
            continue
        stat = target_stats[t.name]
        if square:
            stat.addcmul_(grad, grad, value=coef * coef)
        else:
            stat.add_(grad, alpha=coef)
        param.grad = None


def _examples(batch: dict) -> Iterator[dict]:
    size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    for i in range(size):
        yield {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _hutchinson_step(model, found, batch, stats, samples: int, step: int, max_grad_norm=None, loss_fn=None) -> None:
    params = [t.param for t in found]
    grads = torch.autograd.grad(_loss(model, batch, step, loss_fn), params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    coef = _clip_coefficient(grads, max_grad_norm, "replicated")
    for t, g in zip(found, grads):
        stats.grad_sum[t.name].add_(g.detach(), alpha=coef)
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a parameter the loss does not use has none
    for _ in range(samples if live else 0):
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hvps = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[probes[i] for i in live],
                                   retain_graph=True, allow_unused=True)
        for t, z, hv in zip(found, probes, hvps):
            if hv is not None:
                stats.hessian_sum[t.name].add_(z * hv / samples)


def _all_reduce(stats: _Statistics) -> None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for _, tensor in stats.tensors():
        if tensor.dtype == torch.float32:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        else:  # bf16 statistics: sum in fp32 (not every backend reduces bf16), one tensor at a time
            wide = tensor.float()
            dist.all_reduce(wide, op=dist.ReduceOp.SUM)
            tensor.copy_(wide)


def _score(selection: str, stats: _Statistics, name: str) -> torch.Tensor:
    signal = SIGNALS[selection]
    return signal.score(**{kind: getattr(stats, kind).pop(name) for kind in signal.statistics})
