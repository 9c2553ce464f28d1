"""`sam-peft merge`: write a merged model that plain transformers loads."""

from __future__ import annotations

import argparse

from ..storage.adapter_dir import resolve_adapter_dir
from .common import run_info


def add_parser(sub) -> None:
    merge = sub.add_parser("merge", help="write a merged model that plain transformers loads")
    merge.add_argument("--adapter", required=True)
    merge.add_argument("--output", required=True)
    merge.add_argument("--task", help="task (default: read from the run's metrics.json)")
    merge.add_argument("--model", help="base model (default: the packaged all-MiniLM-L6-v2)")
    merge.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..tasks import resolve_task
    from ..training import default_model_path, load_base_model

    adapter_dir = resolve_adapter_dir(args.adapter)
    task = resolve_task(args.task or run_info(adapter_dir).get("task") or "")
    model_path = args.model or default_model_path()
    base = load_base_model(model_path, task)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload(safe_merge=True)
    merged.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(args.output)
    print(f"merged model written to {args.output} (loads with transformers' from_pretrained)")
    return 0
