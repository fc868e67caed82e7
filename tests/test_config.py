"""Every option of every group composes into a typed RunConfig; bad keys fail at compose time."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from emq.config import CONF_DIR, GROUP_SCHEMAS
from emq.errors import EmqError
from emq.schema import MemoryConfig, ModelConfig, QuantMethod, RunConfig, Stage
from tests.conftest import compose_run

OPTIONS = [(group, p.stem) for group in GROUP_SCHEMAS for p in sorted((CONF_DIR / group).glob("*.yaml"))]


def test_every_group_has_options():
    assert {g for g, _ in OPTIONS} == set(GROUP_SCHEMAS)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group, option):
    cfg = compose_run([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    assert isinstance(getattr(cfg, group), GROUP_SCHEMAS[group])


def test_default_is_the_demo():
    cfg = compose_run()
    assert isinstance(cfg.model, ModelConfig) and cfg.model.name == "demo_good_doctor" and cfg.model.demo
    assert isinstance(cfg.memory, MemoryConfig)
    assert cfg.quant.method is QuantMethod.auto
    assert cfg.stage is Stage.all
    assert cfg.model.base.endswith("/demo/base") and not cfg.model.base.startswith("$")
    assert "~" not in cfg.paths.data_dir


def test_brief_command_composes():
    cfg = compose_run(["model=good_doctor", "memory=low_vram"])
    assert cfg.model.adapter == "Jack-Payne1/qwen2.5-14b-instruct-good-doctor"
    assert cfg.memory.prefer_cpu_merge


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(ConfigCompositionException):
        compose_run(["memory.no_such_knob=1"])


def test_forced_unknown_key_is_refused_not_dropped():
    with pytest.raises(EmqError, match="memory.no_such_knob"):
        compose_run(["+memory.no_such_knob=1"])


def test_wrong_type_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_run(["memory.gpu_memory_utilization=lots"])


def test_bad_enum_fails_at_compose_time():
    with pytest.raises((ConfigCompositionException, ValidationError, ConfigKeyError)):
        compose_run(["quant.method=gptq"])


def test_trained_in_4bit_override_is_typed():
    assert compose_run(["model.trained_in_4bit=true"]).model.trained_in_4bit is True
    assert compose_run([]).model.trained_in_4bit is None


def test_data_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("EMQ_HOME", str(tmp_path))
    cfg = compose_run()
    assert cfg.paths.data_dir == str(tmp_path)
    assert cfg.paths.cache_dir == str(tmp_path / "merged")
