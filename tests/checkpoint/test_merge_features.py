"""Stream and PEFT merges against PEFT serving the adapter, feature by feature (fp32: 1e-4).

Adapters are made by PEFT itself (init_lora_weights=False gives nonzero B), on tiny synthetic
bases written to disk, so every feature is checked on the files PEFT really writes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emq.detect import detect
from emq.errors import EmqError
from emq.checkpoint.merge import MergeSettings, merge_adapter
from emq.schema import MergeBase, MergeMethod, ModelConfig
from tests.synthetic import LORA_FEATURES, logits, make_base, peft_adapter

FP32_ATOL = 1e-4


def _merge(base: Path, adapter: Path, cache: Path, method=MergeMethod.stream) -> Path:
    det = detect(ModelConfig(name="t", base=str(base), adapter=str(adapter)))
    result = merge_adapter(det, ["cpu"], cache, settings=MergeSettings(method, MergeBase.original, "float32"))
    return Path(result.path)


@pytest.mark.parametrize("method", [MergeMethod.stream, MergeMethod.peft])
@pytest.mark.parametrize("feature", list(LORA_FEATURES))
def test_merge_matches_peft(tmp_path, feature, method):
    kw = dict(LORA_FEATURES[feature])
    config = None
    if feature == "lora_bias":  # lora_bias needs a base bias to add to
        from tests.synthetic import llama_config
        config = llama_config(attention_bias=True)
    base = make_base(tmp_path / "base", shards=2, config=config)
    if config is not None:  # add the q/k/v/o biases the config promises
        _add_attention_biases(base)
    adapter = peft_adapter(base, tmp_path / "adapter", **kw)
    merged = _merge(base, adapter, tmp_path / "cache", method)
    torch.testing.assert_close(logits(merged), logits(base, adapter), atol=FP32_ATOL, rtol=0)


def _add_attention_biases(base: Path) -> None:
    from safetensors.torch import load_file, save_file

    for shard in sorted(base.glob("*.safetensors")):
        t = load_file(shard)
        for name in list(t):
            if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
                t[name[: -len("weight")] + "bias"] = torch.randn(t[name].shape[0]).to(torch.bfloat16) * 0.01
        save_file(t, str(shard))
    index = base / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        for shard in sorted(base.glob("*.safetensors")):
            from safetensors import safe_open
            with safe_open(str(shard), "pt") as f:
                data["weight_map"].update({k: shard.name for k in f.keys()})
        index.write_text(json.dumps(data))


def test_tied_embeddings_with_lm_head_saved(tmp_path):
    base = make_base(tmp_path / "base", tied=True)
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], modules_to_save=["lm_head"])
    merged = _merge(base, adapter, tmp_path / "cache")
    assert json.loads((merged / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(merged), logits(base, adapter), atol=FP32_ATOL, rtol=0)


def test_tied_embeddings_with_lora_on_embedding(tmp_path):
    base = make_base(tmp_path / "base", tied=True)
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=["embed_tokens", "v_proj"])
    merged = _merge(base, adapter, tmp_path / "cache")
    torch.testing.assert_close(logits(merged), logits(base, adapter), atol=FP32_ATOL, rtol=0)


def test_fan_in_fan_out_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)).save_pretrained(base)
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    merged = _merge(base, adapter, tmp_path / "cache")
    torch.testing.assert_close(logits(merged), logits(base, adapter), atol=FP32_ATOL, rtol=0)


def test_dora_is_refused_before_any_work(tmp_path):
    base = make_base(tmp_path / "base")
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"], use_dora=True)
    det = detect(ModelConfig(name="t", base=str(base), adapter=str(adapter)))
    with pytest.raises(EmqError, match="DoRA"):
        merge_adapter(det, ["cpu"], tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("[!.]*"))  # nothing published


def test_nan_in_adapter_is_an_error_naming_the_module(tmp_path):
    from safetensors.torch import load_file, save_file

    base = make_base(tmp_path / "base")
    adapter = peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    t = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in t if "layers.1" in k and "lora_B" in k)
    t[key][0, 0] = float("nan")
    save_file(t, str(adapter / "adapter_model.safetensors"))
    det = detect(ModelConfig(name="t", base=str(base), adapter=str(adapter)))
    with pytest.raises(EmqError, match=r"model\.layers\.1\.self_attn\.q_proj has NaN"):
        merge_adapter(det, ["cpu"], tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("[!.]*"))
