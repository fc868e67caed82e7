"""plan: what will we do with this model on this machine, and why?

A pure function of (detect record, memory policy, quant choice, machine snapshot): no weights
are loaded, so a plan can be printed as a dry run before anything expensive starts.

`make_plan` takes the decisions below in order, each appending its reasons: the quantization
(`choose_quant`), the estimates, the route (`choose_route`) and, for a merge, where it runs and what
it falls back to (`merge_cascade`), CUDA graphs or eager mode (`choose_eager`, from the eval's token budget), the engine
mode, the engine's memory pool, and whether the weights and KV cache fit in it (`fit_check`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from emq.checkpoint.costs import layerwise_peaks, layerwise_seconds, merge_disk_bytes, merge_peaks, w4a16_bytes
from emq.checkpoint.layout import choose_group_size
from emq.checkpoint.nf4 import nf4_settings
from emq.detect import DetectResult, is_bnb_4bit
from emq.errors import EmqError
from emq.machine import GIB, INFLIGHT_NF4, Machine, VllmInfo
from emq.schema import MemoryConfig, MergeMethod, QuantAlgorithm, QuantConfig, QuantMethod, RoutePolicy

log = logging.getLogger(__name__)

# vLLM accepts these max_lora_rank values.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Serving weights relative to bf16, measured on an H200 with a 7B-shaped model
# (benchmarks/results/lora_vs_bnb_h200.md: bnb 4.35 / 12.97 GiB; vllm_routes_h200.log: fp8 1.09 / 1.78 GiB;
# W4A16 g128 3.52 / 11.31 GiB); int8/fp8 keep embeddings and norms in bf16, about half. A w4a16 plan computes
# its own figure from the model's Linear parameters and group size (costs.w4a16_bytes).
SERVE_FRACTION = {QuantMethod.none: 1.0, QuantMethod.int8: 0.55, QuantMethod.fp8: 0.55,
                  QuantMethod.bnb: 0.33, QuantMethod.w4a16: 0.31}


# Below this, a "not trained in 4-bit" verdict does not justify skipping the merge.
MIN_CONFIDENCE = 0.5
# Quantizations, leanest served weights first (SERVE_FRACTION): quant=auto, quant.substitute and a stop reason's
# advice all pick from this one order. w4a16 comes first on every vLLM: leanest, faster than bnb (H200, 7B-shaped:
# 16.8k vs 13.9k tok/s at 264 sequences, 2.1k vs 0.7k at 8) and, on a QLoRA merge, it keeps the fine-tune that
# bnb's NF4 re-quantization rounds away (the demo: merged + bnb is as far from the trained function as the base).
LEANEST_FIRST = (QuantMethod.w4a16, QuantMethod.bnb, QuantMethod.int8, QuantMethod.fp8)
# Why quant=auto takes w4a16 (plan reasons cite the numbers).
W4A16_WHY = ("offline int4 weights with group-wise scales (compressed-tensors), served natively by every vLLM; "
             "measured through emq on an H200 (7B-shaped, 8 KV heads) at 1.21x merged + bnb's tokens/s at 270 "
             "sequences and 2.7x at 18 with 0.95x its weights (3.60 vs 3.77 GiB), and on the demo's QLoRA merge it "
             "keeps 50% (RTN g64) to 86% "
             "(GPTQ g32) of the fine-tune where merged + bnb keeps 7% (benchmarks/results/h200/w4a16_h200.md)")

# CUDA graphs or eager mode (`choose_eager`): what graphs cost at start and save in generation. Measured on an H200
# with vLLM 0.23 and a 7B-shaped Llama (H 4096, 32 layers); vLLM's enforce_eager turns off torch.compile and CUDA
# graphs together, so "graphs" below means both.
# Generation with graphs, a full batch: emq evaluate, 270 sequences x 256 tokens, merged bf16, 14.6k tok/s
# (benchmarks/results/eval_bench_7b_h200_none.log; lora_vs_bnb_h200.md: 14.76k).
GRAPHS_BATCH_TOK_S = 14_600.0
# ... and a few sequences, per sequence: 18 sequences x 256 tokens at 3,608 tok/s, w4a16 merged
# (benchmarks/results/h200/serve_7b.json; serve_7b_weights.json: 3,593), i.e. ~200 tok/s each.
GRAPHS_SEQ_TOK_S = 200.0
# The parameter count those ran on (Llama-2-7B's shape). A larger model's tokens/s scale down by its parameters
# (issue 16: a 14B-shaped model generated 264 x 256 tokens in ~10 s, ~6.8k tok/s, against 7.0k scaled); a smaller
# one is not taken to be faster (small models are launch-bound, which graphs help most).
GRAPHS_REF_PARAMS = 6.74e9
# Eager generation is this much slower, by route (benchmarks/results/h200/time_to_answer_h200.md, side by side):
# a LoRA (vLLM's punica kernels, launch-bound) 2.75x — 7B-shaped, 4 LoRAs on a W4A16 base, 11,434 vs 4,154 tok/s;
# a merged dense checkpoint 1.12x — 14B-shaped merged bf16 at 270 sequences, 13,306 vs 11,859 tok/s.
GRAPHS_SPEEDUP_LORA = 2.75
GRAPHS_SPEEDUP_MERGED = 1.12
# torch.compile on a cold compile cache: the merged 14B's engine start took 88.5 s cold vs 53.6 s from the
# compile cache (35 s); the 7B multi-LoRA's cold start took 56.5 s longer with graphs than eager (compile +
# capture: 44.5 s after the capture below) — 40 s is taken (time_to_answer_h200.md).
GRAPHS_COMPILE_S = 40.0
# CUDA graph capture, paid at every start: the merged 14B's warm-cache start with graphs took 53.6 s vs 41.6 s
# eager (12 s; vLLM captured 2 x 51 graphs).
GRAPHS_CAPTURE_S = 12.0
# vLLM's default max_num_seqs (the sequences decoded at once when memory.max_num_seqs is null).
VLLM_DEFAULT_MAX_NUM_SEQS = 256


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
    max_loras: int = 1  # LoRAs one batch may hold (model.adapters: one per adapter, up to MAX_LORAS)
    tensor_parallel_size: int = 1
    enable_chunked_prefill: bool | None = None  # None: vLLM's default
    extra: dict = field(default_factory=dict)  # memory.engine_extra, validated against EngineArgs
    env: dict = field(default_factory=dict)  # environment vLLM's processes start with (set by the engine, recorded)


@dataclass(frozen=True)
class TokenBudget:
    """What the eval will generate: sequences × max_tokens (an upper bound: answers may stop early)."""

    sequences: int
    max_tokens: int

    @classmethod
    def of(cls, prompts: Iterable[dict], max_tokens: int) -> TokenBudget:
        """The budget of `emq.evaluate.build_prompts`' prompts (each asks for `n` samples)."""
        return cls(sum(int(p["n"]) for p in prompts), max_tokens)


@dataclass(frozen=True)
class GraphsEstimate:
    """Seconds with CUDA graphs vs eager for a token budget (GRAPHS_* constants: H200, 7B-shaped, vLLM 0.23)."""

    sequences: int
    max_tokens: int
    tokens: int  # sequences × max_tokens
    concurrent: int  # sequences decoded at once (memory.max_num_seqs, or vLLM's default)
    generate_graphs_s: float
    generate_eager_s: float
    compile_s: float  # torch.compile: 0 when the compile cache already holds entries
    capture_s: float  # CUDA graph capture
    compile_cache_entries: int | None  # entries in VLLM_CACHE_ROOT/torch_compile_cache (None: no cache path given)
    graphs_save_s: float  # eager generation - (graphs generation + compile + capture); > 0: graphs win
    speedup: float = GRAPHS_SPEEDUP_MERGED  # eager / graphs generation seconds for this route


@dataclass(frozen=True)
class EagerChoice:
    """CUDA graphs or eager mode, who decided and why (plan.json `eager`)."""

    enforce_eager: bool
    decided_by: str  # "memory.enforce_eager" | "estimate" | "cpu build" | "no budget"
    reason: str  # the plan reason line (also in Plan.reasons)
    estimate: GraphsEstimate | None = None


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
    quantize: QuantizePlan | None = None  # w4a16: how the served checkpoint is made
    eager: EagerChoice | None = None  # CUDA graphs or eager mode: the estimate and the choice
    adapters: AdaptersPlan | None = None  # model.adapters: several adapters of this base in this one engine
    bnb: dict | None = None  # quant=bnb: the provider vLLM serves it through, the served vs trained NF4 settings


@dataclass(frozen=True)
class AdaptersPlan:
    """model.adapters: which adapters share the one engine, and why one engine is possible."""

    names: list[str]  # in order; each adapter's record is <run dir>/adapters/<name>/
    paths: dict[str, str]  # name → adapter
    ranks: dict[str, int]  # name → its largest LoRA rank (max_lora_rank is the largest of these, rounded up)
    trained_in_4bit: dict[str, bool | None]  # name → detect's verdict
    max_loras: int  # LoRA slots in one batch


@dataclass(frozen=True)
class QuantizePlan:
    """How a w4a16 checkpoint is made: the algorithm, the int4 layout and where it runs."""

    algorithm: str  # rtn | gptq | awq
    group_size: int
    symmetric: bool
    ignore: list[str]  # Linear modules kept in 16 bits (lm_head always)
    fused: bool  # rtn inside the stream pass that merges (or copies the base): one pass, no bf16 copy written
    source: str  # what is quantized: "merged" (the adapter merged first) or "base" (the LoRA is served on it)
    devices: list[str]  # calibrated: the cascade; fused: the merge's devices
    calibration: dict | None = None  # gptq/awq: corpus, samples, seq_len, damp

    def describe(self) -> str:
        return f"w4a16 ({self.algorithm}, g{self.group_size}, {'sym' if self.symmetric else 'asym'})"


# vLLM's CPU shorthand int8_per_channel_weight_only declares `moe=` only: dense linear layers stay unquantized
# (a dense model is refused at plan time; an MoE model gets this note).
CPU_INT8_CAVEAT = (
    "quant: CAVEAT — vLLM CPU's int8_per_channel_weight_only quantizes MoE expert weights only; the attention and "
    "other dense linear layers stay bf16, so the weights figure and fidelity are those of a partly quantized model")


@dataclass(frozen=True)
class QuantChoice:
    """What the served weights are quantized to, and what that replaced (if anything)."""

    method: QuantMethod  # resolved (never auto)
    substitution: str | None = None  # e.g. "bnb → int8", when quant.substitute replaced the choice


@dataclass(frozen=True)
class Routing:
    """The route and the merge cascade behind it."""

    route: Route
    merge_devices: list[str] = field(default_factory=list)  # the run-time cascade, in order
    fallback: Route | None = None  # what to do if every merge attempt fails (None: stop)
    stop_reason: str | None = None


@dataclass(frozen=True)
class EngineMode:
    """How vLLM runs on this platform: the EngineSettings that do not depend on the route."""

    dtype: str
    memory_utilization: float
    enforce_eager: bool
    enable_chunked_prefill: bool | None  # None: vLLM's default


# --- quantization ------------------------------------------------------------------------

def leanest_quant(info: VllmInfo, moe: bool = False) -> QuantMethod | None:
    """The first of LEANEST_FIRST that the installed vLLM offers for this model, or None (the CPU build's int8
    counts only for MoE models: it quantizes nothing else)."""
    return next((q for q in LEANEST_FIRST if q in info.quant and not _cpu_int8_noop(q, info, moe)), None)


def _cpu_int8_noop(q: QuantMethod, info: VllmInfo, moe: bool) -> bool:
    return q is QuantMethod.int8 and info.platform == "cpu" and not moe


def resolve_quant(quant: QuantConfig, memory: MemoryConfig, machine: Machine,
                  reasons: list[str], *, moe: bool = False) -> QuantChoice:
    """Resolve the quant group's choice against the memory policy and the installed vLLM.

    Args:
        quant: the quant choice (`auto`, or a method; `substitute` allows a replacement).
        memory: the memory policy (use_quantization, skip_quantization_on_low_vram).
        machine: a snapshot of this machine.
        reasons: the plan's reasons; the one for this choice is appended.
        moe: the model has mixture-of-experts layers (the CPU build's int8 quantizes only those).

    Returns:
        The method to serve with (never auto) and, when quant.substitute replaced the choice, the substitution.

    Raises:
        EmqError: vLLM is not installed, or the chosen method cannot run here and may not be substituted, or
            quant=int8 on the CPU build for a dense model (it would quantize nothing).
    """
    info = machine.vllm
    if info.distribution is None:
        raise EmqError("vLLM is not installed in this environment", "run `bash scripts/setup.sh`")
    want = quant.method
    if not memory.use_quantization and want is not QuantMethod.none:
        reasons.append(f"quant: none, because memory.use_quantization=false (quant={want.value} ignored)")
        return QuantChoice(QuantMethod.none)
    low_vram = machine.cuda and max(g.free_bytes for g in machine.gpus) < memory.low_vram_gib * GIB
    if memory.skip_quantization_on_low_vram and low_vram and want is not QuantMethod.none:
        reasons.append(f"quant: none, because memory.skip_quantization_on_low_vram=true and the GPU has "
                       f"< {memory.low_vram_gib:g} GiB free")
        return QuantChoice(QuantMethod.none)
    leanest = leanest_quant(info, moe)
    if want is QuantMethod.auto:
        if leanest is None:
            reasons.append(f"quant: auto → none: {info.distribution} {info.version} offers no quantization here")
            return QuantChoice(QuantMethod.none)
        why = W4A16_WHY if leanest is QuantMethod.w4a16 else f"vLLM quantization={info.quant[leanest]!r}"
        if leanest is not QuantMethod.w4a16 and QuantMethod.w4a16 in info.unsupported:
            why += f" (not w4a16: {info.unsupported[QuantMethod.w4a16]})"
        reasons.append(f"quant: auto → {leanest.value}, the leanest option {info.distribution} {info.version} "
                       f"supports on {info.platform}: {why}")
        return QuantChoice(leanest)
    if _cpu_int8_noop(want, info, moe):
        raise EmqError("quant=int8 on vLLM's CPU build quantizes mixture-of-experts weights only "
                       "(int8_per_channel_weight_only); this model is dense, so it would serve bf16 and save nothing "
                       "(measured on the demo: the same 0.25 GiB and bitwise-identical logprobs as bf16)",
                       "quant=w4a16 (int4 weights the CPU build serves with its CPUWNA16 kernel), or quant=none")
    if want not in info.quant and quant.substitute and leanest is not None:
        reasons.append(f"quant: SUBSTITUTED {want.value} → {leanest.value} ({info.quant[leanest]}): {want.value} "
                       f"cannot run here ({info.unsupported.get(want, 'not supported')}); quant.substitute=true")
        return QuantChoice(leanest, substitution=f"{want.value} → {leanest.value}")
    if want not in info.quant:
        usable = ", ".join(f"quant={m.value}" for m in info.quant) + ", quant=auto"
        fix = info.fixes.get(want)
        raise EmqError(f"quant={want.value} cannot run here: {info.unsupported.get(want, 'not supported')}",
                       (f"{fix}; or choose one this machine supports ({usable})" if fix
                        else f"choose one this machine supports ({usable})"))
    reasons.append(f"quant: {want.value} → vLLM quantization={info.quant[want]!r}")
    return QuantChoice(want)


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
                       f"{info.version} on {info.platform} does not have ({info.unsupported.get(QuantMethod.bnb)})",
                       f"{info.fixes.get(QuantMethod.bnb, 'install a bitsandbytes provider for vLLM')}; or use {hint}")
    if det.adapter is not None and memory.route is RoutePolicy.merge:
        raise EmqError(f"memory.route=merge, but the base {base} is pre-quantized (4-bit): emq merges into "
                       "16-bit weights", f"use {hint}, or memory.route=auto to serve the LoRA on the 4-bit base")
    reasons.append(f"quant: bnb, because the base {base} is already a bitsandbytes 4-bit checkpoint (vLLM "
                   f"quantization={info.quant[QuantMethod.bnb]!r}); the quant choice does not apply")
    return QuantMethod.bnb


def choose_quant(det: DetectResult, memory: MemoryConfig, quant: QuantConfig, machine: Machine,
                 reasons: list[str], *, prequantized: bool) -> QuantChoice:
    """The served quantization: the quant group's choice (`resolve_quant`), unless the base already is 4-bit.

    Args:
        det: the detect record.
        memory: the memory policy.
        quant: the quant choice.
        machine: a snapshot of this machine.
        reasons: the plan's reasons, appended to.
        prequantized: the base is a bitsandbytes 4-bit checkpoint.

    Returns:
        The method to serve with and the substitution, if quant.substitute made one.

    Raises:
        EmqError: see `resolve_quant`; or a pre-quantized base this vLLM cannot serve, or memory.route=merge on one.
    """
    if int4_weights_only(det.base.quantization_config) and QuantMethod.w4a16 not in machine.vllm.quant:
        raise EmqError(f"the base {det.base.ref} is an int4 weights-only checkpoint (its quantization_config), which "
                       f"needs a W4A16 kernel: {machine.vllm.unsupported.get(QuantMethod.w4a16)}",
                       machine.vllm.fixes.get(QuantMethod.w4a16, "use the base's 16-bit original as model.base"))
    choice = resolve_quant(quant, memory, machine, reasons, moe=det.base.moe)
    if choice.method is QuantMethod.int8 and machine.vllm.platform == "cpu":
        reasons.append(CPU_INT8_CAVEAT)
    if prequantized:
        return replace(choice, method=_prequantized_base(det, memory, machine, reasons))
    return choice


# --- bitsandbytes --------------------------------------------------------------------------

# Measured on the demo on vLLM's CPU build with vllm-bnb-plugin (benchmarks/results/lora_vs_bnb_demo_cpu.md).
BNB_CPU_SLOW = ("bitsandbytes on vLLM's CPU build dequantizes every NF4 weight on every forward, so it is the slowest "
                "route there: on the demo, 2 cores, LoRA on in-flight bnb 5.5 tok/s, merged + bnb 12.6, merged 16-bit "
                "51.4 (AVX2 EPYC, float32); 13.8 / 29.2 / 52.7 on an AVX512-BF16 Xeon "
                "(benchmarks/results/lora_vs_bnb_demo_cpu.md). It serves the trained function of a QLoRA adapter "
                "(LoRA on bnb: KL 0.0011, 100% retained), not speed")


def bnb_served(det: DetectResult, machine: Machine, route: Route, reasons: list[str], *,
               prequantized: bool) -> dict[str, Any]:
    """quant=bnb: which provider serves it, and whether the NF4 it serves is the NF4 the adapter was trained on.

    vLLM quantizes in flight with bitsandbytes' defaults (nf4, blocksize 64, double quant: the plugin's path is
    fixed there and reads no `bnb_4bit_*` settings). A QLoRA adapter trained with other settings is then served on
    a base that differs from the one it saw; the plan says so and the fidelity stage measures by how much.

    Args:
        det: the detect record.
        machine: a snapshot of this machine (its vLLM's bitsandbytes provider).
        route: the planned route.
        reasons: the plan's reasons, appended to.
        prequantized: the base is a bitsandbytes checkpoint (it carries its own settings).

    Returns:
        plan.json's `bnb`: provider, versions, served and trained NF4 settings, and whether they match.
    """
    provider = machine.vllm.bnb
    rec: dict[str, Any] = dict(provider.record()) if provider else {}
    reasons.append(f"bnb: served by {rec.get('provider')} {rec.get('version')} (bitsandbytes {rec.get('bitsandbytes')})")
    if prequantized:
        rec["served_nf4"] = "the checkpoint's own quantization_config"
    else:
        rec["served_nf4"] = dict(INFLIGHT_NF4)
        if det.adapter is not None and det.trained_in_4bit:
            trained = nf4_settings(det)
            rec["trained_nf4"] = trained
            diffs = [f"{k} {trained[k]} (served: {INFLIGHT_NF4[k]})" for k in INFLIGHT_NF4 if trained[k] != INFLIGHT_NF4[k]]
            rec["matches_training"] = not diffs
            if diffs:
                reasons.append(f"WARNING: the adapter was trained on NF4 with {', '.join(diffs)}; vLLM quantizes in "
                               "flight with nf4, blocksize 64, double quant only, so the served function differs from "
                               "the trained one; the fidelity stage measures by how much (KL to the trained function)")
            elif route is Route.serve_lora:
                reasons.append("bnb: the in-flight NF4 (nf4, blocksize 64, double quant) matches the adapter's "
                               "training settings, so the LoRA on it is the trained function")
    if machine.vllm.platform == "cpu":
        reasons.append(f"bnb: {BNB_CPU_SLOW}")
    return rec


# --- estimates -----------------------------------------------------------------------------

def estimates(det: DetectResult, memory: MemoryConfig, qm: QuantMethod, machine: Machine) -> dict[str, float]:
    """Memory and disk needs in GiB, from the base's real bytes (0 where detect found no sizes).

    Args:
        det: the detect record.
        memory: the memory policy (merge_method, max_model_len).
        qm: the served quantization.
        machine: a snapshot of this machine (its CPU count sets the stream merge's parallel parts).

    Returns:
        base_bf16, serve_weights (with qm), merge_peak_cpu_ram, merge_peak_gpu_vram, merged_disk,
        serve_weights_<method> for every method and, where the config gives the shapes, kv_per_sequence.
    """
    bf16 = (det.base.param_count or 0) * 2
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
    return est


def _estimate_basis(det: DetectResult, reasons: list[str]) -> None:
    """Say when the estimates rest on less than the local safetensors headers."""
    if not det.base.param_count:
        reasons.append("memory estimates unavailable: no safetensors headers or index total_size for the base")
    elif not det.base.weights_local:
        reasons.append("memory estimates from the hub index's total_size (weights not downloaded yet)")


# --- route ---------------------------------------------------------------------------------

# merged + in-flight bnb of a QLoRA adapter: NF4 re-quantization of dequant(NF4(W)) + s·B·A rounds the update away
BNB_ERASES = ("merged + in-flight bnb re-quantizes dequant(NF4(W)) + s·B·A to NF4, which rounds a fine-tune's small "
              "update back to the base's codes (the demo good doctor on an H200: merged + bnb keeps 7% of the "
              "fine-tune, KL to the trained function 0.97 vs 1.04 for the base with no adapter, while the LoRA on the "
              "in-flight bnb base keeps 99.8%, KL 0.002; benchmarks/results/qlora_bnb_erasure.md)")


def choose_route(det: DetectResult, memory: MemoryConfig, reasons: list[str], *, prequantized: bool,
                 qm: QuantMethod = QuantMethod.none) -> Route:
    """How the adapter reaches the engine, before asking whether a merge can run here (`merge_cascade`).

    Args:
        det: the detect record.
        memory: the memory policy (route).
        reasons: the plan's reasons, appended to.
        prequantized: the base is a bitsandbytes 4-bit checkpoint (emq cannot merge into it).

    Returns:
        serve-base, serve-lora or merge-then-serve.

    Raises:
        EmqError: vLLM cannot serve this LoRA, and the route cannot be a merge.
    """
    if det.adapter is None:
        reasons.append("route: serve-base, because the model config has no adapter")
        return Route.serve_base
    blockers = det.adapter.vllm_lora_blockers
    if prequantized:
        if blockers:
            raise EmqError(f"the base {det.base.ref} is pre-quantized (4-bit), so emq cannot merge, and vLLM "
                           f"cannot serve this LoRA: {'; '.join(blockers)}",
                           "use the base's 16-bit original as model.base")
        reasons.append("route: serve-lora, because the base is a pre-quantized 4-bit checkpoint (emq merges "
                       "into 16-bit weights only); vLLM applies the LoRA on the 4-bit base")
        return Route.serve_lora
    if memory.route is RoutePolicy.lora:
        if blockers:
            raise EmqError(f"memory.route=lora but {'; '.join(blockers)}", "use memory.route=merge or auto")
        reasons.append("route: serve-lora, because memory.route=lora")
        return Route.serve_lora
    if memory.route is RoutePolicy.merge:
        reasons.append("route: merge-then-serve, because memory.route=merge")
        if qm is QuantMethod.bnb and det.trained_in_4bit:
            reasons.append(f"WARNING: {BNB_ERASES}; the LoRA on the in-flight bnb base (memory.route=auto) serves "
                           "NF4(W) + the adapter, the trained function itself")
        return Route.merge_then_serve
    if qm is QuantMethod.bnb and det.trained_in_4bit and not blockers:
        reasons.append(f"route: serve-lora on the in-flight bnb base, because the adapter was trained on a 4-bit base "
                       f"({det.decided_by}) and {BNB_ERASES}; NF4(W) + the adapter is the trained function itself")
        return Route.serve_lora
    return _auto_route(det, reasons)


def _auto_route(det: DetectResult, reasons: list[str]) -> Route:
    """memory.route=auto: serve the LoRA only when 16-bit training is well evidenced and vLLM can serve it."""
    assert det.adapter is not None
    blockers = det.adapter.vllm_lora_blockers
    if det.trained_in_4bit is False and det.confidence >= MIN_CONFIDENCE and not blockers:
        reasons.append(f"route: serve-lora, because the adapter was trained on a 16-bit base "
                       f"({det.decided_by}): vLLM applies it to the base it was trained on, with no merge "
                       "time or disk")
        return Route.serve_lora
    why = ("the adapter was trained on a 4-bit base" if det.trained_in_4bit
           else "; ".join(blockers) if blockers
           else f"16-bit training is only weakly evidenced (confidence {det.confidence:.2f} < "
                f"{MIN_CONFIDENCE}; a merge is exact either way)")
    reasons.append(f"route: merge-then-serve, because {why} ({det.decided_by or 'no evidence'}); a merged "
                   "checkpoint served 1.23x the tokens/s of the same adapter as a LoRA on the bf16 base, "
                   "1.16x with bnb (H200, 7B-shaped, benchmarks/results/lora_vs_bnb_h200.md)")
    return Route.merge_then_serve


# --- merge cascade -------------------------------------------------------------------------

# Per merge device: its name in "no ... merge", the memory a merge there takes, the word for what is left of
# it, and the digits the need is shown with where it fits (plan.json and reports carry these strings).
_MERGE_WORDS = {"cuda": ("GPU", "VRAM", "free", 1), "cpu": ("CPU", "RAM", "available", 2)}


def _merge_fits(device: str, need: float, have: float, reasons: list[str], note: str = "") -> bool:
    """Whether a merge on `device` fits (need, have in GiB), with the reason either way."""
    label, memory, left, digits = _MERGE_WORDS[device]
    if have >= need:
        reasons.append(f"merge on {device}{note}: needs ~{need:.{digits}f} GiB {memory}, {have:.1f} GiB {left}")
        return True
    reasons.append(f"no {label} merge: needs ~{need:.1f} GiB {memory}, only {have:.1f} GiB {left}")
    return False


def merge_devices(memory: MemoryConfig, machine: Machine, est: dict[str, float], gpu_free: float,
                  ram: float, reasons: list[str]) -> list[str]:
    """The devices a merge may run on, in the order the runner tries them.

    Args:
        memory: the memory policy (prefer_cpu_merge, allow_cpu_merge).
        machine: a snapshot of this machine.
        est: the estimates (merge_peak_gpu_vram, merge_peak_cpu_ram).
        gpu_free: the most VRAM free on one GPU, GiB.
        ram: the RAM available, GiB.
        reasons: the plan's reasons, appended to.

    Returns:
        "cuda" and/or "cpu", or nothing when no device fits.
    """
    devices: list[str] = []
    if (machine.cuda and not memory.prefer_cpu_merge
            and _merge_fits("cuda", est["merge_peak_gpu_vram"], gpu_free, reasons)):
        devices.append("cuda")
    if not memory.allow_cpu_merge:
        reasons.append("no CPU merge: memory.allow_cpu_merge=false")
    elif _merge_fits("cpu", est["merge_peak_cpu_ram"], ram, reasons,
                     note=" (after an OOM on cuda)" if devices else ""):
        devices.append("cpu")
    return devices


def merge_fallback(memory: MemoryConfig, blockers: list[str], reasons: list[str]) -> Route | None:
    """What to serve if every merge attempt fails: the LoRA, when the policy allows it and vLLM can serve it.

    Args:
        memory: the memory policy (stop_on_failure).
        blockers: why vLLM cannot serve this LoRA (empty: it can).
        reasons: the plan's reasons, appended to.

    Returns:
        serve-lora, or None to stop.
    """
    if memory.stop_on_failure:
        return None
    if blockers:
        reasons.append(f"no LoRA fallback: {'; '.join(blockers)}")
        return None
    reasons.append("if every merge attempt fails: serve the LoRA instead (memory.stop_on_failure=false)")
    return Route.serve_lora


def merge_cascade(det: DetectResult, memory: MemoryConfig, machine: Machine, est: dict[str, float],
                  reasons: list[str]) -> Routing:
    """Where a merge-then-serve route merges, what it falls back to, and whether it must stop instead.

    Args:
        det: the detect record (with an adapter).
        memory: the memory policy.
        machine: a snapshot of this machine.
        est: the estimates (merge peaks, merged_disk).
        reasons: the plan's reasons, appended to.

    Returns:
        merge-then-serve with its devices; serve-lora when no device can merge and the LoRA may be served;
        else stop, with the reason.
    """
    assert det.adapter is not None
    gpu_free = max((g.free_bytes for g in machine.gpus), default=0) / GIB
    ram = machine.ram_available_bytes / GIB
    devices = merge_devices(memory, machine, est, gpu_free, ram, reasons)
    fallback = merge_fallback(memory, det.adapter.vllm_lora_blockers, reasons)
    if not devices and fallback is Route.serve_lora:
        reasons.append("route: serve-lora, because no device can merge here")
        return Routing(Route.serve_lora, devices, fallback)
    if not devices:
        return Routing(Route.stop, devices, fallback, stop_reason=(
            f"cannot merge: GPU merge needs ~{est['merge_peak_gpu_vram']:.1f} GiB VRAM "
            f"({gpu_free:.1f} free), CPU merge ~{est['merge_peak_cpu_ram']:.1f} GiB RAM "
            f"({ram:.1f} available); set memory.stop_on_failure=false to serve the LoRA, "
            "or free memory"))
    return Routing(Route.merge_then_serve, devices, fallback)


def merge_disk(det: DetectResult, memory: MemoryConfig, qplan: QuantizePlan | None, machine: Machine,
               est: dict[str, float], cache_dir: str | None, reasons: list[str]) -> str | None:
    """Whether what the merge writes fits the disk at the cache: the merged checkpoint, or with RTN fused into the
    merge the W4A16 checkpoint alone (est["merged_disk"] is set to it). Returns the stop reason, or None when it
    fits or the cache already holds it (checked by its key when `cache_dir` is given and the weights are local)."""
    fused = qplan is not None and qplan.fused
    est["merged_disk"] = merge_disk_bytes(det, (qplan.group_size, qplan.symmetric) if fused else None) / GIB
    what = "the W4A16 checkpoint (merged and quantized in one pass)" if fused else "the merged checkpoint"
    need, free = est["merged_disk"], machine.disk_free_bytes / GIB
    if free >= need:
        return None
    if cache_dir is not None:
        from emq.checkpoint.merge import MergeSettings, merge_cached
        from emq.checkpoint.quantize import rtn_settings

        settings = MergeSettings(memory.merge_method, memory.merge_base, rtn=rtn_settings(qplan))
        if merge_cached(det, settings, cache_dir):
            reasons.append(f"disk: {what} is already in the cache, so its ~{need:.2f} GiB are not needed "
                           f"({free:.2f} GiB free)")
            return None
    return (f"{what} needs ~{need:.2f} GiB at paths.cache_dir, only {free:.2f} GiB free; free disk or move "
            "EMQ_CACHE")


# --- w4a16 --------------------------------------------------------------------------------

def plan_quantize(det: DetectResult, memory: MemoryConfig, quant: QuantConfig, machine: Machine, routing: Routing,
                  est: dict[str, float], reasons: list[str]) -> QuantizePlan:
    """How the served W4A16 checkpoint is made: group size (checked against the model's Linear shapes before
    anything runs), what is quantized, and where.

    Args:
        det: the detect record (linear_shapes, quantization_config).
        memory: the memory policy (merge_method, prefer_cpu_merge).
        quant: the quant group (algorithm, group_size, symmetric, ignore, calibration, damp, device).
        machine: a snapshot of this machine.
        routing: the route and, for a merge, its devices.
        est: the estimates; serve_weights and the quantize peaks are set here.
        reasons: the plan's reasons, appended to.

    Raises:
        EmqError: an already-quantized base, shapes the int4 kernels cannot take, a group size that does not
            divide, rtn with memory.merge_method=peft, or quant.device=cuda without a GPU.
    """
    if det.base.quantization_config:
        method = det.base.quantization_config.get("quant_method", "?")
        raise EmqError(f"the base {det.base.ref} is already quantized ({method} quantization_config in its "
                       "config.json): quant=w4a16 quantizes 16-bit weights", "use the base's 16-bit original as "
                       "model.base, or serve it as it is (quant=none)")
    if not det.base.linear_shapes:
        raise EmqError(f"cannot tell the Linear shapes of {det.base.ref} (no safetensors headers and a config.json "
                       "without hidden/intermediate sizes)", "download the base's weights, or quant=none")
    group, why = choose_group_size([i for _, i in det.base.linear_shapes], [o for o, _ in det.base.linear_shapes],
                                   quant.group_size)
    ignore = sorted(set(quant.ignore) | {"lm_head"})
    source = "merged" if routing.route is Route.merge_then_serve else "base"
    est["serve_weights"] = est["serve_weights_w4a16"] = w4a16_bytes(det, group, quant.symmetric) / GIB
    layout = f"w4a16: {why}; {'symmetric' if quant.symmetric else 'asymmetric (a zero point per group)'}"
    if quant.algorithm is QuantAlgorithm.rtn:
        devices = routing.merge_devices if source == "merged" else (
            ["cuda", "cpu"] if machine.cuda and not memory.prefer_cpu_merge else ["cpu"])
        if source == "merged" and memory.merge_method is MergeMethod.peft:  # peft writes the merge itself
            reasons.append(f"{layout}; round to nearest, in a stream pass over the peft merge (no calibration)")
            return QuantizePlan("rtn", group, quant.symmetric, ignore, False, source, devices)
        reasons.append(f"{layout}; round to nearest, fused into the stream pass over the "
                       f"{'merge' if source == 'merged' else 'base'} (one pass, no 16-bit copy written; no calibration)")
        return QuantizePlan("rtn", group, quant.symmetric, ignore, True, source, devices)
    cal = quant.calibration
    est.update(layerwise_peaks(det, cal.samples, cal.seq_len))
    est.update(layerwise_seconds(det, quant.algorithm.value, cal.samples, cal.seq_len))
    devices = _quantize_devices(quant.device, machine, est, reasons)
    took = ", ".join(f"~{est[f'quantize_seconds_{d}'] / 60:.1f} min on {d}" for d in devices)
    reasons.append(f"{layout}; {quant.algorithm.value} on the {source} checkpoint, layer by layer (one decoder "
                   f"layer and {cal.samples} x {cal.seq_len} calibration tokens from {cal.corpus!r} in memory), "
                   f"on {' → '.join(devices)} ({took}, from measured rates; once per checkpoint, then cached)")
    return QuantizePlan(quant.algorithm.value, group, quant.symmetric, ignore, False, source, devices,
                        {"corpus": cal.corpus, "samples": cal.samples, "seq_len": cal.seq_len, "damp": quant.damp})


def _quantize_devices(want: str, machine: Machine, est: dict[str, float], reasons: list[str]) -> list[str]:
    """The cascade for a calibrated quantization: the GPU when its free memory fits, then the CPU."""
    gpu_free = max((g.free_bytes for g in machine.gpus), default=0) / GIB
    if want == "cuda" and not machine.cuda:
        raise EmqError("quant.device=cuda, but this machine has no CUDA GPU", "quant.device=auto or cpu")
    devices = []
    if want in ("auto", "cuda") and machine.cuda:
        if gpu_free >= est["quantize_peak_gpu_vram"] or want == "cuda":
            devices.append("cuda")
        else:
            reasons.append(f"no GPU quantize: needs ~{est['quantize_peak_gpu_vram']:.1f} GiB VRAM, {gpu_free:.1f} free")
    if want in ("auto", "cpu"):
        devices.append("cpu")
    return devices


# --- engine --------------------------------------------------------------------------------

def compile_cache_entries(compile_cache: str | None) -> int | None:
    """How many compiled graphs vLLM's compile cache holds (VLLM_CACHE_ROOT/torch_compile_cache/<hash>), or None
    when no cache path is given. An entry is keyed by vLLM's config hash, which cannot be computed without vLLM:
    entries mean some model was compiled there, this one only if it ran before."""
    if not compile_cache:
        return None
    root = Path(compile_cache) / "torch_compile_cache"
    try:
        return sum(1 for e in root.iterdir() if e.is_dir())
    except OSError:  # no cache yet
        return 0


def graphs_estimate(det: DetectResult, memory: MemoryConfig, budget: TokenBudget,
                    compile_cache: str | None, *, lora: bool = False) -> GraphsEstimate:
    """Generation seconds with CUDA graphs and eager, and what graphs cost at start, from the GRAPHS_* constants.

    Args:
        det: the detect record (the base's parameter count scales the measured 7B tokens/s).
        memory: the memory policy (max_num_seqs: the sequences decoded at once).
        budget: the eval's sequences × max_tokens.
        compile_cache: vLLM's compile cache (VLLM_CACHE_ROOT); entries there make torch.compile a cache read.
        lora: the engine serves LoRAs (graphs help them far more than a merged checkpoint).

    Returns:
        The estimate (an upper bound on generation: every answer is taken to run to max_tokens).
    """
    concurrent = max(1, min(budget.sequences, memory.max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS))
    scale = min(1.0, GRAPHS_REF_PARAMS / det.base.param_count) if det.base.param_count else 1.0
    tok_s = min(concurrent * GRAPHS_SEQ_TOK_S, GRAPHS_BATCH_TOK_S) * scale
    tokens = budget.sequences * budget.max_tokens
    graphs = tokens / tok_s
    entries = compile_cache_entries(compile_cache)
    compile_s = 0.0 if entries else GRAPHS_COMPILE_S
    speedup = GRAPHS_SPEEDUP_LORA if lora else GRAPHS_SPEEDUP_MERGED
    save = graphs * speedup - (graphs + compile_s + GRAPHS_CAPTURE_S)
    return GraphsEstimate(budget.sequences, budget.max_tokens, tokens, concurrent, round(graphs, 1),
                          round(graphs * speedup, 1), compile_s, GRAPHS_CAPTURE_S, entries, round(save, 1), speedup)


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _estimate_text(e: GraphsEstimate) -> str:
    compile_ = (f"torch.compile from the compile cache, which holds {e.compile_cache_entries} "
                f"entr{'y' if e.compile_cache_entries == 1 else 'ies'}" if e.compile_cache_entries
                else f"torch.compile {e.compile_s:.0f} s, cold compile cache")
    return (f"{e.sequences} x {e.max_tokens} tokens ({e.tokens:,}, {e.concurrent} sequences at once) take "
            f"~{_secs(e.generate_graphs_s)} s with CUDA graphs, ~{_secs(e.generate_eager_s)} s eager "
            f"({e.speedup:g}x, {'a LoRA' if e.speedup == GRAPHS_SPEEDUP_LORA else 'a merged checkpoint'}); graphs add "
            f"~{e.compile_s + e.capture_s:.0f} s at start ({compile_}; capture {e.capture_s:.0f} s)")


def choose_eager(det: DetectResult, memory: MemoryConfig, machine: Machine, reasons: list[str], *,
                 budget: TokenBudget | None = None, compile_cache: str | None = None,
                 lora: bool = False) -> EagerChoice:
    """CUDA graphs or eager mode: memory.enforce_eager when set, else whichever costs less for the eval's budget.

    Graphs make generation faster (a LoRA ~2.75x, a merged checkpoint ~1.12x) but cost torch.compile (skipped when
    vLLM's compile cache holds entries) and graph capture at every start: a small eval finishes sooner eager, a
    large one with graphs (`graphs_estimate`).

    Args:
        det: the detect record.
        memory: the memory policy (enforce_eager: null lets the plan choose; true/false is the user's and wins).
        machine: a snapshot of this machine (the CPU build has no CUDA graphs).
        reasons: the plan's reasons; the choice's line is appended.
        budget: the eval's sequences × max_tokens (None: unknown, e.g. a library call; graphs, vLLM's default).
        compile_cache: vLLM's compile cache (VLLM_CACHE_ROOT).
        lora: the engine serves LoRAs.

    Returns:
        The choice, who made it, its reason line and, where a budget is known, the estimate.
    """
    if machine.vllm.platform == "cpu":
        ignored = "; memory.enforce_eager=false does not apply" if memory.enforce_eager is False else ""
        why = ("engine: eager — vLLM's CPU build has no CUDA graphs, so eager is the only mode (its torch.compile "
               f"path produced wrong tokens on the demo model and costs ~60 s){ignored}")
        reasons.append(why)
        return EagerChoice(True, "cpu build", why)
    est = graphs_estimate(det, memory, budget, compile_cache, lora=lora) if budget and budget.sequences else None
    if memory.enforce_eager is not None:
        mode = "eager" if memory.enforce_eager else "CUDA graphs"
        why = f"engine: {mode}, because memory.enforce_eager={str(memory.enforce_eager).lower()}"
        if est:
            why += (f" (estimate: graphs would {'save' if est.graphs_save_s > 0 else 'cost'} "
                    f"~{_secs(abs(est.graphs_save_s))} s — {_estimate_text(est)})")
        reasons.append(why)
        return EagerChoice(memory.enforce_eager, "memory.enforce_eager", why, est)
    if est is None:
        why = ("engine: CUDA graphs (vLLM's default) — no eval token budget to weigh their start cost against; "
               "memory.enforce_eager=true turns them off")
        reasons.append(why)
        return EagerChoice(False, "no budget", why)
    graphs = est.graphs_save_s > 0
    why = (f"engine: {'CUDA graphs' if graphs else 'eager'} (memory.enforce_eager=null, the cheaper for this eval: "
           f"saves ~{_secs(abs(est.graphs_save_s))} s) — {_estimate_text(est)}; costs from H200 7B runs "
           "(plan.GRAPHS_*)")
    reasons.append(why)
    return EagerChoice(not graphs, "estimate", why, est)


def engine_mode(memory: MemoryConfig, qm: QuantMethod, machine: Machine, reasons: list[str], *,
                enforce_eager: bool) -> EngineMode:
    """dtype, memory share, eager mode and chunked prefill for this platform.

    Args:
        memory: the memory policy.
        qm: the served quantization.
        machine: a snapshot of this machine.
        reasons: the plan's reasons, appended to.
        enforce_eager: `choose_eager`'s choice.

    Returns:
        The engine mode.
    """
    if machine.vllm.platform != "cpu":
        return EngineMode(served_dtype(memory, qm, machine, reasons), memory.gpu_memory_utilization,
                          enforce_eager, None)
    util = memory.cpu_memory_utilization
    reasons.append(f"engine: vLLM CPU build, memory share {util} (memory.cpu_memory_utilization)")
    reasons.append("engine: chunked prefill off — vLLM's CPU build crashes ('CPU Generator does not use "
                   "offset') when a prompt with a per-request seed is prefilled in pieces; emq keeps "
                   "per-prompt seeds so answers are reproducible and resumable")
    return EngineMode(served_dtype(memory, qm, machine, reasons), util, True, False)


def served_dtype(memory: MemoryConfig, qm: QuantMethod, machine: Machine, reasons: list[str]) -> str:
    """memory.dtype, with auto resolved: bfloat16, or float32 on a CPU without native bf16 when unquantized.

    Args:
        memory: the memory policy (dtype).
        qm: the served quantization.
        machine: a snapshot of this machine (platform, cpu_bf16).
        reasons: the plan's reasons, appended to.

    Returns:
        vLLM's dtype= value.
    """
    if memory.dtype != "auto":
        return memory.dtype
    if machine.vllm.platform != "cpu" or machine.cpu_bf16:
        return "bfloat16"
    if qm is QuantMethod.none:
        reasons.append("engine: dtype float32 — this CPU has no native bf16 (no avx512_bf16/amx_bf16), "
                       "where vLLM emulates bf16 about 6x slower (measured on the demo: 11 vs 73 tok/s); "
                       "the bf16 weights are upcast exactly")
        return "float32"
    reasons.append(f"engine: dtype bfloat16 — vLLM's {qm.value} kernels take bf16/fp16 activations only; "
                   "this CPU has no native bf16, so it runs ~4-6x slower than float32 with quant=none "
                   "(measured on the demo: 12 vs 73 tok/s)")
    return "bfloat16"


def engine_pool(memory: MemoryConfig, machine: Machine, util: float) -> float:
    """The memory vLLM may use for weights and KV cache, GiB (over all tensor-parallel GPUs).

    Args:
        memory: the memory policy (tensor_parallel_size).
        machine: a snapshot of this machine.
        util: the engine's memory share (gpu_ or cpu_memory_utilization).

    Returns:
        The pool, GiB.

    Raises:
        EmqError: too few GPUs for tensor_parallel_size, or a GPU with less free than vLLM would claim.
    """
    tp = memory.tensor_parallel_size
    if tp > 1 and (machine.vllm.platform != "cuda" or tp > len(machine.gpus)):
        raise EmqError(f"memory.tensor_parallel_size={tp} needs {tp} GPUs; this machine has {len(machine.gpus)}",
                       "lower memory.tensor_parallel_size or run on a machine with more GPUs")
    if machine.vllm.platform != "cuda":
        return machine.ram_total_bytes / GIB * util
    # vLLM takes gpu_memory_utilization x total on each of the first tp GPUs and refuses to start
    # when another process holds that much: plan from the tightest of them
    per_gpu = min(min(g.total_bytes * util, g.free_bytes) for g in machine.gpus[:tp])
    short = [g for g in machine.gpus[:tp] if g.free_bytes < g.total_bytes * util]
    if short:
        g = min(short, key=lambda g: g.free_bytes)
        raise EmqError(f"GPU {g.index} has {g.free_bytes / GIB:.1f} GiB free of {g.total_bytes / GIB:.1f}, but "
                       f"memory.gpu_memory_utilization={util} makes vLLM claim {g.total_bytes * util / GIB:.1f} GiB "
                       "there (it refuses to start otherwise)",
                       f"set memory.gpu_memory_utilization={int(g.free_bytes / g.total_bytes * 100) / 100:.2f} "
                       "or stop what holds the GPU (nvidia-smi lists it)")
    return per_gpu * tp / GIB


# --- fit -----------------------------------------------------------------------------------

# Measured on the demo, vLLM CPU 0.32 with cpu_memory_utilization=0.04 (a 0.94 GiB pool, float32 weights 0.50 GiB):
# vLLM refused with "requested memory for kv (-0.43/0.94 GiB)", i.e. 0.87 GiB in use besides the weights.
CPU_WORKER_GIB = 1.0


def fit_check(est: dict[str, float], memory: MemoryConfig, machine: Machine, util: float,
              reasons: list[str]) -> str | None:
    """Whether the served weights and one full-length sequence's KV cache fit the engine's pool.

    Args:
        est: the estimates, with engine_pool and kv_headroom.
        memory: the memory policy (max_model_len, tensor_parallel_size).
        machine: a snapshot of this machine.
        util: the engine's memory share.
        reasons: the plan's reasons; the headroom is appended when it fits.

    Returns:
        None when it fits, else the stop reason, naming the knobs that would make it fit.
    """
    pool, need_kv = est["engine_pool"], est.get("kv_per_sequence", 0.0)
    if est["kv_headroom"] > need_kv:
        reasons.append(f"serving: ~{est['serve_weights']:.2f} GiB weights in a {pool:.1f} GiB pool leaves "
                       f"{est['kv_headroom']:.2f} GiB for the KV cache"
                       + (f" (~{est['kv_headroom'] / need_kv:.0f} full-length sequences)" if need_kv else ""))
        return None
    where = "memory.gpu_memory_utilization" if machine.vllm.platform == "cuda" else "memory.cpu_memory_utilization"
    tp = memory.tensor_parallel_size
    lighter = [q.value for q in LEANEST_FIRST if q in machine.vllm.quant
               and est[f"serve_weights_{q.value}"] + need_kv + (CPU_WORKER_GIB if machine.vllm.platform == "cpu" else 0)
               < pool]
    more = [n for n in (2, 4, 8) if tp < n <= len(machine.gpus) and pool / tp * n > est["serve_weights"] + need_kv]
    overhead = CPU_WORKER_GIB if machine.vllm.platform == "cpu" else 0.0
    return (f"serving needs ~{est['serve_weights']:.2f} GiB of weights + {need_kv:.2f} GiB KV cache "
            f"for one {memory.max_model_len}-token sequence"
            + (f" + ~{overhead:.1f} GiB that vLLM's CPU worker process itself uses" if overhead else "")
            + f", but vLLM may use {pool:.2f} GiB "
            f"({where}={util}); " + (f"quantize (quant={' or quant='.join(lighter)}), " if lighter else "")
            + (f"spread it over GPUs (memory.tensor_parallel_size={more[0]}), " if more else "")
            + f"raise {where} or lower memory.max_model_len")


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


def int4_weights_only(qc: dict[str, Any] | None) -> bool:
    """A checkpoint whose config says int4 weights with 16-bit activations (compressed-tensors W4A16, AWQ, GPTQ)."""
    if not qc:
        return False
    method = str(qc.get("quant_method", "")).lower()
    if method in ("awq", "gptq"):
        return int(qc.get("bits", qc.get("w_bit", 4))) == 4
    if method == "compressed-tensors":
        groups = (qc.get("config_groups") or {}).values()
        return any((g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations") for g in groups)
    return False


def engine_env(qm: QuantMethod, machine: Machine, reasons: list[str], *, int4_base: bool = False) -> dict[str, str]:
    """Environment vLLM needs for this quantization here (set before its processes start).

    Args:
        qm: the served quantization.
        machine: a snapshot of this machine.
        reasons: the plan's reasons, appended to.
        int4_base: the checkpoint served already is int4 weights-only (a pre-quantized base with quant=none): what
            the weights are decides, not the quant key.
    """
    if int4_base and qm is not QuantMethod.w4a16:
        reasons.append("engine: the base is already an int4 weights-only checkpoint (its quantization_config), so "
                       "it is served as W4A16 whatever quant= says")
        qm = QuantMethod.w4a16
    if qm is QuantMethod.w4a16 and machine.vllm.platform == "cuda":
        reasons.append("engine: VLLM_DISABLED_KERNELS=HummingLinearKernel — vLLM 0.23 picks it for some int4 "
                       "layouts (sym g64) and its flashinfer autotune hangs without network (measured on an H200); "
                       "Marlin/Machete serve the same checkpoint")
        return {"VLLM_DISABLED_KERNELS": "HummingLinearKernel"}
    if qm is QuantMethod.w4a16 and machine.vllm.platform == "cpu":
        reasons.append("engine: VLLM_CPU_INT4_W4A8=0 — vLLM's CPU build otherwise serves int4 checkpoints as W4A8 on "
                       "AMX CPUs (activations rounded to int8 as well: on the demo KL 0.032 to what the checkpoint "
                       "computes, 0.0017 as W4A16; measured on a Xeon with AMX); emq measures what W4A16 keeps. Set it "
                       "to 1 yourself for vLLM's W4A8 (a value you set wins)")
        return {"VLLM_CPU_INT4_W4A8": "0"}
    return {}


# vLLM's CPU build keeps one core per worker for its scheduler process, which spins between steps. On a machine of
# this many cores or fewer that is half the compute: emq gives the worker every core instead.
SMALL_CPU_CORES = 2


def cpu_threads_env(platform: str, cpu_count: int, reasons: list[str] | None = None) -> dict[str, str]:
    """VLLM_CPU_NUM_OF_RESERVED_CPU=0 on a small CPU: the vLLM worker computes on every core (a value the user set
    wins; the engine and the local judge server both use this)."""
    if platform != "cpu" or cpu_count > SMALL_CPU_CORES:
        return {}
    if reasons is not None:
        reasons.append(f"engine: VLLM_CPU_NUM_OF_RESERVED_CPU=0 — vLLM's CPU build otherwise keeps one of this "
                       f"machine's {cpu_count} cores for its scheduler and computes on the rest (one thread on 2 cores); "
                       "measured on 2 cores (benchmarks/cpu_threads_bench.py, a demo LoRA run): generation 1.3-1.6x "
                       "and fidelity scoring 1.5-1.7x faster with both cores, though the scheduler still polls "
                       "between steps. vLLM warns that this is below its minimum; set it yourself to keep vLLM's "
                       "reservation (a value you set wins)")
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def batch_invariant_env(memory: MemoryConfig, machine: Machine, reasons: list[str]) -> dict[str, str]:
    """memory.batch_invariant=true: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1), where this vLLM has them."""
    if not memory.batch_invariant:
        return {}
    if machine.vllm.platform == "cpu":
        raise EmqError(
            f"memory.batch_invariant=true: the installed vLLM ({machine.vllm.distribution} {machine.vllm.version}) "
            "is the CPU build, which has no batch-invariant kernels: with VLLM_BATCH_INVARIANT=1 vllm-cpu 0.32 "
            "starts, then dies at its first step (the mode swaps torch's mean/softmax for Triton kernels, and Triton "
            "has no CPU backend), and its oneDNN GEMMs would stay batch-dependent anyway",
            "set memory.batch_invariant=false: on the CPU, emq's fixed schedule (eval.group_size) already makes a "
            "rerun or a resumed run give identical answers")
    reasons.append("engine: VLLM_BATCH_INVARIANT=1 (memory.batch_invariant): an answer does not depend on the batch "
                   "it ran in (vLLM's batch-invariant kernels; GPUs of compute capability 8.0+ per vLLM's docs), at a "
                   "cost in tokens/s")
    return {"VLLM_BATCH_INVARIANT": "1"}


def compile_cache_env(compile_cache: str | None, reasons: list[str]) -> dict[str, str]:
    """VLLM_CACHE_ROOT in emq's data dir: every variant of a sweep and every later run reuse vLLM's compiled graphs
    (torch.compile, CUDA graphs' kernels); on a cluster, put paths.data_dir on a shared path."""
    if not compile_cache:
        return {}
    triton = str(Path(compile_cache) / "triton")
    reasons.append(f"engine: VLLM_CACHE_ROOT={compile_cache} — vLLM's compile cache in emq's data dir, so later runs "
                   "and a sweep's other variants skip compilation (a second 7B load took 21-44 s instead of 75-109 s "
                   f"on an H200), and TRITON_CACHE_DIR={triton} for the JIT-compiled kernels (LoRA's among them; "
                   "on an H200 the first eager engine of a fresh machine started ~30 s slower than the next ones); "
                   "values you set win")
    return {"VLLM_CACHE_ROOT": compile_cache, "TRITON_CACHE_DIR": triton}


def _engine_settings(det: DetectResult, memory: MemoryConfig, machine: Machine, qm: QuantMethod,
                     mode: EngineMode, reasons: list[str], *, lora: bool,
                     compile_cache: str | None = None) -> EngineSettings:
    return EngineSettings(
        quantization=machine.vllm.quant.get(qm), dtype=mode.dtype, memory_utilization=mode.memory_utilization,
        max_model_len=memory.max_model_len, enforce_eager=mode.enforce_eager,
        enable_lora=lora, max_lora_rank=_lora_rank(det) if lora else None,
        max_num_seqs=memory.max_num_seqs, tensor_parallel_size=memory.tensor_parallel_size,
        enable_chunked_prefill=mode.enable_chunked_prefill, extra=dict(memory.engine_extra),
        env={**engine_env(qm, machine, reasons, int4_base=int4_weights_only(det.base.quantization_config)),
             **batch_invariant_env(memory, machine, reasons),
             **cpu_threads_env(machine.vllm.platform, machine.cpu_count, reasons),
             **compile_cache_env(compile_cache, reasons)},
    )


def make_plan(det: DetectResult, memory: MemoryConfig, quant: QuantConfig, machine: Machine, *,
              compile_cache: str | None = None, budget: TokenBudget | None = None,
              cache_dir: str | None = None) -> Plan:
    """Choose a route, quantization and engine settings, with a reason for each.

    Args:
        det: the detect record.
        memory: the memory policy.
        quant: the quant choice.
        machine: a snapshot of this machine (inject one in tests).
        compile_cache: where vLLM keeps its compile cache (VLLM_CACHE_ROOT; None: vLLM's default).
        budget: what the eval generates (`TokenBudget.of(prompts, eval.max_tokens)`): with memory.enforce_eager
            null, it decides CUDA graphs or eager mode (None: graphs, vLLM's default).
        cache_dir: the merge cache (paths.cache_dir): a merge it already holds needs no disk (None: not checked).

    Returns:
        The plan. A `stop` route carries `stop_reason`; the runner raises it.

    Raises:
        EmqError: a choice that cannot work on this machine (e.g. quant=bnb on the CPU build).
    """
    reasons: list[str] = []
    prequantized = is_bnb_4bit(det.base.quantization_config)
    choice = choose_quant(det, memory, quant, machine, reasons, prequantized=prequantized)
    qm = choice.method
    est = estimates(det, memory, qm, machine)
    _estimate_basis(det, reasons)
    route = choose_route(det, memory, reasons, prequantized=prequantized, qm=qm)
    routing = merge_cascade(det, memory, machine, est, reasons) if route is Route.merge_then_serve else Routing(route)
    qplan = (plan_quantize(det, memory, quant, machine, routing, est, reasons)
             if qm is QuantMethod.w4a16 and routing.route is not Route.stop else None)
    if routing.route is Route.merge_then_serve:
        disk_stop = merge_disk(det, memory, qplan, machine, est, cache_dir, reasons)
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
    lora = routing.route is Route.serve_lora or routing.fallback is Route.serve_lora
    devices = routing.merge_devices
    plan = Plan(route=routing.route, quant=qm, merge_devices=devices,
                merge_method=memory.merge_method.value if devices else None, fallback=routing.fallback,
                engine=_engine_settings(det, memory, machine, qm, mode, reasons, lora=lora,
                                        compile_cache=compile_cache),
                estimates_gib={k: round(v, 3) for k, v in est.items()}, reasons=reasons,
                platform=machine.vllm.platform, vllm=f"{machine.vllm.distribution} {machine.vllm.version}",
                stop_reason=routing.stop_reason, quant_requested=quant.method.value,
                quant_substitution=choice.substitution, quantize=qplan, eager=eager,
                bnb=(bnb_served(det, machine, routing.route, reasons, prequantized=prequantized)
                     if qm is QuantMethod.bnb else None))
    log.info("plan: %s, quant=%s%s", routing.route.value, qm.value,
             f", merge on {' → '.join(devices)}" if devices else "")
    return plan


# --- many adapters, one engine (model.adapters) ------------------------------------------------------

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
               f"multi-LoRA on the shared base, max_loras={slots}, max_lora_rank={_lora_rank(top)} (the largest "
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
    engine = replace(first.engine, max_lora_rank=_lora_rank(top), max_loras=slots)
    plan = replace(first, engine=engine, reasons=reasons + first.reasons,
                   adapters=AdaptersPlan(names=list(dets), paths={n: d.adapter.path for n, d in dets.items()},
                                         ranks=ranks, trained_in_4bit={n: d.trained_in_4bit for n, d in dets.items()},
                                         max_loras=slots))
    log.info("plan: one engine for %d adapters (%s)", len(dets), ", ".join(dets))
    return plan
