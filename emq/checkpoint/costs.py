"""What making a checkpoint costs, from the real bytes: pure formulas the plan uses before anything runs
(kept apart from the kernels so that planning never imports them)."""
from __future__ import annotations

from emq.checkpoint.quantizers import quantizer
from emq.checkpoint.safetensors_io import CHUNK, Writer
from emq.detect import DetectResult
from emq.machine import GIB
from emq.schema import MergeMethod


def stream_workers(cpus: int) -> int:
    """Parts merged at once by `stream` (each: a reader, the merge, a writer)."""
    return max(1, min(cpus, 4))


def stream_peak_ram(largest_linear: int, adapter_bytes: int, cpus: int) -> int:
    """Peak resident bytes of a `stream` merge: per part, its buffer pool (64 MiB or three of the
    largest tensor) and the writer's staging; the adapter's factors upcast to fp32; the runtime.
    Measured: 0.30 GiB on a 0.5B model (2 parts), 3.3 GiB on a 14B one (4 parts)."""
    per_part = max(64 << 20, 3 * largest_linear) + Writer.STAGES * CHUNK
    return stream_workers(cpus) * per_part + 2 * adapter_bytes + (300 << 20)


def merge_peaks(det: DetectResult, method: MergeMethod, cpus: int) -> dict[str, float]:
    """Peak RAM / VRAM of a merge, from the real bytes.

    peft: the whole model in fp32 plus the adapter, +15 % allocator slack (on either device).
    stream: a few tensors per parallel part plus the adapter in fp32 (`stream_peak_ram`);
    on the GPU each part's largest tensor in fp32 plus its bf16 copies, and the adapter.
    """
    params = det.base.param_count or 0
    adapter = det.adapter.weight_bytes if det.adapter else 0
    if method is MergeMethod.peft:
        peak = (params * 4 + adapter * 2) * 1.15 / GIB
        return {"merge_peak_cpu_ram": peak, "merge_peak_gpu_vram": peak}
    linear = det.base.largest_linear_bytes or min(det.base.param_bytes or 0, 5 * 10**9)
    return {"merge_peak_cpu_ram": stream_peak_ram(linear, adapter, cpus) / GIB,
            "merge_peak_gpu_vram": (stream_workers(cpus) * linear * 3.5 + adapter * 2) / GIB + 0.5}


def w4a16_bytes(det: DetectResult, group_size: int, symmetric: bool) -> int:
    """Bytes of a W4A16 checkpoint's weights: decoder Linears at 4 bits plus a 16-bit scale (and, when
    asymmetric, a 4-bit zero point) per group; everything else (embeddings, norms, lm_head) in 16 bits."""
    params = det.base.param_count or 0
    linear = min(det.base.linear_params or 0, params)
    per_param = 0.5 + 2 / group_size + (0 if symmetric else 0.5 / group_size)
    return int(linear * per_param + (params - linear) * 2)


def merge_disk_bytes(det: DetectResult, w4a16: tuple[int, bool] | None = None, out_dtype: str = "bfloat16") -> int:
    """What a merge writes to the cache, with a margin (the plan and the merge's own disk check use this one number).

    Args:
        det: the detect record (parameter count, linear shapes).
        w4a16: (group_size, symmetric) when RTN is fused into the merge (only the W4A16 checkpoint is written).
        out_dtype: the merged checkpoint's dtype otherwise.
    """
    raw = (w4a16_bytes(det, *w4a16) if w4a16 else
           (det.base.param_count or 0) * (4 if out_dtype == "float32" else 2))
    return int(raw * 1.05) + 64 * 1024**2


def layerwise_peaks(det: DetectResult, samples: int, seq_len: int) -> dict[str, float]:
    """Peak memory (GiB) of a calibrated (GPTQ / AWQ) quantization, which holds one decoder layer in fp32, its
    Linears' Hessians (in² floats each), the calibration hidden states in fp32 twice (in and out) and the
    embedding, on the device it runs on; the CPU side also holds the runtime (~1 GiB)."""
    b = det.base
    layers = b.num_layers or 1
    layer_params = (b.linear_params or 0) / layers
    hidden = max((min(s) for s in b.linear_shapes), default=0)  # the narrowest side of a decoder Linear
    hessians = sum(i * i for _, i in b.linear_shapes) * 4
    states = 2 * samples * seq_len * hidden * 4
    embed = ((b.param_count or 0) - (b.linear_params or 0)) * 4
    device = (layer_params * 4 * 2 + hessians + states + embed) / GIB
    return {"quantize_peak_gpu_vram": device + 0.5, "quantize_peak_cpu_ram": device + 1.0}


# Each further round of a compensated quantization (quant.compensation.rounds: quantize what the low-rank term does not
# carry, refit) re-runs the layer's quantization and fit on inputs already captured. Measured on the demo (vLLM CPU
# build machine, 2 cores, GPTQ g32, compensation rank 32): 1 round 212 s, 4 rounds 376 s, so a round adds 0.26 of a
# one-round pass (benchmarks/results/quant_methods_demo_cpu.md).
EXTRA_ROUND_SHARE = 0.26


def layerwise_seconds(det: DetectResult, algorithm: str, samples: int, seq_len: int,
                      rounds: int = 1) -> dict[str, float]:
    """Rough wall time of a calibrated quantization per device, from the algorithm's measured rates (seconds per
    decoder Linear parameter × calibration token: `emq.checkpoint.quantizers.<algorithm>`), × the extra rounds of a
    compensated one (EXTRA_ROUND_SHARE each)."""
    work = (det.base.linear_params or 0) * samples * seq_len * (1 + EXTRA_ROUND_SHARE * (rounds - 1))
    # round to nearest run layer by layer (to fit a compensation) has no rate of its own: GPTQ's bounds it
    rates = quantizer(algorithm).seconds_per_param_token or quantizer("gptq").seconds_per_param_token
    return {f"quantize_seconds_{device}": work * rate for device, rate in rates.items()}
