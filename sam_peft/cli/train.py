"""`sam-peft train`: fine-tune on a GLUE/SuperGLUE task through the shared training path."""

from __future__ import annotations

import argparse

from ..methods import DENSE_LR, EFFICIENT_LR, METHODS, describe_methods
from .common import print_table

TASK_NAMES = "cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli, cb, copa, wsc, boolq, wic"


def add_parser(sub) -> None:
    train = sub.add_parser("train", help="fine-tune on a GLUE/SuperGLUE task")
    # Written out so that `sam-peft --help` does not import datasets; a test keeps it equal to TASKS.
    train.add_argument("--task", required=True, help=TASK_NAMES)
    train.add_argument("--output", required=True, help="output directory")
    train.add_argument("--model", help="local path or hub id (default: the packaged all-MiniLM-L6-v2)")
    train.add_argument("--data-dir", help="directory of the official task files (default: the Hugging Face hub)")
    train.add_argument("--method", default="sam", choices=list(METHODS),
                       help=describe_methods() + " (see docs/baselines.md)")
    train.add_argument("--sparsity", type=float, default=0.005, help="fraction of parameters tuned (0.005 = 0.5 %%)")
    train.add_argument("--allocation", default="per_tensor", choices=["per_tensor", "global"])
    train.add_argument("--burn-in-steps", type=int, help="burn-in batches (default: the paper's, capped at one epoch)")
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    train.add_argument("--lr", type=float,
                       help=f"learning rate (default: {EFFICIENT_LR:g} parameter-efficient, {DENSE_LR:g} dense)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--patience", type=int, default=3,
                       help="early-stopping patience in held-out evaluations, counted from the first one that beats "
                       "the constant prediction's held-out score")
    train.add_argument("--eval-steps", type=int, help="evaluate on the held-out 10 %% every N steps")
    train.add_argument("--limit", type=int, help="use only the first N rows of each split (quick checks)")
    train.add_argument("--train-rows", type=int,
                       help="train on N random rows of the training split (seeded); held-out and dev stay whole")
    train.add_argument("--logging-steps", type=int, help="log the training loss every N steps")
    train.add_argument("--reproject-every", type=int,
                       help="diffpruning: keep the relaxed phase and re-project the diff every N steps (Fig. 3)")
    train.add_argument("--pa-style", default="parallel", choices=["parallel", "sequential"],
                       help="parallel_adapter: He et al.'s scaled parallel adapter or a sequential one "
                            "(default parallel)")
    train.add_argument("--pa-placement", default="ffn", choices=["attention", "ffn", "both"],
                       help="parallel_adapter: beside the attention sublayer, the FFN or both (default ffn)")
    train.add_argument("--pa-r", type=int, help="parallel_adapter / mam: bottleneck width (default hidden size // 2)")
    train.add_argument("--pa-scaling", type=float, help="parallel_adapter / mam: scale s of the adapter (default 4)")
    train.add_argument("--prefix-length", type=int, default=30, help="prefix / mam: prefix length l (default 30)")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the outputs of an earlier run in --output (refused otherwise)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..training import TrainSettings, run_training

    settings = TrainSettings(
        task=args.task, output=args.output, model=args.model, data_dir=args.data_dir, method=args.method,
        sparsity=args.sparsity, allocation=args.allocation, burn_in_steps=args.burn_in_steps, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, patience=args.patience, eval_steps=args.eval_steps, limit=args.limit,
        train_rows=args.train_rows, reproject_every=args.reproject_every, logging_steps=args.logging_steps,
        progress=not args.no_progress,
        pa_style=args.pa_style, pa_placement=args.pa_placement, pa_r=args.pa_r, pa_scaling=args.pa_scaling,
        prefix_length=args.prefix_length, overwrite=args.overwrite,
    )
    metrics = run_training(settings)
    print_table([
        ("task", metrics["task"]), ("method", metrics["method"]), ("seed", metrics["seed"]),
        ("dev (official) primary", f"{metrics['metric']:.2f}"),
        ("  95 % interval", "{:.2f}-{:.2f} (bootstrap over the dev examples)".format(*metrics["dev_interval"])),
        *[(f"  {k}", f"{v:.4f}") for k, v in metrics["metrics"].items()
          if isinstance(v, float) and not k.endswith(("runtime", "per_second", "loss"))],
        ("constant prediction's dev primary", f"{metrics['constant_score']:.2f}" + _verdict(metrics)),
        ("held-out 10 % primary", f"{metrics['heldout_metrics'].get('primary', float('nan')):.2f}"),
        ("trainable parameters", f"{metrics['trainable_params']:,}"),
        ("adapter file bytes", f"{metrics['delta_bytes']:,}"),
        ("burn-in seconds", f"{metrics['burn_in_seconds']:.1f}" if metrics["burn_in_seconds"] else "-"),
        ("training seconds", f"{metrics['train_seconds']:.1f}"),
        ("steps", metrics["global_steps"]),
        ("output", args.output),
    ])
    return 0


def _verdict(metrics: dict) -> str:
    if metrics["constant"]:
        return " (this run is flagged constant: it predicts what a constant prediction does)"
    if metrics["above_constant"]:
        return " (below the run's whole interval: the run beats it)"
    return " (inside the run's interval: not distinguishable from a constant prediction)"
