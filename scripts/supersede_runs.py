"""Move superseded benchmark runs out of a results file: those that early stopping ended on the constant-prediction
plateau, and (with `--rates-from`) those made at a learning rate the search no longer chooses.

Until commit "training: early stopping counts only after the model beats the constant prediction", a run stopped
after `patience` held-out evaluations without improvement even when none had yet beaten the constant prediction's
held-out score, and kept a constant model (CoLA's Matthews correlation stays 0 for about an epoch). The new rule
changes nothing for a run that beat that score before stopping or that used its whole budget, so only the runs
that stopped early at or below it are moved, to `<name>-superseded.jsonl` beside the file, each with the reason;
the runner then makes them again.

When the search's own runs are made again, its choice can change: `--rates-from SEARCH.jsonl` also moves the runs
whose method now has another chosen rate.

    python scripts/supersede_runs.py benchmarks/results/lrsearch.jsonl --data-dir ../shared/data/glue
    python scripts/supersede_runs.py benchmarks/results/evidence.jsonl --data-dir ../shared/data/glue \
        --rates-from benchmarks/results/lrsearch.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sam_peft.bench.glue import choose_lrs
from sam_peft.tasks import load_task
from sam_peft.tasks.constant import constant_baseline


def plateau_stop(record: dict, data_dir: str, cache: dict) -> str | None:
    """Why the run stopped on the plateau, or None if it did not."""
    task, seed = record["task"], record["seed"]
    if (task, seed) not in cache:
        splits = load_task(task, data_dir=data_dir, seed=seed)
        cache[task, seed] = (constant_baseline(task, splits["heldout"]["label"])["constant_score"],
                             len(splits["train"]))
    floor, n_train = cache[task, seed]
    settings = record["settings"]
    budget = math.ceil(settings["epochs"] * math.ceil(n_train / settings["batch_size"]))
    evaluations = [e["eval_primary"] for e in record["log_history"] if "eval_primary" in e]
    if record["global_steps"] < budget and evaluations and max(evaluations) <= floor:
        return (f"stopped at step {record['global_steps']} of {budget} with its best held-out score "
                f"{max(evaluations):.2f} at or below the constant prediction's {floor:.2f}")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rates-from", help="results of the learning-rate search whose choice the runs must use")
    args = parser.parse_args()
    chosen = choose_lrs(args.rates_from) if args.rates_from else {}
    lines = [line for line in args.results.read_text().splitlines() if line.strip()]
    kept, moved, cache = [], [], {}
    for line in lines:
        record = json.loads(line)
        reason = plateau_stop(record, args.data_dir, cache)
        rate = chosen.get(record["method"])
        if reason is None and rate is not None and float(record["lr"]) != rate:
            reason = f"made at learning rate {record['lr']:g}; {args.rates_from} now chooses {rate:g}"
        if reason is None:
            kept.append(line)
        else:
            moved.append(json.dumps({**record, "superseded": reason}))
            print(f"{record['task']} {record['method']} seed {record['seed']} lr {record.get('lr')}: {reason}")
    if moved:
        superseded = args.results.with_name(args.results.stem + "-superseded.jsonl")
        with open(superseded, "a") as handle:
            handle.write("\n".join(moved) + "\n")
        args.results.write_text("\n".join(kept) + "\n")
    print(f"{len(moved)} of {len(lines)} runs moved")


if __name__ == "__main__":
    main()
