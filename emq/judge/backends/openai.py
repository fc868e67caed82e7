"""judge=openai: any OpenAI-compatible endpoint (OpenAI, a vLLM server elsewhere, …).

Checked before any weights load: the key is set (read from the environment variable judge.api_key_env names, at
the moment of use; never logged, printed or written), the endpoint answers, and the scoring method is known —
explicit, from judge.tokenizer, from the server's /tokenize, OpenAI's own tokenizers, else one probe of the
endpoint (`probe_scoring`, recorded in the plan).
"""
from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.judge.plan import JudgePlan, api_key, scrub
from emq.judge.scoring import scoring_from_tokenizer
from emq.schema import JudgeConfig, Scoring

log = logging.getLogger(__name__)
# OpenAI's tokenizers (cl100k, o200k) spell every integer 0-999 as a single token.
_OPENAI_MODELS = re.compile(r"^(gpt-|chatgpt|o\d)", re.IGNORECASE)
TOP_LOGPROBS_MAX = 20  # the API's limit


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


class OpenAIEndpoint:
    name = "openai"
    judges = True
    shared_by_sweep = False  # an endpoint judges each run as it finishes

    def config_problems(self, cfg: JudgeConfig) -> list[tuple[str, str]]:
        problems = []
        if not 1 <= cfg.top_logprobs <= TOP_LOGPROBS_MAX:
            problems.append((f"judge.top_logprobs={cfg.top_logprobs} is outside [1, {TOP_LOGPROBS_MAX}] (judge=openai: "
                             "the API's limit)", f"judge.top_logprobs={TOP_LOGPROBS_MAX}"))
        if not cfg.model:
            problems.append(("judge.model is not set (judge=openai needs a model to ask)",
                             "judge.model=<model name or path>, or judge=none"))
        if not cfg.base_url:
            problems.append(("judge.base_url is not set (judge=openai needs an endpoint)",
                             "judge.base_url=https://api.openai.com/v1 (or your server's /v1 URL)"))
        return problems

    def prepare(self, cfg: JudgeConfig, *, platform: str, dtype: str, memory_utilization: float) -> JudgePlan:
        key = api_key(cfg)
        _check_endpoint(cfg, key)
        probe = None
        if cfg.scoring is not Scoring.auto:
            method, why = cfg.scoring, "judge.scoring"
        elif cfg.tokenizer:
            method, why = scoring_from_tokenizer(cfg.tokenizer)
        elif (found := _scoring_from_server(cfg, cfg.base_url, key)) is not None:
            method, why = found
        elif _OPENAI_MODELS.match(cfg.model or ""):
            method, why = Scoring.single_token, f"{cfg.model} uses an OpenAI tokenizer (0-999 are single tokens)"
        else:  # the tokenizer is not known here: the endpoint can tell
            method, why, probe = probe_scoring(cfg, key)
            log.info("judge: scoring=%s (%s)", method.value, why)
        return JudgePlan("openai", cfg.model, cfg.base_url, method.value, why, cfg.api_key_env, probe=probe)

    def where(self, plan: JudgePlan) -> str:
        return plan.base_url or ""

    def api_key(self, cfg: JudgeConfig) -> str:
        return api_key(cfg)

    @contextmanager
    def endpoint(self, cfg: JudgeConfig, plan: JudgePlan, server_log: Path):
        yield cfg.base_url, None


BACKEND = OpenAIEndpoint()
