"""The run's plan, assembled in one place: one model, or model.adapters' one engine."""
from __future__ import annotations

from collections.abc import Callable

from emq.detect import DetectResult
from emq.machine import Machine
from emq.plan.adapters import plan_adapters
from emq.plan.make import make_plan
from emq.plan.types import Plan, QuantizePlan, TokenBudget
from emq.schema import MemoryConfig, QuantConfig


def plan_run(dets: dict[str, DetectResult], memory: MemoryConfig, quant: QuantConfig, machine: Machine, *,
             one_engine: bool, compile_cache: str | None, budget: TokenBudget | None,
             merge_cached: Callable[[QuantizePlan | None], bool] | None = None, notes: list[str] = ()) -> Plan:
    """The plan of a run: `make_plan` for its one model, or `plan_adapters` for model.adapters (`one_engine`),
    with `notes` (what the checks before the plan found, e.g. the answers the context allows) among its reasons.

    Args:
        dets: name → detect record (one entry unless one_engine).
        merge_cached: for one model, whether its merge is already cached (make_plan's input).
        Others: as for `make_plan`.
    """
    if one_engine:
        plan = plan_adapters(dets, memory, quant, machine, compile_cache=compile_cache, budget=budget)
    else:
        (det,) = dets.values()
        plan = make_plan(det, memory, quant, machine, compile_cache=compile_cache, budget=budget,
                         merge_cached=merge_cached)
    plan.reasons.extend(notes)
    return plan
