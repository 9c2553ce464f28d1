"""The claims' statistics: the stratified sign-flip permutation test, Holm's adjustment, and the verdicts on
synthetic runs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from sam_peft.bench.verdicts import Comparison, _verdict, claims_report, common_seeds, compare, holm, sign_flip_test


def test_sign_flip_exact_by_hand():
    # differences 1, 2, 3: of the 8 sign patterns only all-plus and all-minus reach |mean| >= 2
    statistic, p = sign_flip_test({"t": np.array([1.0, 2.0, 3.0])})
    assert statistic == pytest.approx(2.0) and p == pytest.approx(2 / 8)


def test_sign_flip_weighs_tasks_equally_and_samples_beyond_16_pairs():
    statistic, _ = sign_flip_test({"a": np.array([4.0]), "b": np.array([0.0, 0.0, 0.0])})
    assert statistic == pytest.approx(2.0)  # mean of the task means (4 and 0), not of the pairs (1)
    rng = np.random.default_rng(0)
    null = {"a": rng.normal(size=10), "b": rng.normal(size=10)}
    _, p_null = sign_flip_test(null, samples=20_000)
    _, p_shift = sign_flip_test({k: v + 3 for k, v in null.items()}, samples=20_000)
    assert p_null > 0.05 and p_shift == pytest.approx(1 / 20_001)


def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def _runs(gap: float, seeds: int = 5, noise: float = 1.0, constant_task: str | None = None) -> list[dict]:
    rng = np.random.default_rng(1)
    records = []
    for task in ("stsb", "mrpc", "cola"):
        for seed in range(seeds):
            for method, shift in (("sam", gap), ("full", 0.0), ("lora", 0.0)):
                records.append({"task": task, "method": method, "seed": seed,
                                "metric": 50 + shift + noise * rng.normal()})
    return records


def test_a_clear_lead_holds_and_no_lead_is_not_shown():
    clear = claims_report(_runs(gap=10.0), set())
    assert "| Table 1 / Table 5: SAM scores higher than every other method | **holds**" in clear
    none = claims_report(_runs(gap=0.0), set())
    assert "| Table 1 / Table 5: SAM scores higher than every other method | **not shown**" in none
    worse = claims_report(_runs(gap=-10.0), set())
    assert "| Table 1 / Table 5: SAM scores higher than every other method | **fails**" in worse


def test_mostly_constant_tasks_are_left_out_and_one_seed_is_not_testable():
    comparison = compare(_runs(gap=1.0), "sam", "full", {("full", "cola")})
    assert comparison.tasks == ("mrpc", "stsb") and comparison.left_out == ("cola",) and comparison.n == 10
    with_cola = compare(_runs(gap=1.0), "sam", "full", set())
    assert comparison.with_left_out == pytest.approx((with_cola.difference, with_cola.p, 15))
    assert with_cola.with_left_out is None
    assert claims_report(_runs(gap=1.0, seeds=1), set()).startswith("Not testable here")


def test_a_claim_of_all_comparisons_uses_unadjusted_p_and_too_few_pairs_are_not_testable():
    def comparison(difference, p, holm_p, n=10):
        return Comparison("sam", "x", difference, n, ("t",), (), p, holm_p=holm_p)

    # intersection-union: every comparison positive at p < 0.05 is enough, whatever Holm gives
    assert _verdict([comparison(1.0, 0.03, 0.09), comparison(2.0, 0.01, 0.05)]) == "**holds**"
    assert _verdict([comparison(1.0, 0.03, 0.09), comparison(-2.0, 0.001, 0.004)]) == "**fails**"
    assert _verdict([comparison(1.0, 0.03, 0.09), comparison(2.0, 0.2, 0.4)]).startswith("**not shown**")
    assert comparison(1.0, 0.1, 0.1, n=5).smallest_p == pytest.approx(1 / 16)
    # 2 tasks × 2 seeds: 4 pairs, so no p below 2 / 16 exists and no claim can be shown
    few = [r for r in _runs(gap=10.0) if r["seed"] < 2 and r["task"] != "cola"]
    report = claims_report(few, set())
    assert "**not testable here** (too few pairs: with 4 pairs the smallest attainable p is 0.125)" in report


def test_common_seeds_keeps_the_seeds_every_method_finished_per_task():
    records = [r for r in _runs(gap=0.0) if not (r["method"] == "lora" and r["task"] == "cola" and r["seed"] > 2)]
    kept = common_seeds(records)
    assert {r["seed"] for r in kept if r["task"] == "cola"} == {0, 1, 2}
    assert {r["seed"] for r in kept if r["task"] == "stsb"} == set(range(5))


def test_the_std_claim_uses_only_tasks_where_every_method_has_five_runs():
    # cola: full and lora have 4 runs (with few runs Levene's median form has almost no power; with 2 it is
    # degenerate: every |x - median| is equal)
    records = [r for r in _runs(gap=1.0) if r["task"] != "cola" or r["seed"] < 4 or r["method"] == "sam"]
    report = claims_report(records, set())
    assert "nan" not in report and "(mrpc, stsb)" in report
    two_each = [r for r in _runs(gap=1.0) if r["seed"] < 2]
    assert "| Table 1: SAM is the most stable (lowest averaged std) | not testable here" in \
        claims_report(two_each, set())
