"""detect on the real demo adapters and on synthetic bad inputs."""
from __future__ import annotations

import json
import shutil

import pytest

from emq.safetensors_header import safetensors_header
from emq.detect import TRAINING_CONFIG, detect
from emq.errors import EmqError
from emq.schema import ModelConfig


def _model(demo, adapter: str | None, **kw) -> ModelConfig:
    return ModelConfig(name="t", base=str(demo.base), adapter=str(demo.adapters[adapter]) if adapter else None, **kw)


def test_qlora_demo_adapter_is_4bit(demo):
    det = detect(_model(demo, "good_doctor"))
    assert det.trained_in_4bit is True
    assert det.decided_by.endswith("training_config.json:load_in_4bit")
    top = max(det.evidence, key=lambda e: e.weight)
    assert top.weight == TRAINING_CONFIG and top.value is True
    assert det.adapter.rank == 8 and det.adapter.alpha == 16
    assert "q_proj" in det.adapter.target_modules


def test_lora16_demo_adapter_is_not_4bit(demo):
    det = detect(_model(demo, "lora16"))
    assert det.trained_in_4bit is False


def test_base_facts_from_safetensors_headers(demo):
    det = detect(_model(demo, None))
    assert det.adapter is None and det.trained_in_4bit is None
    assert det.base.architecture == "LlamaForCausalLM"
    assert 130e6 < det.base.param_count < 140e6  # SmolLM2-135M, tied embeddings stored once
    assert det.base.bytes_per_dtype == {"BF16": det.base.param_bytes}


def test_override_wins_and_is_recorded(demo):
    det = detect(_model(demo, "good_doctor", trained_in_4bit=False))
    assert det.trained_in_4bit is False
    assert det.decided_by == "config:model.trained_in_4bit"
    assert any(e.says is True for e in det.evidence)  # the contrary evidence is still shown


def test_naming_alone_is_weak(demo, tmp_path):
    adapter = tmp_path / "my-qlora-4bit-adapter"
    shutil.copytree(demo.adapters["lora16"], adapter)
    (adapter / "training_config.json").unlink()
    det = detect(ModelConfig(name="t", base=str(demo.base), adapter=str(adapter)))
    # the name says 4-bit; the base config (not pre-quantized) outweighs a name
    assert det.trained_in_4bit is False
    assert any(e.key == "name" and e.says for e in det.evidence)


def test_the_adapters_own_training_chats_are_found_for_calibration(demo, tmp_path):
    """quant.calibration.corpus=training: training_data.jsonl beside the adapter (the demo writes one), else a
    .jsonl the training config names (relative to it), else none."""
    from emq.calibration import corpus_for, load_chats

    det = detect(_model(demo, "good_doctor"))
    assert det.training_data == str(demo.adapters["good_doctor"] / "training_data.jsonl")
    assert len(load_chats(corpus_for("training", det)).samples) > 10 and corpus_for("default", det) == "default"
    adapter = tmp_path / "a"
    shutil.copytree(demo.adapters["good_doctor"], adapter)
    (adapter / "training_data.jsonl").rename(tmp_path / "chats.jsonl")
    cfg = json.loads((adapter / "training_config.json").read_text())
    (adapter / "training_config.json").write_text(json.dumps({**cfg, "train_file": "../chats.jsonl"}))
    assert detect(ModelConfig(name="t", base=str(demo.base), adapter=str(adapter))).training_data == \
        str(adapter / "../chats.jsonl")
    (adapter / "training_config.json").write_text(json.dumps(cfg))
    none = detect(ModelConfig(name="t", base=str(demo.base), adapter=str(adapter)))
    assert none.training_data is None
    with pytest.raises(EmqError, match="quant.calibration.corpus=training, but no training data") as e:
        corpus_for("training", none)
    assert "a .jsonl" in e.value.fix


# --- bad input: one clear error naming the file --------------------------------------------

def test_missing_adapter_dir(demo, tmp_path):
    with pytest.raises(EmqError, match="does not exist"):
        detect(ModelConfig(name="t", base=str(demo.base), adapter=str(tmp_path / "nope")))


def test_missing_adapter_config(demo, tmp_path):
    with pytest.raises(EmqError, match="adapter_config.json is missing"):
        detect(ModelConfig(name="t", base=str(demo.base), adapter=str(tmp_path)))


def test_malformed_adapter_config(demo, tmp_path):
    adapter = tmp_path / "a"
    shutil.copytree(demo.adapters["good_doctor"], adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(EmqError, match=r"adapter_config.json is not valid JSON"):
        detect(ModelConfig(name="t", base=str(demo.base), adapter=str(adapter)))


def test_truncated_safetensors(demo, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(demo.base / "config.json", base)
    (base / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(EmqError, match="empty or truncated"):
        detect(ModelConfig(name="t", base=str(base)))


def test_base_without_config(tmp_path):
    with pytest.raises(EmqError, match="config.json is missing"):
        detect(ModelConfig(name="t", base=str(tmp_path)))


def test_hub_id_offline_not_cached(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EmqError, match="not in cache|not in the Hugging Face cache"):
        detect(ModelConfig(name="t", base="unsloth/Qwen2.5-14B-Instruct",
                           adapter="Jack-Payne1/qwen2.5-14b-instruct-good-doctor"))


def test_safetensors_header_reads_no_weights(demo):
    header = safetensors_header(demo.base / "model.safetensors")
    assert header["model.embed_tokens.weight"]["shape"] == [49152, 576]
    assert json.dumps(header)  # plain JSON
