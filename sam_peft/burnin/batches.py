"""Reading the burn-in data: counting and moving batches, and taking the loss the burn-in scores."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..errors import SelectionError

logger = logging.getLogger(__name__)


def batch_count(dataloader) -> int | None:
    """len(dataloader), or None when it has none (a DataLoader over an IterableDataset raises TypeError)."""
    try:
        return len(dataloader)
    except TypeError:
        return None


def batches(dataloader, num_steps: int | None, warn: bool = True) -> tuple[Iterator, int | None]:
    """The batches the burn-in reads and how many there will be (None: unknown); `warn=False` for a pass that
    rereads them."""
    total = batch_count(dataloader)
    if total == 0:
        raise SelectionError("the burn-in dataloader is empty; pass training batches to select from.")
    if warn and total is None and num_steps is None:
        logger.warning("the burn-in dataloader (%s) has no length: the burn-in runs until it is exhausted; pass "
                       "num_steps if it is a stream that never ends.", type(dataloader).__name__)
    if warn and num_steps is not None and total is not None and total < num_steps:
        logger.warning("burn-in asked for %d steps but the dataloader has %d batches; using %d.",
                       num_steps, total, total)
    known = None if total is None else min(num_steps or total, total)
    return itertools.islice(iter(dataloader), num_steps), known


def move(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict:
    """A batch of model inputs on `device`; refuses batches that are not dicts."""
    if not isinstance(batch, Mapping):
        raise SelectionError(
            f"a burn-in batch is a {type(batch).__name__}, not a dict of model inputs; pass a dataloader whose "
            "batches are dicts with the model's keyword arguments and labels (e.g. a DataLoader over a tokenized "
            "dataset with transformers' DataCollatorWithPadding)."
        )
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def examples(batch: dict) -> Iterator[dict]:
    """The batch one example at a time (per-example gradients)."""
    size = next(v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor))
    for i in range(size):
        yield {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def burn_in_loss(model: nn.Module, batch: dict, step: int, loss_fn=None) -> torch.Tensor:
    """The scalar loss of one batch: `loss_fn(model, batch)`, or the model's own; refuses none, non-scalar or
    non-finite losses."""
    loss = model_loss(model(**batch)) if loss_fn is None else loss_fn(model, batch)
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


def model_loss(out) -> torch.Tensor | None:
    """`outputs.loss`, or the first element of a tuple output when it is a scalar (transformers' convention when
    labels are given, `return_dict=False`), as the Trainer reads it."""
    if isinstance(out, Mapping):
        return out.get("loss")
    if isinstance(out, (tuple, list)):
        first = out[0] if out else None
        return first if isinstance(first, torch.Tensor) and first.dim() == 0 else None
    return getattr(out, "loss", None)
