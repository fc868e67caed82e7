"""plan: what will we do with this model on this machine, and why?

A pure function of (detect record, memory policy, quant choice, machine snapshot): no weights
are loaded, so a plan can be printed as a dry run before anything expensive starts.

`make_plan` (plan/make.py) takes the decisions below in order, each appending its reasons: the quantization
(`choose_quant`, plan/quant.py), the estimates (plan/estimates.py), the route (`choose_route`, plan/route.py) and,
for a merge, where it runs and what it falls back to (`merge_cascade`, plan/merge.py), how a W4A16 checkpoint is
made (plan/w4a16.py), CUDA graphs or eager mode (`choose_eager`, from the eval's token budget), the engine mode and
memory pool (plan/engine.py), and whether the weights and KV cache fit in it (`fit_check`, plan/fit.py).
`plan_adapters` (plan/adapters.py) plans one engine for many adapters; `plan_run` (plan/run.py) is the run's plan,
either way. The records are in plan/types.py; the
environment the engine needs is emq.engine_env's.
"""
from __future__ import annotations

from emq.plan.adapters import plan_adapters
from emq.plan.fit import weights_missing
from emq.plan.make import make_plan
from emq.plan.quant import LEANEST_FIRST, SERVE_FRACTION, int4_weights_only, leanest_quant, resolve_quant
from emq.plan.run import plan_run
from emq.plan.types import (
    AdaptersPlan,
    EagerChoice,
    EngineSettings,
    Plan,
    QuantChoice,
    QuantizePlan,
    Route,
    TokenBudget,
)

__all__ = ["LEANEST_FIRST", "SERVE_FRACTION", "AdaptersPlan", "EagerChoice", "EngineSettings", "Plan", "QuantChoice",
           "QuantizePlan", "Route", "TokenBudget", "int4_weights_only", "leanest_quant", "make_plan", "plan_adapters", "plan_run",
           "resolve_quant", "weights_missing"]
