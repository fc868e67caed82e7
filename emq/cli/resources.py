"""`python -m emq resources`: this machine's GPUs, RAM and disk, what the installed vLLM and
bitsandbytes can do, and the memory preset to use (the original tool's memory_config.py).

Reads package metadata and device counters only; nothing heavy is imported except torch.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from emq.machine import GIB, Machine, dist_version, snapshot
from emq.schema import QuantMethod

LOW_VRAM_GIB = 24.0
HIGH_VRAM_GIB = 80.0


@dataclass(frozen=True)
class Recommendation:
    preset: str
    reason: str


def recommend(machine: Machine) -> Recommendation:
    """The memory preset (conf/memory/*.yaml) that fits this machine, with the reason."""
    if not machine.gpus:
        return Recommendation("cpu_only", "no CUDA GPU: merge and serve on the CPU")
    free = max(g.free_bytes for g in machine.gpus) / GIB
    if free < LOW_VRAM_GIB:
        return Recommendation("low_vram", f"largest free VRAM {free:.1f} GiB < {LOW_VRAM_GIB:g} GiB: merge on the "
                              "CPU, quantize, no CUDA graphs")
    if free >= HIGH_VRAM_GIB:
        return Recommendation("high_vram", f"{free:.1f} GiB free VRAM: merge on the GPU, serve bf16")
    return Recommendation("default", f"{free:.1f} GiB free VRAM: merge on the GPU, quantize in flight")


def report(machine: Machine) -> list[tuple[str, str]]:
    """Rows of the resources table."""
    rows = [("CPU cores", str(os.cpu_count())),
            ("RAM", f"{machine.ram_available_bytes / GIB:.1f} GiB available of {machine.ram_total_bytes / GIB:.1f}"),
            ("disk at cache", f"{machine.disk_free_bytes / GIB:.1f} GiB free")]
    if machine.gpus:
        for g in machine.gpus:
            rows.append((f"GPU {g.index}", f"{g.name}: {g.free_bytes / GIB:.1f} GiB free of {g.total_bytes / GIB:.1f}"))
    else:
        rows.append(("GPU", "none (CUDA not available)"))
    v = machine.vllm
    rows.append(("vLLM", f"{v.distribution} {v.version} ({v.platform})" if v.distribution else "not installed"))
    for q in QuantMethod:
        if q is QuantMethod.auto:
            continue
        if q in v.quant:
            rows.append((f"  quant={q.value}", f"yes (vLLM quantization={v.quant[q]!r})"))
        else:
            fix = f" — fix: {v.fixes[q]}" if q in v.fixes else ""
            rows.append((f"  quant={q.value}", f"no: {v.unsupported.get(q, 'not supported')}{fix}"))
    if v.bnb is not None and v.bnb.kind is not None:
        rows.append(("  bnb provider", f"{v.bnb.name} {v.bnb.version}"))
    bnb = dist_version("bitsandbytes")
    rows.append(("bitsandbytes", f"{bnb} (NF4 through transformers: training, merging with a dequantized base)"
                 if bnb else "not installed"))
    rec = recommend(machine)
    rows.append(("recommended", f"memory={rec.preset} — {rec.reason}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emq resources", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=os.environ.get("EMQ_CACHE", "~/.cache/emq/merged"),
                        help="where merged checkpoints go (free disk is measured there)")
    args = parser.parse_args(argv)
    from emq.report.tables import summary_table

    print(summary_table(report(snapshot(args.cache_dir)), "emq resources"))  # a CLI's output, not a log
    return 0
