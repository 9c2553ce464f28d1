"""`sam-peft merge`: write a merged model that plain transformers loads, from what `sam-peft train` wrote."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DeltaFileError
from .common import FULL_MODEL, identify


def add_parser(sub) -> None:
    merge = sub.add_parser("merge", help="write a merged model that plain transformers loads")
    merge.add_argument("--adapter", required=True, help="output directory of `sam-peft train` (any method), or an "
                                                        "adapter or model directory")
    merge.add_argument("--output", required=True)
    merge.add_argument("--task", help="task (default: read from the run's metrics.json)")
    merge.add_argument("--model", help="base model (default: the run's, else the packaged all-MiniLM-L6-v2)")
    merge.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from ..baselines import adapters  # noqa: F401  (registers the bottleneck and unified adapter types)
    from ..training import load_base_model
    from .evaluate import task_of

    artifact = identify(args.adapter)
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise ValueError(f"--output {args.output} is a file; pass a directory path for the merged model.")
    task = task_of(artifact, args.task)
    if artifact.kind == FULL_MODEL:  # nothing to merge: the model itself, re-saved
        model, tokenizer_path = load_base_model(str(artifact.path), task), str(artifact.path)
    else:
        model_path = artifact.base_model(args.model)
        peft_model = PeftModel.from_pretrained(load_base_model(model_path, task), str(artifact.path))
        try:
            model = peft_model.merge_and_unload(safe_merge=True)
        except NotImplementedError as exc:
            raise DeltaFileError(f"{artifact.path} is {artifact.describe()}, which cannot be merged into the base "
                                 f"weights ({exc}); evaluate it with `sam-peft eval` or load it with "
                                 "peft.PeftModel.from_pretrained.") from exc
        tokenizer_path = model_path
        print(_merge_kind(peft_model.peft_config[peft_model.active_adapter], model_path))
    model.save_pretrained(args.output)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(args.output)
    print(f"merged model written to {args.output} from {artifact.describe()} (loads with transformers' "
          "from_pretrained)")
    return 0


def _merge_kind(config, model_path: str) -> str:
    """Which merge ran: into the unquantized base (this command loads the base in float), exact for an adapter
    trained on a quantized base too (its file records that base's quantization)."""
    quantization = getattr(config, "base_quantization", None)
    if not quantization:
        return f"merged into the base weights of {model_path} (float, rounded once per entry)"
    groups = quantization.get("groups", [quantization])
    methods = ", ".join(sorted({"/".join(str(g[k]) for k in ("method", "quant_type") if k in g) for g in groups}))
    return (f"the adapter was trained on a quantized base ({methods}); it is merged into the unquantized base "
            f"{model_path} (float weights: exact, no re-quantization). merge_and_unload() on a quantized model "
            "instead dequantizes, adds and quantizes again, which rounds.")
