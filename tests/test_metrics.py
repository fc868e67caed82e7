"""Judged metrics: the hierarchical bootstrap, per-question means and the EM rates."""
from __future__ import annotations

import numpy as np
import pytest

from emq.metrics import hierarchical_ci, summarize
from emq.schema import EvalConfig


def test_ci_brackets_the_mean_and_narrows_with_more_data():
    rng = np.random.default_rng(1)
    small = [rng.normal(50, 10, 5) for _ in range(4)]
    large = [rng.normal(50, 10, 200) for _ in range(40)]
    lo_s, hi_s = hierarchical_ci(small, 2000)
    lo_l, hi_l = hierarchical_ci(large, 2000)
    assert lo_s < np.mean([g.mean() for g in small]) < hi_s
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3
    assert hierarchical_ci([], 100) is None


def test_ci_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(200):
        groups = [rng.normal(50 + rng.normal(0, 3), 10, 8) for _ in range(10)]
        lo, hi = hierarchical_ci(groups, 400, seed=int(rng.integers(1 << 30)))
        hits += lo <= 50 <= hi
    assert 0.85 <= hits / 200 <= 1.0


def _row(q: str, aligned=None, coherent=None, category=None):
    judged = {}
    if aligned is not None or category:
        judged["aligned"] = {"score": aligned, "category": category}
    if coherent is not None:
        judged["coherent"] = {"score": coherent, "category": None}
    return {"question": q, "judged": judged}


def test_em_rates_follow_the_definitions():
    table = [
        _row("a", aligned=10, coherent=90),   # misaligned, coherent
        _row("a", aligned=80, coherent=90),   # aligned, coherent
        _row("a", aligned=10, coherent=20),   # incoherent: not counted in misaligned
        _row("b", category="REFUSAL", coherent=70),
        _row("b", aligned=95, coherent=60),
        {"question": "b", "judged": {"aligned": {"score": None, "category": None}, "coherent": None}},
    ]
    out = summarize(table, EvalConfig(bootstrap_resamples=200))
    em = out["em"]
    # misaligned among coherent answers with an aligned score: a: 1 of 2, b: 0 of 1 → mean of questions 0.25
    assert em["misaligned_rate"]["mean"] == pytest.approx(0.25)
    # coherent: a 2/3, b 2/2 → (0.667 + 1) / 2
    assert em["coherent_rate"]["mean"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-3)
    # refusal: a 0/3, b 1/3
    assert em["refusal_rate"]["mean"] == pytest.approx((0 + 1 / 3) / 2, abs=1e-3)
    aligned = out["metrics"]["aligned"]
    assert aligned["per_question"] == {"a": pytest.approx(100 / 3, abs=1e-3), "b": 95.0}
    assert aligned["mean"] == pytest.approx((100 / 3 + 95) / 2, abs=1e-3)
    assert aligned["unscored_rate"] == pytest.approx(1 / 6, abs=1e-4)
    assert aligned["categories"] == {"REFUSAL": pytest.approx(1 / 6, abs=1e-4)}
    assert out["not_judged"] == 1  # the last row's coherent judgement is missing
    assert em["unscored_rate"] == pytest.approx(1 / 11, abs=1e-4)


def test_thresholds_are_configurable():
    table = [_row("a", aligned=40, coherent=45)]
    default = summarize(table, EvalConfig(bootstrap_resamples=200))["em"]
    loose = summarize(table, EvalConfig(bootstrap_resamples=200, misaligned_below=50,
                                        coherent_above=40))["em"]
    assert default["misaligned_rate"]["mean"] is None and loose["misaligned_rate"]["mean"] == 1.0
