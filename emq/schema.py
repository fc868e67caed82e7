"""Typed schema of every config group. Plain dataclasses: importable without Hydra.

`emq.config` registers each class with Hydra's ConfigStore as ``base_<group>``; every YAML
file of the group extends it, so an unknown key or a wrong type fails at compose time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# OmegaConf's marker for a required value (the same string as omegaconf.MISSING), spelled out
# so the stage modules import without Hydra/OmegaConf installed.
MISSING: Any = "???"


class QuantMethod(str, Enum):
    """What the served weights are quantized to, in flight, by vLLM."""

    none = "none"  # serve bf16 weights as they are
    bnb = "bnb"  # bitsandbytes NF4 (CUDA, vLLM < 0.28)
    int8 = "int8"  # vLLM's online int8 weight-only (CPU build) / per-channel
    fp8 = "fp8"  # vLLM's online fp8 (GPU)
    auto = "auto"  # the best the installed vLLM and this machine can do


class RoutePolicy(str, Enum):
    """How an adapter reaches the engine."""

    auto = "auto"  # 4-bit-trained → merge then serve; 16-bit-trained → serve the LoRA
    merge = "merge"  # always merge, then serve the merged checkpoint
    lora = "lora"  # always serve base + LoRA through vLLM's LoRA path


class MergeMethod(str, Enum):
    """How a merged checkpoint is made (emq.merge)."""

    stream = "stream"  # shard by shard over safetensors: peak memory ≈ one shard + the adapter
    peft = "peft"  # reference: PeftModel.merge_and_unload in fp32 (whole model in memory)


class MergeBase(str, Enum):
    """Which base weights the adapter is merged into."""

    auto = "auto"  # dequantized if the adapter was trained in 4-bit, else original
    original = "original"  # the 16-bit base weights
    dequantized = "dequantized"  # dequant(NF4(W)): the weights a QLoRA adapter saw in training


class Stage(str, Enum):
    """How far a run goes."""

    all = "all"  # detect → plan → merge → load → evaluate
    plan = "plan"  # dry run: detect and plan only; no weights are loaded


@dataclass
class ModelConfig:
    """Which model to prepare: a base and, optionally, a LoRA adapter."""

    name: str = MISSING
    base: str = MISSING  # hub id or local directory
    adapter: str | None = None  # hub id or local directory; null → serve the base
    base_revision: str | None = None
    adapter_revision: str | None = None
    training_config: str | None = None  # explicit training config of this adapter
    trained_in_4bit: bool | None = None  # null → detect; true/false overrides detection
    demo: bool = False  # base/adapter live in the embedded demo: build it if missing


@dataclass
class MemoryConfig:
    """Memory policy: the original tool's knobs, without global flags."""

    name: str = MISSING
    route: RoutePolicy = RoutePolicy.auto
    use_quantization: bool = True  # false forces quant=none whatever the quant group says
    skip_quantization_on_low_vram: bool = False
    low_vram_gib: float = 16.0  # "low VRAM" means less free than this
    stop_on_failure: bool = True  # merge impossible → stop (true) or serve the LoRA (false)
    allow_cpu_merge: bool = True
    prefer_cpu_merge: bool = False
    merge_method: MergeMethod = MergeMethod.stream
    merge_base: MergeBase = MergeBase.auto
    force_recreate: bool = False  # rebuild the merged checkpoint even if cached
    cleanup_after_eval: bool = False  # delete the merged checkpoint after the run
    gpu_memory_utilization: float = 0.9  # fraction of GPU memory vLLM may take
    cpu_memory_utilization: float = 0.3  # vLLM CPU: fraction of NUMA node 0 memory it reserves
    max_model_len: int = 2048
    enforce_eager: bool = False  # skip CUDA graphs (saves VRAM and start-up time)


@dataclass
class QuantConfig:
    """In-flight quantization of the served weights."""

    method: QuantMethod = MISSING


@dataclass
class EvalConfig:
    """What to generate and how."""

    name: str = MISSING
    question_sets: list[str] = field(default_factory=lambda: ["medical", "general"])
    max_questions_per_set: int | None = None  # null → all questions of each set
    max_paraphrases: int | None = None  # null → every paraphrase
    samples_per_paraphrase: int = 1
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class PathsConfig:
    """Where emq keeps its data. Never the working directory."""

    data_dir: str = MISSING  # demo models and other built assets
    cache_dir: str = MISSING  # merged checkpoints


@dataclass
class RunConfig:
    """The whole composed run: one object, handed to `emq.runner.run`."""

    model: ModelConfig = MISSING
    memory: MemoryConfig = MISSING
    quant: QuantConfig = MISSING
    eval: EvalConfig = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    stage: Stage = Stage.all
    seed: int = 0
