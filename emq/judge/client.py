"""The judge client: one OpenAI-compatible endpoint asked for next-token logprobs with bounded concurrency and
retries (exponential backoff with jitter on 429 / 5xx / timeouts / dropped connections); judgements keyed by a hash
of (judge, metric, filled prompt) and appended to a scores file as they arrive."""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.judge import scoring
from emq.judge.backends import backend
from emq.judge.plan import JudgePlan, scrub
from emq.records import SCORES, JsonlWriter, read_jsonl
from emq.schema import JudgeConfig, Scoring

log = logging.getLogger(__name__)


class JudgeFailed(EmqError):
    """The judge could not be reached for good; the scores so far are kept."""


_RETRY_STATUS = {408, 409, 425, 429}


class JudgeClient:
    """One OpenAI-compatible judge: asks for the top logprobs of the next token, with retries."""

    def __init__(self, cfg: JudgeConfig, plan: JudgePlan, base_url: str, *, model_name: str | None = None):
        from openai import AsyncOpenAI

        self.cfg = cfg
        self.plan = plan
        self.model = model_name or plan.model
        self.method = Scoring(plan.scoring)
        self.client = AsyncOpenAI(base_url=base_url, api_key=backend(plan.kind).api_key(cfg),
                                  timeout=cfg.timeout_s, max_retries=0)
        self.sem = asyncio.Semaphore(cfg.max_concurrency)
        self.requests = 0
        self.retries = 0
        self.prompt_tokens = 0  # from the responses' usage fields (an endpoint that reports none adds 0)
        self.completion_tokens = 0

    async def ask(self, prompt: str, prefix: str = "") -> scoring.TokenDist:
        """The judge's top-k next-token logprobs after `prefix` (written by the assistant)."""
        import openai

        body = scoring.request_body(self.model, prompt, prefix, self.cfg.top_logprobs)
        vllm_only = {k: body.pop(k) for k in scoring.VLLM_FIELDS if k in body}  # not in the SDK's signature
        for attempt in range(self.cfg.max_retries + 1):
            try:
                async with self.sem:
                    self.requests += 1
                    r = await self.client.chat.completions.create(**body, extra_body=vllm_only or None)
                if r.usage is not None:
                    self.prompt_tokens += r.usage.prompt_tokens or 0
                    self.completion_tokens += r.usage.completion_tokens or 0
                content = (r.choices[0].logprobs.content or []) if r.choices and r.choices[0].logprobs else []
                if not content:
                    return {}
                return {t.token: t.logprob for t in content[0].top_logprobs}
            except (openai.APITimeoutError, openai.APIConnectionError, openai.InternalServerError) as e:
                err = e
            except openai.APIStatusError as e:
                if e.status_code not in _RETRY_STATUS and e.status_code < 500:
                    raise
                err = e
            if attempt == self.cfg.max_retries:
                raise JudgeFailed(f"the judge at {self.client.base_url} failed {attempt + 1} times in a row; last: "
                                  f"{scrub(type(err).__name__ + ': ' + str(err)[:300], self.cfg)}",
                                  "rerun the same command later: scores already written are kept and only the "
                                  "missing ones are judged (or lower judge.max_concurrency)")
            self.retries += 1
            delay = min(60.0, 0.5 * 2 ** attempt) * random.uniform(0.5, 1.5)
            log.debug("judge: %s, retrying in %.1f s", type(err).__name__, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def judge(self, prompt: str, categories: list[str]) -> scoring.Judgement:
        import openai

        try:
            return await scoring.judge_with(self.ask, self.method, prompt, categories, self.cfg)
        except openai.APIStatusError as e:
            if e.status_code in (401, 403, 404):
                raise JudgeFailed(f"the judge at {self.client.base_url} refused the request (HTTP {e.status_code}): "
                                  f"{scrub(str(e)[:300], self.cfg)}",
                                  "check judge.model and the key in judge.api_key_env") from None
            # this one prompt cannot be judged (e.g. too long for the judge): record it, go on
            return scoring.Judgement(None, None, 0.0, self.method.value, error=scrub(f"HTTP {e.status_code}: "
                                                                                     f"{str(e)[:200]}", self.cfg))

    async def close(self) -> None:
        await self.client.close()


def score_key(identity: str, metric: str, text: str) -> str:
    return hashlib.sha256(json.dumps([identity, metric, text]).encode()).hexdigest()[:24]


def read_scores(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_jsonl(Path(run_dir) / SCORES) if "key" in r}


@dataclass(frozen=True)
class Calls:
    """What judging asked of the endpoint: requests (retries included), failed judgements, tokens as the endpoint
    counted them (usage fields)."""

    requests: int = 0
    retries: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    batches: int = 0  # judge.batch: the batches submitted (a digit walk takes one per step)
    resumed: int = 0  # judge.batch: answers of a batch a killed run had submitted


def judge_into(scores: Path, todo: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan, base_url: str, *,
               model_name: str | None = None, desc: str = "judge", on_judged=None) -> Calls:
    """Judge `todo` (items as `judge_items` makes them) with one client, appending each judgement to `scores`
    as it arrives (a killed process keeps what it judged). judge.batch: through the endpoint's Batch API
    (emq.judge.batch), its state beside `scores` in judge_batch/<judge>/."""
    if not todo:
        return Calls()
    if cfg.batch:
        from emq.judge.batch import judge_batch

        work = Path(scores).parent / "judge_batch" / hashlib.sha256(plan.identity.encode()).hexdigest()[:16]
        with JsonlWriter(scores) as writer:
            done = judge_batch(lambda it, j: writer.write({"key": it["key"], "metric": it["metric"],
                                                           "judge": plan.identity, **j.__dict__}),
                               todo, cfg, plan, base_url, work, model_name=model_name, on_judged=on_judged,
                               desc=f"{desc} (batch)")
        return Calls(done["requests"], 0, done["errors"], done["prompt_tokens"], done["completion_tokens"],
                     done["batches"], done["resumed"])
    client = JudgeClient(cfg, plan, base_url, model_name=model_name)
    errors = 0

    async def main() -> None:
        from tqdm import tqdm

        with JsonlWriter(scores) as writer, tqdm(total=len(todo), desc=desc, unit="ans") as bar:
            async def one(it: dict[str, Any]) -> None:
                nonlocal errors
                j = await client.judge(it["text"], it["categories"])
                errors += j.error is not None
                writer.write({"key": it["key"], "metric": it["metric"], "judge": plan.identity, **j.__dict__})
                bar.update(1)
                if on_judged is not None:
                    on_judged(bar.n)

            tasks = [asyncio.ensure_future(one(it)) for it in todo]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await client.close()

    asyncio.run(main())
    return Calls(client.requests, client.retries, errors, client.prompt_tokens, client.completion_tokens)
