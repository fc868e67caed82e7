"""The plan's estimate of what judging a run asks (emq.judge.estimate): upper bounds from the prompts alone."""
from __future__ import annotations

import pytest

from emq.judge.estimate import CHARS_PER_TOKEN, DIGIT_REQUESTS, estimate, estimate_text
from emq.judge.plan import JudgePlan
from emq.judge.prompts import fill, judge_template
from emq.schema import JudgeConfig, JudgeKind, JudgePriceConfig


def _prompts():
    return [{"set": "t", "question_id": q, "paraphrase_index": 0, "prompt": f"Question {q}?", "n": n,
             "metrics": ["aligned", "coherent"], "judge_prompts": {}} for q, n in (("a", 3), ("b", 2))]


def _plan(scoring: str, kind: str = "openai") -> JudgePlan:
    return JudgePlan(kind, "m", "http://x", scoring, "test", None)


def test_judgements_requests_and_tokens_are_counted_from_the_prompts():
    prompts = _prompts()
    e = estimate(prompts, 100, JudgeConfig(kind=JudgeKind.openai), _plan("single_token"))
    assert e["judgements_at_most"] == 10 and e["requests_at_most"] == 10 == e["completion_tokens_at_most"]
    want = sum(p["n"] * (len(fill(judge_template(p, m)[0], p["prompt"], "")) / CHARS_PER_TOKEN + 100)
               for p in prompts for m in p["metrics"])
    assert e["prompt_tokens_at_most"] == int(want) and "cost_at_most" not in e
    digits = estimate(prompts, 100, JudgeConfig(kind=JudgeKind.openai), _plan("digits"))
    assert digits["requests_at_most"] == 10 * DIGIT_REQUESTS
    assert digits["prompt_tokens_at_most"] == int(want * DIGIT_REQUESTS)


def test_the_cost_with_a_price_and_nothing_for_judge_none():
    cfg = JudgeConfig(kind=JudgeKind.openai, price=JudgePriceConfig(input_per_million=2.0, output_per_million=8.0))
    e = estimate(_prompts(), 50, cfg, _plan("single_token"))
    assert e["cost_at_most"] == pytest.approx(round((e["prompt_tokens_at_most"] * 2 + 10 * 8) / 1e6, 4))
    assert "cost at most" in estimate_text(e) and "at most 10 judgements" in estimate_text(e)
    assert estimate(_prompts(), 50, JudgeConfig(kind=JudgeKind.none), _plan(None, "none")) is None
