"""Peak GPU memory and time of the burn-in for each statistics option, on a BERT-base-shaped model (random weights
and tokens: memory and time do not depend on the data).

    python benchmarks/burnin_memory_gpu.py --json benchmarks/results/burnin-memory-gpu.json

Reports, per option, the peak `torch.cuda.max_memory_allocated` above the model's own memory, divided by the
number of targeted parameters, next to the bytes per parameter docs/distributed.md computes (activations excluded
there, included here: compare the differences between options).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

OPTIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "fp32+clip1": ("float32", 1.0),
           "bf16+clip1": ("bfloat16", 1.0)}


def main() -> None:
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    import sam_peft

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 30522, (args.batch, args.seq), generator=g),
                "labels": torch.randint(0, 2, (args.batch,), generator=g)} for _ in range(args.steps)]
    rows = []
    for name, (dtype, clip) in [("warm-up", OPTIONS["fp32"])] + list(OPTIONS.items()):
        torch.manual_seed(0)
        base = BertForSequenceClassification(BertConfig(num_labels=2)).to(device)
        model = get_peft_model(base, sam_peft.SAMConfig(task_type="SEQ_CLS"))
        n = sum(t.param.numel() for t in sam_peft.tuner.targets.targets(model, "default"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        sam_peft.select_parameters(model, batches, dropout=False, progress=False, statistics_dtype=dtype,
                                   max_grad_norm=clip)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
        rows.append({"option": name, "targeted_parameters": n, "peak_above_model_mb": round(peak / 2**20, 1),
                     "peak_bytes_per_parameter": round(peak / n, 2), "seconds": round(seconds, 3)})
        print(rows[-1], flush=True)
        if name == "warm-up":
            rows.pop()
        del model, base
        torch.cuda.empty_cache()
    out = {"command": "python benchmarks/burnin_memory_gpu.py", "device": torch.cuda.get_device_name(),
           "settings": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
