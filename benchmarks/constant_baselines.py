"""How often a run scored exactly what a constant prediction scores on the official dev split.

A classifier that predicts one class for every dev example gets a fixed score per task (RTE 52.71 or 47.29, ...).
Short runs often end there; this counts, per method, the runs of a results file whose dev metric equals one of
those scores (to 0.01), so a table of means can be read with that in mind. STS-B (regression) is skipped: a
constant prediction has no correlation.

    python benchmarks/constant_baselines.py benchmarks/results/unified.jsonl --data-dir ../shared/data/glue
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np


def constant_scores(task: str, data_dir: str) -> list[float]:
    """The dev metric of predicting each class for every example."""
    from sam_peft.tasks import resolve_task
    from sam_peft.tasks.loading import load_task
    from sam_peft.tasks.metrics import compute_metrics

    labels = np.asarray(load_task(task, data_dir)["dev"]["label"])
    classes = max(resolve_task(task).num_labels, 2)
    return [compute_metrics(task, np.full(len(labels), c), labels)["primary"] for c in range(classes)]


def main() -> None:
    from sam_peft.bench.glue import read_records

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("results")
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    records = [r for r in read_records(Path(args.results)) if r["task"] != "stsb"]
    scores = {task: constant_scores(task, args.data_dir) for task in sorted({r["task"] for r in records})}
    print("constant-prediction dev scores: " + "; ".join(
        f"{task} " + " / ".join(f"{s:.2f}" for s in values) for task, values in scores.items()))
    counts = defaultdict(lambda: [0, 0])
    for r in records:
        counts[r["method"]][1] += 1
        counts[r["method"]][0] += any(abs(r["metric"] - s) < 0.01 for s in scores[r["task"]])
    print("\n| method | runs at a constant prediction's score |\n|---|---|")
    for method, (constant, total) in counts.items():
        print(f"| {method} | {constant} of {total} |")


if __name__ == "__main__":
    main()
