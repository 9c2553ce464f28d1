"""Fu et al.'s claims tested on runs with several seeds: paired differences stratified by task with a sign-flip
permutation test, Holm's adjustment across the comparisons made, the paper's averaged std with per-task Levene tests,
and one verdict per claim (holds / fails / not shown), each with the numbers behind it.

A comparison leaves out the tasks where either method's runs are mostly constant (`report.mostly_constant`), and
says what it gives with them. "SAM beats every other method" and "sparse fine-tuning beats full fine-tuning" are
claims about all of their comparisons at once (intersection-union tests): each holds only if every comparison in it
is positive with p < 0.05, unadjusted; a claim fails if any comparison is significantly negative after Holm's
adjustment across all comparisons made. A claim whose comparisons have too few pairs to reach p < 0.05 at all
(the exact test's smallest p is 2 / 2ⁿ) is not testable here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..methods import REGISTRY

ALPHA = 0.05
EXACT_UP_TO = 16  # pairs: all 2^n sign patterns up to here, random patterns beyond
SAMPLES = 100_000
SPREAD_RUNS = 5  # runs per method and task before spreads are compared (with 3 one deviation from the median is
# always 0 and Levene's median form has almost no power; with 2 it is degenerate)


@dataclass(frozen=True)
class Comparison:
    """a − b: the mean over tasks of the mean paired difference per task, over `n` matched (task, seed) pairs."""

    a: str
    b: str
    difference: float
    n: int
    tasks: tuple[str, ...]
    left_out: tuple[str, ...]
    p: float
    holm_p: float = float("nan")
    wins: int = 0
    losses: int = 0
    with_left_out: tuple[float, float, int] | None = None  # (difference, p, n) with the left-out tasks included

    @property
    def smallest_p(self) -> float:
        """The smallest p the test can give with these n pairs."""
        return 2.0 ** (1 - self.n) if self.n <= EXACT_UP_TO else 1 / (SAMPLES + 1)


def common_seeds(records: list[dict]) -> list[dict]:
    """The records of the seeds that every method finished on their task: methods are compared on the same runs."""
    methods = {r["method"] for r in records}
    seeds: dict[str, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for r in records:
        seeds[r["task"]][r["method"]].add(r["seed"])
    common = {task: set.intersection(*(by[m] for m in methods)) if set(by) == methods else set()
              for task, by in seeds.items()}
    return [r for r in records if r["seed"] in common[r["task"]]]


def sign_flip_test(diffs_by_task: dict[str, np.ndarray], samples: int = SAMPLES, seed: int = 0) -> tuple[float, float]:
    """(statistic, two-sided p) of paired differences grouped by task. The statistic is the mean over tasks of each
    task's mean difference (every task weighs the same). Under the null hypothesis each pair's sign is exchangeable,
    so the signs are flipped: over all 2ⁿ patterns when n ≤ 16, else over `samples` random patterns (seeded; p is
    then (count + 1) / (samples + 1))."""
    tasks = [t for t, d in diffs_by_task.items() if len(d)]
    if not tasks:
        raise ValueError("no paired differences to test")
    diffs = np.concatenate([np.asarray(diffs_by_task[t], dtype=float) for t in tasks])
    weights = np.concatenate([np.full(len(diffs_by_task[t]), 1.0 / (len(diffs_by_task[t]) * len(tasks)))
                              for t in tasks])
    contribution = weights * diffs
    observed = float(contribution.sum())
    n = len(diffs)
    if n <= EXACT_UP_TO:
        patterns = (np.arange(2**n)[:, None] >> np.arange(n)) & 1
        null = (1 - 2 * patterns) @ contribution
        p = float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
    else:
        signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(samples, n))
        null = signs @ contribution
        p = float((np.sum(np.abs(null) >= abs(observed) - 1e-12) + 1) / (samples + 1))
    return observed, p


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values."""
    order = np.argsort(pvalues)
    adjusted, running = np.empty(len(pvalues)), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted.tolist()


def compare(records: list[dict], a: str, b: str, constant: set[tuple[str, str]]) -> Comparison | None:
    """a − b over every (task, seed) both methods finished (within one profile), tasks where either is mostly
    constant left out (and tested with them in `with_left_out`); None without pairs."""
    cells = {(r.get("profile"), r["method"], r["task"], r["seed"]): r["metric"] for r in records}
    by_task: dict[str, list[float]] = defaultdict(list)
    every_task: dict[str, list[float]] = defaultdict(list)
    left_out = set()
    for (profile, method, task, seed), value in sorted(cells.items(), key=lambda kv: str(kv[0])):
        if method != a or (profile, b, task, seed) not in cells:
            continue
        difference = value - cells[(profile, b, task, seed)]
        every_task[task].append(difference)
        if (a, task) in constant or (b, task) in constant:
            left_out.add(task)
        else:
            by_task[task].append(difference)
    if not by_task:
        return None
    statistic, p = sign_flip_test({t: np.array(d) for t, d in by_task.items()})
    every = np.concatenate([np.array(d) for d in by_task.values()])
    with_left_out = None
    if left_out - set(by_task):
        including, p_including = sign_flip_test({t: np.array(d) for t, d in every_task.items()})
        with_left_out = (including, p_including, sum(len(d) for d in every_task.values()))
    return Comparison(a, b, statistic, len(every), tuple(sorted(by_task)), tuple(sorted(left_out - set(by_task))), p,
                      wins=int((every > 0).sum()), losses=int((every < 0).sum()), with_left_out=with_left_out)


def averaged_std(records: list[dict], method: str, tasks: tuple[str, ...]) -> float:
    """The paper's "AVG std": the mean over tasks of each task's std over seeds (sample std, ddof 1)."""
    stds = [np.std([r["metric"] for r in records if r["method"] == method and r["task"] == t], ddof=1)
            for t in tasks]
    return float(np.mean(stds)) if stds else float("nan")


def _verdict(comparisons: list[Comparison]) -> str:
    """A claim that a beats b in every comparison: holds when every one is positive with unadjusted p < ALPHA
    (intersection-union), fails when any is negative with Holm p < ALPHA."""
    if any(c.difference < 0 and c.holm_p < ALPHA for c in comparisons):
        return "**fails**"
    if comparisons and all(c.difference > 0 and c.p < ALPHA for c in comparisons):
        return "**holds**"
    short = [c for c in comparisons if c.smallest_p >= ALPHA]
    if short:
        return (f"**not testable here** (too few pairs: with {min(c.n for c in short)} pairs the smallest "
                f"attainable p is {max(c.smallest_p for c in short):.3g})")
    return "**not shown** (not significant)"


def claims_report(records: list[dict], constant: set[tuple[str, str]], reference: str = "sam",
                  dense: str = "full") -> str:
    """Markdown: every comparison made (Holm across them), the std claim, and one verdict per claim."""
    methods = sorted({r["method"] for r in records})
    seeds = {m: {r["seed"] for r in records if r["method"] == m} for m in methods}
    if reference not in methods or min(len(s) for s in seeds.values()) < 2:
        return ("Not testable here: the claims need at least two seeds of every method, with "
                f"`{reference}` among them.\n")
    others = [m for m in methods if m != reference]
    # the paper's "sparse fine-tuned models": every parameter-efficient method, and the dense ones that tune a mask
    sparse = [m for m in others if m in REGISTRY and (REGISTRY[m].family != "dense" or REGISTRY[m].sparse)]
    wanted = [(reference, m) for m in others] + [(m, dense) for m in sparse if dense in methods]
    found = [c for c in (compare(records, a, b, constant) for a, b in wanted) if c is not None]
    adjusted = holm([c.p for c in found])
    found = [Comparison(**{**c.__dict__, "holm_p": h}) for c, h in zip(found, adjusted)]
    lines = [f"Paired differences a − b over every (task, seed) both methods finished, stratified by task: the "
             "statistic is the mean over tasks of the mean difference per task; p is a two-sided sign-flip "
             f"permutation test (exact up to {EXACT_UP_TO} pairs, else {SAMPLES:,} seeded random sign patterns; "
             "the smallest p n pairs can give is 2 / 2ⁿ); Holm's adjustment over these "
             f"{len(found)} comparisons. Tasks where either method is mostly constant are left out of that "
             "comparison; the last column gives the same test with them included (a collapse counts against the "
             "method that collapsed). A claim over several comparisons holds only if each is positive with p < "
             f"{ALPHA} (intersection-union test, unadjusted p); it fails if any is negative with Holm p < {ALPHA}.\n",
             "| a − b | difference | n pairs | wins / losses | tasks | left out (mostly constant) | p | smallest "
             "attainable p | Holm p | with the left-out tasks: difference, p (n) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in found:
        including = ("—" if c.with_left_out is None else
                     f"{c.with_left_out[0]:+.2f}, {c.with_left_out[1]:.3g} ({c.with_left_out[2]})")
        lines.append(f"| {c.a} − {c.b} | {c.difference:+.2f} | {c.n} | {c.wins} / {c.losses} | {', '.join(c.tasks)} "
                     f"| {', '.join(c.left_out) or '—'} | {c.p:.3g} | {c.smallest_p:.3g} | {c.holm_p:.3g} "
                     f"| {including} |")
    lines.append("")
    lines += _std_section(common_seeds(records), methods, reference, constant)
    against = [c for c in found if c.a == reference]
    versus_dense = [c for c in found if c.b == dense and c.a != reference] + \
        [c for c in against if c.b == dense]
    lines += ["\n| claim (Fu et al.) | verdict | numbers |", "|---|---|---|"]
    lines.append(f"| Table 1 / Table 5: SAM scores higher than every other method | {_verdict(against)} | "
                 + "; ".join(f"{c.b} {c.difference:+.2f} (p {c.p:.3g}, Holm p {c.holm_p:.3g}, n {c.n})"
                             for c in against) + " |")
    if versus_dense:
        lines.append(f"| Table 1: sparse fine-tuning scores higher than full fine-tuning | {_verdict(versus_dense)} | "
                     + "; ".join(f"{c.a} {c.difference:+.2f} (p {c.p:.3g}, Holm p {c.holm_p:.3g}, n {c.n})"
                                 for c in versus_dense) + " |")
    lines.append(f"| Table 1: SAM is the most stable (lowest averaged std) | "
                 f"{_std_claim(common_seeds(records), methods, reference, constant)} |")
    return "\n".join(lines) + "\n"


def _comparable(records: list[dict], methods: list[str], constant: set[tuple[str, str]],
                least: int = SPREAD_RUNS) -> tuple[str, ...]:
    """Tasks where every method has at least `least` runs and none is mostly constant."""
    runs: dict[tuple[str, str], int] = defaultdict(int)
    for r in records:
        runs[(r["method"], r["task"])] += 1
    tasks = sorted({r["task"] for r in records})
    return tuple(t for t in tasks if all(runs[(m, t)] >= least and (m, t) not in constant for m in methods))


def _descriptive_std(records: list[dict], methods: list[str], constant: set[tuple[str, str]]) -> str:
    """The averaged std where it is defined (2 runs or more) but too few runs are there to test it."""
    tasks = _comparable(records, methods, constant, least=2)
    if not tasks:
        return ""
    avg = {m: averaged_std(records, m, tasks) for m in methods}
    return (f"averaged std on {', '.join(tasks)}, untested: "
            + ", ".join(f"{m} {v:.2f}" for m, v in sorted(avg.items(), key=lambda kv: kv[1])))


def _levene(records: list[dict], a: str, b: str, tasks: tuple[str, ...]) -> list[tuple[str, float, float, float]]:
    rows = []
    for t in tasks:
        x = [r["metric"] for r in records if r["method"] == a and r["task"] == t]
        y = [r["metric"] for r in records if r["method"] == b and r["task"] == t]
        if len(x) > 1 and len(y) > 1:
            rows.append((t, float(np.std(x, ddof=1)), float(np.std(y, ddof=1)),
                         float(stats.levene(x, y, center="median").pvalue)))
    return rows


def _std_section(records: list[dict], methods: list[str], reference: str,
                 constant: set[tuple[str, str]]) -> list[str]:
    tasks = _comparable(records, methods, constant)
    if not tasks:
        described = _descriptive_std(records, methods, constant)
        return [f"No task where every method has {SPREAD_RUNS} runs or more and none is mostly constant: the std "
                "claim is not testable here" + (f" (the paper's {described})" if described else "") + ".\n"]
    lines = [f"The paper's averaged std (mean over tasks of each task's std over the seeds every method finished) "
             f"on the tasks where no method is mostly constant ({', '.join(tasks)}): "
             + ", ".join(f"{m} {averaged_std(records, m, tasks):.2f}" for m in methods) + ".\n",
             f"Per-task Levene tests (median-centred) of equal spread, {reference} against each method, Holm over "
             "all of them:\n", "| task | method | std " + reference + " | std method | p | Holm p |",
             "|---|---|---|---|---|---|"]
    rows = [(m, *row) for m in methods if m != reference for row in _levene(records, reference, m, tasks)]
    for (m, t, sa, sb, p), h in zip(rows, holm([row[-1] for row in rows])):
        lines.append(f"| {t} | {m} | {sa:.2f} | {sb:.2f} | {p:.3g} | {h:.3g} |")
    return lines


def _std_claim(records: list[dict], methods: list[str], reference: str, constant: set[tuple[str, str]]) -> str:
    tasks = _comparable(records, methods, constant)
    if not tasks:
        described = _descriptive_std(records, methods, constant)
        return (f"not testable here | no task where every method has {SPREAD_RUNS} runs or more and none is mostly "
                "constant" + (f"; {described}" if described else ""))
    avg = {m: averaged_std(records, m, tasks) for m in methods}
    rows = [(m, *row) for m in methods if m != reference for row in _levene(records, reference, m, tasks)]
    adjusted = holm([row[-1] for row in rows]) if rows else []
    less = [(m, t) for (m, t, sa, sb, _), h in zip(rows, adjusted) if h < ALPHA and sa < sb]
    more = [(m, t) for (m, t, sa, sb, _), h in zip(rows, adjusted) if h < ALPHA and sa > sb]
    lowest = min(avg, key=avg.get)
    numbers = (f"averaged std: {', '.join(f'{m} {v:.2f}' for m, v in sorted(avg.items(), key=lambda kv: kv[1]))}; "
               f"Levene tests with Holm p < {ALPHA}: {len(less)} where {reference} spreads less, {len(more)} more, "
               f"of {len(rows)}")
    if more:
        return f"**fails** | {numbers}"
    if lowest == reference and less:
        return f"**holds** | {numbers}"
    if lowest != reference:
        return (f"**not shown**: {lowest}'s averaged std is lower ({avg[lowest]:.2f} against {avg[reference]:.2f}) "
                f"| {numbers}")
    return f"**not shown** (lowest averaged std, no per-task difference significant) | {numbers}"
