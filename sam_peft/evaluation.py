"""Evaluation of a (plain or peft) model on an encoded task split, with offline metrics."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.no_grad()
def evaluate_model(model, tokenizer, task, split, *, batch_size: int = 64, max_length: int = 128,
                   progress: bool = True) -> dict[str, float]:
    """Metrics (official ones plus `primary`, 0–100) of `model` on a raw task split."""
    from .tasks import collator_for, compute_metrics, encode

    encoded = encode(task, tokenizer, split, max_length=max_length)
    loader = DataLoader(encoded, batch_size=batch_size, collate_fn=collator_for(task, tokenizer))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in tqdm(loader, desc=f"eval {task.name}", disable=not progress):
        labels.append(batch.pop("labels").numpy())
        logits.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy())
    model.train(was_training)
    return compute_metrics(task, np.concatenate(logits), np.concatenate(labels))
