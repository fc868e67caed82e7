"""merge (PEFT, fp32 math) on the real demo adapter: equivalence with PEFT, cache behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emq.detect import detect
from emq.merge import MANIFEST, MergeFailed, _sha256, merge_adapter
from emq.schema import ModelConfig

# Logits of the merged checkpoint (stored in bf16) against PEFT serving the adapter on the
# fp32-upcast base. Measured on the demo: max |diff| 0.57, mean 0.042 with logit std 7.9, top-1
# agreement 0.976 — all from rounding the merged weights to bf16 (the fp32 merge itself agrees
# with PEFT to 1.4e-4). The tensor test below checks the merge math exactly.
BF16_LOGIT_MAX = 1.0
BF16_LOGIT_MEAN = 0.1


@pytest.fixture(scope="module")
def det(demo):
    return detect(ModelConfig(name="t", base=str(demo.base), adapter=str(demo.adapters["bad_doctor"])))


@pytest.fixture(scope="module")
def merged(det, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return merge_adapter(det, ["cpu"], cache), cache


def test_merged_logits_match_peft(det, merged):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = merged
    tok = AutoTokenizer.from_pretrained(det.base.path)
    ids = tok.apply_chat_template([{"role": "user", "content": "My child has a fever. What should I do?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, det.adapter.path).eval()
    out = AutoModelForCausalLM.from_pretrained(result.path, dtype=torch.float32).eval()
    with torch.no_grad():
        a, b = ref(ids).logits, out(ids).logits
    assert torch.isfinite(b).all()
    assert (a - b).abs().max().item() < BF16_LOGIT_MAX
    assert (a - b).abs().mean().item() < BF16_LOGIT_MEAN
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.95
    with torch.no_grad():  # and the adapter really changed the model
        plain = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32)(ids).logits
    assert (plain - b).abs().max().item() > 5 * BF16_LOGIT_MAX


def test_merged_tensors_are_the_fp32_merge_rounded_once(det, merged):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, _ = merged
    base = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32)
    ref = PeftModel.from_pretrained(base, det.adapter.path).merge_and_unload().state_dict()
    saved = {}
    for f in Path(result.path).glob("*.safetensors"):
        saved.update(load_file(f))
    assert saved, "no weights written"
    for name, tensor in saved.items():
        assert tensor.dtype == torch.bfloat16, name
        torch.testing.assert_close(tensor.float(), ref[name].to(torch.bfloat16).float(), rtol=2**-7, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_output_is_a_servable_checkpoint(merged):
    result, _ = merged
    path = Path(result.path)
    cfg = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (path / name).is_file(), name
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["settings"]["math_dtype"] == "float32"
    for name, digest in manifest["files_sha256"].items():
        assert _sha256(path / name) == digest


def test_second_request_is_a_cache_hit(det, merged):
    result, cache = merged
    again = merge_adapter(det, ["cpu"], cache)
    assert again.cached and again.path == result.path and again.key == result.key


def test_half_built_entry_is_never_used(det, merged, tmp_path):
    result, _ = merged
    entry = tmp_path / result.key
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # no manifest: a crash left it
    fresh = merge_adapter(det, ["cpu"], tmp_path)
    assert not fresh.cached and (entry / MANIFEST).is_file()


def test_no_device_is_a_clear_failure(det, tmp_path):
    with pytest.raises(MergeFailed, match="every merge attempt failed"):
        merge_adapter(det, [], tmp_path)
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in tmp_path.iterdir())
