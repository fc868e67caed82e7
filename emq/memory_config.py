"""The original tool's `memory_config.py`, answered by emq's planner: `python -m emq.memory_config` prints the
GPU's memory, the recommended settings as the original flags (USE_QUANTIZATION, USE_CPU_FOR_MERGING,
SKIP_QUANTIZATION_ON_LOW_VRAM, and STOP_ON_FAILURE) and the emq memory preset they come from.

In a script, change `from memory_config import …` to `from emq.memory_config import …`. The recommendation is
`emq resources`' (emq.cli.resources.recommend) for a GPU of that size, and the flags are that preset's
(conf/memory/<preset>.yaml) values; without a GPU it recommends emq's CPU preset, where the original stopped.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from emq.cli.resources import recommend
from emq.machine import GIB, Gpu, snapshot
from emq.quant_utils import check_vram_capacity
from emq.schema import MemoryConfig

__all__ = ["check_vram_capacity", "generate_config_file", "get_memory_config", "main"]

PRESETS = Path(__file__).resolve().parent.parent / "conf" / "memory"
# the original's flags, each read from the emq memory setting it became
FLAGS = {"USE_QUANTIZATION": "use_quantization", "USE_CPU_FOR_MERGING": "prefer_cpu_merge",
         "SKIP_QUANTIZATION_ON_LOW_VRAM": "skip_quantization_on_low_vram", "STOP_ON_FAILURE": "stop_on_failure"}
NAMES = {"cpu_only": "No CUDA GPU (CPU only)", "low_vram": "Low VRAM GPU", "default": "Medium GPU",
         "high_vram": "High-End GPU"}


def preset(name: str) -> MemoryConfig:
    """The memory preset conf/memory/<name>.yaml over the schema's defaults (the same values Hydra composes)."""
    values = yaml.safe_load((PRESETS / f"{name}.yaml").read_text()) or {}
    values.pop("defaults", None)
    return dataclasses.replace(MemoryConfig(), **values)


def get_memory_config(vram_gb: float) -> dict[str, Any]:
    """The recommended settings for a GPU of `vram_gb` GiB (0: none), as the original's dict: name, the flags,
    description; plus `emq_memory`, the preset (`python -m emq memory=<preset>`)."""
    machine = snapshot(Path("~").expanduser())
    gpus = [Gpu(0, "GPU", int(vram_gb * GIB), int(vram_gb * GIB))] if vram_gb > 0 else []
    rec = recommend(dataclasses.replace(machine, gpus=gpus))
    memory = preset(rec.preset)
    size = f" ({vram_gb:.0f} GB VRAM)" if vram_gb > 0 else ""
    return {"name": f"{NAMES.get(rec.preset, rec.preset)}{size}",
            **{flag: bool(getattr(memory, key)) for flag, key in FLAGS.items()},
            "description": rec.reason, "emq_memory": rec.preset}


def generate_config_file(config: dict[str, Any]) -> str:
    """The settings as Python lines to paste into doctor_eval.py (True/False, so the lines run), and the emq
    command that uses the same policy."""
    lines = [f"# Memory Configuration (Auto-generated for {config['name']})"]
    notes = {"USE_QUANTIZATION": config["description"],
             "USE_CPU_FOR_MERGING": "Use CPU for LoRA merging (slower but uses less VRAM)",
             "SKIP_QUANTIZATION_ON_LOW_VRAM": "Skip quantization if VRAM is insufficient",
             "STOP_ON_FAILURE": "Stop if no merge fits (False: fall back to the LoRA)"}
    lines += [f"{flag} = {bool(config[flag])}  # {notes[flag]}" for flag in FLAGS if flag in config]
    if config.get("emq_memory"):
        lines.append(f"# emq: python -m emq memory={config['emq_memory']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """Print this machine's VRAM, the recommended settings and the lines to paste (a CLI's output: print)."""
    print("Memory Configuration Helper (emq)")
    print("=" * 50)
    vram_gb = check_vram_capacity()
    if vram_gb == 0:
        print("No CUDA GPU detected: emq merges and serves on the CPU (vLLM's CPU build)")
    else:
        print(f"Total VRAM: {vram_gb:.1f} GB")
    print()
    config = get_memory_config(vram_gb)
    print(f"Recommended Configuration: {config['name']}")
    print(f"   {config['description']}")
    print()
    print("Recommended Settings:")
    for flag in FLAGS:
        print(f"   {flag} = {config[flag]}")
    print()
    print("Copy this to your doctor_eval.py:")
    print("-" * 40)
    print(generate_config_file(config))
    print("-" * 40)
    print(f"Or run emq with the same policy: python -m emq memory={config['emq_memory']}")


if __name__ == "__main__":
    main()
