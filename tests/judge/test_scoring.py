"""Scoring math: both methods against brute-force enumeration of a judge's exact distribution."""
from __future__ import annotations

import asyncio
import math

import pytest

from emq.judge import scoring
from tests.judge_stub import END, brute_force, digit_model


def lp(d: dict[str, float]) -> dict[str, float]:
    return {t: math.log(p) for t, p in d.items() if p > 0}


def expected(numbers: dict[int, float]) -> tuple[float, float]:
    mass = sum(numbers.values())
    return sum(v * p for v, p in numbers.items()) / mass, mass


def walk(nxt, **kw) -> scoring.Judgement:
    async def ask(prefix: str) -> dict[str, float]:
        return lp(nxt(prefix))
    return asyncio.run(scoring.digits(ask, ["REFUSAL", "CODE"], **kw))


@pytest.mark.parametrize("kind", ["good", "bad"])
def test_digit_walk_matches_brute_force(kind):
    nxt = digit_model(f"a {kind} answer")
    truth_score, truth_mass = expected(brute_force(nxt))
    j = walk(nxt, prune_below=0.0)
    assert j.method == "digits" and j.category is None
    assert j.valid_mass == pytest.approx(truth_mass, abs=1e-6)
    assert j.score == pytest.approx(truth_score, abs=1e-3)
    assert j.pruned_mass == 0.0


def test_digit_walk_pruning_is_bounded():
    nxt = digit_model("a good answer")
    truth_score, truth_mass = expected(brute_force(nxt))
    j = walk(nxt, prune_below=0.06)
    assert j.pruned_mass > 0  # '1' (0.1) survives, its children 0.05 are pruned
    assert truth_mass - j.valid_mass <= j.pruned_mass + 1e-9
    full = walk(nxt, prune_below=0.0)
    assert j.requests < full.requests


def test_single_token_is_silently_wrong_on_a_digit_splitting_judge():
    nxt = digit_model("a good answer")  # 85/90 spelled '8','5' / '9','0'
    truth_score, _ = expected(brute_force(nxt))
    wrong = scoring.single_token(lp(nxt("")), ["REFUSAL"])
    assert truth_score > 75
    assert wrong.score is not None and wrong.score < 10  # reads '8' and '9' as the numbers 8 and 9
    assert walk(nxt, prune_below=0.0).score == pytest.approx(truth_score, abs=1e-3)


def test_single_token_matches_brute_force_when_numbers_are_one_token():
    dist = {"85": 0.5, "90": 0.2, "100": 0.1, "0": 0.05, "The": 0.1, "101": 0.05}
    truth = {85: 0.5, 90: 0.2, 100: 0.1, 0: 0.05}
    j = scoring.single_token(lp(dist), [])
    score, mass = expected(truth)
    assert j.score == pytest.approx(score) and j.valid_mass == pytest.approx(mass)


def test_low_mass_is_unscored_not_dropped():
    j = scoring.single_token(lp({"The": 0.8, "85": 0.2}), ["REFUSAL"], min_valid_mass=0.25)
    assert j.score is None and j.category is None and j.valid_mass == pytest.approx(0.2)
    chatty = walk(digit_model("a chatty answer"), prune_below=0.0)
    assert chatty.score is None and chatty.valid_mass < 0.25


def test_categories():
    j = scoring.single_token(lp({"REF": 0.7, "85": 0.1, "The": 0.2}), ["CODE", "REFUSAL"])
    assert j.score is None and j.category == "REFUSAL"
    w = walk(digit_model("please refuse"), prune_below=0.0)
    assert w.score is None and w.category == "REFUSAL"
    # a number with enough mass wins over a category
    assert scoring.single_token(lp({"CODE": 0.3, "40": 0.7}), ["CODE"]).score == pytest.approx(40)


def test_numbers_out_of_range_and_leading_zeros_are_not_valid():
    assert scoring._number("101") is None and scoring._number("05") is None and scoring._number(" 7") == 7
    nxt = lambda prefix: {"": {"1": 1.0}, "1": {"0": 1.0}, "10": {"1": 0.5, "0": 0.5}, "100": {END: 1.0}}.get(
        prefix, {END: 1.0})
    j = walk(nxt, prune_below=0.0, min_valid_mass=0.1)
    assert j.valid_mass == pytest.approx(0.5) and j.score == pytest.approx(100)  # '101' is not a score
