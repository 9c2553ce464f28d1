"""`sam-peft bench report`: Table 1 (mean ± std, ranks), Table 5 (t-tests of SAM against each method),
the stability/performance rank correlation (Fig. 4) and the sparsity sweep (Fig. 5), as markdown and PNG."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from ..plots import save_png, subplots
from ..storage.io import write_text_atomic
from .glue import read_records

TASK_ORDER = ("cola", "stsb", "mrpc", "rte", "cb", "copa", "wsc")


def _by(records, *keys):
    out = defaultdict(list)
    for r in records:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def table1(records: list[dict]) -> tuple[str, dict]:
    """Markdown table of mean ± std (over seeds) per task, the average over tasks, and ranks."""
    records = [r for r in records if r.get("sparsity") in (None, 0.005)]
    methods = sorted({r["method"] for r in records})
    # compare methods on the same runs: per task, only the seeds every method has finished
    seeds_of = _by(records, "method", "task")
    common = {t: set.intersection(*({r["seed"] for r in seeds_of.get((m, t), [])} for m in methods))
              for t in {r["task"] for r in records}}
    records = [r for r in records if r["seed"] in common[r["task"]]]
    cells = _by(records, "method", "task")
    # a partial results file: report the tasks every method has finished
    tasks = [t for t in TASK_ORDER if all(cells.get((m, t)) for m in methods)]
    summary = {}
    for method in methods:
        per_task = {t: [r["metric"] for r in cells.get((method, t), [])] for t in tasks}
        if not all(per_task.values()):
            continue
        seeds = sorted({r["seed"] for t in tasks for r in cells[(method, t)]})
        averages = [np.mean([r["metric"] for t in tasks for r in cells[(method, t)] if r["seed"] == s])
                    for s in seeds if all(any(r["seed"] == s for r in cells[(method, t)]) for t in tasks)]
        summary[method] = {
            "tasks": {t: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
                      for t, v in per_task.items()},
            "mean": float(np.mean([np.mean(v) for v in per_task.values()])),
            # stability: std over seeds of the per-seed average over tasks
            "std": float(np.std(averages, ddof=1)) if len(averages) > 1 else float("nan"),
            "seeds": len(averages),
        }
    order = sorted(summary, key=lambda m: -summary[m]["mean"])
    std_order = sorted(summary, key=lambda m: (math.isnan(summary[m]["std"]), summary[m]["std"]))
    for rank, method in enumerate(order, 1):
        summary[method]["rank"] = rank
        summary[method]["stability_rank"] = std_order.index(method) + 1
    if not tasks:
        return "No task has results for every method yet.", {}
    header = "| method | " + " | ".join(tasks) + " | mean | std (seeds) | rank |"
    lines = [header, "|" + "---|" * (len(tasks) + 4)]
    for method in order:
        s = summary[method]
        row = [f"{s['tasks'][t][0]:.2f} ± {s['tasks'][t][1]:.2f}" for t in tasks]
        std = "n/a (1 seed)" if math.isnan(s["std"]) else f"{s['std']:.2f}"
        lines.append(f"| {method} | " + " | ".join(row) + f" | **{s['mean']:.2f}** | {std} | {s['rank']} |")
    return "\n".join(lines), summary


def table5(records: list[dict], reference: str = "sam") -> str:
    """Paired t-tests of the reference method against each method over matched (task, seed) runs."""
    methods = sorted({r["method"] for r in records} - {reference})
    return paired_table(records, [(reference, method) for method in methods], header=f"{reference} vs")


def paired_table(records: list[dict], pairs: list[tuple[str, str]], header: str = "a vs b") -> str:
    """Paired t-tests of method a against method b over their matched (profile, task, seed) runs, one row per pair
    (a pair with fewer than two matched runs is left out), with how often a beat, tied or lost to b."""
    cells = {(r.get("profile"), r["method"], r["task"], r["seed"]): r["metric"] for r in records}
    lines = [f"| {header} | pairs | mean difference | wins / ties / losses | t | p |", "|---|---|---|---|---|---|"]
    for a_method, b_method in pairs:
        matched = [(cells[(p, a_method, t, s)], cells[(p, b_method, t, s)]) for (p, m, t, s) in cells
                   if m == a_method and (p, b_method, t, s) in cells]
        if len(matched) < 2:
            continue
        a, b = np.array(matched).T
        diff = a - b
        t, p = stats.ttest_rel(a, b) if np.any(diff != diff[0]) else (float("nan"), float("nan"))
        record = f"{int((diff > 0).sum())} / {int((diff == 0).sum())} / {int((diff < 0).sum())}"
        name = f"{a_method} vs {b_method}" if header == "a vs b" else b_method
        lines.append(f"| {name} | {len(matched)} | {np.mean(diff):+.2f} | {record} | {t:.2f} | {p:.3g} |")
    return "\n".join(lines)


def rank_correlation(summary: dict) -> tuple[float, float]:
    """Spearman correlation between the stability rank and the performance rank (Fig. 4)."""
    methods = [m for m in summary if not math.isnan(summary[m]["std"])]
    if len(methods) < 3:
        return float("nan"), float("nan")
    rho, p = stats.spearmanr([summary[m]["rank"] for m in methods], [summary[m]["stability_rank"] for m in methods])
    return float(rho), float(p)


def sweep_table(records: list[dict]) -> tuple[str, dict]:
    """Mean ± std over tasks and seeds of the dev and training-set metrics for each sparsity of SAM (Fig. 5)."""
    rows = defaultdict(list)
    for r in records:
        if r["method"] == "sam" and r.get("sparsity"):
            rows[r["sparsity"]].append(r)
    # compare sparsities on the same runs: the (task, seed) pairs finished at every sparsity
    common = set.intersection(*({(r["task"], r["seed"]) for r in runs} for runs in rows.values())) if rows else set()
    rows = {p: [r for r in runs if (r["task"], r["seed"]) in common] for p, runs in rows.items()}
    data = {}
    lines = ["| sparsity | runs | dev metric | train metric | train loss |", "|---|---|---|---|---|"]
    for p in sorted(rows):
        metric = [r["metric"] for r in rows[p]]
        train = [r["train_metric"] for r in rows[p] if r.get("train_metric") is not None]
        loss = [r["train_loss"] for r in rows[p] if r.get("train_loss") is not None]
        data[p] = (float(np.mean(metric)), float(np.std(metric)),
                   float(np.mean(train)) if train else float("nan"), float(np.std(train)) if train else float("nan"),
                   float(np.mean(loss)) if loss else float("nan"))
        lines.append(f"| {p} | {len(metric)} | {data[p][0]:.2f} ± {data[p][1]:.2f} | "
                     f"{data[p][2]:.2f} ± {data[p][3]:.2f} | {data[p][4]:.4f} |")
    return "\n".join(lines), data


def lr_grid_table(records: list[dict]) -> str:
    """Mean held-out (10 %) metric of each method at each learning rate, and the rate `--lrs-from` picks."""
    from .glue import choose_lrs_from_records

    chosen = choose_lrs_from_records(records)
    cells = _by(records, "method", "lr")
    lrs = sorted({float(r["lr"]) for r in records})
    tasks = [t for t in TASK_ORDER if any(r["task"] == t for r in records)]
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
    order = sorted(summary, key=lambda m: -summary[m]["mean"])
    fig, (left, right) = subplots(1, 2, figsize=(11, 4))
    left.bar(order, [summary[m]["mean"] for m in order], yerr=[summary[m]["std"] for m in order], capsize=4)
    left.set_ylabel("mean primary metric over tasks (0-100)")
    left.set_title("performance (error bar: std over seeds)")
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
    """Which part of the report a record belongs to: lrgrid, sweep, perturb (Table 2) or main (Tables 1 and 5)."""
    if record.get("profile") in ("lrgrid", "sweep"):
        return record["profile"]
    return "perturb" if (record.get("settings") or {}).get("drop_fraction") else "main"


def write_report(results: list[str], output: str, pairs: list[tuple[str, str]] = ()) -> Path:
    """Write the markdown report (and PNG plots beside it) for one or more results files; `pairs` adds paired
    t-tests of chosen methods (a, b) over the main runs."""
    # one record per (profile, task, method, seed, sparsity, lr): the last one written wins
    unique = {(r.get("profile"), r["task"], r["method"], r["seed"], r.get("sparsity"), r.get("lr")): r
              for path in results for r in read_records(Path(path))}
    records = list(unique.values())
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
        parts += ["## Table 2: data perturbation (each run drops a different random 10 % of train)\n", text]
    sweep = groups["sweep"]
    records = groups["main"]
    main = [r for r in records if r.get("sparsity") in (None, 0.005)]
    if main:
        text, summary = table1(main)
        rho, p = rank_correlation(summary)
        correlation = (f"{rho:.3f} (p = {p:.3g})" if not math.isnan(rho)
                       else "not defined: stability needs at least two seeds per method")
        parts += ["## Table 1: primary metric on the official dev split, mean ± std over seeds\n", text,
                  "\n## Table 5: paired t-tests of SAM against each method\n", table5(main),
                  f"\n## Stability vs performance\n\nSpearman ρ between stability rank and performance rank: "
                  f"{correlation}.\n"]
        if pairs:
            parts += ["\n## Paired comparisons (a − b over matched task and seed runs)\n", paired_table(main, pairs)]
        if summary:
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
