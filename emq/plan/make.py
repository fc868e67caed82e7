"""make_plan: the decisions above, in order, into one Plan."""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from emq.detect import DetectResult, is_bnb_4bit
from emq.engine_env import batch_invariant_env, compile_cache_env, cpu_threads_env, engine_env
from emq.machine import Machine
from emq.plan.engine import choose_eager, engine_mode, engine_pool
from emq.plan.estimates import estimate_basis, estimates
from emq.plan.fit import CPU_WORKER_GIB, fit_check, lora_rank
from emq.plan.merge import merge_cascade, merge_disk
from emq.plan.quant import bnb_served, choose_quant, int4_weights_only
from emq.plan.route import choose_route
from emq.plan.types import EngineMode, EngineSettings, Plan, QuantizePlan, Route, Routing, TokenBudget
from emq.plan.w4a16 import plan_quantize
from emq.schema import MemoryConfig, QuantConfig, QuantMethod

log = logging.getLogger(__name__)


def _engine_settings(det: DetectResult, memory: MemoryConfig, machine: Machine, qm: QuantMethod,
                     mode: EngineMode, reasons: list[str], *, lora: bool,
                     compile_cache: str | None = None, compensation: int = 0) -> EngineSettings:
    return EngineSettings(
        quantization=machine.vllm.quant.get(qm), dtype=mode.dtype, memory_utilization=mode.memory_utilization,
        max_model_len=memory.max_model_len, enforce_eager=mode.enforce_eager,
        enable_lora=lora, max_lora_rank=lora_rank(det, extra=compensation) if lora else None,
        max_num_seqs=memory.max_num_seqs, tensor_parallel_size=memory.tensor_parallel_size,
        enable_chunked_prefill=mode.enable_chunked_prefill, extra=dict(memory.engine_extra),
        env={**engine_env(qm, machine, reasons, int4_base=int4_weights_only(det.base.quantization_config)),
             **batch_invariant_env(memory, machine, reasons),
             **cpu_threads_env(machine.vllm.platform, machine.cpu_count, reasons),
             **compile_cache_env(compile_cache, reasons)},
    )


def make_plan(det: DetectResult, memory: MemoryConfig, quant: QuantConfig, machine: Machine, *,
              compile_cache: str | None = None, budget: TokenBudget | None = None,
              merge_cached: Callable[[QuantizePlan | None], bool] | None = None) -> Plan:
    """Choose a route, quantization and engine settings, with a reason for each.

    Args:
        det: the detect record.
        memory: the memory policy.
        quant: the quant choice.
        machine: a snapshot of this machine (inject one in tests).
        compile_cache: where vLLM keeps its compile cache (VLLM_CACHE_ROOT; None: vLLM's default).
        budget: what the eval generates (`TokenBudget.of(prompts, eval.max_tokens)`): with memory.enforce_eager
            null, it decides CUDA graphs or eager mode (None: graphs, vLLM's default).
        merge_cached: whether the merge this plan makes is already in the cache, given its W4A16 plan (a merge it
            holds needs no disk; None: not asked): emq.checkpoint.quantize.merge_in_cache.

    Returns:
        The plan. A `stop` route carries `stop_reason`; the runner raises it.

    Raises:
        EmqError: a choice that cannot work on this machine (e.g. quant=bnb on the CPU build).
    """
    reasons: list[str] = []
    prequantized = is_bnb_4bit(det.base.quantization_config)
    choice = choose_quant(det, memory, quant, machine, reasons, prequantized=prequantized)
    qm = choice.method
    if quant.compensation.rank and qm is not QuantMethod.w4a16:
        reasons.append(f"WARNING: quant.compensation.rank={quant.compensation.rank} is not used: it compensates a "
                       f"W4A16 base, and this plan serves {qm.value} (quant=w4a16_keep asks for W4A16)")
    est = estimates(det, memory, qm, machine)
    estimate_basis(det, reasons)
    route = choose_route(det, memory, reasons, prequantized=prequantized, qm=qm,
                         compensated=qm is QuantMethod.w4a16 and quant.compensation.rank > 0)
    routing = merge_cascade(det, memory, machine, est, reasons) if route is Route.merge_then_serve else Routing(route)
    qplan = (plan_quantize(det, memory, quant, machine, routing, est, reasons)
             if qm is QuantMethod.w4a16 and routing.route is not Route.stop else None)
    if routing.route is Route.merge_then_serve:
        disk_stop = merge_disk(det, memory, qplan, machine, est, merge_cached, reasons)
        if disk_stop is not None:
            routing = replace(routing, route=Route.stop, stop_reason=disk_stop)
    eager = choose_eager(det, memory, machine, reasons, budget=budget, compile_cache=compile_cache,
                         lora=routing.route is Route.serve_lora)
    mode = engine_mode(memory, qm, machine, reasons, enforce_eager=eager.enforce_eager)
    if mode.dtype == "float32" and qm is QuantMethod.none:
        est["serve_weights"] *= 2  # the bf16 weights are served upcast
    pool = engine_pool(memory, machine, mode.memory_utilization)
    if det.base.param_count and routing.route is not Route.stop and machine.vllm.platform in ("cuda", "cpu"):
        # vLLM's CPU build counts its worker process's own memory (Python, torch, vLLM: ~0.9 GiB) against the pool
        overhead = CPU_WORKER_GIB if machine.vllm.platform == "cpu" else 0.0
        est |= {"engine_pool": pool, "kv_headroom": pool - est["serve_weights"] - overhead}
        stop_reason = fit_check(est, memory, machine, mode.memory_utilization, reasons)
        if stop_reason is not None:
            routing = replace(routing, route=Route.stop, stop_reason=stop_reason)
    if routing.route is Route.stop:
        reasons.append(f"route: stop, because {routing.stop_reason}")
    lora = (routing.route is Route.serve_lora or routing.fallback is Route.serve_lora
            or (qplan is not None and qplan.compensation > 0))  # a base alone: the compensation is the LoRA
    devices = routing.merge_devices
    plan = Plan(route=routing.route, quant=qm, merge_devices=devices,
                merge_method=memory.merge_method.value if devices else None, fallback=routing.fallback,
                engine=_engine_settings(det, memory, machine, qm, mode, reasons, lora=lora,
                                        compile_cache=compile_cache,
                                        compensation=qplan.compensation if qplan else 0),
                estimates_gib={k: round(v, 3) for k, v in est.items()}, reasons=reasons,
                platform=machine.vllm.platform, vllm=f"{machine.vllm.distribution} {machine.vllm.version}",
                stop_reason=routing.stop_reason, quant_requested=quant.method.value,
                quant_substitution=choice.substitution, quantize=qplan, eager=eager,
                bnb=(bnb_served(det, machine, routing.route, reasons, prequantized=prequantized)
                     if qm is QuantMethod.bnb else None))
    log.info("plan: %s, quant=%s%s", routing.route.value, qm.value,
             f", merge on {' → '.join(devices)}" if devices else "")
    return plan
