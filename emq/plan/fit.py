"""Whether the served weights and the KV cache fit the engine's pool; what serving needs from the weights."""
from __future__ import annotations

from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import Machine
from emq.plan.quant import LEANEST_FIRST
from emq.plan.types import Route
from emq.schema import MemoryConfig


# vLLM accepts these max_lora_rank values.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


# Measured on the demo, vLLM CPU 0.32 with cpu_memory_utilization=0.04 (a 0.94 GiB pool, float32 weights 0.50 GiB):
# vLLM refused with "requested memory for kv (-0.43/0.94 GiB)", i.e. 0.87 GiB in use besides the weights.
CPU_WORKER_GIB = 1.0


def fit_check(est: dict[str, float], memory: MemoryConfig, machine: Machine, util: float,
              reasons: list[str]) -> str | None:
    """Whether the served weights and one full-length sequence's KV cache fit the engine's pool.

    Args:
        est: the estimates, with engine_pool and kv_headroom.
        memory: the memory policy (max_model_len, tensor_parallel_size).
        machine: a snapshot of this machine.
        util: the engine's memory share.
        reasons: the plan's reasons; the headroom is appended when it fits.

    Returns:
        None when it fits, else the stop reason, naming the knobs that would make it fit.
    """
    pool, need_kv = est["engine_pool"], est.get("kv_per_sequence", 0.0)
    if est["kv_headroom"] > need_kv:
        reasons.append(f"serving: ~{est['serve_weights']:.2f} GiB weights in a {pool:.1f} GiB pool leaves "
                       f"{est['kv_headroom']:.2f} GiB for the KV cache"
                       + (f" (~{est['kv_headroom'] / need_kv:.0f} full-length sequences)" if need_kv else ""))
        return None
    where = "memory.gpu_memory_utilization" if machine.vllm.platform == "cuda" else "memory.cpu_memory_utilization"
    tp = memory.tensor_parallel_size
    lighter = [q.value for q in LEANEST_FIRST if q in machine.vllm.quant
               and est[f"serve_weights_{q.value}"] + need_kv + (CPU_WORKER_GIB if machine.vllm.platform == "cpu" else 0)
               < pool]
    more = [n for n in (2, 4, 8) if tp < n <= len(machine.gpus) and pool / tp * n > est["serve_weights"] + need_kv]
    overhead = CPU_WORKER_GIB if machine.vllm.platform == "cpu" else 0.0
    return (f"serving needs ~{est['serve_weights']:.2f} GiB of weights + {need_kv:.2f} GiB KV cache "
            f"for one {memory.max_model_len}-token sequence"
            + (f" + ~{overhead:.1f} GiB that vLLM's CPU worker process itself uses" if overhead else "")
            + f", but vLLM may use {pool:.2f} GiB "
            f"({where}={util}); " + (f"quantize (quant={' or quant='.join(lighter)}), " if lighter else "")
            + (f"spread it over GPUs (memory.tensor_parallel_size={more[0]}), " if more else "")
            + f"raise {where} or lower memory.max_model_len")


def weights_missing(det: DetectResult, route: Route, *, fidelity: bool) -> bool:
    """Whether the route needs weight files detect did not fetch (hub ids: detect reads metadata only)."""
    merge_lacks = route is Route.merge_then_serve and not (det.base.weights_local and det.adapter.weight_file)
    lora_lacks = route is Route.serve_lora and det.adapter.weight_file is None
    return merge_lacks or lora_lacks or (fidelity and not det.base.weights_local)


def adapter_rank(det: DetectResult) -> int:
    """The adapter's largest rank (its rank_pattern included); 0 without an adapter."""
    return max([det.adapter.rank, *det.adapter.rank_pattern.values()]) if det.adapter is not None else 0


def lora_rank(det: DetectResult, extra: int = 0) -> int:
    """vLLM's max_lora_rank for the adapter (plus `extra`: a compensation served in the same LoRA), rounded up to
    a value vLLM accepts."""
    top = adapter_rank(det) + extra
    for r in VLLM_LORA_RANKS:
        if r >= top:
            return r
    if extra:
        raise EmqError(f"the served LoRA's rank {top} (the adapter's + quant.compensation.rank={extra}) exceeds "
                       f"vLLM's maximum LoRA rank {VLLM_LORA_RANKS[-1]}", "lower quant.compensation.rank")
    raise EmqError(f"adapter rank {top} ({det.adapter.path}/adapter_config.json) exceeds vLLM's maximum "
                   f"LoRA rank {VLLM_LORA_RANKS[-1]}", "merge it instead: memory.route=merge")
