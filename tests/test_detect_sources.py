"""detect on synthetic adapters: every evidence source, conflicts, and bad inputs."""
from __future__ import annotations

import json

import pytest
import yaml

from emq.detect import ADAPTER_BASE_QUANTIZED, BASE_CONFIG, MODEL_CARD_TAG, NAMING, TRAINING_CONFIG, detect
from emq.errors import EmqError
from emq.schema import ModelConfig
from tests.synthetic import llama_config, make_adapter, make_base

BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}


@pytest.fixture
def base(tmp_path):
    return make_base(tmp_path / "base")


def _detect(base, adapter, **kw):
    return detect(ModelConfig(name="t", base=str(base), adapter=str(adapter), **kw))


def _top(det):
    return max((e for e in det.evidence if e.says is not None), key=lambda e: e.weight)


def test_training_config_json_beside_adapter(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    (a / "training_config.json").write_text(json.dumps({"load_in_4bit": True}))
    det = _detect(base, a)
    assert det.trained_in_4bit is True and _top(det).weight == TRAINING_CONFIG


def test_axolotl_yaml_adapter_qlora(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    (a / "axolotl.yaml").write_text(yaml.safe_dump({"adapter": "qlora", "base_model": str(base)}))
    det = _detect(base, a)
    assert det.trained_in_4bit is True and _top(det).key == "adapter"


def test_config_star_json_with_bnb_keys(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    (a / "config_run7.json").write_text(json.dumps({"bnb_4bit_quant_type": "nf4"}))
    assert _detect(base, a).trained_in_4bit is True


def test_nested_quantization_dict(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    (a / "training_config.json").write_text(json.dumps({"quantization": {"load_in_4bit": True}}))
    det = _detect(base, a)
    assert det.trained_in_4bit is True and _top(det).key == "quantization.load_in_4bit"


def test_explicit_training_config_path(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    cfg = tmp_path / "elsewhere.json"
    cfg.write_text(json.dumps({"load_in_4bit": False}))
    det = _detect(base, a, training_config=str(cfg))
    assert det.trained_in_4bit is False and _top(det).source == str(cfg)


def test_config_for_another_adapter_is_not_evidence(base, tmp_path):
    a = make_adapter(tmp_path / "my-adapter", str(base))
    (a / "training_config.json").write_text(json.dumps({"load_in_4bit": True,
                                                         "finetuned_model_id": "someone/other-adapter"}))
    det = _detect(base, a)
    ignored = [e for e in det.evidence if e.says is None]
    assert ignored and "names another adapter" in ignored[0].note
    assert det.trained_in_4bit is False  # only the weak base-config evidence is left


def test_adapter_names_a_prequantized_base(base, tmp_path):
    qbase = make_base(tmp_path / "base-bnb-4bit", config=llama_config(quantization_config=BNB))
    a = make_adapter(tmp_path / "a", str(qbase))
    det = _detect(base, a)
    assert det.trained_in_4bit is True and _top(det).weight == ADAPTER_BASE_QUANTIZED


def test_model_card_tags(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    (a / "README.md").write_text("---\nbase_model: x/y\ntags: [trl, qlora]\n---\n# card\n")
    det = _detect(base, a)
    assert det.trained_in_4bit is True and _top(det).weight == MODEL_CARD_TAG


def test_prequantized_base_itself(tmp_path):
    qbase = make_base(tmp_path / "qbase", config=llama_config(quantization_config=BNB))
    a = make_adapter(tmp_path / "a", str(qbase))
    det = _detect(qbase, a)
    assert det.trained_in_4bit is True and _top(det).weight == BASE_CONFIG


def test_naming_alone_says_4bit_weakly(base, tmp_path):
    a = make_adapter(tmp_path / "doctor-4bit-adapter", str(base))
    det = _detect(base, a)
    names = [e for e in det.evidence if e.key == "name"]
    assert names and names[0].weight == NAMING
    assert det.trained_in_4bit is False  # outweighed by the base config: naming is never decisive


def test_conflict_resolves_by_strength_and_is_shown(base, tmp_path):
    a = make_adapter(tmp_path / "qlora-adapter", str(base))
    (a / "training_config.json").write_text(json.dumps({"load_in_4bit": False}))
    (a / "README.md").write_text("---\ntags: [bnb-4bit]\n---\n")
    det = _detect(base, a)
    assert det.trained_in_4bit is False and _top(det).weight == TRAINING_CONFIG
    assert len(det.conflicts) == 2 and all("outweighed by" in c for c in det.conflicts)
    assert det.confidence < 1.0


def test_override_decides(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    (a / "training_config.json").write_text(json.dumps({"load_in_4bit": True}))
    det = _detect(base, a, trained_in_4bit=False)
    assert det.trained_in_4bit is False and det.confidence == 1.0 and det.decided_by == "config:model.trained_in_4bit"


def test_no_evidence_at_all_is_weak(base, tmp_path):
    det = _detect(base, make_adapter(tmp_path / "a", str(base)))
    assert det.trained_in_4bit is False and det.confidence <= 0.25


def test_sharded_base_with_index(tmp_path):
    b = make_base(tmp_path / "sharded", shards=3)
    det = detect(ModelConfig(name="t", base=str(b), adapter=str(make_adapter(tmp_path / "a", str(b)))))
    assert len(det.base.shards) == 3 and det.base.weights_local
    one = detect(ModelConfig(name="t", base=str(make_base(tmp_path / "one"))))
    assert det.base.param_count == one.base.param_count
    assert det.base.num_layers == 2 and det.base.head_dim == 16 and det.base.num_kv_heads == 2


def test_adapter_facts_and_vllm_support(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base), r=8, config={"use_rslora": True, "rank_pattern": {"q_proj": 16},
                                                               "modules_to_save": ["lm_head"]})
    facts = _detect(base, a).adapter
    assert facts.rank == 8 and facts.use_rslora and facts.rank_pattern == {"q_proj": 16}
    assert not facts.vllm_lora_ok and "modules_to_save" in facts.vllm_lora_blockers[0]


# --- bad inputs: each one clear error naming the file and the fix ------------------------------

def _bad_json(a):
    (a / "adapter_config.json").write_text("{oops")


def _cfg_list(a):
    (a / "adapter_config.json").write_text("[1, 2]")


def _no_weights(a):
    (a / "adapter_model.safetensors").unlink()


def _empty_weights(a):
    (a / "adapter_model.safetensors").write_bytes(b"")


def _truncated_weights(a):
    data = (a / "adapter_model.safetensors").read_bytes()
    (a / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage_header(a):
    (a / "adapter_model.safetensors").write_bytes((16).to_bytes(8, "little") + b"\xff" * 16)


def _bad_yaml(a):
    (a / "train.yaml").write_text("adapter: [qlora\n")


def _rank_zero(a):
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))


def _not_lora(a):
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))


def _no_targets(a):
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": []}))


def _missing_adapter_config(a):
    (a / "adapter_config.json").unlink()


BAD_ADAPTERS = [
    (_missing_adapter_config, "adapter_config.json is missing"),
    (_bad_json, "adapter_config.json is not valid JSON"),
    (_cfg_list, "must hold a JSON object"),
    (_no_weights, "has no adapter_model.safetensors"),
    (_empty_weights, "empty or truncated"),
    (_truncated_weights, "truncated"),
    (_garbage_header, "corrupt safetensors header"),
    (_bad_yaml, "is not valid YAML"),
    (_rank_zero, "rank must be a positive integer"),
    (_not_lora, "IA3 adapter"),
    (_no_targets, "no target_modules"),
]


@pytest.mark.parametrize(("breaker", "match"), BAD_ADAPTERS, ids=[b.__name__.strip("_") for b, _ in BAD_ADAPTERS])
def test_bad_adapter(base, tmp_path, breaker, match):
    a = make_adapter(tmp_path / "a", str(base))
    breaker(a)
    with pytest.raises(EmqError, match=match) as e:
        _detect(base, a)
    assert e.value.fix
    assert str(tmp_path) in e.value.message  # names the file


def _wrong_targets(tmp_path, base):
    return make_adapter(tmp_path / "a", str(base), module_prefix="transformer.h")


def _wrong_shapes(tmp_path, base):
    return make_adapter(tmp_path / "a", str(base), in_features=96)


BAD_PAIRS = [
    (_wrong_targets, "does not have"),
    (_wrong_shapes, "has shape"),
]


@pytest.mark.parametrize(("maker", "match"), BAD_PAIRS, ids=["targets-missing-in-base", "shape-mismatch"])
def test_adapter_that_does_not_fit_the_base(base, tmp_path, maker, match):
    with pytest.raises(EmqError, match=match) as e:
        _detect(base, maker(tmp_path, base))
    assert "model.base" in e.value.fix


def _base_unknown_arch(b):
    (b / "config.json").write_text(json.dumps(llama_config(architectures=["FluxCapacitorModel"])))


def _base_no_arch(b):
    cfg = llama_config()
    del cfg["architectures"]
    (b / "config.json").write_text(json.dumps(cfg))


def _base_missing_shard(b):
    (b / "model-00002-of-00002.safetensors").unlink()


def _base_no_config(b):
    (b / "config.json").unlink()


def _base_truncated(b):
    p = b / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:1000])


BAD_BASES = [
    (_base_unknown_arch, "unknown architecture 'FluxCapacitorModel'"),
    (_base_no_arch, "names no architecture"),
    (_base_missing_shard, "lists shards that are missing"),
    (_base_no_config, "config.json is missing"),
    (_base_truncated, "truncated"),
]


@pytest.mark.parametrize(("breaker", "match"), BAD_BASES, ids=[b.__name__.strip("_") for b, _ in BAD_BASES])
def test_bad_base(tmp_path, breaker, match):
    b = make_base(tmp_path / "base", shards=2)
    breaker(b)
    with pytest.raises(EmqError, match=match) as e:
        detect(ModelConfig(name="t", base=str(b)))
    assert e.value.fix


def test_missing_explicit_training_config(base, tmp_path):
    a = make_adapter(tmp_path / "a", str(base))
    with pytest.raises(EmqError, match="model.training_config"):
        _detect(base, a, training_config=str(tmp_path / "nope.json"))


def test_at_least_fifteen_distinct_bad_inputs():
    assert len(BAD_ADAPTERS) + len(BAD_PAIRS) + len(BAD_BASES) + 1 >= 15


def test_known_architectures_shortcut_matches_transformers():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from emq.detect import _known_architectures

    assert _known_architectures() == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
