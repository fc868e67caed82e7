"""Memory and disk estimates from the base's real bytes."""
from __future__ import annotations


from emq.checkpoint.costs import merge_peaks
from emq.detect import DetectResult
from emq.machine import GIB, Machine
from emq.plan.quant import SERVE_FRACTION
from emq.schema import MemoryConfig, QuantMethod


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


def estimate_basis(det: DetectResult, reasons: list[str]) -> None:
    """Say when the estimates rest on less than the local safetensors headers."""
    if not det.base.param_count:
        reasons.append("memory estimates unavailable: no safetensors headers or index total_size for the base")
    elif not det.base.weights_local:
        reasons.append("memory estimates from the hub index's total_size (weights not downloaded yet)")
