"""`sam-peft eval`: evaluate adapters on the official dev split, switching deltas in place on one base."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..storage.adapter_dir import resolve_adapter_dir
from .common import run_info


def add_parser(sub) -> None:
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
    evaluate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..evaluation import evaluate_model
    from ..storage.adapter_dir import delta_from_adapter_dir
    from ..storage.packing import pack_parameters
    from ..tasks import load_task, resolve_task
    from ..training import default_model_path, load_base_model

    model_path = args.model or default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    bases: dict[tuple, object] = {}
    results = []
    for adapter in args.adapter:
        adapter_dir = resolve_adapter_dir(adapter)
        task = resolve_task(args.task or run_info(adapter_dir).get("task") or "")
        key = (task.is_multiple_choice, task.num_labels, task.is_regression)
        if key not in bases:  # one base per head shape; deltas are switched in place on it
            bases[key] = load_base_model(model_path, task).eval()
            pack_parameters(bases[key])
        base = bases[key]
        delta = delta_from_adapter_dir(adapter_dir)
        split = load_task(task, data_dir=args.data_dir, limit=args.limit)["dev"]
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
