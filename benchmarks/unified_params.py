"""Trainable parameters of each method of the `unified` profile on the packaged MiniLM (docs/benchmarks-unified.md).

Builds every method exactly as the training path does (`sam_peft.methods.prepare_method`, RTE's 2-label head) and
counts the parameters that receive gradients. SAM's entries are chosen by the burn-in; their number is fixed by
p (per tensor floor(p·numel)), so one burn-in batch of random tokens gives the count.

    python benchmarks/unified_params.py [--json benchmarks/results/unified-params.json]
"""

from __future__ import annotations

import argparse
import json

import torch


def count(method: str, overrides: dict) -> dict:
    from sam_peft.methods import prepare_method
    from sam_peft.tasks import resolve_task
    from sam_peft.training import TrainSettings, count_trainable, default_model_path, load_base_model

    task = resolve_task("rte")
    settings = TrainSettings(task="rte", output="unused", method=method, **overrides)
    base = load_base_model(default_model_path(), task)
    total = sum(p.numel() for p in base.parameters())
    head = sum(p.numel() for n, p in base.named_parameters() if n.startswith("classifier."))
    model = prepare_method(base, settings, task, burn_in=1, total_steps=100).model
    if method == "sam":
        import sam_peft

        batch = {"input_ids": torch.randint(1000, 2000, (4, 16)), "attention_mask": torch.ones(4, 16, dtype=torch.long),
                 "labels": torch.tensor([0, 1, 0, 1])}
        sam_peft.select_parameters(model, [batch], num_steps=1)
    trainable = count_trainable(model)
    return {"trainable": trainable, "added": trainable - head, "head": head, "base_total": total}


def main() -> None:
    from sam_peft.bench.profiles import PROFILES, VARIANTS

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the counts to this JSON file")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = {}
    for label in PROFILES["unified"].methods:
        method, overrides = VARIANTS.get(label, (label, {}))
        rows[label] = count(method, overrides)
    base_total = next(iter(rows.values()))["base_total"]
    print(f"MiniLM parameters (with the 2-label head): {base_total:,}\n")
    print("| method | trainable (with head) | without the head | % of the model |")
    print("|---|---:|---:|---:|")
    for label, row in rows.items():
        print(f"| {label} | {row['trainable']:,} | {row['added']:,} | {100 * row['trainable'] / base_total:.2f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
