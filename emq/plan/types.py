"""The plan's records: the route, the engine settings, and the choices the planner hands between its steps."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from emq.schema import QuantMethod


class Route(str, Enum):
    serve_base = "serve-base"
    serve_lora = "serve-lora"
    merge_then_serve = "merge-then-serve"
    stop = "stop"

    @property
    def needs_engine(self) -> bool:
        return self is not Route.stop


@dataclass(frozen=True)
class EngineSettings:
    """What `emq.engine.load` hands to vllm.LLM (besides the model path)."""

    quantization: str | None  # vLLM's quantization= value
    dtype: str
    memory_utilization: float  # gpu_memory_utilization (on the CPU build: share of NUMA node memory)
    max_model_len: int
    enforce_eager: bool
    enable_lora: bool
    max_lora_rank: int | None
    max_num_seqs: int | None = None
    max_loras: int = 1  # LoRAs one batch may hold (model.adapters: one per adapter, up to MAX_LORAS)
    tensor_parallel_size: int = 1
    enable_chunked_prefill: bool | None = None  # None: vLLM's default
    extra: dict = field(default_factory=dict)  # memory.engine_extra, validated against EngineArgs
    env: dict = field(default_factory=dict)  # environment vLLM's processes start with (set by the engine, recorded)


@dataclass(frozen=True)
class TokenBudget:
    """What the eval will generate: sequences × max_tokens (an upper bound: answers may stop early)."""

    sequences: int
    max_tokens: int

    @classmethod
    def of(cls, prompts: Iterable[dict], max_tokens: int) -> TokenBudget:
        """The budget of `emq.prompts.build_prompts`' prompts (each asks for `n` samples)."""
        return cls(sum(int(p["n"]) for p in prompts), max_tokens)


@dataclass(frozen=True)
class GraphsEstimate:
    """Seconds with CUDA graphs vs eager for a token budget (GRAPHS_* constants: H200, 7B-shaped, vLLM 0.23)."""

    sequences: int
    max_tokens: int
    tokens: int  # sequences × max_tokens
    concurrent: int  # sequences decoded at once (memory.max_num_seqs, or vLLM's default)
    generate_graphs_s: float
    generate_eager_s: float
    compile_s: float  # torch.compile: 0 when the compile cache already holds entries
    capture_s: float  # CUDA graph capture
    compile_cache_entries: int | None  # entries in VLLM_CACHE_ROOT/torch_compile_cache (None: no cache path given)
    graphs_save_s: float  # eager generation - (graphs generation + compile + capture); > 0: graphs win
    speedup: float  # eager / graphs generation seconds for this route


@dataclass(frozen=True)
class EagerChoice:
    """CUDA graphs or eager mode, who decided and why (plan.json `eager`)."""

    enforce_eager: bool
    decided_by: str  # "memory.enforce_eager" | "estimate" | "cpu build" | "no budget"
    reason: str  # the plan reason line (also in Plan.reasons)
    estimate: GraphsEstimate | None = None


@dataclass(frozen=True)
class Plan:
    """The plan stage's record: a route and the reason for every choice."""

    route: Route
    quant: QuantMethod  # resolved (never auto)
    merge_devices: list[str]  # the run-time cascade, in order ("cuda", "cpu")
    merge_method: str | None
    fallback: Route | None  # what to do if every merge attempt fails (None: stop)
    engine: EngineSettings
    estimates_gib: dict[str, float]
    reasons: list[str]
    platform: str
    vllm: str | None
    stop_reason: str | None = None
    quant_requested: str | None = None  # the quant group's choice
    quant_substitution: str | None = None  # e.g. "bnb → int8", when quant.substitute replaced it
    quantize: QuantizePlan | None = None  # w4a16: how the served checkpoint is made
    eager: EagerChoice | None = None  # CUDA graphs or eager mode: the estimate and the choice
    adapters: AdaptersPlan | None = None  # model.adapters: several adapters of this base in this one engine
    bnb: dict | None = None  # quant=bnb: the provider vLLM serves it through, the served vs trained NF4 settings


@dataclass(frozen=True)
class AdaptersPlan:
    """model.adapters: which adapters share the one engine, and why one engine is possible."""

    names: list[str]  # in order; each adapter's record is <run dir>/adapters/<name>/
    paths: dict[str, str]  # name → adapter
    ranks: dict[str, int]  # name → its largest LoRA rank (max_lora_rank is the largest of these, rounded up)
    trained_in_4bit: dict[str, bool | None]  # name → detect's verdict
    max_loras: int  # LoRA slots in one batch


@dataclass(frozen=True)
class QuantizePlan:
    """How a w4a16 checkpoint is made: the algorithm, the int4 layout and where it runs."""

    algorithm: str  # rtn | gptq | awq
    group_size: int
    symmetric: bool
    ignore: list[str]  # Linear modules kept in 16 bits (lm_head always)
    fused: bool  # rtn inside the stream pass that merges (or copies the base): one pass, no bf16 copy written
    source: str  # what is quantized: "merged" (the adapter merged first) or "base" (the LoRA is served on it)
    devices: list[str]  # calibrated: the cascade; fused: the merge's devices
    calibration: dict | None = None  # gptq/awq: corpus, samples, seq_len, damp
    compensation: int = 0  # quant.compensation.rank: the base as trained + a rank-r error compensation in the LoRA
    compensation_rounds: int = 1  # quant.compensation.rounds
    scale_search: str = "minmax"  # quant.scale_search (every quantizer: fused RTN through rtn_settings)

    def describe(self) -> str:
        rounds = f" × {self.compensation_rounds} rounds" if self.compensation_rounds > 1 else ""
        comp = f", compensation r{self.compensation}{rounds}" if self.compensation else ""
        search = f", {self.scale_search} scales" if self.scale_search != "minmax" else ""
        return f"w4a16 ({self.algorithm}, g{self.group_size}, {'sym' if self.symmetric else 'asym'}{search}{comp})"


@dataclass(frozen=True)
class QuantChoice:
    """What the served weights are quantized to, and what that replaced (if anything)."""

    method: QuantMethod  # resolved (never auto)
    substitution: str | None = None  # e.g. "bnb → int8", when quant.substitute replaced the choice


@dataclass(frozen=True)
class Routing:
    """The route and the merge cascade behind it."""

    route: Route
    merge_devices: list[str] = field(default_factory=list)  # the run-time cascade, in order
    fallback: Route | None = None  # what to do if every merge attempt fails (None: stop)
    stop_reason: str | None = None


@dataclass(frozen=True)
class EngineMode:
    """How vLLM runs on this platform: the EngineSettings that do not depend on the route."""

    dtype: str
    memory_utilization: float
    enforce_eager: bool
    enable_chunked_prefill: bool | None  # None: vLLM's default
