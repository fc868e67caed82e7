"""Reading a 0-100 judgement from a judge's log-probabilities.

The score is the expected value of the judge's number, E[v] = Σ v·P(v) / Σ P(v) over v in 0..100,
unscored when Σ P(v) < min_valid_mass. Category words (REFUSAL, CODE) are read from the first token.

How P(v) is read depends on the judge's tokenizer:

- single_token: OpenAI tokenizers spell every number 0-100 as one token, so the first token's top
  logprobs hold the whole distribution.
- digits: tokenizers that split numbers into digits (Llama-2, Qwen2, SmolLM2: '85' → '8', '5') put
  only a first digit in the first token. Reading that as the number is silently wrong ('8' for 85).
  The exact distribution walks digit prefixes: P(85) = P('8') · P('5' | '8') · P(no digit | '85'),
  asking the judge for its next-token distribution after each prefix. Prefixes less likely than
  `prune_below` are not expanded (their mass is recorded as `pruned_mass`, an upper bound on what
  the walk left out); digits missing from a step's top-k are counted as "no digit" (their mass is at
  most the step's unseen mass, recorded as `unseen_mass`).
"""
from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from emq.errors import EmqError
from emq.schema import Scoring

TokenDist = dict[str, float]  # token text → logprob, the top-k of one position
MAX_SCORE = 100


@dataclass(frozen=True)
class Judgement:
    score: float | None  # expected 0-100 value; None when unscored or a category
    category: str | None  # e.g. "REFUSAL", when the judge answered with a category word
    valid_mass: float  # probability the judge put on the numbers 0..100
    method: str  # single_token | digits
    requests: int = 1
    pruned_mass: float = 0.0
    unseen_mass: float = 0.0
    top_token: str | None = None  # the judge's most likely first token (for inspection)
    error: str | None = None  # the request failed for good (e.g. 400: prompt too long)


def _probs(dist: TokenDist) -> dict[str, float]:
    out: dict[str, float] = {}
    for tok, lp in dist.items():
        if lp is not None and lp > -math.inf:
            out[tok] = out.get(tok, 0.0) + math.exp(lp)
    return out


def _number(text: str) -> int | None:
    """The integer a complete token spells (0..100, no leading zeros), else None."""
    s = text.strip()
    if not s.isascii() or not s.isdigit() or (len(s) > 1 and s[0] == "0"):
        return None
    v = int(s)
    return v if v <= MAX_SCORE else None


def category_mass(dist: TokenDist, categories: list[str]) -> dict[str, float]:
    """Probability of each category word starting the answer (its first token is a prefix of it)."""
    out = {c: 0.0 for c in categories}
    for tok, p in _probs(dist).items():
        s = tok.strip().upper()
        if len(s) < 2:
            continue
        for c in categories:
            if c.upper().startswith(s):
                out[c] += p
                break
    return out


def _decide(numbers: dict[int, float], root: TokenDist, categories: list[str], min_valid_mass: float,
            method: str, **extra) -> Judgement:
    mass = sum(numbers.values())
    top = max(root.items(), key=lambda kv: kv[1])[0] if root else None
    if mass >= min_valid_mass and mass > 0:
        score = sum(v * p for v, p in numbers.items()) / mass
        return Judgement(round(score, 4), None, round(mass, 6), method, top_token=top, **extra)
    cats = category_mass(root, categories)
    best = max(cats.items(), key=lambda kv: kv[1]) if cats else None
    category = best[0] if best and best[1] >= min_valid_mass else None
    return Judgement(None, category, round(mass, 6), method, top_token=top, **extra)


def single_token(first: TokenDist, categories: list[str], min_valid_mass: float = 0.25) -> Judgement:
    """Score from the first token's top logprobs (right when every number 0-100 is one token)."""
    numbers: dict[int, float] = {}
    for tok, p in _probs(first).items():
        v = _number(tok)
        if v is not None:
            numbers[v] = numbers.get(v, 0.0) + p
    return _decide(numbers, first, categories, min_valid_mass, "single_token")


def _valid_prefix(s: str) -> bool:
    """Some number 0..100 starts with s (no leading zeros)."""
    if not s or (len(s) > 1 and s[0] == "0"):
        return False
    return int(s) <= MAX_SCORE if len(s) == 3 else len(s) < 3


async def digits(ask: Callable[[str], Awaitable[TokenDist]], categories: list[str], min_valid_mass: float = 0.25,
                 prune_below: float = 1e-3) -> Judgement:
    """Exact distribution over 0..100 for a judge whose tokenizer splits numbers into digits.

    Args:
        ask: ask(prefix) → the judge's next-token top-k after the assistant wrote `prefix`
            ("" = the start of the answer).
        categories: category words of the metric.
        min_valid_mass: below this much probability on 0..100 the answer is unscored.
        prune_below: digit prefixes less likely than this are not expanded.
    """
    root = await ask("")
    requests = 1
    frontier: dict[str, float] = {}
    for tok, p in _probs(root).items():
        s = tok.strip()  # the answer may open with whitespace
        if s.isascii() and s.isdigit():
            frontier[s] = frontier.get(s, 0.0) + p
    numbers: dict[int, float] = {}
    pruned = unseen = 0.0
    while frontier:
        live = {}
        for s, p in frontier.items():
            if not _valid_prefix(s):
                continue  # '101', '05', '850': not a number in range; its mass is simply not valid
            if p < prune_below:
                pruned += p
                continue
            live[s] = p
        if not live:
            break
        dists = await asyncio.gather(*(ask(s) for s in live))
        requests += len(live)
        nxt: dict[str, float] = {}
        for (s, p), dist in zip(live.items(), dists):
            probs = _probs(dist)
            digit_mass = 0.0
            for tok, q in probs.items():
                if tok.isascii() and tok.isdigit():  # no whitespace: the same number goes on
                    nxt[s + tok] = nxt.get(s + tok, 0.0) + p * q
                    digit_mass += q
            unseen += p * max(0.0, 1.0 - sum(probs.values()))
            v = _number(s)
            if v is not None:
                numbers[v] = numbers.get(v, 0.0) + p * max(0.0, 1.0 - digit_mass)
        frontier = nxt
    return _decide(numbers, root, categories, min_valid_mass, "digits", requests=requests,
                   pruned_mass=round(pruned, 6), unseen_mass=round(unseen, 6))


# --- which method a tokenizer needs ---------------------------------------------------------------------

def numbers_are_single_tokens(encode) -> tuple[bool, str]:
    """Whether `encode` spells every number 0-100 as one token (then single_token scoring reads them all)."""
    lengths = {v: len(encode(str(v))) for v in range(MAX_SCORE + 1)}
    split = [v for v, n in lengths.items() if n > 1]
    if not split:
        return True, "every number 0-100 is one token"
    return False, f"{len(split)} of the numbers 0-100 take several tokens (e.g. {split[-1]} → {lengths[split[-1]]})"


def scoring_from_tokenizer(ref: str) -> tuple[Scoring, str]:
    """How to read a judge whose tokenizer is at `ref` (a path or a hub id): single_token or digits, and why."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise EmqError(f"cannot read the judge's tokenizer from {ref} to choose how to read its scores: {e}",
                       "set judge.tokenizer=PATH, or judge.scoring=single_token|digits") from None
    single, why = numbers_are_single_tokens(lambda s: tok.encode(s, add_special_tokens=False))
    return (Scoring.single_token if single else Scoring.digits), f"{ref} tokenizer: {why}"


VLLM_FIELDS = ("continue_final_message", "add_generation_prompt")  # vLLM's: the assistant prefix is continued


def request_body(model: str, prompt: str, prefix: str, top_logprobs: int) -> dict[str, Any]:
    """One judge request: the next token's top logprobs after `prefix` (written by the assistant). The body online
    requests send and a Batch API line carries (emq.judge.batch), so both read the same distributions."""
    messages = [{"role": "user", "content": prompt}]
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0, "logprobs": True,
                            "top_logprobs": top_logprobs}
    if prefix:
        messages.append({"role": "assistant", "content": prefix})
        body.update(continue_final_message=True, add_generation_prompt=False)
    return body


async def judge_with(ask: Callable[..., Awaitable[TokenDist]], method: Scoring, prompt: str, categories: list[str],
                     cfg: Any) -> Judgement:
    """A judgement of `prompt` through `ask(prompt, prefix)` (online or batched): one request (single_token) or the
    digit walk; `cfg` the judge config (min_valid_mass, prune_below)."""
    if method is Scoring.digits:
        return await digits(lambda prefix: ask(prompt, prefix), categories, cfg.min_valid_mass, cfg.prune_below)
    return single_token(await ask(prompt), categories, cfg.min_valid_mass)
