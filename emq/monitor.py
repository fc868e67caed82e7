"""Peak memory of this process and all its children (vLLM's engine and worker processes)."""
from __future__ import annotations

import threading

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of `proc` and every descendant, in bytes."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakMemory:
    """Samples the process tree's RSS in a background thread; use as a context manager."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s = interval_s
        self.peak_rss_bytes = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="emq-peak-memory", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> int:
        """Take one sample now; returns the current tree RSS."""
        rss = tree_rss(self._proc)
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        return rss

    def reset(self) -> None:
        """Forget the peak so far (e.g. after a one-off demo build in the same process)."""
        self.peak_rss_bytes = 0

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
