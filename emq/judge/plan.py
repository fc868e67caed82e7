"""What the judge is: the planned judge (`JudgePlan`), its key (read from the environment at the moment of use,
never stored), and `prepare`, which asks the judge's backend (emq.judge.backends, found by judge.kind) to check
it before any weights load."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.judge.backends import backend
from emq.schema import JudgeConfig


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
        return f"{self.kind}|{backend(self.kind).where(self)}|{self.model}|{self.scoring}"

    @property
    def judges(self) -> bool:
        """Whether this judge scores anything (not judge=none)."""
        return backend(self.kind).judges


def files_fingerprint(path: str) -> str:
    """Names, sizes and mtimes of a local model's files: a retrained judge at the same path is another judge."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else ([p] if p.is_file() else [])
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def fingerprint(cfg: JudgeConfig, plan: JudgePlan) -> str:
    """Everything a score depends on besides the filled prompt: the judge's identity, for a local judge its
    weights' files (a retrained demo judge keeps its path), and the knobs that shape a score. What the judge cache
    and the validation scores are kept under."""
    parts = [plan.identity, f"top_logprobs={cfg.top_logprobs}", f"min_valid_mass={cfg.min_valid_mass}",
             f"prune_below={cfg.prune_below}"]
    if plan.server:
        parts.append("files=" + files_fingerprint(plan.server["model"]))
    return "|".join(parts)


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
    """Check the judge before any weights load and decide how scores are read: its backend's `prepare`
    (emq.judge.backends.<judge.kind>).

    Raises:
        EmqError: a missing key, an unreachable endpoint, an unreadable judge.tokenizer, with the fix.
    """
    return backend(cfg.kind).prepare(cfg, platform=platform, dtype=dtype, memory_utilization=memory_utilization)
