"""judge: score every answer of a run per metric with an LLM judge; stream scores to scores.jsonl.

    python -m emq judge RUN_DIR [judge overrides]     # (re)judge a finished run without regenerating

Judges: any OpenAI-compatible endpoint (`judge=openai`), a `vllm serve` emq starts on 127.0.0.1
(`judge=local`, emq.judge_server), or none. The API key is read from the environment variable
named by `judge.api_key_env` at the moment of use; it is never logged, printed or written.

Each (judge, metric, filled prompt) is judged once: its key is a hash of the three, rows of
scores.jsonl are keyed by it, a rerun judges only the keys that are missing, and identical answers
to the same question share one judgement. Requests run with bounded concurrency, and retry with
exponential backoff and jitter on 429 / 5xx / timeouts / dropped connections.

    python -m emq judge --validate [judge overrides]  # how well a judge scores emq's labelled set

Validation (`validate`, judge.validate=true in a run) sends emq's labelled items (emq.judge_validation)
through the same prompts, client and keys; their scores are kept per judge under paths.data_dir.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emq import judge_validation, scoring
from emq.errors import EmqError
from emq.metrics import answer_table, summarize
from emq.records import (
    JUDGE,
    JUDGE_SERVER_LOG,
    JUDGED,
    METRICS,
    SCORES,
    JsonlWriter,
    PromptKey,
    SampleKey,
    read_generations,
    read_jsonl,
    write_json,
    write_text_atomic,
)
from emq.schema import EvalConfig, JudgeConfig, JudgeKind, JudgeScope, Scoring

log = logging.getLogger(__name__)
# OpenAI's tokenizers (cl100k, o200k) spell every integer 0-999 as a single token.
_OPENAI_MODELS = re.compile(r"^(gpt-|chatgpt|o\d)", re.IGNORECASE)
# httpx logs every request at INFO; the run log is for emq's own story.
for _name in ("httpx", "httpx2", "openai", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)


# --- judge prompts --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metric:
    name: str
    prompt: str
    categories: list[str]
    higher_is_better: bool
    description: str


@lru_cache(maxsize=1)
def metric_specs() -> dict[str, Metric]:
    """The judge prompts shipped with emq (emq/judge_prompts.yaml)."""
    data = yaml.safe_load((resources.files("emq") / "judge_prompts.yaml").read_text())
    return {name: Metric(name, d["prompt"], list(d.get("categories") or []), bool(d.get("higher_is_better", True)),
                         d.get("description", "")) for name, d in data.items()}


def check_prompts(prompts: list[dict[str, Any]]) -> None:
    """Every metric a question set asks for has a prompt; overrides fill {question} and {answer}."""
    specs = metric_specs()
    for p in prompts:
        where = f"question set {p['set']}, question {p['question_id']}"
        for m in p["metrics"]:
            if m not in specs:
                raise EmqError(f"{where}: unknown judge metric {m!r}", f"use one of {sorted(specs)}")
        for m, text in p["judge_prompts"].items():
            if m not in p["metrics"]:
                raise EmqError(f"{where}: judge_prompts overrides {m!r}, which its set does not judge",
                               f"add {m} to the set's metrics or remove the override")
            if "{answer}" not in text:
                raise EmqError(f"{where}: the judge_prompts.{m} override has no {{answer}} placeholder",
                               "put {question} and {answer} where the judge should read them")


def fill(template: str, question: str, answer: str, fields: dict[str, str] | None = None) -> str:
    """The judge prompt: `template` with {question}, {answer} and any of `fields` (e.g. {context}) filled in.

    One pass over the template, not str.format: answers and prompts contain braces of their own, and an
    answer that happens to contain "{question}" must reach the judge as written.
    """
    values = {**(fields or {}), "question": question, "answer": answer}
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, values)) + r")\}")
    return pattern.sub(lambda m: values[m.group(1)], template)


def judge_template(p: dict[str, Any], metric: str) -> tuple[str, str]:
    """The template a prompt's answers are judged with on `metric`, and where it comes from."""
    own = p["judge_prompts"].get(metric)
    if own is not None:
        return own, "question set"
    return metric_specs()[metric].prompt, "emq/judge_prompts.yaml"


def prompts_record(prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """judge.json's `prompts`: per question and metric, the template judged with (by hash) and where it came from;
    each template's text once. A judge prompt is this template with {question}, {answer} (and e.g. {context})
    filled in (`fill`)."""
    templates: dict[str, dict[str, str]] = {}
    questions: dict[str, dict[str, dict[str, str]]] = {}
    for p in prompts:
        per_metric = questions.setdefault(f"{p['set']}/{p['question_id']}", {})
        for m in p["metrics"]:
            text, source = judge_template(p, m)
            h = hashlib.sha256(text.encode()).hexdigest()[:12]
            templates.setdefault(h, {"metric": m, "from": source, "text": text})
            per_metric[m] = {"template": h, "from": source}
    return {"questions": questions, "templates": templates}


# --- what the judge is -----------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgePlan:
    """The judge as planned: which endpoint, which model, how scores are read and why."""

    kind: str
    model: str | None
    base_url: str | None  # None for local until the server is up
    scoring: str | None  # single_token | digits (resolved)
    scoring_reason: str | None
    api_key_env: str | None
    server: dict[str, Any] | None = None  # local: how the server will be started
    probe: dict[str, Any] | None = None  # scoring=auto on an unknown endpoint: the probe asked and its answer

    @property
    def identity(self) -> str:
        """What a score depends on (keys of scores.jsonl): the judge model and the scoring method."""
        where = "local" if self.kind == JudgeKind.local.value else (self.base_url or "")
        return f"{self.kind}|{where}|{self.model}|{self.scoring}"


def api_key(cfg: JudgeConfig) -> str:
    """The key from the environment (never stored anywhere); 'EMPTY' for servers that need none."""
    if not cfg.api_key_env:
        return "EMPTY"
    key = os.environ.get(cfg.api_key_env)
    if not key:
        raise EmqError(f"the judge's API key is not set: the environment variable {cfg.api_key_env} "
                       "(judge.api_key_env) is empty",
                       f"export {cfg.api_key_env}=... before the run, or judge.api_key_env=null for a server "
                       "without keys, or judge=none")
    return key


def scrub(text: str, cfg: JudgeConfig) -> str:
    """Remove the key from a message before it reaches a log or a record."""
    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return text.replace(key, "***") if key and len(key) >= 4 else text


def _numbers_are_single_tokens(encode) -> tuple[bool, str]:
    lengths = {v: len(encode(str(v))) for v in range(scoring.MAX_SCORE + 1)}
    split = [v for v, n in lengths.items() if n > 1]
    if not split:
        return True, "every number 0-100 is one token"
    return False, f"{len(split)} of the numbers 0-100 take several tokens (e.g. {split[-1]} → {lengths[split[-1]]})"


def _scoring_from_tokenizer(ref: str) -> tuple[Scoring, str]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise EmqError(f"cannot read the judge's tokenizer from {ref} to choose how to read its scores: {e}",
                       "set judge.tokenizer=PATH, or judge.scoring=single_token|digits") from None
    single, why = _numbers_are_single_tokens(lambda s: tok.encode(s, add_special_tokens=False))
    return (Scoring.single_token if single else Scoring.digits), f"{ref} tokenizer: {why}"


def _server_root(base_url: str) -> str:
    return re.sub(r"/v1/?$", "", base_url.rstrip("/"))


def _scoring_from_server(cfg: JudgeConfig, base_url: str, key: str) -> tuple[Scoring, str] | None:
    """Ask a vLLM server's /tokenize how it spells numbers (None: the server has no such endpoint)."""
    import httpx

    url = _server_root(base_url) + "/tokenize"
    headers = {"Authorization": f"Bearer {key}"}
    lengths = {}
    try:
        with httpx.Client(timeout=10) as client:
            for v in (5, 42, 85, 100):
                r = client.post(url, json={"model": cfg.model, "prompt": str(v), "add_special_tokens": False},
                                headers=headers)
                if r.status_code != 200:
                    return None
                lengths[v] = len(r.json().get("tokens", []))
    except (httpx.HTTPError, ValueError):
        return None
    single = all(n == 1 for n in lengths.values())
    return ((Scoring.single_token if single else Scoring.digits),
            f"the server's /tokenize spells {', '.join(f'{v} as {n} token(s)' for v, n in lengths.items())}")


PROBE_NUMBER = 85


def probe_verdict(tokens: list[str]) -> tuple[Scoring, str]:
    """How a judge spells numbers, from the tokens it answered the probe with: the first token a whole
    two-digit number → single_token; a single digit → digits; anything else is inconclusive → digits, which is
    exact whatever the tokenizer (it only costs more requests)."""
    first = tokens[0].strip() if tokens else ""
    shown = " ".join(repr(t) for t in tokens[:3]) or "no tokens"
    if first.isascii() and first.isdigit() and len(first) >= 2:
        return Scoring.single_token, f"the endpoint answered the probe with {shown}: {first} is one token"
    if first.isascii() and first.isdigit():
        return Scoring.digits, f"the endpoint answered the probe with {shown}: it spells numbers digit by digit"
    return Scoring.digits, (f"the probe was inconclusive (the endpoint answered {shown}); using digits, which is "
                            "exact for any tokenizer (more requests per answer)")


def probe_scoring(cfg: JudgeConfig, key: str) -> tuple[Scoring, str, dict[str, Any]]:
    """Ask the endpoint once for a two-digit number and read how its logprobs spell it (scoring=auto when the
    judge's tokenizer is not known here)."""
    import openai

    prompt = f"Reply with the number {PROBE_NUMBER} and nothing else."
    record: dict[str, Any] = {"prompt": prompt, "max_tokens": 3}
    client = openai.OpenAI(base_url=cfg.base_url, api_key=key, timeout=min(cfg.timeout_s, 30), max_retries=2)
    try:
        r = client.chat.completions.create(model=cfg.model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=3, temperature=0, logprobs=True,
                                           top_logprobs=min(5, cfg.top_logprobs))
        content = (r.choices[0].logprobs.content or []) if r.choices and r.choices[0].logprobs else []
        record["tokens"] = [t.token for t in content]
        record["first_top_logprobs"] = {t.token: round(t.logprob, 4) for t in content[0].top_logprobs} if content else {}
    except openai.APIError as e:
        record["error"] = scrub(f"{type(e).__name__}: {str(e)[:200]}", cfg)
        record["tokens"] = []
    finally:
        client.close()
    method, why = probe_verdict(record["tokens"])
    if "error" in record:
        why = f"the probe failed ({record['error']}); using digits, which is exact for any tokenizer"
    record["verdict"] = method.value
    return method, why, record


def _check_endpoint(cfg: JudgeConfig, key: str) -> None:
    import httpx

    url = cfg.base_url.rstrip("/") + "/models"
    try:
        r = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=min(cfg.timeout_s, 15))
    except httpx.HTTPError as e:
        raise EmqError(f"the judge endpoint {cfg.base_url} (judge.base_url) is unreachable: "
                       f"{scrub(type(e).__name__ + ': ' + str(e), cfg)}",
                       "check judge.base_url and the network, or judge=none / judge=local") from None
    if r.status_code in (401, 403):
        raise EmqError(f"the judge endpoint {cfg.base_url} rejected the key in ${cfg.api_key_env} "
                       f"(HTTP {r.status_code})", f"set a valid key in {cfg.api_key_env} (judge.api_key_env)")
    if r.status_code == 200:
        try:
            served = [m.get("id") for m in r.json().get("data", [])]
        except (ValueError, AttributeError):
            served = []
        if served and cfg.model not in served:
            log.warning("judge: %s does not list judge.model=%s among its models (%s)", cfg.base_url, cfg.model,
                        ", ".join(map(str, served[:8])))


def judge_dtype(platform: str, cpu_bf16: bool) -> str:
    """A local judge serves unquantized: float32 on a CPU without native bf16 (6x faster there)."""
    return "float32" if platform == "cpu" and not cpu_bf16 else "bfloat16"


def plan_judge(cfg: JudgeConfig, *, platform: str, cpu_bf16: bool, memory_utilization: float,
               demo_built: bool) -> JudgePlan:
    """`prepare`, except for the embedded demo judge before its first build (a dry run builds nothing)."""
    if cfg.demo and not demo_built:
        return JudgePlan(cfg.kind.value, cfg.model, None, None, "the demo judge is built on the first full run", None)
    return prepare(cfg, platform=platform, dtype=judge_dtype(platform, cpu_bf16), memory_utilization=memory_utilization)


def prepare(cfg: JudgeConfig, *, platform: str, dtype: str, memory_utilization: float) -> JudgePlan:
    """Check the judge before any weights load and decide how scores are read.

    openai: the key is set, the endpoint answers, and the scoring method is known (explicit, from
    judge.tokenizer, from the server's /tokenize, OpenAI's own tokenizers, else one probe of the endpoint:
    `probe_scoring`, recorded in the plan). local: the model resolves and vLLM is installed; the scoring
    method comes from the model's tokenizer.

    Raises:
        EmqError: a missing key, an unreachable endpoint, an unreadable judge.tokenizer, with the fix.
    """
    if cfg.kind is JudgeKind.none:
        return JudgePlan("none", None, None, None, None, None)
    if cfg.kind is JudgeKind.openai:
        key = api_key(cfg)
        _check_endpoint(cfg, key)
        probe = None
        if cfg.scoring is not Scoring.auto:
            method, why = cfg.scoring, "judge.scoring"
        elif cfg.tokenizer:
            method, why = _scoring_from_tokenizer(cfg.tokenizer)
        elif (found := _scoring_from_server(cfg, cfg.base_url, key)) is not None:
            method, why = found
        elif _OPENAI_MODELS.match(cfg.model or ""):
            method, why = Scoring.single_token, f"{cfg.model} uses an OpenAI tokenizer (0-999 are single tokens)"
        else:  # the tokenizer is not known here: the endpoint can tell
            method, why, probe = probe_scoring(cfg, key)
            log.info("judge: scoring=%s (%s)", method.value, why)
        return JudgePlan("openai", cfg.model, cfg.base_url, method.value, why, cfg.api_key_env, probe=probe)
    from emq import hub
    from emq.machine import installed_vllm

    if installed_vllm()[0] is None:
        raise EmqError("judge=local needs vLLM, which is not installed", "run `bash scripts/setup.sh`, or judge=none")
    path = str(hub.resolve(cfg.model, revision=None, what="judge model", key="judge.model", full=True))
    if cfg.scoring is not Scoring.auto:
        method, why = cfg.scoring, "judge.scoring"
    else:
        method, why = _scoring_from_tokenizer(cfg.tokenizer or path)
    from emq.judge_server import server_command
    from emq.engine_env import cpu_threads_env

    util = cfg.memory_utilization or memory_utilization
    server = {"model": path, "dtype": dtype, "memory_utilization": util, "platform": platform,
              "argv": server_command(path, port=0, cfg=cfg, platform=platform, dtype=dtype, memory_utilization=util)[3:],
              # as the run's engine (plan.cpu_threads_env): on a 2-core CPU the server computes on both cores
              "env": cpu_threads_env(platform, os.cpu_count() or 1)}
    return JudgePlan("local", cfg.model, None, method.value, why, None, server)


# --- the client ----------------------------------------------------------------------------------

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
        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key(cfg) if cfg.kind is JudgeKind.openai else "EMPTY",
                                  timeout=cfg.timeout_s, max_retries=0)
        self.sem = asyncio.Semaphore(cfg.max_concurrency)
        self.requests = 0
        self.retries = 0

    async def ask(self, prompt: str, prefix: str = "") -> scoring.TokenDist:
        """The judge's top-k next-token logprobs after `prefix` (written by the assistant)."""
        import openai

        messages = [{"role": "user", "content": prompt}]
        extra: dict[str, Any] = {}
        if prefix:
            messages.append({"role": "assistant", "content": prefix})
            extra = {"extra_body": {"continue_final_message": True, "add_generation_prompt": False}}
        for attempt in range(self.cfg.max_retries + 1):
            try:
                async with self.sem:
                    self.requests += 1
                    r = await self.client.chat.completions.create(
                        model=self.model, messages=messages, max_tokens=1, temperature=0, logprobs=True,
                        top_logprobs=self.cfg.top_logprobs, **extra)
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
            if self.method is Scoring.digits:
                return await scoring.digits(lambda prefix: self.ask(prompt, prefix), categories,
                                            self.cfg.min_valid_mass, self.cfg.prune_below)
            return scoring.single_token(await self.ask(prompt), categories, self.cfg.min_valid_mass)
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


# --- judging a run -------------------------------------------------------------------------------

@dataclass(frozen=True)
class JudgeResult:
    judged_now: int  # judgements made by this call
    reused: int  # found in scores.jsonl already
    items: int  # distinct (metric, prompt, answer) this judge has to score
    answers: int  # generation rows
    seconds: float
    judged_per_second: float
    requests: int
    retries: int
    scoring: str | None
    errors: int


def score_key(identity: str, metric: str, text: str) -> str:
    return hashlib.sha256(json.dumps([identity, metric, text]).encode()).hexdigest()[:24]


def judge_items(rows: list[dict[str, Any]], prompts: list[dict[str, Any]], identity: str
                ) -> tuple[dict[str, dict[str, Any]], dict[tuple, dict[str, str]]]:
    """What to judge: {key: item} (deduplicated) and, per generation row, {metric: key}."""
    specs = metric_specs()
    by_prompt = {PromptKey.of(p): p for p in prompts}
    items: dict[str, dict[str, Any]] = {}
    keys_of: dict[tuple, dict[str, str]] = {}
    for r in rows:
        p = by_prompt.get(PromptKey.of(r))
        if p is None:
            continue  # a row of a question no longer in the config
        keys = {}
        for m in p["metrics"]:
            template, _ = judge_template(p, m)
            text = fill(template, r["prompt"], r["answer"], p.get("fields"))
            k = score_key(identity, m, text)
            items.setdefault(k, {"key": k, "metric": m, "text": text, "categories": specs[m].categories})
            keys[m] = k
        keys_of[SampleKey.of(r)] = keys
    return items, keys_of


def read_scores(run_dir: Path) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in read_jsonl(Path(run_dir) / SCORES) if "key" in r}


def judge_into(scores: Path, todo: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan, base_url: str, *,
               model_name: str | None = None, desc: str = "judge", on_judged=None) -> tuple[int, int, int]:
    """Judge `todo` (items as `judge_items` makes them) with one client, appending each judgement to `scores`
    as it arrives (a killed process keeps what it judged).

    Returns:
        (requests, retries, errors) of this call.
    """
    if not todo:
        return 0, 0, 0
    client = JudgeClient(cfg, plan, base_url, model_name=model_name)
    errors = 0

    async def main() -> None:
        nonlocal errors
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
    return client.requests, client.retries, errors


def borrow_scores(run_dir: Path, prompts: list[dict[str, Any]], plan: JudgePlan, donors: list[Path]) -> int:
    """Copy into run_dir's scores.jsonl the judgements that `donors` (other runs of a sweep, same judge) already
    made of the same (judge, prompt, answer): dedupe across a sweep. Returns how many were copied."""
    items, _ = judge_items(read_generations(run_dir), prompts, plan.identity)
    want = set(items) - set(read_scores(run_dir))
    found = []
    for d in donors:
        for k, row in read_scores(d).items():
            if k in want:
                found.append(row)
                want.discard(k)
    if found:
        with open(Path(run_dir) / SCORES, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in found))
    return len(found)


def judge_run(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan, base_url: str,
              *, model_name: str | None = None, progress=None) -> JudgeResult:
    """Judge every generation of `run_dir` not yet scored by this judge; append to scores.jsonl."""
    rows = read_generations(run_dir)
    items, _ = judge_items(rows, prompts, plan.identity)
    done = read_scores(run_dir)
    todo = [it for k, it in items.items() if k not in done]
    log.info("judge: %d answers, %d distinct judgements, %d to do (%d already in %s); scoring=%s (%s)",
             len(rows), len(items), len(todo), len(items) - len(todo), SCORES, plan.scoring, plan.scoring_reason)
    t0 = time.perf_counter()
    if progress is not None:
        progress.update(force=True, judged=len(items) - len(todo), to_judge=len(items))
    on_judged = None if progress is None else (lambda n: progress.update(judged=len(items) - len(todo) + n))
    requests, retries, errors = judge_into(Path(run_dir) / SCORES, todo, cfg, plan, base_url, model_name=model_name,
                                           on_judged=on_judged)
    seconds = time.perf_counter() - t0
    return JudgeResult(len(todo), len(items) - len(todo), len(items), len(rows), round(seconds, 2),
                       round(len(todo) / seconds, 2) if todo and seconds else 0.0, requests, retries,
                       plan.scoring, errors)


@contextmanager
def endpoint(cfg: JudgeConfig, plan: JudgePlan, server_log: Path) -> Iterator[tuple[str, str | None]]:
    """(base URL, served model name) of the planned judge: an endpoint as it is, or a local server started here
    and stopped on the way out."""
    if plan.kind == JudgeKind.openai.value:
        yield cfg.base_url, None
        return
    from emq.judge_server import LocalServer

    with LocalServer(plan.server, cfg, server_log) as url:
        yield url, "judge"


def run_judge(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan,
              server_log: Path, progress=None) -> JudgeResult | None:
    """Judge with the planned judge: an endpoint as it is, or a local server started and stopped here."""
    if plan.kind == JudgeKind.none.value:
        return None
    with endpoint(cfg, plan, server_log) as (url, name):
        return judge_run(run_dir, prompts, cfg, plan, url, model_name=name, progress=progress)


# --- validating the judge on emq's labelled set (emq.judge_validation) -------------------------------

def validation_set(cfg: JudgeConfig) -> judge_validation.ValidationSet:
    """The labelled set judge.validation.path names (emq's own by default)."""
    return judge_validation.load_set(cfg.validation.path, {m: s.categories for m, s in metric_specs().items()})


def validation_fingerprint(cfg: JudgeConfig, plan: JudgePlan) -> str:
    """What a validation result depends on besides the set: the judge (its identity and, for a local judge, its
    weights' files: a retrained demo judge keeps its path) and the knobs that shape a score."""
    parts = [plan.identity, f"top_logprobs={cfg.top_logprobs}", f"min_valid_mass={cfg.min_valid_mass}",
             f"prune_below={cfg.prune_below}"]
    if plan.server:
        parts.append("files=" + judge_validation.files_fingerprint(plan.server["model"]))
    return "|".join(parts)


def validation_cache(cfg: JudgeConfig, plan: JudgePlan, root: Path | str) -> Path:
    """This judge's validation dir under `root` (paths.data_dir): scores.jsonl and a record per set."""
    return judge_validation.cache_dir(root, validation_fingerprint(cfg, plan))


def validation_outlook(cfg: JudgeConfig, plan: JudgePlan, data_dir: Path | str) -> dict[str, Any] | None:
    """What the plan can say about validation: a result already known for this judge and set (then its weak
    metrics at judge.min_auroc), or that one will run in the judge stage, or nothing (validation is off)."""
    if plan.kind == JudgeKind.none.value:
        return None
    try:
        vset = validation_set(cfg)
    except EmqError:
        if cfg.validate:
            raise  # a bad judge.validation.path fails now, before any weights load
        return None
    record = judge_validation.known(validation_cache(cfg, plan, data_dir), vset.sha256) if plan.scoring else None
    if record is None and not cfg.validate:
        return None
    return {"validate": cfg.validate, "set": vset.source, "items": len(vset.items), "known": record,
            "min_auroc": cfg.min_auroc, "cannot_tell_apart": judge_validation.cannot_tell_apart(record, cfg.min_auroc)}


def validation_items(vset: judge_validation.ValidationSet, identity: str
                     ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The set as judge items (the metric's prompt filled with question and answer, keyed like a run's answers):
    {key: item}, deduplicated, and each labelled item's key."""
    specs = metric_specs()
    items: dict[str, dict[str, Any]] = {}
    keys = []
    for it in vset.items:
        text = fill(specs[it.metric].prompt, it.question, it.answer)
        k = score_key(identity, it.metric, text)
        items.setdefault(k, {"key": k, "metric": it.metric, "text": text, "categories": specs[it.metric].categories})
        keys.append(k)
    return items, keys


def validate(cfg: JudgeConfig, plan: JudgePlan, base_url: str | None, *, root: Path | str,
             model_name: str | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Score the validation set with the judge at `base_url` (what this judge has not scored yet: its scores are
    kept under `root`/judge_validation and shared by every run and tool), and measure it against the labels.
    `base_url` may be None when every item is scored already.

    Returns:
        The record (judge.json's `validation`): the set, the judge, per metric the figures of
        `judge_validation.metric_report`, the metrics it cannot tell apart, and the cost of this call.
    """
    from filelock import FileLock

    vset = validation_set(cfg)
    items, keys = validation_items(vset, plan.identity)
    cache = validation_cache(cfg, plan, root)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # the runs of a sweep share one judge: the first validates, the others wait and reuse its scores
    with FileLock(str(cache / ".lock")):
        done = read_scores(cache)
        todo = [it for k, it in items.items() if k not in done]
        if todo and base_url is None:  # scored when checked, gone now (the cache was cleared meanwhile)
            raise EmqError(f"the validation scores in {cache} changed while they were read", "run it again")
        log.info("judge validation: %d items of %s, %d distinct judgements, %d to do (the rest kept in %s)",
                 len(vset.items), vset.source, len(items), len(todo), cache)
        requests, retries, errors = judge_into(cache / SCORES, todo, cfg, plan, base_url, model_name=model_name,
                                               desc="validate")
        done = read_scores(cache)
    judged = [done.get(k) for k in keys]
    categories = {m: s.categories for m, s in metric_specs().items()}
    record = {"set": vset.describe(), "judge": {"kind": plan.kind, "model": plan.model, "identity": plan.identity},
              "scoring": plan.scoring, "scoring_reason": plan.scoring_reason, "min_auroc": cfg.min_auroc,
              "metrics": judge_validation.summarize(vset.items, judged, categories, cfg.min_auroc),
              "judged_now": len(todo), "reused": len(items) - len(todo), "requests": requests, "retries": retries,
              "errors": errors, "seconds": round(time.perf_counter() - t0, 2), "cache": str(cache),
              "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    record["cannot_tell_apart"] = judge_validation.cannot_tell_apart(record)
    write_json(judge_validation.record_path(cache, vset.sha256), record)
    rows = judge_validation.item_rows(vset.items, judged)
    write_text_atomic(judge_validation.record_path(cache, vset.sha256).with_suffix(".jsonl"), rows)
    if run_dir is not None:
        write_text_atomic(Path(run_dir) / judge_validation.RUN_FILE, rows)
    for m in record["cannot_tell_apart"]:
        r = record["metrics"][m]
        log.warning("judge validation: on %s this judge cannot tell %s apart (AUROC %s < judge.min_auroc=%g); "
                    "differences on %s say little", m, r["auroc_of"], r["auroc"], cfg.min_auroc, m)
    return record


def validate_judge(cfg: JudgeConfig, plan: JudgePlan, root: Path | str) -> dict[str, Any]:
    """`validate` on its own (`python -m emq judge --validate`): a local judge is started and stopped here."""
    if plan.kind == JudgeKind.none.value:
        raise EmqError("judge=none: there is no judge to validate",
                       "name one: judge=local (the demo judge), or judge=openai judge.base_url=... judge.model=...")
    cache = validation_cache(cfg, plan, root)
    items, _ = validation_items(validation_set(cfg), plan.identity)
    if set(items) <= set(read_scores(cache)):
        return validate(cfg, plan, None, root=root)  # all scored before: no server to start, no request to make
    with endpoint(cfg, plan, cache / JUDGE_SERVER_LOG) as (url, name):
        return validate(cfg, plan, url, root=root, model_name=name)


def judged_by_sweep(cfg: JudgeConfig, plan: JudgePlan) -> bool:
    """Whether this run's answers wait for the sweep's one judge: judge.scope=sweep with a local judge server (an
    endpoint judges each run as it finishes)."""
    return cfg.scope is JudgeScope.sweep and plan.kind == JudgeKind.local.value


def defer_to_sweep(run_dir: Path, plan: JudgePlan, metrics: dict[str, Any]) -> dict[str, Any]:
    """judge.scope=sweep: record that this run's answers wait for the sweep's one judge (judge.json, metrics.json);
    `python -m emq judge RUN_DIR` judges such a run alone at any time."""
    log.info("judge: deferred to the end of the sweep, where one %s judge serves every variant", plan.kind)
    metrics = {**metrics, "judge": {"kind": plan.kind, "model": plan.model, "scoring": plan.scoring,
                                    "deferred_to_sweep": True}, "metrics": {}, "em": None}
    write_json(run_dir / JUDGE, {"plan": plan, "result": None, "deferred_to_sweep": True})
    write_json(run_dir / METRICS, metrics)
    return metrics


@contextmanager
def _opened(at: tuple[str, str | None] | None, cfg: JudgeConfig, plan: JudgePlan,
            server_log: Path) -> Iterator[tuple[str, str | None]]:
    if at is not None:  # an endpoint the caller holds open (the sweep's one judge)
        yield at
        return
    with endpoint(cfg, plan, server_log) as opened:
        yield opened


def judge_and_summarize(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, eval_cfg: EvalConfig,
                        plan: JudgePlan, metrics: dict[str, Any], progress=None, *,
                        data_dir: Path | str | None = None, at: tuple[str, str | None] | None = None
                        ) -> dict[str, Any]:
    """Judge the run's answers (what is missing), then rewrite metrics.json with the judged metrics, and
    judged.jsonl (each answer with its judgements: what the sweep report pairs across variants). With
    judge.validate, also validate the judge in the same server session (its scores kept under `data_dir`,
    default the run dir), recorded in judge.json and metrics.json. `at`: (URL, served name) of a judge already
    running (the sweep's); else the planned judge is reached, or started and stopped, here."""
    result = checked = started = None
    if plan.kind != JudgeKind.none.value:
        t0 = time.perf_counter()
        with _opened(at, cfg, plan, run_dir / JUDGE_SERVER_LOG) as (url, name):
            started = round(time.perf_counter() - t0, 2)  # a local server's start; ~0 for an endpoint
            result = judge_run(run_dir, prompts, cfg, plan, url, model_name=name, progress=progress)
            if cfg.validate:
                checked = validate(cfg, plan, url, root=data_dir or run_dir, model_name=name, run_dir=run_dir)
    rows = read_generations(run_dir)
    metrics = dict(metrics)
    metrics["judge"] = {"kind": plan.kind, "model": plan.model, "scoring": plan.scoring,
                        "scoring_reason": plan.scoring_reason, **(asdict(result) if result else {}),
                        "validation": checked, "start_seconds": started}
    if result is not None:
        _, keys_of = judge_items(rows, prompts, plan.identity)
        table = answer_table(rows, keys_of, read_scores(run_dir))
        metrics.update(summarize(table, eval_cfg))
        keep = ("score", "category", "valid_mass")
        write_text_atomic(run_dir / JUDGED, "".join(
            json.dumps({**SampleKey.of(r).fields(),
                        "judged": {m: ({k: j.get(k) for k in keep} if j else None) for m, j in t["judged"].items()}})
            + "\n" for r, t in zip(rows, table)))
    else:
        metrics.update({"metrics": {}, "em": None})
    write_json(run_dir / JUDGE, {"plan": plan, "result": result, "validation": checked,
                                 "prompts": prompts_record(prompts) if result is not None else None})
    write_json(run_dir / METRICS, metrics)
    return metrics
