"""What judging a run will ask of the judge, estimated at the plan stage before anything runs: judgements, requests,
tokens and (with judge.price) cost — upper bounds, since answers are not written yet.

- judgements: every sample × every metric of its question. Repeated answers, scores already in the run dir and the
  judge cache (emq.judge.cache) make it fewer; they are not known before generation.
- prompt tokens per request: the filled judge prompt at CHARS_PER_TOKEN characters a token (the judge's tokenizer
  is not loaded to plan), plus the answer at its eval.max_tokens bound.
- requests per judgement: 1 with scoring=single_token; a digit walk (scoring=digits) asks once per digit prefix it
  explores: up to DIGIT_REQUESTS (emq's demo judge, a 135M model with flat distributions, needed 9.5 on average;
  a confident judge needs 2-3).
"""
from __future__ import annotations

from typing import Any

from emq.judge.plan import JudgePlan
from emq.judge.prompts import fill, judge_template
from emq.schema import JudgeConfig

CHARS_PER_TOKEN = 4.0  # English text in common BPE tokenizers
DIGIT_REQUESTS = 10  # the most requests emq counts for one judgement by a digit walk


def estimate(prompts: list[dict[str, Any]], max_tokens: int, cfg: JudgeConfig, plan: JudgePlan
             ) -> dict[str, Any] | None:
    """plan.json's `judge_estimate` (None for judge=none)."""
    if not plan.judges:
        return None
    judgements = 0
    prompt_tokens = 0.0
    for p in prompts:
        for m in p["metrics"]:
            template, _ = judge_template(p, m)
            per = len(fill(template, p["prompt"], "", p.get("fields"))) / CHARS_PER_TOKEN + max_tokens
            judgements += p["n"]
            prompt_tokens += p["n"] * per
    per_judgement = 1 if plan.scoring == "single_token" else DIGIT_REQUESTS
    requests = judgements * per_judgement
    out: dict[str, Any] = {"judgements_at_most": judgements, "requests_at_most": requests,
                           "requests_per_judgement": per_judgement,
                           "prompt_tokens_at_most": int(prompt_tokens * per_judgement),
                           "completion_tokens_at_most": requests,
                           "how": f"every sample x metric; prompt at {CHARS_PER_TOKEN:g} characters a token + the "
                                  f"answer at eval.max_tokens={max_tokens}; "
                                  + ("1 request a judgement (single_token)" if per_judgement == 1 else
                                     f"up to {per_judgement} requests a judgement (digits walk)")
                                  + "; repeated answers and the judge cache make it less"}
    cost = cost_of(cfg, out["prompt_tokens_at_most"], out["completion_tokens_at_most"], ndigits=4)
    if cost is not None:
        out["cost_at_most"] = cost
    return out


def cost_of(cfg: JudgeConfig, prompt_tokens: int, completion_tokens: int, *, ndigits: int = 6) -> float | None:
    """judge.price (per million input / output tokens, the user's figures: emq ships no price table) × the tokens;
    None when no price is set."""
    price = cfg.price
    if price.input_per_million is None and price.output_per_million is None:
        return None
    return round((prompt_tokens * (price.input_per_million or 0.0)
                  + completion_tokens * (price.output_per_million or 0.0)) / 1e6, ndigits)


def estimate_text(e: dict[str, Any]) -> str:
    """The plan table's line."""
    return (f"at most {e['judgements_at_most']:,} judgements, {e['requests_at_most']:,} requests, "
            f"{e['prompt_tokens_at_most']:,} prompt + {e['completion_tokens_at_most']:,} completion tokens"
            + (f", cost at most {e['cost_at_most']:.4f} (judge.price)" if "cost_at_most" in e else "")
            + f" ({e['how']})")
