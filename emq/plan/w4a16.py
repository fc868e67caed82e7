"""How the served W4A16 checkpoint is made: group size, what is quantized, on which device."""
from __future__ import annotations


from emq.calibration import corpus_for
from emq.checkpoint.costs import layerwise_peaks, layerwise_seconds, w4a16_bytes
from emq.checkpoint.layout import choose_group_size
from emq.checkpoint.quantizers import quantizer
from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import GIB, Machine
from emq.plan import fit
from emq.plan.types import QuantizePlan, Route, Routing
from emq.schema import MemoryConfig, MergeMethod, QuantConfig


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
    layout = (f"w4a16: {why}; {'symmetric' if quant.symmetric else 'asymmetric (a zero point per group)'}"
              + ("; each group's scale searched (mse: its range × 1.00 … 0.70, the least error kept)"
                 if quant.scale_search.value == "mse" else ""))
    if quant.compensation.rank:
        return _compensated(det, memory, quant, machine, source, group, ignore, est, layout, reasons)
    if not quantizer(quant.algorithm.value).calibrated:  # round to nearest: no calibration, fused into a stream pass
        devices = routing.merge_devices if source == "merged" else (
            ["cuda", "cpu"] if machine.cuda and not memory.prefer_cpu_merge else ["cpu"])
        if source == "merged" and memory.merge_method is MergeMethod.peft:  # peft writes the merge itself
            reasons.append(f"{layout}; round to nearest, in a stream pass over the peft merge (no calibration)")
            return QuantizePlan("rtn", group, quant.symmetric, ignore, False, source, devices,
                                scale_search=quant.scale_search.value)
        reasons.append(f"{layout}; round to nearest, fused into the stream pass over the "
                       f"{'merge' if source == 'merged' else 'base'} (one pass, no 16-bit copy written; no calibration)")
        return QuantizePlan("rtn", group, quant.symmetric, ignore, True, source, devices,
                            scale_search=quant.scale_search.value)
    cal = quant.calibration
    corpus = corpus_for(cal.corpus, det)
    est.update(layerwise_peaks(det, cal.samples, cal.seq_len))
    est.update(layerwise_seconds(det, quant.algorithm.value, cal.samples, cal.seq_len))
    devices = _quantize_devices(quant.device, machine, est, reasons)
    took = ", ".join(f"~{est[f'quantize_seconds_{d}'] / 60:.1f} min on {d}" for d in devices)
    said = _corpus_said(cal.corpus, corpus)
    reasons.append(f"{layout}; {quant.algorithm.value} on the {source} checkpoint, layer by layer (one decoder "
                   f"layer and {cal.samples} x {cal.seq_len} calibration tokens from {said} in memory), "
                   f"on {' → '.join(devices)} ({took}, from measured rates; once per checkpoint, then cached)")
    return QuantizePlan(quant.algorithm.value, group, quant.symmetric, ignore, False, source, devices,
                        {"corpus": corpus, "samples": cal.samples, "seq_len": cal.seq_len, "damp": quant.damp},
                        scale_search=quant.scale_search.value)


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


def _compensated(det: DetectResult, memory: MemoryConfig, quant: QuantConfig, machine: Machine, source: str,
                 group: int, ignore: list[str], est: dict[str, float], layout: str, reasons: list[str]) -> QuantizePlan:
    """quant.compensation.rank: the base as the adapter was trained on, quantized layer by layer with each Linear's
    rank-r error compensation fitted on the calibration activations; served in one LoRA with the adapter."""
    rank, alg = quant.compensation.rank, quant.algorithm.value
    if source != "base":
        raise EmqError(f"quant.compensation.rank={rank} serves the adapter as a LoRA on the W4A16 base, but the route "
                       "merges it (memory.route=merge, or a LoRA vLLM cannot serve)",
                       "memory.route=lora (or auto), or quant.compensation.rank=0")
    if not quantizer(alg).compensable:
        raise EmqError(f"quant.compensation.rank={rank} with quant.algorithm={alg}: {alg} rewrites the layer (it folds "
                       "scales into the norms), so the error it leaves is not the weight's alone",
                       "quant.algorithm=gptq or rtn with a compensation, or quant.compensation.rank=0")
    cal = quant.calibration
    corpus = corpus_for(cal.corpus, det)
    est.update(layerwise_peaks(det, cal.samples, cal.seq_len))
    est.update(layerwise_seconds(det, alg, cal.samples, cal.seq_len, quant.compensation.rounds))
    devices = _quantize_devices(quant.device, machine, est, reasons)
    base = ("dequant(NF4(W)), the base the QLoRA adapter was trained on" if det.trained_in_4bit
            else "the base as it is (the adapter was trained on it)")
    adapter_rank, padded = fit.adapter_rank(det), fit.lora_rank(det, rank)  # too high a rank stops here
    if quant.compensation.fill and padded - adapter_rank > rank:
        reasons.append(f"compensation: rank {padded - adapter_rank}, raised from quant.compensation.rank={rank} to "
                       f"fill the rank-{padded} LoRA buffers vLLM allocates for the adapter's {adapter_rank} + {rank} "
                       "(quant.compensation.fill=true: free at serve time, and a higher rank never leaves more error)")
        rank = padded - adapter_rank
    served = adapter_rank + rank
    if det.adapter is not None and det.trained_in_4bit is None:
        reasons.append("WARNING: compensated: whether the adapter was trained on a 4-bit base is unknown, so the base "
                       "is quantized as it is; a QLoRA adapter was trained on dequant(NF4(W)), and the compensation then "
                       "leaves that difference in: set model.trained_in_4bit=true if it was")
    if padded > served:
        reasons.append(f"compensation: vLLM holds every LoRA at max_lora_rank={padded}, so the served rank {served} "
                       f"costs what {padded} costs; quant.compensation.rank={padded - served + rank} (or "
                       "quant.compensation.fill=true) would use those buffers (a higher rank never leaves more error)")
    reasons.append(f"{layout}; compensated: {alg} on {base}, layer by layer ({cal.samples} x {cal.seq_len} "
                   f"calibration tokens from {_corpus_said(cal.corpus, corpus)}), each Linear's error compensated by "
                   f"a rank-{rank} term fitted on its calibration inputs{_rounds(quant.compensation.rounds)}; served as one LoRA of rank {served} (the adapter's "
                   f"{served - rank} + {rank}) on the W4A16 base, on {' → '.join(devices)}")
    return QuantizePlan(alg, group, quant.symmetric, ignore, False, source, devices,
                        {"corpus": corpus, "samples": cal.samples, "seq_len": cal.seq_len, "damp": quant.damp},
                        compensation=rank, compensation_rounds=quant.compensation.rounds,
                        scale_search=quant.scale_search.value)


def _corpus_said(asked: str, corpus: str) -> str:
    return repr(corpus) if asked == corpus else f"{asked!r}: {corpus}"


def _rounds(n: int) -> str:
    return f" ({n} rounds of quantizing what it does not carry, then refitting)" if n > 1 else ""
