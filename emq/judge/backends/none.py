"""judge=none: the run generates answers and measures fidelity; nothing is scored."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from emq.errors import EmqError
from emq.judge.plan import JudgePlan
from emq.schema import JudgeConfig


class NoJudge:
    name = "none"
    judges = False
    shared_by_sweep = False

    def config_problems(self, cfg: JudgeConfig) -> list[tuple[str, str]]:
        return []

    def prepare(self, cfg: JudgeConfig, *, platform: str, dtype: str, memory_utilization: float) -> JudgePlan:
        return JudgePlan("none", None, None, None, None, None)

    def where(self, plan: JudgePlan) -> str:
        return ""

    def api_key(self, cfg: JudgeConfig) -> str:
        return "EMPTY"

    @contextmanager
    def endpoint(self, cfg: JudgeConfig, plan: JudgePlan, server_log: Path):
        raise EmqError("judge=none: there is no judge to ask",
                       "name one: judge=local (the demo judge), or judge=openai judge.base_url=... judge.model=...")
        yield  # pragma: no cover


BACKEND = NoJudge()
