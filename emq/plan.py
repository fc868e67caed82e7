"""plan: what will we do with this model on this machine, and why?

A pure function of (detect record, memory policy, quant choice, machine snapshot): no weights
are loaded, so a plan can be printed as a dry run before anything expensive starts.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from enum import Enum

from emq.checkpoint.costs import merge_peaks
from emq.detect import DetectResult, is_bnb_4bit
from emq.errors import EmqError
from emq.machine import GIB, Machine
from emq.schema import MemoryConfig, QuantConfig, QuantMethod, RoutePolicy

log = logging.getLogger(__name__)

# vLLM accepts these max_lora_rank values.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Serving weights relative to bf16, measured on an H200 with a 7B-shaped model
# (benchmarks/results/lora_vs_bnb_h200.md: bnb 4.35 / 12.97 GiB; vllm_routes_h200.log: fp8 1.09 / 1.78 GiB);
# int8/fp8 keep embeddings and norms in bf16, about half.
SERVE_FRACTION = {QuantMethod.none: 1.0, QuantMethod.int8: 0.55, QuantMethod.fp8: 0.55,
                  QuantMethod.bnb: 0.33}


# Below this, a "not trained in 4-bit" verdict does not justify skipping the merge.
MIN_CONFIDENCE = 0.5


class Route(str, Enum):
    serve_base = "serve-base"
    serve_lora = "serve-lora"
    merge_then_serve = "merge-then-serve"
    stop = "stop"

    @property
    def needs_engine(self) -> bool:
        return self is not Route.stop


@dataclass(frozen=True)
class EngineSettings:
    """What `emq.engine.load` hands to vllm.LLM (besides the model path)."""

    quantization: str | None  # vLLM's quantization= value
    dtype: str
    memory_utilization: float  # gpu_memory_utilization (on the CPU build: share of NUMA node memory)
    max_model_len: int
    enforce_eager: bool
    enable_lora: bool
    max_lora_rank: int | None
    max_num_seqs: int | None = None
    tensor_parallel_size: int = 1
    enable_chunked_prefill: bool | None = None  # None: vLLM's default
    extra: dict = field(default_factory=dict)  # memory.engine_extra, validated against EngineArgs


@dataclass(frozen=True)
class Plan:
    """The plan stage's record: a route and the reason for every choice."""

    route: Route
    quant: QuantMethod  # resolved (never auto)
    merge_devices: list[str]  # the run-time cascade, in order ("cuda", "cpu")
    merge_method: str | None
    fallback: Route | None  # what to do if every merge attempt fails (None: stop)
    engine: EngineSettings
    estimates_gib: dict[str, float]
    reasons: list[str]
    platform: str
    vllm: str | None
    stop_reason: str | None = None
    quant_requested: str | None = None  # the quant group's choice
    quant_substitution: str | None = None  # e.g. "bnb → int8", when quant.substitute replaced it


# vLLM's CPU shorthand int8_per_channel_weight_only declares `moe=` only: dense linear layers stay unquantized.
CPU_INT8_CAVEAT = (
    "quant: CAVEAT — vLLM CPU's int8_per_channel_weight_only quantizes MoE expert weights only; a dense model's "
    "linear layers stay bf16 (measured on the demo: the same 0.25 GiB of weights and bitwise-identical fidelity "
    "logprobs as quant=none memory.dtype=bfloat16), so on a dense model it saves no memory and its fidelity "
    "numbers are those of bf16 serving")


def resolve_quant(quant: QuantConfig, memory: MemoryConfig, machine: Machine,
                   reasons: list[str]) -> QuantMethod:
    info = machine.vllm
    if info.distribution is None:
        raise EmqError("vLLM is not installed in this environment", "run `bash scripts/setup.sh`")
    want = quant.method
    if not memory.use_quantization and want is not QuantMethod.none:
        reasons.append(f"quant: none, because memory.use_quantization=false (quant={want.value} ignored)")
        return QuantMethod.none
    low_vram = machine.cuda and max(g.free_bytes for g in machine.gpus) < memory.low_vram_gib * GIB
    if memory.skip_quantization_on_low_vram and low_vram and want is not QuantMethod.none:
        reasons.append(f"quant: none, because memory.skip_quantization_on_low_vram=true and the GPU has "
                       f"< {memory.low_vram_gib:g} GiB free")
        return QuantMethod.none
    if want is QuantMethod.auto:
        for choice in (QuantMethod.bnb, QuantMethod.int8, QuantMethod.fp8):
            if choice in info.quant:
                reasons.append(f"quant: auto → {choice.value} ({info.quant[choice]}), the leanest in-flight "
                               f"option {info.distribution} {info.version} supports on {info.platform}")
                return choice
        reasons.append(f"quant: auto → none: {info.distribution} {info.version} offers no in-flight quantization here")
        return QuantMethod.none
    if want not in info.quant and quant.substitute:
        for choice in (QuantMethod.bnb, QuantMethod.int8, QuantMethod.fp8):
            if choice in info.quant:
                reasons.append(f"quant: SUBSTITUTED {want.value} → {choice.value} ({info.quant[choice]}): {want.value} "
                               f"cannot run here ({info.unsupported.get(want, 'not supported')}); quant.substitute=true")
                return choice
    if want not in info.quant:
        usable = ", ".join(f"quant={m.value}" for m in info.quant) + ", quant=auto"
        raise EmqError(f"quant={want.value} cannot run here: {info.unsupported.get(want, 'not supported')}",
                       f"choose one this machine supports ({usable}); for bitsandbytes use a CUDA machine "
                       "with vllm>=0.23,<0.28 (scripts/setup.sh installs it there)")
    reasons.append(f"quant: {want.value} → vLLM quantization={info.quant[want]!r}")
    return want


def _prequantized_base(det: DetectResult, memory: MemoryConfig, machine: Machine, reasons: list[str]) -> QuantMethod:
    """A bitsandbytes 4-bit base (e.g. unsloth/...-bnb-4bit): vLLM serves it (and a LoRA on it) only
    through its bitsandbytes loader; emq's merge needs the 16-bit weights."""
    info = machine.vllm
    base = det.base.ref
    sixteen = re.sub(r"(-unsloth)?-bnb-4bit$", "", base)
    hint = (f"model.base={sixteen} (its 16-bit original: emq merges the adapter onto dequant(NF4(W)), the "
            "weights it was trained on)" if sixteen != base else "the base's 16-bit original as model.base")
    if QuantMethod.bnb not in info.quant:
        raise EmqError(f"the base {base} is a pre-quantized bitsandbytes 4-bit checkpoint (quantization_config in "
                       f"its config.json); serving it needs vLLM's bitsandbytes loader, which {info.distribution} "
                       f"{info.version} on {info.platform} does not have",
                       f"use {hint}, or run on a CUDA machine with vllm>=0.23,<0.28 (scripts/setup.sh installs it)")
    if det.adapter is not None and memory.route is RoutePolicy.merge:
        raise EmqError(f"memory.route=merge, but the base {base} is pre-quantized (4-bit): emq merges into "
                       "16-bit weights", f"use {hint}, or memory.route=auto to serve the LoRA on the 4-bit base")
    reasons.append(f"quant: bnb, because the base {base} is already a bitsandbytes 4-bit checkpoint (vLLM "
                   f"quantization={info.quant[QuantMethod.bnb]!r}); the quant choice does not apply")
    return QuantMethod.bnb


def weights_missing(det: DetectResult, route: Route, *, fidelity: bool) -> bool:
    """Whether the route needs weight files detect did not fetch (hub ids: detect reads metadata only)."""
    merge_lacks = route is Route.merge_then_serve and not (det.base.weights_local and det.adapter.weight_file)
    lora_lacks = route is Route.serve_lora and det.adapter.weight_file is None
    return merge_lacks or lora_lacks or (fidelity and not det.base.weights_local)


def _lora_rank(det: DetectResult) -> int:
    assert det.adapter is not None
    top = max([det.adapter.rank, *det.adapter.rank_pattern.values()])
    for r in VLLM_LORA_RANKS:
        if r >= top:
            return r
    raise EmqError(f"adapter rank {top} ({det.adapter.path}/adapter_config.json) exceeds vLLM's maximum "
                   f"LoRA rank {VLLM_LORA_RANKS[-1]}", "merge it instead: memory.route=merge")


def make_plan(det: DetectResult, memory: MemoryConfig, quant: QuantConfig, machine: Machine) -> Plan:
    """Choose a route, quantization and engine settings, with a reason for each.

    Args:
        det: the detect record.
        memory: the memory policy.
        quant: the quant choice.
        machine: a snapshot of this machine (inject one in tests).

    Returns:
        The plan. A `stop` route carries `stop_reason`; the runner raises it.

    Raises:
        EmqError: a choice that cannot work on this machine (e.g. quant=bnb on the CPU build).
    """
    reasons: list[str] = []
    qm = resolve_quant(quant, memory, machine, reasons)
    if qm is QuantMethod.int8 and machine.vllm.platform == "cpu":
        reasons.append(CPU_INT8_CAVEAT)
    prequantized = is_bnb_4bit(det.base.quantization_config)
    if prequantized:
        qm = _prequantized_base(det, memory, machine, reasons)
    platform = machine.vllm.platform
    params = det.base.param_count or 0
    bf16 = params * 2
    est = {
        "base_bf16": bf16 / GIB,
        "serve_weights": bf16 * SERVE_FRACTION[qm] / GIB,
        **merge_peaks(det, memory.merge_method, machine.cpu_count),
        "merged_disk": bf16 / GIB,
        **{f"serve_weights_{q.value}": bf16 * f / GIB for q, f in SERVE_FRACTION.items()},
    }
    b = det.base
    if b.num_layers and b.num_kv_heads and b.head_dim:
        kv_per_token = 2 * b.num_layers * b.num_kv_heads * b.head_dim * 2  # K and V, bf16
        est["kv_per_sequence"] = kv_per_token * memory.max_model_len / GIB
    if not params:
        reasons.append("memory estimates unavailable: no safetensors headers or index total_size for the base")
    elif not det.base.weights_local:
        reasons.append("memory estimates from the hub index's total_size (weights not downloaded yet)")

    # --- route -----------------------------------------------------------------------
    merge_devices: list[str] = []
    fallback: Route | None = None
    stop_reason: str | None = None
    if det.adapter is None:
        route = Route.serve_base
        reasons.append("route: serve-base, because the model config has no adapter")
    else:
        blockers = det.adapter.vllm_lora_blockers
        policy = memory.route
        if prequantized:
            if blockers:
                raise EmqError(f"the base {det.base.ref} is pre-quantized (4-bit), so emq cannot merge, and vLLM "
                               f"cannot serve this LoRA: {'; '.join(blockers)}",
                               "use the base's 16-bit original as model.base")
            route = Route.serve_lora
            reasons.append("route: serve-lora, because the base is a pre-quantized 4-bit checkpoint (emq merges "
                           "into 16-bit weights only); vLLM applies the LoRA on the 4-bit base")
        elif policy is RoutePolicy.lora:
            if blockers:
                raise EmqError(f"memory.route=lora but {'; '.join(blockers)}", "use memory.route=merge or auto")
            route = Route.serve_lora
            reasons.append("route: serve-lora, because memory.route=lora")
        elif policy is RoutePolicy.merge:
            route = Route.merge_then_serve
            reasons.append("route: merge-then-serve, because memory.route=merge")
        elif det.trained_in_4bit is False and det.confidence >= MIN_CONFIDENCE and not blockers:
            route = Route.serve_lora
            reasons.append(f"route: serve-lora, because the adapter was trained on a 16-bit base "
                           f"({det.decided_by}): vLLM applies it to the base it was trained on, with no merge "
                           "time or disk")
        else:
            route = Route.merge_then_serve
            why = ("the adapter was trained on a 4-bit base" if det.trained_in_4bit
                   else "; ".join(blockers) if blockers
                   else f"16-bit training is only weakly evidenced (confidence {det.confidence:.2f} < "
                        f"{MIN_CONFIDENCE}; a merge is exact either way)")
            reasons.append(f"route: merge-then-serve, because {why} ({det.decided_by or 'no evidence'}); a merged "
                           "checkpoint served 1.23x the tokens/s of the same adapter as a LoRA on the bf16 base, 1.16x with bnb (H200, 7B-shaped, "
                           "benchmarks/results/lora_vs_bnb_h200.md)")
        if route is Route.merge_then_serve:
            gpu_free = max((g.free_bytes for g in machine.gpus), default=0) / GIB
            ram = machine.ram_available_bytes / GIB
            if machine.cuda and not memory.prefer_cpu_merge:
                if gpu_free >= est["merge_peak_gpu_vram"]:
                    merge_devices.append("cuda")
                    reasons.append(f"merge on cuda: needs ~{est['merge_peak_gpu_vram']:.1f} GiB VRAM, "
                                   f"{gpu_free:.1f} GiB free")
                else:
                    reasons.append(f"no GPU merge: needs ~{est['merge_peak_gpu_vram']:.1f} GiB VRAM, only "
                                   f"{gpu_free:.1f} GiB free")
            if memory.allow_cpu_merge:
                if ram >= est["merge_peak_cpu_ram"]:
                    merge_devices.append("cpu")
                    reasons.append(f"merge on cpu{' (after an OOM on cuda)' if merge_devices[0] == 'cuda' else ''}: "
                                   f"needs ~{est['merge_peak_cpu_ram']:.2f} GiB RAM, {ram:.1f} GiB available")
                else:
                    reasons.append(f"no CPU merge: needs ~{est['merge_peak_cpu_ram']:.1f} GiB RAM, only "
                                   f"{ram:.1f} GiB available")
            else:
                reasons.append("no CPU merge: memory.allow_cpu_merge=false")
            if memory.stop_on_failure:
                fallback = None
            elif blockers:
                reasons.append(f"no LoRA fallback: {'; '.join(blockers)}")
            else:
                fallback = Route.serve_lora
                reasons.append("if every merge attempt fails: serve the LoRA instead (memory.stop_on_failure=false)")
            if not merge_devices:
                if fallback is Route.serve_lora:
                    route = Route.serve_lora
                    reasons.append("route: serve-lora, because no device can merge here")
                else:
                    route = Route.stop
                    stop_reason = (f"cannot merge: GPU merge needs ~{est['merge_peak_gpu_vram']:.1f} GiB VRAM "
                                   f"({gpu_free:.1f} free), CPU merge ~{est['merge_peak_cpu_ram']:.1f} GiB RAM "
                                   f"({ram:.1f} available); set memory.stop_on_failure=false to serve the LoRA, "
                                   "or free memory")
            elif machine.disk_free_bytes < est["merged_disk"] * GIB:
                route = Route.stop
                stop_reason = (f"the merged checkpoint needs ~{est['merged_disk']:.1f} GiB at paths.cache_dir, "
                               f"only {machine.disk_free_bytes / GIB:.1f} GiB free; free disk or move EMQ_CACHE")

    # --- engine --------------------------------------------------------------------------
    chunked: bool | None = None
    if platform == "cpu":
        util = memory.cpu_memory_utilization
        eager = True
        reasons.append(f"engine: vLLM CPU build, memory share {util} (memory.cpu_memory_utilization), "
                       "eager mode (its compiled path produced wrong tokens on the demo model and costs ~60 s)")
        chunked = False
        reasons.append("engine: chunked prefill off — vLLM's CPU build crashes ('CPU Generator does not use "
                       "offset') when a prompt with a per-request seed is prefilled in pieces; emq keeps "
                       "per-prompt seeds so answers are reproducible and resumable")
    else:
        util = memory.gpu_memory_utilization
        eager = memory.enforce_eager
    dtype = memory.dtype
    if dtype == "auto":
        dtype = "bfloat16"
        if platform == "cpu" and not machine.cpu_bf16:
            if qm is QuantMethod.none:
                dtype = "float32"
                reasons.append("engine: dtype float32 — this CPU has no native bf16 (no avx512_bf16/amx_bf16), "
                               "where vLLM emulates bf16 about 6x slower (measured on the demo: 11 vs 73 tok/s); "
                               "the bf16 weights are upcast exactly")
            else:
                reasons.append(f"engine: dtype bfloat16 — vLLM's {qm.value} kernels take bf16/fp16 activations only; "
                               "this CPU has no native bf16, so it runs ~4-6x slower than float32 with quant=none "
                               "(measured on the demo: 12 vs 73 tok/s)")
    if dtype == "float32" and qm is QuantMethod.none:
        est["serve_weights"] *= 2
    tp = memory.tensor_parallel_size
    if tp > 1 and (platform != "cuda" or tp > len(machine.gpus)):
        raise EmqError(f"memory.tensor_parallel_size={tp} needs {tp} GPUs; this machine has {len(machine.gpus)}",
                       "lower memory.tensor_parallel_size or run on a machine with more GPUs")
    if platform == "cuda":
        # vLLM takes gpu_memory_utilization x total on each of the first tp GPUs and refuses to start
        # when another process holds that much: plan from the tightest of them
        per_gpu = min(min(g.total_bytes * util, g.free_bytes) for g in machine.gpus[:tp])
        pool = per_gpu * tp / GIB
        short = [g for g in machine.gpus[:tp] if g.free_bytes < g.total_bytes * util]
        if short:
            g = min(short, key=lambda g: g.free_bytes)
            raise EmqError(f"GPU {g.index} has {g.free_bytes / GIB:.1f} GiB free of {g.total_bytes / GIB:.1f}, but "
                           f"memory.gpu_memory_utilization={util} makes vLLM claim {g.total_bytes * util / GIB:.1f} GiB "
                           "there (it refuses to start otherwise)",
                           f"set memory.gpu_memory_utilization={int(g.free_bytes / g.total_bytes * 100) / 100:.2f} "
                           "or stop what holds the GPU (nvidia-smi lists it)")
    else:
        pool = machine.ram_total_bytes / GIB * util
    if params and route is not Route.stop and platform in ("cuda", "cpu"):
        est["engine_pool"] = pool
        est["kv_headroom"] = pool - est["serve_weights"]
        where = "memory.gpu_memory_utilization" if platform == "cuda" else "memory.cpu_memory_utilization"
        need_kv = est.get("kv_per_sequence", 0.0)
        if est["kv_headroom"] <= need_kv:
            route = Route.stop
            lighter = [q.value for q in (QuantMethod.bnb, QuantMethod.int8, QuantMethod.fp8)
                       if q in machine.vllm.quant and est[f"serve_weights_{q.value}"] + need_kv < pool]
            per_gpu = pool / tp
            more = [n for n in (2, 4, 8) if tp < n <= len(machine.gpus) and per_gpu * n > est["serve_weights"] + need_kv]
            stop_reason = (f"serving needs ~{est['serve_weights']:.1f} GiB of weights + {need_kv:.2f} GiB KV cache "
                           f"for one {memory.max_model_len}-token sequence, but vLLM may use {pool:.1f} GiB "
                           f"({where}={util}); " + (f"quantize (quant={' or quant='.join(lighter)}), " if lighter else "")
                           + (f"spread it over GPUs (memory.tensor_parallel_size={more[0]}), " if more else "")
                           + f"raise {where} or lower memory.max_model_len")
        else:
            reasons.append(f"serving: ~{est['serve_weights']:.2f} GiB weights in a {pool:.1f} GiB pool leaves "
                           f"{est['kv_headroom']:.2f} GiB for the KV cache"
                           + (f" (~{est['kv_headroom'] / need_kv:.0f} full-length sequences)" if need_kv else ""))
    if route is Route.stop:
        reasons.append(f"route: stop, because {stop_reason}")
    lora = route is Route.serve_lora or fallback is Route.serve_lora
    engine = EngineSettings(
        quantization=machine.vllm.quant.get(qm), dtype=dtype, memory_utilization=util,
        max_model_len=memory.max_model_len, enforce_eager=eager,
        enable_lora=lora, max_lora_rank=_lora_rank(det) if lora else None,
        max_num_seqs=memory.max_num_seqs, tensor_parallel_size=memory.tensor_parallel_size,
        enable_chunked_prefill=chunked, extra=dict(memory.engine_extra),
    )
    plan = Plan(route=route, quant=qm, merge_devices=merge_devices,
                merge_method=memory.merge_method.value if merge_devices else None, fallback=fallback, engine=engine,
                estimates_gib={k: round(v, 3) for k, v in est.items()}, reasons=reasons,
                platform=platform, vllm=f"{machine.vllm.distribution} {machine.vllm.version}",
                stop_reason=stop_reason, quant_requested=quant.method.value,
                quant_substitution=(f"{quant.method.value} → {qm.value}" if any("SUBSTITUTED" in r for r in reasons)
                                    else None))
    log.info("plan: %s, quant=%s%s", route.value, qm.value,
             f", merge on {' → '.join(merge_devices)}" if merge_devices else "")
    return plan
