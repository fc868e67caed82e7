"""GPU check: does emq's NVML accounting see the GPU memory of its child processes?

A torch-only workload of known size runs in a child process (and a grandchild) while emq's
PeakMemory samples the parent's process tree: each allocates exactly N GiB with
torch.empty(..., device="cuda") and touches it. The parent never uses CUDA, so torch's counters in
the parent read 0 — the number must come from NVML. Expected: the known bytes plus one CUDA context
per process (~0.5 GiB each). Prints a short table last.

    python3 scripts/gpu/nvml_check.py
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
GIB = 1024**3

CHILD = """
import sys, time, subprocess, torch
gib = int(sys.argv[1]); grand = int(sys.argv[2])
x = torch.empty(gib * 1024**3, dtype=torch.uint8, device="cuda"); x.fill_(1); torch.cuda.synchronize()
print("reserved", torch.cuda.memory_reserved(), flush=True)
p = subprocess.Popen([sys.executable, "-c", sys.argv[3], str(grand), "0", sys.argv[3]]) if grand else None
time.sleep(6)
if p: p.wait()
"""


def measure(gib: int, grand: int) -> dict:
    from emq.monitor import PeakMemory

    with PeakMemory(interval_s=0.1) as mem:
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(gib), str(grand), CHILD], capture_output=True,
                             text=True, timeout=300)
        seconds = time.perf_counter() - t0
    reserved = sum(int(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("reserved"))
    import torch

    return {"known": (gib + grand) * GIB, "torch_reserved_children": reserved,
            "nvml_tree": mem.peak_gpu_bytes, "nvml_device_delta": mem.peak_gpu_device_delta_bytes,
            "method": mem.gpu_method, "parent_torch": torch.cuda.memory_allocated() if torch.cuda.is_initialized() else 0,
            "seconds": seconds, "rc": out.returncode, "err": out.stderr[-500:]}


def main() -> None:
    rows = [("child 8 GiB", measure(8, 0)), ("child 8 + grandchild 4 GiB", measure(8, 4)),
            ("child 20 GiB", measure(20, 0))]
    print(f"\n{'workload':<28} {'known GiB':>9} {'torch (children)':>16} {'NVML tree':>10} {'device delta':>12} "
          f"{'tree - known':>12} {'parent torch':>12}  method")
    for name, r in rows:
        if r["rc"] != 0:
            print(name, "FAILED", r["err"])
            continue
        tree = (r["nvml_tree"] or 0) / GIB
        print(f"{name:<28} {r['known'] / GIB:9.2f} {r['torch_reserved_children'] / GIB:16.2f} {tree:10.2f} "
              f"{(r['nvml_device_delta'] or 0) / GIB:12.2f} {tree - r['known'] / GIB:12.2f} "
              f"{r['parent_torch'] / GIB:12.2f}  {r['method']}")


if __name__ == "__main__":
    main()
