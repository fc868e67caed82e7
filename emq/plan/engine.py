"""How vLLM runs: CUDA graphs or eager mode (from the eval's token budget), the served dtype, the memory pool."""
from __future__ import annotations

from pathlib import Path

from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import GIB, Machine
from emq.plan.types import EagerChoice, EngineMode, GraphsEstimate, TokenBudget
from emq.schema import MemoryConfig, QuantMethod


# CUDA graphs or eager mode (`choose_eager`): what graphs cost at start and save in generation. Measured on an H200
# with vLLM 0.23 and a 7B-shaped Llama (H 4096, 32 layers); vLLM's enforce_eager turns off torch.compile and CUDA
# graphs together, so "graphs" below means both.
# Generation with graphs, a full batch: emq evaluate, 270 sequences x 256 tokens, merged bf16, 14.6k tok/s
# (benchmarks/results/eval_bench_7b_h200_none.log; lora_vs_bnb_h200.md: 14.76k).
GRAPHS_BATCH_TOK_S = 14_600.0
# ... and a few sequences, per sequence: 18 sequences x 256 tokens at 3,608 tok/s, w4a16 merged
# (benchmarks/results/h200/serve_7b.json; serve_7b_weights.json: 3,593), i.e. ~200 tok/s each.
GRAPHS_SEQ_TOK_S = 200.0
# The parameter count those ran on (Llama-2-7B's shape). A larger model's tokens/s scale down by its parameters
# (issue 16: a 14B-shaped model generated 264 x 256 tokens in ~10 s, ~6.8k tok/s, against 7.0k scaled); a smaller
# one is not taken to be faster (small models are launch-bound, which graphs help most).
GRAPHS_REF_PARAMS = 6.74e9
# Eager generation is this much slower, by route (benchmarks/results/h200/time_to_answer_h200.md, side by side):
# a LoRA (vLLM's punica kernels, launch-bound) 2.75x — 7B-shaped, 4 LoRAs on a W4A16 base, 11,434 vs 4,154 tok/s;
# a merged dense checkpoint 1.12x — 14B-shaped merged bf16 at 270 sequences, 13,306 vs 11,859 tok/s.
GRAPHS_SPEEDUP_LORA = 2.75
GRAPHS_SPEEDUP_MERGED = 1.12
# torch.compile on a cold compile cache: the merged 14B's engine start took 88.5 s cold vs 53.6 s from the
# compile cache (35 s); the 7B multi-LoRA's cold start took 56.5 s longer with graphs than eager (compile +
# capture: 44.5 s after the capture below) — 40 s is taken (time_to_answer_h200.md).
GRAPHS_COMPILE_S = 40.0
# CUDA graph capture, paid at every start: the merged 14B's warm-cache start with graphs took 53.6 s vs 41.6 s
# eager (12 s; vLLM captured 2 x 51 graphs).
GRAPHS_CAPTURE_S = 12.0
# vLLM's default max_num_seqs (the sequences decoded at once when memory.max_num_seqs is null).
VLLM_DEFAULT_MAX_NUM_SEQS = 256


def compile_cache_entries(compile_cache: str | None) -> int | None:
    """How many compiled graphs vLLM's compile cache holds (VLLM_CACHE_ROOT/torch_compile_cache/<hash>), or None
    when no cache path is given. An entry is keyed by vLLM's config hash, which cannot be computed without vLLM:
    entries mean some model was compiled there, this one only if it ran before."""
    if not compile_cache:
        return None
    root = Path(compile_cache) / "torch_compile_cache"
    try:
        return sum(1 for e in root.iterdir() if e.is_dir())
    except OSError:  # no cache yet
        return 0


def graphs_estimate(det: DetectResult, memory: MemoryConfig, budget: TokenBudget,
                    compile_cache: str | None, *, lora: bool = False) -> GraphsEstimate:
    """Generation seconds with CUDA graphs and eager, and what graphs cost at start, from the GRAPHS_* constants.

    Args:
        det: the detect record (the base's parameter count scales the measured 7B tokens/s).
        memory: the memory policy (max_num_seqs: the sequences decoded at once).
        budget: the eval's sequences × max_tokens.
        compile_cache: vLLM's compile cache (VLLM_CACHE_ROOT); entries there make torch.compile a cache read.
        lora: the engine serves LoRAs (graphs help them far more than a merged checkpoint).

    Returns:
        The estimate (an upper bound on generation: every answer is taken to run to max_tokens).
    """
    concurrent = max(1, min(budget.sequences, memory.max_num_seqs or VLLM_DEFAULT_MAX_NUM_SEQS))
    scale = min(1.0, GRAPHS_REF_PARAMS / det.base.param_count) if det.base.param_count else 1.0
    tok_s = min(concurrent * GRAPHS_SEQ_TOK_S, GRAPHS_BATCH_TOK_S) * scale
    tokens = budget.sequences * budget.max_tokens
    graphs = tokens / tok_s
    entries = compile_cache_entries(compile_cache)
    compile_s = 0.0 if entries else GRAPHS_COMPILE_S
    speedup = GRAPHS_SPEEDUP_LORA if lora else GRAPHS_SPEEDUP_MERGED
    save = graphs * speedup - (graphs + compile_s + GRAPHS_CAPTURE_S)
    return GraphsEstimate(budget.sequences, budget.max_tokens, tokens, concurrent, round(graphs, 1),
                          round(graphs * speedup, 1), compile_s, GRAPHS_CAPTURE_S, entries, round(save, 1), speedup)


def _secs(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def _estimate_text(e: GraphsEstimate) -> str:
    compile_ = (f"torch.compile from the compile cache, which holds {e.compile_cache_entries} "
                f"entr{'y' if e.compile_cache_entries == 1 else 'ies'}" if e.compile_cache_entries
                else f"torch.compile {e.compile_s:.0f} s, cold compile cache")
    return (f"{e.sequences} x {e.max_tokens} tokens ({e.tokens:,}, {e.concurrent} sequences at once) take "
            f"~{_secs(e.generate_graphs_s)} s with CUDA graphs, ~{_secs(e.generate_eager_s)} s eager "
            f"({e.speedup:g}x, {'a LoRA' if e.speedup == GRAPHS_SPEEDUP_LORA else 'a merged checkpoint'}); graphs add "
            f"~{e.compile_s + e.capture_s:.0f} s at start ({compile_}; capture {e.capture_s:.0f} s)")


def choose_eager(det: DetectResult, memory: MemoryConfig, machine: Machine, reasons: list[str], *,
                 budget: TokenBudget | None = None, compile_cache: str | None = None,
                 lora: bool = False) -> EagerChoice:
    """CUDA graphs or eager mode: memory.enforce_eager when set, else whichever costs less for the eval's budget.

    Graphs make generation faster (a LoRA ~2.75x, a merged checkpoint ~1.12x) but cost torch.compile (skipped when
    vLLM's compile cache holds entries) and graph capture at every start: a small eval finishes sooner eager, a
    large one with graphs (`graphs_estimate`).

    Args:
        det: the detect record.
        memory: the memory policy (enforce_eager: null lets the plan choose; true/false is the user's and wins).
        machine: a snapshot of this machine (the CPU build has no CUDA graphs).
        reasons: the plan's reasons; the choice's line is appended.
        budget: the eval's sequences × max_tokens (None: unknown, e.g. a library call; graphs, vLLM's default).
        compile_cache: vLLM's compile cache (VLLM_CACHE_ROOT).
        lora: the engine serves LoRAs.

    Returns:
        The choice, who made it, its reason line and, where a budget is known, the estimate.
    """
    if machine.vllm.platform == "cpu":
        ignored = "; memory.enforce_eager=false does not apply" if memory.enforce_eager is False else ""
        why = ("engine: eager — vLLM's CPU build has no CUDA graphs, so eager is the only mode (its torch.compile "
               f"path produced wrong tokens on the demo model and costs ~60 s){ignored}")
        reasons.append(why)
        return EagerChoice(True, "cpu build", why)
    est = graphs_estimate(det, memory, budget, compile_cache, lora=lora) if budget and budget.sequences else None
    if memory.enforce_eager is not None:
        mode = "eager" if memory.enforce_eager else "CUDA graphs"
        why = f"engine: {mode}, because memory.enforce_eager={str(memory.enforce_eager).lower()}"
        if est:
            why += (f" (estimate: graphs would {'save' if est.graphs_save_s > 0 else 'cost'} "
                    f"~{_secs(abs(est.graphs_save_s))} s — {_estimate_text(est)})")
        reasons.append(why)
        return EagerChoice(memory.enforce_eager, "memory.enforce_eager", why, est)
    if est is None:
        why = ("engine: CUDA graphs (vLLM's default) — no eval token budget to weigh their start cost against; "
               "memory.enforce_eager=true turns them off")
        reasons.append(why)
        return EagerChoice(False, "no budget", why)
    graphs = est.graphs_save_s > 0
    why = (f"engine: {'CUDA graphs' if graphs else 'eager'} (memory.enforce_eager=null, the cheaper for this eval: "
           f"saves ~{_secs(abs(est.graphs_save_s))} s) — {_estimate_text(est)}; costs from H200 7B runs "
           "(plan.GRAPHS_*)")
    reasons.append(why)
    return EagerChoice(not graphs, "estimate", why, est)


def engine_mode(memory: MemoryConfig, qm: QuantMethod, machine: Machine, reasons: list[str], *,
                enforce_eager: bool) -> EngineMode:
    """dtype, memory share, eager mode and chunked prefill for this platform.

    Args:
        memory: the memory policy.
        qm: the served quantization.
        machine: a snapshot of this machine.
        reasons: the plan's reasons, appended to.
        enforce_eager: `choose_eager`'s choice.

    Returns:
        The engine mode.
    """
    if machine.vllm.platform != "cpu":
        return EngineMode(served_dtype(memory, qm, machine, reasons), memory.gpu_memory_utilization,
                          enforce_eager, None)
    util = memory.cpu_memory_utilization
    reasons.append(f"engine: vLLM CPU build, memory share {util} (memory.cpu_memory_utilization)")
    reasons.append("engine: chunked prefill off — vLLM's CPU build crashes ('CPU Generator does not use "
                   "offset') when a prompt with a per-request seed is prefilled in pieces; emq keeps "
                   "per-prompt seeds so answers are reproducible and resumable")
    return EngineMode(served_dtype(memory, qm, machine, reasons), util, True, False)


def served_dtype(memory: MemoryConfig, qm: QuantMethod, machine: Machine, reasons: list[str]) -> str:
    """memory.dtype, with auto resolved: bfloat16, or float32 on a CPU without native bf16 when unquantized.

    Args:
        memory: the memory policy (dtype).
        qm: the served quantization.
        machine: a snapshot of this machine (platform, cpu_bf16).
        reasons: the plan's reasons, appended to.

    Returns:
        vLLM's dtype= value.
    """
    if memory.dtype != "auto":
        return memory.dtype
    if machine.vllm.platform != "cpu" or machine.cpu_bf16:
        return "bfloat16"
    if qm is QuantMethod.none:
        reasons.append("engine: dtype float32 — this CPU has no native bf16 (no avx512_bf16/amx_bf16), "
                       "where vLLM emulates bf16 about 6x slower (measured on the demo: 11 vs 73 tok/s); "
                       "the bf16 weights are upcast exactly")
        return "float32"
    reasons.append(f"engine: dtype bfloat16 — vLLM's {qm.value} kernels take bf16/fp16 activations only; "
                   "this CPU has no native bf16, so it runs ~4-6x slower than float32 with quant=none "
                   "(measured on the demo: 12 vs 73 tok/s)")
    return "bfloat16"


def engine_pool(memory: MemoryConfig, machine: Machine, util: float) -> float:
    """The memory vLLM may use for weights and KV cache, GiB (over all tensor-parallel GPUs).

    Args:
        memory: the memory policy (tensor_parallel_size).
        machine: a snapshot of this machine.
        util: the engine's memory share (gpu_ or cpu_memory_utilization).

    Returns:
        The pool, GiB.

    Raises:
        EmqError: too few GPUs for tensor_parallel_size, or a GPU with less free than vLLM would claim.
    """
    tp = memory.tensor_parallel_size
    if tp > 1 and (machine.vllm.platform != "cuda" or tp > len(machine.gpus)):
        raise EmqError(f"memory.tensor_parallel_size={tp} needs {tp} GPUs; this machine has {len(machine.gpus)}",
                       "lower memory.tensor_parallel_size or run on a machine with more GPUs")
    if machine.vllm.platform != "cuda":
        return machine.ram_total_bytes / GIB * util
    # vLLM takes gpu_memory_utilization x total on each of the first tp GPUs and refuses to start
    # when another process holds that much: plan from the tightest of them
    per_gpu = min(min(g.total_bytes * util, g.free_bytes) for g in machine.gpus[:tp])
    short = [g for g in machine.gpus[:tp] if g.free_bytes < g.total_bytes * util]
    if short:
        g = min(short, key=lambda g: g.free_bytes)
        raise EmqError(f"GPU {g.index} has {g.free_bytes / GIB:.1f} GiB free of {g.total_bytes / GIB:.1f}, but "
                       f"memory.gpu_memory_utilization={util} makes vLLM claim {g.total_bytes * util / GIB:.1f} GiB "
                       "there (it refuses to start otherwise)",
                       f"set memory.gpu_memory_utilization={int(g.free_bytes / g.total_bytes * 100) / 100:.2f} "
                       "or stop what holds the GPU (nvidia-smi lists it)")
    return per_gpu * tp / GIB
