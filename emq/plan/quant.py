"""Which quantization serves the model (quant=auto's order, substitutions, pre-quantized bases) and, for
bitsandbytes, which provider serves it and whether its NF4 is the one the adapter was trained on."""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from emq.checkpoint.nf4 import nf4_settings
from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import GIB, INFLIGHT_NF4, Machine, VllmInfo
from emq.plan.types import QuantChoice, Route
from emq.schema import MemoryConfig, QuantConfig, QuantMethod, RoutePolicy


# Serving weights relative to bf16, measured on an H200 with a 7B-shaped model
# (benchmarks/results/lora_vs_bnb_h200.md: bnb 4.35 / 12.97 GiB; vllm_routes_h200.log: fp8 1.09 / 1.78 GiB;
# W4A16 g128 3.52 / 11.31 GiB); int8/fp8 keep embeddings and norms in bf16, about half. A w4a16 plan computes
# its own figure from the model's Linear parameters and group size (costs.w4a16_bytes).
SERVE_FRACTION = {QuantMethod.none: 1.0, QuantMethod.int8: 0.55, QuantMethod.fp8: 0.55,
                  QuantMethod.bnb: 0.33, QuantMethod.w4a16: 0.31}

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
             "(GPTQ g32) of the fine-tune where merged + bnb keeps 7% (benchmarks/results/h200/w4a16_h200.md); "
             "quant=w4a16_keep keeps 95.5% of it (the LoRA on W4A16 of the base as trained, with a low-rank "
             "compensation; vLLM CPU 0.32: benchmarks/results/keep_demo_cpu.md) at "
             "0.57x bf16's weights with its LoRA; at 7B on an H100 (a rank-32 adapter, so compensation 32 in rank-64 "
             "LoRA buffers) it ran 1.06x LoRA-on-bnb's tokens/s at 270 sequences and 2.35x at 18, where W4A16 merged "
             "ran 1.39x and 3.27x (benchmarks/results/h100/keep_7b_h100.md)")


# vLLM's CPU shorthand int8_per_channel_weight_only declares `moe=` only: dense linear layers stay unquantized
# (a dense model is refused at plan time; an MoE model gets this note).
CPU_INT8_CAVEAT = (
    "quant: CAVEAT — vLLM CPU's int8_per_channel_weight_only quantizes MoE expert weights only; the attention and "
    "other dense linear layers stay bf16, so the weights figure and fidelity are those of a partly quantized model")


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
