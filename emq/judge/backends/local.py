"""judge=local: `vllm serve judge.model` on 127.0.0.1 (emq.judge.server), started for the judging and always
stopped. Checked before any weights load: vLLM is installed and the model resolves; the scoring method comes from
the model's tokenizer. One server can serve a whole sweep (judge.scope=sweep)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from emq.engine_env import cpu_threads_env
from emq.errors import EmqError
from emq.judge.plan import JudgePlan
from emq.judge.scoring import scoring_from_tokenizer
from emq.judge.server import LocalServer, server_command
from emq.schema import JudgeConfig, Scoring


class LocalVllmServer:
    name = "local"
    judges = True
    shared_by_sweep = True

    def config_problems(self, cfg: JudgeConfig) -> list[tuple[str, str]]:
        if not cfg.model:
            return [("judge.model is not set (judge=local needs a model to ask)",
                     "judge.model=<model name or path>, or judge=none")]
        if cfg.batch:
            return [("judge.batch=true needs an endpoint with the OpenAI Batch API (/v1/batches); the local judge "
                     "server has none", "judge.batch=false (a local judge costs nothing per request), or judge=openai "
                     "at an endpoint that offers batches")]
        return []

    def prepare(self, cfg: JudgeConfig, *, platform: str, dtype: str, memory_utilization: float) -> JudgePlan:
        from emq import hub
        from emq.machine import installed_vllm

        if installed_vllm()[0] is None:
            raise EmqError("judge=local needs vLLM, which is not installed",
                           "run `bash scripts/setup.sh`, or judge=none")
        path = str(hub.resolve(cfg.model, revision=None, what="judge model", key="judge.model", full=True))
        if cfg.scoring is not Scoring.auto:
            method, why = cfg.scoring, "judge.scoring"
        else:
            method, why = scoring_from_tokenizer(cfg.tokenizer or path)
        util = cfg.memory_utilization or memory_utilization
        server = {"model": path, "dtype": dtype, "memory_utilization": util, "platform": platform,
                  "argv": server_command(path, port=0, cfg=cfg, platform=platform, dtype=dtype,
                                         memory_utilization=util)[3:],
                  # as the run's engine (engine_env.cpu_threads_env): on a 2-core CPU the server computes on both
                  "env": cpu_threads_env(platform, os.cpu_count() or 1),
                  **({"server_args": list(cfg.server_args)} if cfg.server_args else {})}
        return JudgePlan("local", cfg.model, None, method.value, why, None, server)

    def where(self, plan: JudgePlan) -> str:
        # judge.server_args make another judge of the same weights (e.g. --quantization bitsandbytes): its scores
        # are its own
        extra = (plan.server or {}).get("server_args")
        return "local" + (f"[{' '.join(extra)}]" if extra else "")

    def api_key(self, cfg: JudgeConfig) -> str:
        return "EMPTY"

    @contextmanager
    def endpoint(self, cfg: JudgeConfig, plan: JudgePlan, server_log: Path):
        with LocalServer(plan.server, cfg, server_log) as url:
            yield url, "judge"


BACKEND = LocalVllmServer()
