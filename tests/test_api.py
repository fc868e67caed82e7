"""The Python API (emq.was_trained_in_4bit / get_or_create_merged_model / prepare_model_for_vllm)."""
from __future__ import annotations

import json
from pathlib import Path

import emq
from emq.plan import Route
from tests.conftest import default_route


def test_was_trained_in_4bit_reads_the_adapters_base_itself(demo):
    assert emq.was_trained_in_4bit(str(demo.adapters["good_doctor"])) is True
    assert emq.was_trained_in_4bit(str(demo.adapters["lora16"])) is False


def test_get_or_create_merged_model_is_cached(demo, tmp_path):
    a = emq.get_or_create_merged_model(None, str(demo.adapters["bad_doctor"]), cache_dir=tmp_path, device="cpu")
    b = emq.get_or_create_merged_model(str(demo.base), str(demo.adapters["bad_doctor"]), cache_dir=tmp_path,
                                       device="cpu")
    assert a == b and (a / "manifest.json").is_file()
    assert json.loads((a / "manifest.json").read_text())["inputs"]["settings"]["merge_base"] == "dequantized"


def test_prepare_a_qlora_adapter_takes_the_plans_4bit_route(demo, tmp_path):
    prep = emq.prepare_model_for_vllm(str(demo.adapters["good_doctor"]), cache_dir=tmp_path)
    if default_route() == "merge-then-serve":  # this vLLM serves W4A16: auto merges, RTN fused into the merge
        assert prep.merged and Path(prep.model).parent == tmp_path and prep.lora_request() is None
        assert prep.engine_kwargs["quantization"] == "compressed-tensors"
        assert prep.env["VLLM_CPU_INT4_W4A8"] == "0"  # the script sets it before LLM(...): W4A16, not CPU's W4A8
        assert (Path(prep.model) / "config.json").read_text().count("pack-quantized") == 1
        assert prep.plan.route is Route.merge_then_serve
    else:  # no W4A16 kernel here (vLLM's CPU build on an AVX2 CPU): auto is bnb, the LoRA on the in-flight NF4 base
        assert not prep.merged and prep.model == str(demo.base) and prep.lora_request() is not None
        assert prep.engine_kwargs["quantization"] == "bitsandbytes" and prep.engine_kwargs["enable_lora"]
        assert prep.plan.route is Route.serve_lora


def test_prepare_serves_a_16bit_adapter_as_lora(demo, tmp_path):
    prep = emq.prepare_model_for_vllm(str(demo.adapters["lora16"]), use_quantization=False, cache_dir=tmp_path)
    assert not prep.merged and prep.model == str(demo.base)
    assert prep.engine_kwargs["enable_lora"] and "quantization" not in prep.engine_kwargs
    req = prep.lora_request()
    assert req.lora_path == str(demo.adapters["lora16"])
