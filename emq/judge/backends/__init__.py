"""Judge backends: one module per judge.kind, each providing `BACKEND`, found by name (`backend(kind)`).

A backend says what its kind needs in the config, checks it before any weights load (`prepare` → a JudgePlan),
and opens it for judging (`endpoint`: the base URL and served model name of an OpenAI-compatible endpoint, for as
long as the `with` lasts). A new kind of judge is one module here, one JudgeKind value and one conf/judge/*.yaml.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

Problem = tuple[str, str]  # (what is wrong, the fix), as emq.schema.check_values collects them


class Backend(Protocol):
    name: str  # the judge.kind value, the module's name
    judges: bool  # False for judge=none: nothing is scored
    shared_by_sweep: bool  # a server emq starts: one per sweep when judge.scope=auto (judge.scope=sweep)

    def config_problems(self, cfg: Any) -> list[Problem]:
        """What this kind needs in judge.* that `cfg` lacks (checked when the config is composed)."""

    def prepare(self, cfg: Any, *, platform: str, dtype: str, memory_utilization: float) -> Any:
        """Check the judge (key, endpoint, model, vLLM) and decide how scores are read: the JudgePlan."""

    def where(self, plan: Any) -> str:
        """Where the judge is, as a score's identity spells it."""

    def api_key(self, cfg: Any) -> str:
        """The key requests carry (read from the environment at the moment of use)."""

    def endpoint(self, cfg: Any, plan: Any, server_log: Path) -> AbstractContextManager[tuple[str, str | None]]:
        """(base URL, served model name or None) while the `with` lasts."""


def backend(kind: str) -> Backend:
    """The backend of judge.kind `kind` (a JudgeKind or its value)."""
    name = getattr(kind, "value", kind)
    try:
        return importlib.import_module(f"{__name__}.{name}").BACKEND
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        from emq.errors import EmqError

        raise EmqError(f"judge.kind={name!r} has no backend", f"use one of {names()}") from None


def names() -> list[str]:
    """Every backend's kind."""
    return sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))


def endpoint_of(cfg: Any, plan: Any, server_log: Path) -> Iterator[tuple[str, str | None]]:
    """The planned judge opened: `backend(plan.kind).endpoint`."""
    return backend(plan.kind).endpoint(cfg, plan, server_log)
