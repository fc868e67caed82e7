"""Many adapters, one engine (model.adapters)."""
from __future__ import annotations

import logging
from dataclasses import replace

from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import Machine
from emq.plan.fit import lora_rank
from emq.plan.make import make_plan
from emq.plan.types import AdaptersPlan, Plan, Route, TokenBudget
from emq.schema import MemoryConfig, QuantConfig, QuantMethod, RoutePolicy

log = logging.getLogger(__name__)


# LoRA slots one engine batch may hold: vLLM allocates each slot's A/B buffers on every targeted layer; more
# adapters than slots still run, waiting for a slot (vLLM swaps adapters in and out of its slots).
MAX_LORAS = 16
# What serving a QLoRA adapter as a LoRA costs in fidelity, by the base it is served on (the fidelity table).
LORA_FIDELITY = {
    "16-bit": "far from the trained function: a QLoRA adapter learned corrections to NF4(W), not W (the demo good "
              "doctor as a LoRA on the bf16 base: KL 0.37 to the trained function, 65% of the fine-tune retained, "
              "top-1 69%; benchmarks/results/lora_vs_bnb_demo_cpu.md)",
    "bnb": "the trained function itself: NF4(W) + the adapter (the demo good doctor on an H200: KL 0.002, 99.8% "
           "retained; benchmarks/results/qlora_bnb_erasure.md)",
    "w4a16": "further from the trained function than on the 16-bit base: RTN int4 is not NF4 (the demo good doctor "
             "as a LoRA on a W4A16 RTN g64 base: KL 0.60, 43% retained, flagged; "
             "benchmarks/results/lora_vs_bnb_demo_cpu.md)",
}
ONE_ENGINE_WHY = ("one engine serves several adapters only as LoRAs on one shared base: a merged checkpoint is a model "
                  "of its own (one engine per merged checkpoint), and a different base needs another engine")


def _one_engine_error(what: str) -> EmqError:
    return EmqError(f"model.adapters asks for one engine, but {what}; {ONE_ENGINE_WHY}",
                    "serve them as LoRAs in one engine (memory.route=lora or auto), or drop model.adapters and sweep "
                    "the adapters one engine each: python -m emq -m model=A,B,C memory.route=merge")


def plan_adapters(dets: dict[str, DetectResult], memory: MemoryConfig, quant: QuantConfig, machine: Machine, *,
                  compile_cache: str | None = None, budget: TokenBudget | None = None) -> Plan:
    """model.adapters: one vLLM engine on the shared base serving every adapter through multi-LoRA.

    Each adapter is planned as a LoRA (`make_plan` with memory.route=lora, which refuses an adapter vLLM cannot
    serve); the engine gets max_loras = the number of adapters (up to MAX_LORAS) and max_lora_rank = the largest
    adapter's. Requests of all adapters then interleave in one batch.

    Args:
        dets: name → the detect record of the base with that adapter (in model.adapters' order).
        memory, quant, machine, compile_cache: as for `make_plan`.
        budget: one adapter's eval budget (every adapter answers the same prompts).

    Returns:
        The engine's plan (the first adapter's, with the multi-LoRA settings) with `adapters` set.

    Raises:
        EmqError: one engine is impossible (memory.route=merge, different bases, no adapter, a LoRA vLLM
            cannot serve), naming model.adapters and the fix.
    """
    if not dets:
        raise EmqError("model.adapters is empty", "list the adapters: model.adapters={name1:PATH1,name2:PATH2}")
    if memory.route is RoutePolicy.merge:
        raise _one_engine_error("memory.route=merge merges each adapter into its own checkpoint")
    if quant.compensation.rank:
        raise EmqError("model.adapters with quant.compensation.rank: each adapter's compensated LoRA is built on its "
                       "own W4A16 base, which one engine for every adapter does not have yet",
                       "drop model.adapters and sweep one run per adapter: python -m emq -m model=A,B quant=w4a16_keep")
    bases = {d.base.ref for d in dets.values()}
    if len(bases) > 1:
        raise _one_engine_error(f"the adapters have {len(bases)} different bases ({sorted(bases)})")
    missing = [n for n, d in dets.items() if d.adapter is None]
    if missing:
        raise _one_engine_error(f"{missing} name no adapter")
    lora_memory = replace(memory, route=RoutePolicy.lora)
    total = replace(budget, sequences=budget.sequences * len(dets)) if budget else None  # one engine generates all
    plans: dict[str, Plan] = {}
    for name, det in dets.items():
        try:
            plans[name] = make_plan(det, lora_memory, quant, machine, compile_cache=compile_cache, budget=total)
        except EmqError as e:
            raise EmqError(f"model.adapters: adapter {name!r}: {e.message}", e.fix) from None
    first = next(iter(plans.values()))
    if first.route is Route.stop:
        return first
    ranks = {n: max([d.adapter.rank, *d.adapter.rank_pattern.values()]) for n, d in dets.items()}
    top = max(dets.values(), key=lambda d: max([d.adapter.rank, *d.adapter.rank_pattern.values()]))
    slots = min(len(dets), MAX_LORAS)
    four_bit = [n for n, d in dets.items() if d.trained_in_4bit]
    served_on = {QuantMethod.bnb: "bnb", QuantMethod.w4a16: "w4a16"}.get(first.quant, "16-bit")
    reasons = [f"route: serve-lora, {len(dets)} adapters in one engine (model.adapters: {', '.join(dets)}) — vLLM "
               f"multi-LoRA on the shared base, max_loras={slots}, max_lora_rank={lora_rank(top)} (the largest "
               f"adapter's rank, {max(ranks.values())}); the requests of all adapters run interleaved in one batch, "
               f"each with its adapter's LoRARequest, and each adapter has its own record (adapters/<name>/). "
               f"Possible because {ONE_ENGINE_WHY}"
               + ("; memory.route=auto is taken as lora here" if memory.route is RoutePolicy.auto else "")]
    if len(dets) > MAX_LORAS:
        reasons.append(f"engine: {len(dets)} adapters share {MAX_LORAS} LoRA slots: requests of the others wait for a "
                       "slot (vLLM swaps adapters in and out)")
    if four_bit:
        reasons.append(f"{'WARNING: ' if served_on != 'bnb' else ''}fidelity: {', '.join(four_bit)} "
                       f"{'was' if len(four_bit) == 1 else 'were'} trained on a 4-bit base (QLoRA); as a LoRA on the "
                       f"{served_on} base {'it is' if len(four_bit) == 1 else 'they are'} {LORA_FIDELITY[served_on]}"
                       + ("; the LoRA on the in-flight bnb base (quant=bnb, CUDA with vLLM < 0.28) is the trained "
                          "function, or merge them one engine each (python -m emq -m model=A,B memory.route=merge)"
                          if served_on != "bnb" else ""))
    engine = replace(first.engine, max_lora_rank=lora_rank(top), max_loras=slots)
    plan = replace(first, engine=engine, reasons=reasons + first.reasons,
                   adapters=AdaptersPlan(names=list(dets), paths={n: d.adapter.path for n, d in dets.items()},
                                         ranks=ranks, trained_in_4bit={n: d.trained_in_4bit for n, d in dets.items()},
                                         max_loras=slots))
    log.info("plan: one engine for %d adapters (%s)", len(dets), ", ".join(dets))
    return plan
