"""`sam-peft inspect`: summarise what `sam-peft train` wrote (a sparse delta, another peft adapter or a model)."""

from __future__ import annotations

import argparse
import json

from .common import SPARSE_DELTA, Artifact, identify, print_table


def add_parser(sub) -> None:
    inspect = sub.add_parser("inspect", help="summarise a saved adapter or model")
    inspect.add_argument("directory", help="output directory of `sam-peft train` (any method), or an adapter or "
                                           "model directory")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..deltas.adapter_dir import adapter_summary

    artifact = identify(args.directory)
    if artifact.kind != SPARSE_DELTA:
        summary = tensor_summary(artifact)
        if args.json:
            print(json.dumps(summary, indent=2))
        else:
            print_table([(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v)
                         for k, v in summary.items()])
        return 0
    summary = {"kind": artifact.kind, "method": artifact.method, **adapter_summary(artifact.path)}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows = [(k, v) for k, v in summary.items() if not isinstance(v, dict)]
    print_table([(k, f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else v) for k, v in rows])
    total = summary["entries"] or 1
    print("\nentries per layer:")
    for layer, count in sorted(summary["per_layer"].items(), key=lambda x: (x[0] == "other", x[0].zfill(4))):
        print(f"  {layer:>6}  {count:>9,}  ({100 * count / total:5.1f} % of entries)")
    print("\nentries per module kind:")
    for kind, count in sorted(summary["per_kind"].items(), key=lambda x: -x[1]):
        print(f"  {kind:<40} {count:>9,}")
    return 0


def tensor_summary(artifact: Artifact) -> dict:
    """Kind, tensors, parameters and bytes of a peft adapter or a full model (shapes read from the file header)."""
    from safetensors import safe_open

    files = sorted(artifact.path.glob("*.safetensors"))
    tensors = params = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                tensors += 1
                count = 1
                for dim in shape:
                    count *= dim
                params += count
    config = artifact.config
    summary = {
        "directory": str(artifact.path),
        "kind": artifact.kind,
        "what": artifact.describe(),
        "method": artifact.method,
        "task": artifact.run.get("task"),
        "file_bytes": sum(p.stat().st_size for p in files),
        "tensors": tensors,
        "parameters": params,
    }
    if artifact.peft_type:
        targets = config.get("target_modules")
        summary.update({
            "peft_type": artifact.peft_type,
            "task_type": config.get("task_type"),
            "base_model": config.get("base_model_name_or_path"),
            "target_modules": ", ".join(sorted(targets)) if isinstance(targets, list) else targets,
            "modules_to_save": ", ".join(config.get("modules_to_save") or []) or None,
        })
    else:
        summary.update({
            "architecture": ", ".join(config.get("architectures") or []) or None,
            "model_type": config.get("model_type"),
            "problem_type": config.get("problem_type"),
            "dtype": config.get("dtype") or config.get("torch_dtype"),
        })
    return summary
