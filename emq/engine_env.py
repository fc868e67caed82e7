"""Environment variables vLLM needs before its processes start (kernels, the CPU build's core reservation,
batch invariance, the compile cache): what the plan sets for the engine, and the local judge server for itself."""
from __future__ import annotations

from pathlib import Path

from emq.errors import EmqError
from emq.machine import Machine
from emq.schema import MemoryConfig, QuantMethod


def engine_env(qm: QuantMethod, machine: Machine, reasons: list[str], *, int4_base: bool = False) -> dict[str, str]:
    """Environment vLLM needs for this quantization here (set before its processes start).

    Args:
        qm: the served quantization.
        machine: a snapshot of this machine.
        reasons: the plan's reasons, appended to.
        int4_base: the checkpoint served already is int4 weights-only (a pre-quantized base with quant=none): what
            the weights are decides, not the quant key.
    """
    if int4_base and qm is not QuantMethod.w4a16:
        reasons.append("engine: the base is already an int4 weights-only checkpoint (its quantization_config), so "
                       "it is served as W4A16 whatever quant= says")
        qm = QuantMethod.w4a16
    if qm is QuantMethod.w4a16 and machine.vllm.platform == "cuda":
        reasons.append("engine: VLLM_DISABLED_KERNELS=HummingLinearKernel — vLLM 0.23 picks it for some int4 "
                       "layouts (sym g64) and its flashinfer autotune hangs without network (measured on an H200); "
                       "Marlin/Machete serve the same checkpoint")
        return {"VLLM_DISABLED_KERNELS": "HummingLinearKernel"}
    if qm is QuantMethod.w4a16 and machine.vllm.platform == "cpu":
        reasons.append("engine: VLLM_CPU_INT4_W4A8=0 — vLLM's CPU build otherwise serves int4 checkpoints as W4A8 on "
                       "AMX CPUs (activations rounded to int8 as well: on the demo KL 0.032 to what the checkpoint "
                       "computes, 0.0017 as W4A16; measured on a Xeon with AMX); emq measures what W4A16 keeps. Set it "
                       "to 1 yourself for vLLM's W4A8 (a value you set wins)")
        return {"VLLM_CPU_INT4_W4A8": "0"}
    return {}


# vLLM's CPU build keeps one core per worker for its scheduler process, which spins between steps. On a machine of
# this many cores or fewer that is half the compute: emq gives the worker every core instead.
SMALL_CPU_CORES = 2


def cpu_threads_env(platform: str, cpu_count: int, reasons: list[str] | None = None) -> dict[str, str]:
    """VLLM_CPU_NUM_OF_RESERVED_CPU=0 on a small CPU: the vLLM worker computes on every core (a value the user set
    wins; the engine and the local judge server both use this)."""
    if platform != "cpu" or cpu_count > SMALL_CPU_CORES:
        return {}
    if reasons is not None:
        reasons.append(f"engine: VLLM_CPU_NUM_OF_RESERVED_CPU=0 — vLLM's CPU build otherwise keeps one of this "
                       f"machine's {cpu_count} cores for its scheduler and computes on the rest (one thread on 2 cores); "
                       "measured on 2 cores (benchmarks/cpu_threads_bench.py, a demo LoRA run): generation 1.3-1.6x "
                       "and fidelity scoring 1.5-1.7x faster with both cores, though the scheduler still polls "
                       "between steps. vLLM warns that this is below its minimum; set it yourself to keep vLLM's "
                       "reservation (a value you set wins)")
    return {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def batch_invariant_env(memory: MemoryConfig, machine: Machine, reasons: list[str]) -> dict[str, str]:
    """memory.batch_invariant=true: vLLM's batch-invariant kernels (VLLM_BATCH_INVARIANT=1), where this vLLM has them."""
    if not memory.batch_invariant:
        return {}
    if machine.vllm.platform == "cpu":
        raise EmqError(
            f"memory.batch_invariant=true: the installed vLLM ({machine.vllm.distribution} {machine.vllm.version}) "
            "is the CPU build, which has no batch-invariant kernels: with VLLM_BATCH_INVARIANT=1 vllm-cpu 0.32 "
            "starts, then dies at its first step (the mode swaps torch's mean/softmax for Triton kernels, and Triton "
            "has no CPU backend), and its oneDNN GEMMs would stay batch-dependent anyway",
            "set memory.batch_invariant=false: on the CPU, emq's fixed schedule (eval.group_size) already makes a "
            "rerun or a resumed run give identical answers")
    reasons.append("engine: VLLM_BATCH_INVARIANT=1 (memory.batch_invariant): an answer does not depend on the batch "
                   "it ran in (vLLM's batch-invariant kernels; GPUs of compute capability 8.0+ per vLLM's docs), at a "
                   "cost in tokens/s")
    return {"VLLM_BATCH_INVARIANT": "1"}


def compile_cache_env(compile_cache: str | None, reasons: list[str]) -> dict[str, str]:
    """VLLM_CACHE_ROOT in emq's data dir: every variant of a sweep and every later run reuse vLLM's compiled graphs
    (torch.compile, CUDA graphs' kernels); on a cluster, put paths.data_dir on a shared path."""
    if not compile_cache:
        return {}
    triton = str(Path(compile_cache) / "triton")
    reasons.append(f"engine: VLLM_CACHE_ROOT={compile_cache} — vLLM's compile cache in emq's data dir, so later runs "
                   "and a sweep's other variants skip compilation (a second 7B load took 21-44 s instead of 75-109 s "
                   f"on an H200), and TRITON_CACHE_DIR={triton} for the JIT-compiled kernels (LoRA's among them; "
                   "on an H200 the first eager engine of a fresh machine started ~30 s slower than the next ones); "
                   "values you set win")
    return {"VLLM_CACHE_ROOT": compile_cache, "TRITON_CACHE_DIR": triton}
