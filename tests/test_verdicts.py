"""The claims' statistics: the stratified sign-flip permutation test, Holm's adjustment, and the verdicts on
synthetic runs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from sam_peft.bench.verdicts import claims_report, compare, holm, sign_flip_test


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
    assert claims_report(_runs(gap=1.0, seeds=1), set()).startswith("Not testable here")


def test_the_std_claim_uses_only_tasks_where_every_method_has_three_runs():
    # cola: full and lora have 2 runs (Levene's median form is degenerate with 2: every |x - median| is equal)
    records = [r for r in _runs(gap=1.0) if r["task"] != "cola" or r["seed"] < 2 or r["method"] == "sam"]
    report = claims_report(records, set())
    assert "nan" not in report and "(mrpc, stsb)" in report
    two_each = [r for r in _runs(gap=1.0) if r["seed"] < 2]
    assert "| Table 1: SAM is the most stable (lowest averaged std) | not testable here" in \
        claims_report(two_each, set())
