"""For a merge: where it runs (the GPU → CPU cascade), what it falls back to, and whether the disk holds it."""
from __future__ import annotations

from collections.abc import Callable

from emq.checkpoint.costs import merge_disk_bytes
from emq.detect import DetectResult
from emq.machine import GIB, Machine
from emq.plan.types import QuantizePlan, Route, Routing
from emq.schema import MemoryConfig


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
               est: dict[str, float], merge_cached: Callable[[QuantizePlan | None], bool] | None,
               reasons: list[str]) -> str | None:
    """Whether what the merge writes fits the disk at the cache: the merged checkpoint, or with RTN fused into the
    merge the W4A16 checkpoint alone (est["merged_disk"] is set to it). Returns the stop reason, or None when it
    fits or the cache already holds it (`merge_cached(qplan)`, asked only when the disk is short; None: not asked,
    e.g. emq.checkpoint.quantize.merge_in_cache)."""
    fused = qplan is not None and qplan.fused
    est["merged_disk"] = merge_disk_bytes(det, (qplan.group_size, qplan.symmetric) if fused else None) / GIB
    what = "the W4A16 checkpoint (merged and quantized in one pass)" if fused else "the merged checkpoint"
    need, free = est["merged_disk"], machine.disk_free_bytes / GIB
    if free >= need:
        return None
    if merge_cached is not None:
        if merge_cached(qplan):
            reasons.append(f"disk: {what} is already in the cache, so its ~{need:.2f} GiB are not needed "
                           f"({free:.2f} GiB free)")
            return None
    return (f"{what} needs ~{need:.2f} GiB at paths.cache_dir, only {free:.2f} GiB free; free disk or move "
            "EMQ_CACHE")
