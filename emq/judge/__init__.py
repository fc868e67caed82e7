"""judge: score every answer of a run per metric with an LLM judge; stream scores to scores.jsonl.

    python -m emq judge RUN_DIR [judge overrides]     # (re)judge a finished run without regenerating
    python -m emq judge --validate [judge overrides]  # how well a judge scores emq's labelled set

Judges (emq.judge.backends, one module per judge.kind): any OpenAI-compatible endpoint (`judge=openai`), a
`vllm serve` emq starts on 127.0.0.1 (`judge=local`, emq.judge.server), or none. The API key is read from the
environment variable named by `judge.api_key_env` at the moment of use; it is never logged, printed or written.

Each (judge, metric, filled prompt) is judged once: its key is a hash of the three, rows of scores.jsonl are keyed
by it, a rerun judges only the keys that are missing, and identical answers to the same question share one
judgement. Requests run with bounded concurrency, and retry with exponential backoff and jitter on 429 / 5xx /
timeouts / dropped connections (emq.judge.client). Across runs, every judgement is kept in the judge cache
(emq.judge.cache, in paths.data_dir): a sweep, a rerun or another run whose answers repeat earlier ones asks
nothing for them, and a run whose every judgement is cached starts no judge at all. judge.json records requests,
tokens (the endpoint's usage fields), cache hits and, with judge.price, the cost; the plan estimates them first
(emq.judge.estimate).

Validation (emq.judge.validation; judge.validate=true in a run) sends emq's labelled items through the same
prompts, client and keys; their scores are kept per judge under paths.data_dir.

The modules: prompts (what a judge reads), plan (what the judge is), backends (each kind), client (asking),
scoring (reading a 0-100 score from logprobs), run (judging run dirs), cache (judgements across runs), estimate
(the plan's figures), validation, server (the local server).
"""
from __future__ import annotations

import logging

from emq.judge.cache import JudgeCache
from emq.judge.client import JudgeClient, JudgeFailed, judge_into, read_scores, score_key
from emq.judge.estimate import estimate
from emq.judge.plan import JudgePlan, api_key, judge_dtype, plan_judge, prepare, scrub
from emq.judge.prompts import Metric, check_prompts, fill, judge_template, metric_specs, prompts_record
from emq.judge.run import (
    JudgeResult,
    ToJudge,
    borrow_scores,
    defer_to_sweep,
    endpoint,
    judge_and_summarize,
    judge_items,
    judge_label,
    judge_run,
    judge_run_dirs,
    judged_by_sweep,
    run_judge,
)
from emq.judge.validation import validate, validate_judge, validation_outlook, validation_set

__all__ = ["JudgeCache", "JudgeClient", "JudgeFailed", "JudgePlan", "JudgeResult", "Metric", "ToJudge", "api_key",
           "borrow_scores", "check_prompts", "defer_to_sweep", "endpoint", "estimate", "fill", "judge_and_summarize",
           "judge_dtype", "judge_into", "judge_items", "judge_label", "judge_run", "judge_run_dirs", "judge_template",
           "judged_by_sweep", "metric_specs", "plan_judge", "prepare", "prompts_record", "read_scores", "run_judge",
           "score_key", "scrub", "validate", "validate_judge", "validation_outlook", "validation_set"]

# httpx logs every request at INFO; the run log is for emq's own story.
for _name in ("httpx", "httpx2", "openai", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)
