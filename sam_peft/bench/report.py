"""`sam-peft bench report`: how many runs predict a constant, Table 1 (mean ± std, ranks), Table 5 (t-tests of SAM
against each method), a verdict on each of the paper's claims (`verdicts`), the stability/performance rank
correlation (Fig. 4) and the sparsity sweep (Fig. 5), as markdown and PNG. A task where a compared method's runs
are mostly constant is left out of the comparison."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from ..plots import save_png, subplots
from ..storage.io import write_text_atomic
from .glue import read_records
from .verdicts import claims_report, common_seeds

TASK_ORDER = ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc")


def _by(records, *keys):
    out = defaultdict(list)
    for r in records:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def mark_constant(records: list[dict], data_dir: str | None = None) -> None:
    """Give records written before the `constant` field one, in place: a run is constant when its dev metric equals
    what a constant prediction of some class scores on that dev split (computed from the labels in `data_dir`);
    `constant` is None (unknown) for a classification task without `data_dir`. Regression needs no data: any
    constant prediction scores 0.0."""
    from ..tasks import load_task, resolve_task
    from ..tasks.constant import constant_baseline, matches_constant

    baselines: dict[tuple, dict | None] = {}
    for r in records:
        if "constant" in r:
            continue
        limit = (r.get("settings") or {}).get("limit")
        key = (r["task"], limit)
        if key not in baselines:
            if resolve_task(r["task"]).is_regression:
                baselines[key] = constant_baseline(r["task"], [0.0, 1.0])
            elif data_dir is None:
                baselines[key] = None
            else:
                labels = load_task(r["task"], data_dir, limit=limit)["dev"]["label"]
                baselines[key] = constant_baseline(r["task"], labels)
        baseline = baselines[key]
        r["constant_score"] = None if baseline is None else baseline["constant_score"]
        r["constant"] = None if baseline is None else matches_constant(r["metric"], baseline["constant_scores"])


def constant_counts(records: list[dict]) -> dict[tuple[str, str], tuple[int, int, int]]:
    """(method, task) -> (constant runs, runs of unknown status, runs)."""
    return {key: (sum(r.get("constant") is True for r in runs), sum(r.get("constant") is None for r in runs),
                  len(runs))
            for key, runs in _by(records, "method", "task").items()}


def mostly_constant(records: list[dict]) -> set[tuple[str, str]]:
    """The (method, task) cells where more than half of the runs are constant."""
    return {key for key, (constant, _, total) in constant_counts(records).items() if 2 * constant > total}


def tasks_in_order(records: list[dict]) -> list[str]:
    """The tasks of the records: the paper's first, in its order (`TASK_ORDER`), then any other by name."""
    present = {r["task"] for r in records}
    return [t for t in TASK_ORDER if t in present] + sorted(present - set(TASK_ORDER))


def constant_table(records: list[dict]) -> str:
    """Per task and method, how many runs are constant, and each task's constant-prediction dev score."""
    from ..tasks import resolve_task

    counts = constant_counts(records)
    methods = sorted({r["method"] for r in records})
    tasks = tasks_in_order(records)
    lines = ["| task | constant score | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for task in tasks:
        scores = {round(r["constant_score"], 2) for r in records if r["task"] == task
                  and r.get("constant_score") is not None}
        score = " / ".join(f"{s:.2f}" for s in sorted(scores)) or "unknown"
        cells = []
        for method in methods:
            constant, unknown, total = counts.get((method, task), (0, 0, 0))
            cells.append("-" if not total else f"{constant} / {total}" + (f" ({unknown} unknown)" if unknown else ""))
        lines.append(f"| {task} | {score} | " + " | ".join(cells) + " |")
    classification = [r for r in records if not resolve_task(r["task"]).is_regression]
    constant = sum(r.get("constant") is True for r in classification)
    unknown = sum(r.get("constant") is None for r in classification)
    note = (f" The status of {unknown} runs is unknown: their records predate the `constant` field; pass --data-dir "
            "to compute it from the dev labels." if unknown else "")
    return ("A run is constant when it predicted one class for every dev example or scored what the best constant "
            "prediction scores (records without a histogram: what the constant prediction of any class scores); "
            "for regression (stsb) a constant prediction scores 0.0. Each cell: constant runs / runs. "
            f"Classification runs: {constant} of {len(classification)} constant.{note}\n\n" + "\n".join(lines))


def _cell(values: list[float]) -> str:
    """Mean ± sample std of a cell; a single run has no std and shows its value alone."""
    return f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else f"{values[0]:.2f}"


def table1(records: list[dict]) -> tuple[str, dict]:
    """Markdown table of mean ± std (over seeds) per task, the averages over tasks, the two std statistics and
    ranks. Tasks where some method's runs are mostly constant (`mostly_constant`) are shown but left out of
    everything a comparison rests on: the comparable mean, both stds and the ranks."""
    records = [r for r in records if r.get("sparsity") in (None, 0.005)]
    methods = sorted({r["method"] for r in records})
    constant = mostly_constant(records)  # over all runs of a method on a task, as Table 5 and the claims count it
    records = common_seeds(records)  # compare methods on the same runs: per task, the seeds every method finished
    cells = _by(records, "method", "task")
    # a partial results file: report the tasks every method has finished
    tasks = [t for t in tasks_in_order(records) if all(cells.get((m, t)) for m in methods)]
    if not tasks:
        return "No task has results for every method yet.", {}
    comparable = [t for t in tasks if not any((m, t) in constant for m in methods)]
    summary = {}
    for method in methods:
        per_task = {t: [r["metric"] for r in cells[(method, t)]] for t in tasks}
        seeds = sorted({r["seed"] for t in comparable for r in cells[(method, t)]})
        averages = [np.mean([r["metric"] for t in comparable for r in cells[(method, t)] if r["seed"] == s])
                    for s in seeds if all(any(r["seed"] == s for r in cells[(method, t)]) for t in comparable)]
        task_stds = [np.std(per_task[t], ddof=1) for t in comparable if len(per_task[t]) > 1]
        summary[method] = {
            "tasks": {t: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else float("nan"), len(v))
                      for t, v in per_task.items()},
            "mean_all": float(np.mean([np.mean(v) for v in per_task.values()])),
            # the mean a comparison rests on: over the tasks where no method is mostly constant
            "mean": float(np.mean([np.mean(per_task[t]) for t in comparable])) if comparable else float("nan"),
            # stability: the std over seeds of the per-seed average over the comparable tasks ...
            "std": float(np.std(averages, ddof=1)) if len(averages) > 1 else float("nan"),
            # ... and the paper's "AVG std": the mean over the comparable tasks of each task's std over seeds
            "avg_std": float(np.mean(task_stds)) if task_stds and len(task_stds) == len(comparable) else float("nan"),
            "seeds": len(averages),
        }
    order = sorted(summary, key=lambda m: (-summary[m]["mean_all"] if not comparable else -summary[m]["mean"]))
    std_order = sorted(summary, key=lambda m: (math.isnan(summary[m]["std"]), summary[m]["std"]))
    for rank, method in enumerate(order, 1):
        summary[method]["rank"] = rank if comparable else None
        summary[method]["stability_rank"] = std_order.index(method) + 1
    header = ("| method | " + " | ".join(f"{t} †" if t not in comparable else t for t in tasks)
              + " | mean (all tasks) | mean (comparable tasks) | std of per-seed means | mean per-task std "
              "(paper's AVG std) | rank |")
    lines = [header, "|" + "---|" * (len(tasks) + 6)]

    def number(value: float) -> str:
        return "n/a" if math.isnan(value) else f"{value:.2f}"

    for method in order:
        s = summary[method]
        row = [_cell([r["metric"] for r in cells[(method, t)]]) + (" †" if (method, t) in constant else "")
               for t in tasks]
        lines.append(f"| {method} | " + " | ".join(row) + f" | {s['mean_all']:.2f} | **{number(s['mean'])}** | "
                     f"{number(s['std'])} | {number(s['avg_std'])} | {s['rank'] or '-'} |")
    left_out = [t for t in tasks if t not in comparable]
    note = ("Cells: mean ± sample std (ddof 1) over seeds; a single run shows its value alone. † after a cell: that "
            "method's runs on the task are mostly constant (more than half); † after a task: some method is mostly "
            "constant there, so the task is left out of the comparable mean, both stds and the ranks"
            + (f" (left out: {', '.join(left_out)})" if left_out else " (none left out)") + ". Std of per-seed means: "
            "the std over seeds of each seed's average over the comparable tasks. Mean per-task std: the average "
            "over the comparable tasks of each task's std over seeds (the paper's AVG std).")
    if not comparable:
        note += " No task is free of mostly-constant methods, so no method is ranked."
    return note + "\n\n" + "\n".join(lines), summary


def table5(records: list[dict], reference: str = "sam") -> str:
    """Paired t-tests of the reference method against each method over matched (task, seed) runs."""
    methods = sorted({r["method"] for r in records} - {reference})
    return paired_table(records, [(reference, method) for method in methods], header=f"{reference} vs")


def paired_table(records: list[dict], pairs: list[tuple[str, str]], header: str = "a vs b") -> str:
    """Paired t-tests of method a against method b over their matched (profile, task, seed) runs, one row per pair
    (a pair with fewer than two matched runs is left out), with how often a beat, tied or lost to b. Tasks where a's
    or b's runs are mostly constant are left out of that pair's test and named in its row."""
    cells = {(r.get("profile"), r["method"], r["task"], r["seed"]): r["metric"] for r in records}
    constant = mostly_constant(records)
    lines = [f"| {header} | pairs | mean difference | wins / ties / losses | t | p | left out (mostly constant) |",
             "|---|---|---|---|---|---|---|"]
    for a_method, b_method in pairs:
        keys = [(p, t, s) for (p, m, t, s) in cells if m == a_method and (p, b_method, t, s) in cells]
        left_out = sorted({t for _, t, _ in keys if (a_method, t) in constant or (b_method, t) in constant})
        matched = [(cells[(p, a_method, t, s)], cells[(p, b_method, t, s)]) for p, t, s in keys if t not in left_out]
        name = f"{a_method} vs {b_method}" if header == "a vs b" else b_method
        if len(matched) < 2:
            if keys:
                lines.append(f"| {name} | {len(matched)} | - | - | - | - | {', '.join(left_out) or '-'} |")
            continue
        a, b = np.array(matched).T
        diff = a - b
        t, p = stats.ttest_rel(a, b) if np.any(diff != diff[0]) else (float("nan"), float("nan"))
        record = f"{int((diff > 0).sum())} / {int((diff == 0).sum())} / {int((diff < 0).sum())}"
        lines.append(f"| {name} | {len(matched)} | {np.mean(diff):+.2f} | {record} | {t:.2f} | {p:.3g} | "
                     f"{', '.join(left_out) or '-'} |")
    return ("Paired t-test (scipy's ttest_rel, two-sided) over matched (task, seed) runs, a − b; a task where a's or "
            "b's runs are mostly constant is left out of that row.\n\n" + "\n".join(lines))


def rank_correlation(summary: dict) -> tuple[float, float]:
    """Spearman correlation between the stability rank and the performance rank (Fig. 4)."""
    methods = [m for m in summary if not math.isnan(summary[m]["std"]) and summary[m]["rank"] is not None]
    if len(methods) < 3:
        return float("nan"), float("nan")
    rho, p = stats.spearmanr([summary[m]["rank"] for m in methods], [summary[m]["stability_rank"] for m in methods])
    return float(rho), float(p)


def sweep_table(records: list[dict]) -> tuple[str, dict]:
    """Mean ± sample std over tasks and seeds of the dev and training-set metrics for each sparsity of SAM (Fig. 5),
    and how many of the runs are constant."""
    rows = defaultdict(list)
    for r in records:
        if r["method"] == "sam" and r.get("sparsity"):
            rows[r["sparsity"]].append(r)
    # compare sparsities on the same runs: the (task, seed) pairs finished at every sparsity
    common = set.intersection(*({(r["task"], r["seed"]) for r in runs} for runs in rows.values())) if rows else set()
    rows = {p: [r for r in runs if (r["task"], r["seed"]) in common] for p, runs in rows.items()}
    data = {}
    lines = ["| sparsity | runs | dev metric | train metric | train loss | constant runs |", "|---" * 6 + "|"]

    def spread(values: list[float]) -> float:
        return float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")

    for p in sorted(rows):
        metric = [r["metric"] for r in rows[p]]
        train = [r["train_metric"] for r in rows[p] if r.get("train_metric") is not None]
        loss = [r["train_loss"] for r in rows[p] if r.get("train_loss") is not None]
        data[p] = (float(np.mean(metric)), spread(metric),
                   float(np.mean(train)) if train else float("nan"), spread(train),
                   float(np.mean(loss)) if loss else float("nan"))
        constant = sum(r.get("constant") is True for r in rows[p])
        unknown = sum(r.get("constant") is None for r in rows[p])
        lines.append(f"| {p} | {len(metric)} | {_cell(metric)} | {_cell(train) if train else 'n/a'} | "
                     f"{data[p][4]:.4f} | {constant}" + (f" ({unknown} unknown)" if unknown else "") + " |")
    return "Dev and train metric: mean ± sample std over the runs.\n\n" + "\n".join(lines), data


def lr_grid_table(records: list[dict]) -> str:
    """Mean held-out (10 %) metric of each method at each learning rate, and the rate `--lrs-from` picks."""
    from .glue import choose_lrs_from_records

    chosen = choose_lrs_from_records(records)
    cells = _by(records, "method", "lr")
    lrs = sorted({float(r["lr"]) for r in records})
    tasks = tasks_in_order(records)
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " | chosen |", "|---|" + "---|" * (len(lrs) + 1)]
    for method in sorted({r["method"] for r in records}):
        row = []
        for lr in lrs:
            runs = cells.get((method, lr), [])
            row.append(f"{np.mean([r['heldout_metric'] for r in runs]):.2f} ({len(runs)})" if runs else "-")
        lines.append(f"| {method} | " + " | ".join(row) + f" | {chosen.get(method, float('nan')):g} |")
    return (f"Tasks: {', '.join(tasks)}; each cell: mean held-out primary metric (runs). Only rates with every "
            "(task, seed) of their method count for the choice.\n\n" + "\n".join(lines))


def _plot_methods(summary: dict, path: Path) -> None:
    order = sorted(summary, key=lambda m: summary[m]["rank"])
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    left.bar(order, [summary[m]["mean"] for m in order], yerr=[summary[m]["std"] for m in order], capsize=4)
    left.set_ylabel("mean primary metric, comparable tasks (0-100)")
    left.set_title("performance (error bar: std of per-seed means)")
    left.tick_params(axis="x", rotation=45)
    right.scatter([summary[m]["stability_rank"] for m in order], [summary[m]["rank"] for m in order])
    for m in order:
        right.annotate(m, (summary[m]["stability_rank"], summary[m]["rank"]))
    right.set_xlabel("stability rank (1 = lowest std)")
    right.set_ylabel("performance rank (1 = best)")
    right.set_title("stability vs performance (Fig. 4)")
    save_png(fig, path, tight_layout=True)


def _plot_sweep(data: dict, path: Path) -> None:
    ps = sorted(data)
    fig, ax = subplots(figsize=(6, 4))
    ax.errorbar(ps, [data[p][0] for p in ps], yerr=[data[p][1] for p in ps], marker="o", capsize=3, label="dev")
    ax.errorbar(ps, [data[p][2] for p in ps], yerr=[data[p][3] for p in ps], marker="s", capsize=3, label="train")
    ax.set_xscale("log")
    ax.set_xlabel("sparsity p (fraction tuned)")
    ax.set_ylabel("primary metric (0-100)")
    ax.legend()
    ax.set_title("SAM: performance against sparsity (Fig. 5)")
    save_png(fig, path, tight_layout=True)


def _provenance(records: list[dict]) -> str:
    """Profiles, settings, learning rates, devices and commands behind the records."""
    lines = ["| profile | settings | devices | runs |", "|---|---|---|---|"]
    for (profile,), runs in sorted(_by(records, "profile").items(), key=lambda kv: str(kv[0])):
        settings = ", ".join(f"{k}={v}" for k, v in (runs[0].get("settings") or {}).items())
        devices = ", ".join(sorted({r.get("device", "cpu (not recorded)") for r in runs}))
        lines.append(f"| {profile} | {settings} | {devices} | {len(runs)} |")
    lrs = defaultdict(set)
    for r in records:
        lrs[r["method"]].add(r.get("lr"))
    rates = ", ".join(f"{m} {'/'.join(f'{lr:g}' for lr in sorted(v) if lr is not None)}"
                      for m, v in sorted(lrs.items()))
    commands = sorted({r.get("command", "") for r in records} - {""})
    return ("\n".join(lines) + f"\n\nLearning rates: {rates}.\n\nCommands:\n\n"
            + "\n".join(f"    {c}" for c in commands) + "\n")


def _report_group(record: dict) -> str:
    """Which part of the report a record belongs to: lrgrid (with lrsearch), sweep, perturb (Table 2) or main
    (Tables 1 and 5)."""
    if record.get("profile") in ("lrgrid", "lrsearch"):
        return "lrgrid"
    if record.get("profile") == "sweep":
        return "sweep"
    return "perturb" if (record.get("settings") or {}).get("drop_fraction") else "main"


def write_report(results: list[str], output: str, pairs: list[tuple[str, str]] = (),
                 data_dir: str | None = None) -> Path:
    """Write the markdown report (and PNG plots beside it) for one or more results files; `pairs` adds paired
    t-tests of chosen methods (a, b) over the main runs; `data_dir` (the task files) lets records written before
    the `constant` field be judged from the dev labels (otherwise their status is unknown)."""
    # one record per (profile, task, method, seed, sparsity, lr): the last one written wins
    unique = {(r.get("profile"), r["task"], r["method"], r["seed"], r.get("sparsity"), r.get("lr")): r
              for path in results for r in read_records(Path(path))}
    records = list(unique.values())
    mark_constant(records, data_dir)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [f"# GLUE/SuperGLUE benchmark report\n\nResults: {', '.join(results)} ({len(records)} runs).\n",
             _provenance(records)]
    groups = defaultdict(list)
    for r in records:
        groups[_report_group(r)].append(r)
    if groups["lrgrid"]:
        parts += ["## Learning-rate grid (held-out 10 %)\n", lr_grid_table(groups["lrgrid"])]
    if groups["perturb"]:
        text, _ = table1(groups["perturb"])
        parts += ["## Constant predictions, Table 2 runs\n", constant_table(groups["perturb"])]
        parts += ["## Table 2: data perturbation (each run drops a different random 10 % of train)\n", text]
    sweep = groups["sweep"]
    records = groups["main"]
    main = [r for r in records if r.get("sparsity") in (None, 0.005)]
    if main:
        text, summary = table1(main)
        rho, p = rank_correlation(summary)
        correlation = (f"{rho:.3f} (p = {p:.3g}, {len(summary)} methods)" if not math.isnan(rho)
                       else "not defined: it needs at least two seeds per method and a comparable task")
        parts += ["## Constant predictions on the official dev split\n", constant_table(main),
                  "\n## Table 1: primary metric on the official dev split, mean ± std over seeds\n", text,
                  "\n## Table 5: paired t-tests of SAM against each method\n", table5(main),
                  f"\n## Stability vs performance\n\nSpearman ρ between stability rank (std of per-seed means) and "
                  "performance rank: "
                  f"{correlation}.\n"]
        parts += ["\n## Claims of Fu et al.: stratified sign-flip permutation tests, Holm's adjustment\n",
                  claims_report(main, mostly_constant(main))]
        if pairs:
            parts += ["\n## Paired comparisons (a − b over matched task and seed runs)\n", paired_table(main, pairs)]
        if summary and all(s["rank"] is not None for s in summary.values()):
            plot = out.with_name(out.stem + "-methods.png")
            _plot_methods(summary, plot)
            parts.append(f"![methods]({plot.name})\n")
    if len({r.get("sparsity") for r in sweep if r["method"] == "sam"} - {None}) > 1:
        text, data = sweep_table(sweep)
        plot = out.with_name(out.stem + "-sweep.png")
        _plot_sweep(data, plot)
        parts += ["## Sparsity sweep (SAM)\n", text, f"\n![sweep]({plot.name})\n"]
    write_text_atomic(out, "\n".join(parts) + "\n")
    return out
