"""`sam-peft`: train, evaluate, inspect and merge sparse deltas (a thin layer over the library)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .bench.profiles import PROFILES
from .errors import SamPeftError
from .methods import METHODS

logger = logging.getLogger("sam_peft")


def _train(args: argparse.Namespace) -> int:
    from .training import TrainSettings, run_training

    settings = TrainSettings(
        task=args.task, output=args.output, model=args.model, data_dir=args.data_dir, method=args.method,
        sparsity=args.sparsity, allocation=args.allocation, burn_in_steps=args.burn_in_steps, epochs=args.epochs,
        max_steps=args.max_steps, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
        seed=args.seed, patience=args.patience, eval_steps=args.eval_steps, limit=args.limit,
        reproject_every=args.reproject_every, logging_steps=args.logging_steps, progress=not args.no_progress,
    )
    metrics = run_training(settings)
    _print_table([
        ("task", metrics["task"]), ("method", metrics["method"]), ("seed", metrics["seed"]),
        ("dev (official) primary", f"{metrics['metric']:.2f}"),
        *[(f"  {k}", f"{v:.4f}") for k, v in metrics["metrics"].items()
          if isinstance(v, float) and not k.endswith(("runtime", "per_second", "loss"))],
        ("held-out 10 % primary", f"{metrics['dev_metrics'].get('primary', float('nan')):.2f}"),
        ("trainable parameters", f"{metrics['trainable_params']:,}"),
        ("adapter file bytes", f"{metrics['delta_bytes']:,}"),
        ("burn-in seconds", f"{metrics['burn_in_seconds']:.1f}" if metrics["burn_in_seconds"] else "-"),
        ("training seconds", f"{metrics['train_seconds']:.1f}"),
        ("steps", metrics["global_steps"]),
        ("output", args.output),
    ])
    return 0


def _print_table(rows: list[tuple[str, object]]) -> None:
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{str(key):<{width}}  {value}")


def _inspect(args: argparse.Namespace) -> int:
    from .adapter_files import adapter_summary

    summary = adapter_summary(args.directory)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    _print_table([(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in rows])
    total = summary["entries"] or 1
    print("\nentries per layer:")
    for layer, count in sorted(summary["per_layer"].items(), key=lambda x: (x[0] == "other", x[0].zfill(4))):
        print(f"  {layer:>6}  {count:>9,}  ({100 * count / total:5.1f} % of entries)")
    print("\nentries per module kind:")
    for kind, count in sorted(summary["per_kind"].items(), key=lambda x: -x[1]):
        print(f"  {kind:<40} {count:>9,}")
    return 0


def _run_info(adapter_dir: Path) -> dict:
    for candidate in (adapter_dir / "metrics.json", adapter_dir.parent / "metrics.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text())
    return {}


def _resolve_adapter_dir(path: str) -> Path:
    path = Path(path)
    return path / "adapter" if (path / "adapter" / "adapter_config.json").exists() else path


def _eval(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from .adapter_files import delta_from_adapter_dir
    from .evaluation import evaluate_model
    from .packing import pack_parameters
    from .tasks import load_task, resolve_task
    from .training import default_model_path, load_base_model

    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    bases: dict[tuple, object] = {}
    results = []
    for adapter in args.adapter:
        adapter_dir = _resolve_adapter_dir(adapter)
        task = resolve_task(args.task or _run_info(adapter_dir).get("task") or "")
        key = (task.is_multiple_choice, task.num_labels, task.is_regression)
        if key not in bases:  # one base per head shape; deltas are switched in place on it
            bases[key] = load_base_model(model_path, task).eval()
            pack_parameters(bases[key])
        base = bases[key]
        delta = delta_from_adapter_dir(adapter_dir)
        split = load_task(task, data_dir=args.data_dir, limit=args.limit)["test"]
        delta.apply_to(base)
        try:
            metrics = evaluate_model(base, tokenizer, task, split, batch_size=args.batch_size,
                                     max_length=args.max_length, progress=not args.no_progress)
        finally:
            delta.remove_from(base)
        results.append({"adapter": str(adapter_dir), "task": task.name, **metrics})
        print(f"{adapter_dir}  {task.name}: primary {metrics['primary']:.2f}  "
              + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "primary"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from .tasks import resolve_task
    from .training import default_model_path, load_base_model

    adapter_dir = _resolve_adapter_dir(args.adapter)
    task = resolve_task(args.task or _run_info(adapter_dir).get("task") or "")
    model_path = args.model or default_model_path()
    base = load_base_model(model_path, task)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    merged.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(args.output)
    print(f"merged model written to {args.output} (loads with transformers' from_pretrained)")
    return 0


def _bench_glue(args: argparse.Namespace) -> int:
    from .bench.glue import run_profile

    path = run_profile(args.profile, name=args.name, results_dir=args.results_dir, model=args.model,
                       data_dir=args.data_dir, jobs=args.jobs, tasks=args.tasks, methods=args.methods,
                       max_runs=args.max_runs, lrs_from=args.lrs_from, command="sam-peft " + " ".join(sys.argv[1:]))
    print(f"results in {path}")
    return 0


def _bench_report(args: argparse.Namespace) -> int:
    from .bench.report import write_report

    print(f"report written to {write_report(args.results, args.output)}")
    return 0


def _bench_projection(args: argparse.Namespace) -> int:
    from .bench.projection import write_projection_curve

    curve = write_projection_curve(args.run, args.json, args.png)
    print(f"{len(curve['steps'])} logged steps, projections at {curve['projections']}: {args.json}, {args.png}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sam-peft", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune on a GLUE/SuperGLUE task")
    train.add_argument("--task", required=True,
                       help="cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, cb, copa, wsc, boolq")
    train.add_argument("--output", required=True, help="output directory")
    train.add_argument("--model", help="local path or hub id (default: the packaged all-MiniLM-L6-v2)")
    train.add_argument("--data-dir", help="directory of the official task files (default: the Hugging Face hub)")
    train.add_argument("--method", default="sam", choices=list(METHODS),
                       help="sparse deltas: sam, fisher, sam_hessian, magnitude, random, bitfit; peft: lora, adapter; "
                            "dense: full, mixout, childpruning, diffpruning, dps (see docs/baselines.md)")
    train.add_argument("--sparsity", type=float, default=0.005, help="fraction of parameters tuned (0.005 = 0.5 %%)")
    train.add_argument("--allocation", default="per_tensor", choices=["per_tensor", "global"])
    train.add_argument("--burn-in-steps", type=int, help="burn-in batches (default: the paper's, capped at one epoch)")
    train.add_argument("--epochs", type=float, default=3.0)
    train.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    train.add_argument("--lr", type=float, help="learning rate (default: 1e-3 parameter-efficient, 5e-5 dense)")
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--patience", type=int, default=3, help="early-stopping patience in evaluations")
    train.add_argument("--eval-steps", type=int, help="evaluate on the held-out 10 %% every N steps")
    train.add_argument("--limit", type=int, help="use only the first N rows of each split (quick checks)")
    train.add_argument("--logging-steps", type=int, help="log the training loss every N steps")
    train.add_argument("--reproject-every", type=int,
                       help="diffpruning: keep the relaxed phase and re-project the diff every N steps (Fig. 3)")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    inspect = sub.add_parser("inspect", help="summarise a saved adapter")
    inspect.add_argument("directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=_inspect)

    evaluate = sub.add_parser("eval", help="evaluate adapters on the official dev split, switching deltas in place")
    evaluate.add_argument("--adapter", action="append", required=True, help="adapter directory (repeatable)")
    evaluate.add_argument("--task", help="task (default: read from the run's metrics.json)")
    evaluate.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--max-length", type=int, default=128)
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--json", help="also write the results to this JSON file")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=_eval)

    merge = sub.add_parser("merge", help="write a merged model that plain transformers loads")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--task", help="task (default: read from the run's metrics.json)")
    merge.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    merge.set_defaults(func=_merge)

    bench = sub.add_parser("bench", help="reproduction harness").add_subparsers(dest="bench", required=True)
    glue = bench.add_parser("glue", help="run (or resume) a profile: smoke, quick, paper or sweep")
    glue.add_argument("--profile", default="quick", choices=list(PROFILES),
                      help="smoke (tests), quick (2-core CPU, ~2 h), lrgrid (learning-rate search), paper, "
                           "perturb (Table 2), sweep (Fig. 5)")
    glue.add_argument("--name", help="results file name (default: the profile name)")
    glue.add_argument("--results-dir", default="benchmarks/results")
    glue.add_argument("--data-dir", help="directory of the official task files (default: the hub)")
    glue.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    glue.add_argument("--jobs", type=int, default=1, help="parallel runs (at most the number of cores)")
    glue.add_argument("--tasks", nargs="+", help="only these tasks")
    glue.add_argument("--methods", nargs="+", help="only these methods")
    glue.add_argument("--max-runs", type=int, help="stop after this many new runs (run a profile in parts)")
    glue.add_argument("--lrs-from", help="results file of the lrgrid profile: use each method's chosen learning rate")
    glue.set_defaults(func=_bench_glue)
    report = bench.add_parser("report", help="tables and plots from results files")
    report.add_argument("results", nargs="+", help="results .jsonl files")
    report.add_argument("--output", default="docs/benchmarks-report.md")
    report.set_defaults(func=_bench_report)
    projection = bench.add_parser("projection", help="Fig. 3 curve from a diffpruning run with --reproject-every")
    projection.add_argument("run", help="output directory of the run")
    projection.add_argument("--json", default="benchmarks/results/projection.json")
    projection.add_argument("--png", default="docs/images/projection.png")
    projection.set_defaults(func=_bench_projection)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (SamPeftError, FileNotFoundError, ValueError) as exc:
        print(f"sam-peft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
