"""`sam-peft eval`: evaluate what `sam-peft train` wrote, for any method, on the official dev split.

Sparse deltas are switched in place on one loaded base; peft adapters (LoRA, bottleneck and unified adapters) are
loaded on a fresh base; full models (full fine-tuning and the dense baselines) are loaded from their directory.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from ..errors import DeltaFileError
from .common import FULL_MODEL, PEFT_ADAPTER, SPARSE_DELTA, Artifact, identify


def add_parser(sub) -> None:
    evaluate = sub.add_parser("eval", help="evaluate trained adapters or models on the official dev split")
    evaluate.add_argument("--adapter", action="append", required=True,
                          help="output directory of `sam-peft train` (any method), or an adapter or model directory "
                               "(repeatable)")
    evaluate.add_argument("--task", help="task (default: read from the run's metrics.json)")
    evaluate.add_argument("--model", help="base model (default: the run's, else the packaged all-MiniLM-L6-v2)")
    evaluate.add_argument("--data-dir")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--max-length", type=int,
                          help="token limit (default: the run's, from its metrics.json, else 128)")
    evaluate.add_argument("--limit", type=int)
    evaluate.add_argument("--json", help="also write the results to this JSON file")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..evaluation import evaluate_model
    from ..tasks import load_task

    artifacts = [identify(path) for path in args.adapter]  # refuse an unusable directory before loading anything
    if args.json and Path(args.json).is_dir():
        raise ValueError(f"--json {args.json} is a directory; pass a file path.")
    tokenizers: dict[str, object] = {}
    bases: dict[tuple, object] = {}
    results = []
    for artifact in artifacts:
        task = task_of(artifact, args.task)
        model_path = artifact.base_model(args.model)
        tokenizer_path = str(artifact.path) if artifact.kind == FULL_MODEL else model_path
        if tokenizer_path not in tokenizers:
            tokenizers[tokenizer_path] = AutoTokenizer.from_pretrained(tokenizer_path)
        split = load_task(task, data_dir=args.data_dir, limit=args.limit)["dev"]
        with loaded(artifact, task, model_path, bases) as model:
            max_length = args.max_length or (artifact.run.get("settings") or {}).get("max_length") or 128
            metrics = evaluate_model(model, tokenizers[tokenizer_path], task, split, batch_size=args.batch_size,
                                     max_length=max_length, progress=not args.no_progress)
        results.append({"adapter": str(artifact.path), "kind": artifact.kind, "method": artifact.method,
                        "task": task.name, "max_length": max_length, **metrics})
        print(f"{artifact.path}  {task.name} ({artifact.kind}): primary {metrics['primary']:.2f}  "
              + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "primary"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def task_of(artifact: Artifact, explicit: str | None):
    """The task given on the command line, else the one the run's metrics.json records."""
    from ..tasks import resolve_task

    name = explicit or artifact.run.get("task")
    if not name:
        raise DeltaFileError(f"{artifact.path} is {artifact.describe()}, but no metrics.json beside it records its "
                             "task; pass --task.")
    return resolve_task(name)


@contextmanager
def loaded(artifact: Artifact, task, model_path: str, bases: dict):
    """The model to evaluate. Sparse deltas are applied in place to one shared base per (model, head shape) and
    removed afterwards; a peft adapter is loaded on a fresh base; a full model is loaded from its directory."""
    from peft import PeftModel

    from ..baselines import adapters  # noqa: F401  (registers the bottleneck and unified adapter types)
    from ..deltas.adapter_dir import delta_from_adapter_dir
    from ..deltas.packing import pack_parameters
    from ..training import load_base_model

    if artifact.kind == SPARSE_DELTA:
        key = (model_path, task.is_multiple_choice, task.num_labels, task.is_regression)
        if key not in bases:
            bases[key] = load_base_model(model_path, task).eval()
            pack_parameters(bases[key])
        delta = delta_from_adapter_dir(artifact.path)
        delta.apply_to(bases[key])
        try:
            yield bases[key]
        finally:
            delta.remove_from(bases[key])
    elif artifact.kind == PEFT_ADAPTER:
        yield PeftModel.from_pretrained(load_base_model(model_path, task), str(artifact.path)).eval()
    else:
        yield load_base_model(str(artifact.path), task).eval()
