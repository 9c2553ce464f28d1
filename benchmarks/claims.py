"""Every number the docs state about the benchmark results that the reports do not print, computed from
benchmarks/results/*.jsonl and the official dev labels (README, docs/reproduction.md, docs/results.md).

    python benchmarks/claims.py --data-dir ../shared/data/glue

Statistics: paired t-tests are scipy's two-sided `ttest_rel` over matched (task, seed) runs; binomial tests are
exact and one-sided (greater); intervals are Clopper-Pearson 95 %; stds are sample stds (ddof 1); Levene's test is
the median-centred (Brown-Forsythe) form. A (method, task) is "mostly constant" when more than half of its runs
predict a constant (sam_peft.bench.report.mostly_constant).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import stats

from sam_peft.bench.verdicts import holm

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_METHODS = ("sam", "full", "lora", "fisher", "bitfit", "random", "magnitude")
# the --pairs of docs/benchmarks-unified-report.md
UNIFIED_PAIRS = [("parallel_adapter_attn", "adapter"), ("parallel_adapter_ffn", "adapter"),
                 ("parallel_adapter_ffn", "sequential_adapter_r96"),
                 ("parallel_adapter_attn", "sequential_adapter_r96"), ("parallel_adapter_ffn", "parallel_adapter_attn"),
                 ("mam", "full"), ("mam", "parallel_adapter_ffn"), ("sam_mam_budget", "mam"), ("sam", "mam"),
                 ("sam_mam_budget", "sam"), ("sam_mam_budget", "full")]
MAIN_JOB_CORRECT = 154  # `sam-peft train --task rte` (docs/results.md): accuracy 55.60 on RTE's 277 dev examples


def load(name: str, data_dir: str) -> list[dict]:
    from sam_peft.bench.glue import read_records
    from sam_peft.bench.report import mark_constant

    records = read_records(RESULTS / f"{name}.jsonl")
    mark_constant(records, data_dir)
    return records


def paired(records: list[dict], a: str, b: str, tasks=None, drop_constant: bool = False) -> tuple[str, float]:
    """a - b over matched (task, seed) runs; `drop_constant` leaves out tasks where a or b is mostly constant."""
    from sam_peft.bench.report import mostly_constant

    records = [r for r in records if r.get("sparsity") in (None, 0.005)]
    constant = mostly_constant(records) if drop_constant else set()
    cells = {(r["method"], r["task"], r["seed"]): r["metric"] for r in records}
    pairs = [(v, cells[(b, t, s)]) for (m, t, s), v in cells.items()
             if m == a and (b, t, s) in cells and (tasks is None or t in tasks)
             and (a, t) not in constant and (b, t) not in constant]
    x, y = np.array(pairs).T
    diff = x - y
    p = stats.ttest_rel(x, y).pvalue
    dropped = sorted({t for m, t in constant if m in (a, b) and (tasks is None or t in tasks)})
    return (f"{a} - {b}: {diff.mean():+.2f} over n = {len(diff)} pairs, wins/ties/losses "
            f"{(diff > 0).sum()}/{(diff == 0).sum()}/{(diff < 0).sum()}, paired t-test p = {p:.3g}"
            + (f" (left out, mostly constant: {', '.join(dropped) or 'none'})" if drop_constant else "")), float(p)


def constant_summary(name: str, records: list[dict]) -> None:
    from sam_peft.tasks import resolve_task

    runs = [r for r in records if not resolve_task(r["task"]).is_regression]
    by_task = defaultdict(lambda: [0, 0])
    for r in runs:
        by_task[r["task"]][0] += r["constant"] is True
        by_task[r["task"]][1] += 1
    detail = ", ".join(f"{t} {c} of {n}" for t, (c, n) in sorted(by_task.items()))
    print(f"{name}: {sum(r['constant'] is True for r in runs)} of {len(runs)} classification runs constant ({detail})")


def rte(data_dir: str, files: dict[str, list[dict]]) -> None:
    from sam_peft.tasks import load_task

    labels = np.asarray(load_task("rte", data_dir)["dev"]["label"])
    n, majority = len(labels), int(np.bincount(labels).max())
    rate = majority / n
    threshold = next(k for k in range(n + 1) if stats.binomtest(k, n, rate, alternative="greater").pvalue < 0.05)
    test = stats.binomtest(MAIN_JOB_CORRECT, n, rate, alternative="greater")
    low, high = stats.binomtest(MAIN_JOB_CORRECT, n).proportion_ci(0.95, method="exact")  # two-sided interval
    print(f"RTE dev: n = {n}, majority class {majority} ({100 * rate:.2f} %); the smallest accuracy above it at "
          f"p < 0.05 (exact one-sided binomial) is {threshold}/{n} = {100 * threshold / n:.2f} %")
    print(f"main job: {MAIN_JOB_CORRECT}/{n} = {100 * MAIN_JOB_CORRECT / n:.2f} %, one-sided exact binomial p against "
          f"the majority rate = {test.pvalue:.3f}; 95 % Clopper-Pearson interval {100 * low:.1f}-{100 * high:.1f} %")
    for name, records in files.items():
        runs = [r["metric"] for r in records if r["task"] == "rte"]
        if runs:
            bar = 100 * threshold / n
            above = sum(m >= bar - 1e-9 for m in runs)
            print(f"{name}: {above} of {len(runs)} RTE runs at or above {bar:.2f} (best {max(runs):.2f})")


def stds(records: list[dict], methods: tuple[str, ...], tasks: list[str]) -> None:
    records = [r for r in records if r.get("sparsity") in (None, 0.005)]
    for method in methods:
        per_task = {t: [r["metric"] for r in records if r["method"] == method and r["task"] == t] for t in tasks}
        seeds = sorted({r["seed"] for r in records if r["method"] == method})
        per_seed = [np.mean([r["metric"] for r in records if r["method"] == method and r["seed"] == s
                             and r["task"] in tasks]) for s in seeds]
        avg_std = np.mean([np.std(v, ddof=1) for v in per_task.values()])
        print(f"  {method}: mean per-task std (paper's AVG std) {avg_std:.2f}, "
              f"std of per-seed means {np.std(per_seed, ddof=1):.2f} (n = {len(seeds)} seeds x {len(tasks)} tasks)")


def levene(records: list[dict], a: str, b: str, tasks: list[str]) -> None:
    for t in tasks:
        x = [r["metric"] for r in records if r["method"] == a and r["task"] == t]
        y = [r["metric"] for r in records if r["method"] == b and r["task"] == t]
        p = stats.levene(x, y, center="median").pvalue
        print(f"  {t}: std {a} {np.std(x, ddof=1):.2f} vs {b} {np.std(y, ddof=1):.2f} (n = {len(x)} vs {len(y)}), "
              f"Levene (median) p = {p:.3g}")


def family(title: str, records: list[dict], pairs: list[tuple[str, str]], tasks=None) -> None:
    """A family of paired tests with tasks where either method is mostly constant left out, Holm-adjusted."""
    print(f"{title} ({len(pairs)} tests, Holm-adjusted, mostly-constant tasks left out per pair):")
    rows = [paired(records, a, b, tasks, drop_constant=True) for a, b in pairs]
    for (text, _), adjusted in zip(rows, holm([p for _, p in rows])):
        print(f"  {text}; Holm p = {adjusted:.3g}")


def main() -> None:
    from sam_peft.bench.report import mostly_constant

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True, help="directory of the official task files")
    args = parser.parse_args()
    files = {name: load(name, args.data_dir) for name in ("quick", "unified", "paper", "sweep")}

    print("== constant predictions (official dev split)")
    for name, records in files.items():
        constant_summary(name, records)
    wsc = [r for r in files["paper"] if r["task"] == "wsc"]
    best = wsc[0]["constant_score"]
    print(f"paper, wsc: {sum(r['metric'] <= best + 1e-6 for r in wsc)} of {len(wsc)} runs at or below the constant "
          f"score {best:.2f}")
    cb = [r["metric"] for r in files["sweep"] if r["task"] == "cb"]
    print(f"sweep, cb: {sum(r['constant'] is True for r in files['sweep'] if r['task'] == 'cb')} of {len(cb)} runs "
          f"constant; dev metric {min(cb):.2f}-{max(cb):.2f} (best constant score "
          f"{next(r['constant_score'] for r in files['sweep'] if r['task'] == 'cb'):.2f})")
    print(f"unified: {len(files['unified'])} runs, {len({r['method'] for r in files['unified']})} methods")

    print("\n== RTE and the main job")
    rte(args.data_dir, files)

    quick, paper = files["quick"], files["paper"]
    print("\n== quick profile (3 seeds)")
    print(paired(quick, "sam", "full")[0])
    print("without stsb: " + paired(quick, "sam", "full", tasks={"rte", "mrpc", "cb", "copa"})[0])
    print(paired(quick, "sam", "full", drop_constant=True)[0])
    print("without stsb: " + paired(quick, "sam", "full", tasks={"rte", "mrpc", "cb", "copa"}, drop_constant=True)[0])
    print("stability over all five tasks:")
    stds(quick, QUICK_METHODS, ["stsb", "mrpc", "rte", "cb", "copa"])
    print("stability over the tasks where no quick method is mostly constant (the report's comparable tasks):")
    comparable = sorted({r["task"] for r in quick} - {t for _, t in mostly_constant(quick)})
    stds(quick, QUICK_METHODS, comparable)
    print("per-task test of equal spread, sam vs full:")
    levene(quick, "sam", "full", ["stsb", "mrpc", "rte", "cb", "copa"])

    family("quick, Table 5: sam against each method", quick,
           [("sam", m) for m in QUICK_METHODS if m != "sam"])
    family("quick: each sparse method against full fine-tuning", quick,
           [(m, "full") for m in ("sam", "fisher", "bitfit", "random", "magnitude")])

    print("\n== unified profile (3 seeds)")
    family("unified, the report's --pairs", files["unified"], UNIFIED_PAIRS)

    print("\n== paper profile, seed 0")
    five = {"mrpc", "rte", "cb", "copa", "wsc"}
    seed0 = [r for r in paper if r["seed"] == 0]
    print(paired(seed0, "sam", "full", five)[0])
    print(paired(seed0, "sam", "full", five, drop_constant=True)[0])
    sizes = {"mrpc": 408, "rte": 277, "cb": 56, "copa": 100, "wsc": 104}
    gaps = {t: next(r["metric"] for r in seed0 if r["method"] == "sam" and r["task"] == t)
            - next(r["metric"] for r in seed0 if r["method"] == "full" and r["task"] == t) for t in sorted(five)}
    print("sam - full per task, with the standard error of a difference of two independent accuracies at 50 % "
          "(100 * sqrt(2 * 0.25 / n)): " + ", ".join(
              f"{t} {gaps[t]:+.2f} (SE {100 * np.sqrt(0.5 / sizes[t]):.1f}, n = {sizes[t]})" for t in sorted(five)))
    family("paper, Table 5: sam against each method", seed0,
           [("sam", m) for m in sorted({r["method"] for r in seed0} - {"sam"})], five)
    for drop in (False, True):
        print("other sparse and dense baselines - full fine-tuning, Holm-adjusted over these 8 tests"
              + (", tasks where either is mostly constant left out:" if drop else ", all five tasks:"))
        methods = ("fisher", "random", "magnitude", "bitfit", "diffpruning", "childpruning", "dps", "mixout")
        rows = [paired(seed0, method, "full", five, drop_constant=drop) for method in methods]
        for (text, _), adjusted in zip(rows, holm([p for _, p in rows])):
            print(f"  {text}; Holm p = {adjusted:.3g}")


if __name__ == "__main__":
    main()
