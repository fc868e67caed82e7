"""Peak memory of the process tree: children count, the footprint record, no GPU here."""
from __future__ import annotations

import subprocess
import sys
import time

from emq.machine import GIB
from emq.monitor import PeakMemory, tree_rss


def test_a_child_process_counts_in_the_tree():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(300 * 2**20); time.sleep(30)"])
    try:
        import psutil

        me = psutil.Process()
        deadline = time.time() + 20
        while time.time() < deadline and psutil.Process(child.pid).memory_info().rss < 300 * 2**20:
            time.sleep(0.1)
        assert tree_rss(me) >= me.memory_info().rss + 300 * 2**20
        with PeakMemory(interval_s=0.05) as mem:
            time.sleep(0.3)
        assert mem.peak_rss_bytes >= 300 * 2**20
    finally:
        child.kill()
        child.wait()


def test_footprint_and_reset():
    with PeakMemory(interval_s=0.05) as mem:
        block = bytearray(200 * 2**20)
        time.sleep(0.3)
        peak = mem.footprint()
        del block
        mem.reset()
        after = mem.footprint()
    assert peak["peak_rss_gib"] >= 0.19 and after["peak_rss_gib"] <= peak["peak_rss_gib"]
    assert set(peak) == {"peak_rss_gib", "peak_vram_gib", "peak_vram_method"}
    if not mem._nvml.available:  # noqa: SLF001 - no NVIDIA driver on this machine: no GPU numbers, said so
        assert peak["peak_vram_gib"] is None and peak["peak_vram_method"] is None
    assert GIB == 2**30
