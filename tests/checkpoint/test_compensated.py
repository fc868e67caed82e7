"""The compensated adapter (emq.checkpoint.compensated): the adapter's update and the compensation in one LoRA."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emq.checkpoint.compensated import PEFT_PREFIX, adapter_config, build_tensors


def test_the_combined_lora_is_the_sum_of_the_update_and_the_compensation():
    g = torch.Generator().manual_seed(0)
    ft = {"model.layers.0.mlp.up_proj": (torch.randn(24, 4, generator=g), torch.randn(4, 16, generator=g))}
    comp = {"model.layers.0.mlp.up_proj": (torch.randn(24, 8, generator=g), torch.randn(8, 16, generator=g)),
            "model.layers.0.mlp.down_proj": (torch.randn(16, 8, generator=g), torch.randn(8, 24, generator=g))}
    tensors, rank, r_ft = build_tensors(ft, comp)
    assert (rank, r_ft) == (12, 4)
    for module in comp:
        a = tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].float()
        b = tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"].float()
        assert a.shape[0] == b.shape[1] == 12 and tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"].dtype == torch.bfloat16
        want = comp[module][0] @ comp[module][1] + (ft[module][0] @ ft[module][1] if module in ft else 0)
        assert torch.allclose(b @ a, want, rtol=0.02, atol=0.05 * float(want.abs().max()))
    # a Linear the adapter does not train gets zeros for the update's rank
    down = tensors[f"{PEFT_PREFIX}model.layers.0.mlp.down_proj.lora_A.weight"]
    assert down[:4].abs().max() == 0


def test_the_config_serves_the_sum_at_scale_one(tmp_path):
    from types import SimpleNamespace

    det = SimpleNamespace(adapter=None)
    cfg = adapter_config(det, ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"], 40, "/w4a16")
    assert cfg["r"] == cfg["lora_alpha"] == 40 and not cfg["use_rslora"] and cfg["rank_pattern"] == {}
    assert cfg["target_modules"] == ["q_proj", "up_proj"] and cfg["peft_type"] == "LORA"


@pytest.mark.slow
def test_the_demo_qlora_gets_a_w4a16_base_as_trained_and_one_lora_holding_update_and_compensation(demo, tmp_path):
    """The quantize stage of quant.compensation.rank on the demo's QLoRA, end to end without vLLM (~1-2 min): the
    base quantized is dequant(NF4(W)) (a cached stream pass), the compensation is fitted layer by layer, the served
    LoRA is the adapter's update + the compensation exactly, and a second call builds nothing."""
    from safetensors.torch import load_file

    from emq.checkpoint.layerwise import COMPENSATION_FILE
    from emq.checkpoint.quantize import quantize_for_plan, served_adapter
    from emq.checkpoint.stream import load_adapter
    from emq.detect import detect
    from emq.plan import QuantizePlan
    from emq.schema import ModelConfig

    det = detect(ModelConfig(name="demo_good_doctor", base=str(demo.base), adapter=str(demo.adapters["good_doctor"])))
    assert det.trained_in_4bit
    qplan = QuantizePlan("rtn", 64, False, ["lm_head"], False, "base", ["cpu"],
                         {"corpus": "default", "samples": 2, "seq_len": 64, "damp": 0.01}, compensation=4)
    cache = tmp_path / "cache"
    quantized = quantize_for_plan(det, qplan, None, cache)
    source = json.loads((Path(quantized.source) / "manifest.json").read_text())
    assert source["inputs"]["settings"]["merge_base"] == "dequantized" and source["inputs"]["adapter"]["path"] is None
    assert json.loads((Path(quantized.path) / "config.json").read_text())["quantization_config"]
    adapter = served_adapter(det, qplan, quantized, cache)
    assert (adapter.rank, adapter.adapter_rank, adapter.compensation_rank) == (12, 8, 4) and not adapter.cached
    cfg = json.loads((Path(adapter.path) / "adapter_config.json").read_text())
    assert cfg["r"] == cfg["lora_alpha"] == 12 and len(cfg["target_modules"]) == 7
    served = load_file(str(Path(adapter.path) / "adapter_model.safetensors"))
    factors = load_file(str(Path(quantized.path) / COMPENSATION_FILE))
    deltas, _, _, reader = load_adapter(det)
    module = "model.layers.3.mlp.down_proj"
    d = deltas[f"{module}.weight"]
    want = d.scale * torch.from_numpy(d.b.f32()) @ torch.from_numpy(d.a.f32()) + \
        factors[f"{module}.b"] @ factors[f"{module}.a"]
    reader.close()
    peft = f"base_model.model.{module}"
    got = served[f"{peft}.lora_B.weight"].float() @ served[f"{peft}.lora_A.weight"].float()
    assert torch.allclose(got, want, atol=0.02 * float(want.abs().max()))
    assert served_adapter(det, qplan, quantize_for_plan(det, qplan, None, cache), cache).cached
