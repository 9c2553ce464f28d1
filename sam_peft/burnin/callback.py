"""`SAMCallback`: burn-in selection inside `transformers.Trainer`, before the first optimizer step."""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import TrainerCallback

from ..errors import SelectionError
from ..tuner.targets import resolve_adapter, targets, tuner_of
from .batches import batch_count
from .select import select_parameters

logger = logging.getLogger(__name__)


class SAMCallback(TrainerCallback):
    """Run `select_parameters` on the trainer's train dataloader when training begins.

    The optimizer (built by the Trainer before any callback runs) keeps the same value parameters, whose
    contents are replaced by the selected entries, so it trains exactly those (and the dense head). When the
    adapter already has its entries — selected earlier, or loaded from a checkpoint on resume — nothing is
    re-selected.

    Args:
        burn_in_steps: batches of burn-in (None: one pass over the dataloader).
        adapter_name: adapter to select (default: the active one).
        **select_kwargs: passed on to `sam_peft.select_parameters` (e.g. `dropout=False`,
            `statistics_dtype=torch.bfloat16`, `max_grad_norm=1.0`, `max_statistics_bytes=4 * 2**30` for a burn-in
            in several passes holding at most 4 GiB of statistics). The burn-in scores the model's own loss; when
            the trainer trains another (`compute_loss_func`, label smoothing, a TRL `loss_type`), pass the same
            as `loss_fn=(model, batch) -> loss`.

    Under DDP the Trainer wraps the model before this callback runs; when the selection changes the size of the
    values (global allocation) the DDP wrapper is rebuilt around them. Under FSDP2 (accelerate's FSDP plugin with
    `fsdp_version: 2`) the selection runs on the shards (see `select_parameters` and docs/distributed.md).
    """

    def __init__(self, burn_in_steps: int | None = None, adapter_name: str | None = None, **select_kwargs):
        self.burn_in_steps = burn_in_steps
        self.adapter_name = adapter_name
        self.select_kwargs = select_kwargs
        self.report = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        tuner = tuner_of(model)
        adapter = resolve_adapter(tuner, self.adapter_name)
        if adapter not in tuner.active_adapters:
            raise SelectionError(
                f"SAMCallback selects adapter '{adapter}' but the model trains {list(tuner.active_adapters)}; call "
                f"model.set_adapter('{adapter}') before training, or give the callback the active adapter's name."
            )
        if tuner.peft_config[adapter].is_selected:
            logger.info("adapter '%s' already has its entries; no burn-in.", adapter)
            return
        self.select_kwargs.setdefault("progress", not args.disable_tqdm)
        if self.burn_in_steps is None and batch_count(train_dataloader) is None:
            raise SelectionError("the trainer's train dataloader has no length (an IterableDataset), so one burn-in "
                                 "pass over it may never end: give SAMCallback(burn_in_steps=N).")
        with _training_autocast(args, model):  # the burn-in runs as training will: bf16/fp16, fp32 statistics
            self.report = select_parameters(model, train_dataloader, self.burn_in_steps, adapter_name=adapter,
                                            **self.select_kwargs)
        _drop_frozen_values(kwargs.get("optimizer"), tuner, adapter)
        logger.info("SAM selection done:\n%s", self.report)


def _training_autocast(args, model) -> contextlib.AbstractContextManager:
    """The autocast the Trainer's training steps use (`bf16=True` / `fp16=True`), or nothing."""
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    if dtype is None:
        return contextlib.nullcontext()
    device = next((p.device.type for p in model.parameters()), "cpu")
    return torch.autocast(device, dtype=dtype)


def _drop_frozen_values(optimizer, tuner, adapter: str) -> None:
    """Take the values tensors the selection left empty (and frozen) out of the optimizer the Trainer built before
    it, so that its parameter groups, and the checkpoints it writes, are those of an optimizer built after a
    selection (or after loading a checkpoint): a run resumes whichever way its entries were chosen."""
    if optimizer is None:
        return
    frozen = {id(t.values) for t in targets(tuner, adapter) if not t.values.requires_grad}
    for group in optimizer.param_groups:
        if any(id(p) in frozen and p in optimizer.state for p in group["params"]):
            return  # the optimizer has stepped them already: leave it as it is
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in frozen]
