"""Peak memory of this process and all its children (vLLM's engine core and workers, a local judge):
RSS from psutil, GPU memory from NVML (nvidia-ml-py), sampled in a background thread.

GPU memory is attributed per process: NVML lists the processes using each GPU with their memory,
and emq sums those that belong to its process tree — not torch's counters, which only see the
parent. Where NVML cannot name the processes (a container whose PID namespace hides them), the
device's used memory above its level at start is recorded instead, and the record says which.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

import psutil

from emq.machine import GIB

log = logging.getLogger(__name__)


def tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of `proc` and every descendant, in bytes."""
    total = 0
    for p in tree(proc):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


class Nvml:
    """GPU memory through NVML; `available` is False without an NVIDIA driver (or nvidia-ml-py)."""

    def __init__(self):
        self.handles = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception:  # noqa: BLE001 - no driver, no library, no GPU: all mean "not available"
            self.handles = []

    @property
    def available(self) -> bool:
        return bool(self.handles)

    def by_pid(self) -> dict[int, int]:
        """Bytes of GPU memory per process id, over every GPU."""
        out: dict[int, int] = {}
        for h in self.handles:
            for fn in (self.nv.nvmlDeviceGetComputeRunningProcesses, self.nv.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    procs = fn(h)
                except self.nv.NVMLError:
                    continue
                for p in procs:
                    used = p.usedGpuMemory or 0
                    out[p.pid] = out.get(p.pid, 0) + used
        return out

    def device_used(self) -> int:
        return sum(self.nv.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)


class PeakMemory:
    """Samples the process tree's RSS and GPU memory in a background thread; use as a context manager."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self.window_rss_bytes = 0  # the peak since `open_window` (a stage's own), beside the run's peaks
        self.peak_gpu_bytes: int | None = None  # NVML, summed over the tree's processes
        self.peak_gpu_device_delta_bytes: int | None = None  # NVML, device used above its level at start
        self._proc = psutil.Process()
        self._nvml = Nvml()
        self._gpu_base = self._nvml.device_used() if self._nvml.available else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="emq-peak-memory", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> int:
        """Take one sample now; returns the current tree RSS."""
        procs = tree(self._proc)
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        self.window_rss_bytes = max(self.window_rss_bytes, rss)
        if self._nvml.available:
            try:
                per_pid = self._nvml.by_pid()
                pids = {p.pid for p in procs}
                gpu = sum(b for pid, b in per_pid.items() if pid in pids)
                self.peak_gpu_bytes = max(self.peak_gpu_bytes or 0, gpu)
                delta = max(0, self._nvml.device_used() - self._gpu_base)
                self.peak_gpu_device_delta_bytes = max(self.peak_gpu_device_delta_bytes or 0, delta)
            except Exception as e:  # noqa: BLE001 - a monitoring hiccup must not end a run
                log.debug("nvml sample failed: %s", e)
        return rss

    @property
    def gpu_method(self) -> str | None:
        if not self._nvml.available:
            return None
        if self.peak_gpu_bytes:
            return "nvml per-process (this process tree)"
        return "nvml device used above its level at start (NVML names no process of this tree)"

    def peak_gpu(self) -> int | None:
        """The best GPU figure: per-process when NVML names this tree's processes, else the device delta."""
        if not self._nvml.available:
            return None
        return self.peak_gpu_bytes or self.peak_gpu_device_delta_bytes

    def footprint(self) -> dict[str, Any]:
        """The peaks so far, as records carry them: RSS of the process tree, GPU memory (NVML)."""
        gpu = self.peak_gpu()
        return {"peak_rss_gib": round(max(self.peak_rss_bytes, self.sample()) / GIB, 3),
                "peak_vram_gib": round(gpu / GIB, 3) if gpu is not None else None,
                "peak_vram_method": self.gpu_method}

    def open_window(self) -> None:
        """Start measuring a stage's own peak RSS (the run's peaks go on)."""
        self.window_rss_bytes = 0

    def window_peak_gib(self) -> float:
        """The peak RSS of the process tree since `open_window`, GiB."""
        return round(max(self.window_rss_bytes, self.sample()) / GIB, 3)

    def reset(self) -> None:
        """Forget the peaks so far (e.g. after a one-off demo build in the same process)."""
        self.peak_rss_bytes = 0
        if self._nvml.available:
            self.peak_gpu_bytes, self.peak_gpu_device_delta_bytes = 0, 0

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
