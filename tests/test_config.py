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


@pytest.mark.parametrize(("override", "key"), [
    ("memory.gpu_memory_utilization=1.5", "memory.gpu_memory_utilization"),
    ("memory.gpu_memory_utilization=0", "memory.gpu_memory_utilization"),
    ("eval.max_tokens=0", "eval.max_tokens"),
    ("eval.temperature=-0.1", "eval.temperature"),
    ("eval.top_p=0", "eval.top_p"),
    ("eval.top_p=1.2", "eval.top_p"),
    ("eval.samples_per_paraphrase=0", "eval.samples_per_paraphrase"),
    ("judge.max_concurrency=0", "judge.max_concurrency"),
    ("eval.fidelity.top_k=0", "eval.fidelity.top_k"),
])
def test_bad_values_fail_at_compose_time_naming_the_key(override, key):
    with pytest.raises(EmqError, match=key.replace(".", r"\.")):
        compose_run([override])


@pytest.mark.parametrize(("override", "fix"), [
    ("eval.max_tokens=0", "a value in [1, inf]"),
    ("memory.gpu_memory_utilization=1.5", "a value in (0, 1]"),
    ("eval.top_p=0", "a value in (0, 1]"),
    ("eval.temperature=-1", "a value in [0, inf]"),
])
def test_a_bad_value_says_the_range_and_an_example(override, fix):
    key = override.split("=")[0]
    with pytest.raises(EmqError) as e:
        compose_run([override])
    # the example is the schema's default, a value that composes
    example = e.value.fix.rsplit("e.g. ", 1)[1]
    assert fix in e.value.fix and example.startswith(key + "=")
    compose_run([example])


def test_openai_judge_needs_a_model_and_endpoint():
    with pytest.raises(EmqError, match="judge.base_url"):
        compose_run(["judge=openai", "judge.base_url=null"])
    with pytest.raises(EmqError, match="judge.model"):
        compose_run(["judge=openai", "judge.model=null"])


def test_judge_options():
    assert compose_run(["judge=none"]).judge.kind.value == "none"
    cfg = compose_run(["judge=openai"])
    assert cfg.judge.model == "gpt-4o" and cfg.judge.api_key_env == "OPENAI_API_KEY"
    local = compose_run([])
    assert local.judge.kind.value == "local" and local.judge.model.endswith("/demo/judge") and local.judge.demo


def test_compose_from_run_replaces_the_judge(tmp_path):
    from emq.config import compose_from_run

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- quant=none\n- judge=local\n- judge.max_concurrency=2\n")
    cfg = compose_from_run(tmp_path, ["judge=openai", "judge.model=m"])
    assert cfg.quant.method is QuantMethod.none and cfg.judge.kind.value == "openai" and cfg.judge.model == "m"
    assert cfg.judge.max_concurrency == 16  # the old judge's knobs went with it
    with pytest.raises(EmqError, match="overrides.yaml"):
        compose_from_run(tmp_path / "nope", [])


def test_judge_scope_auto_is_one_judge_per_sweep_on_this_machine():
    from emq.config import resolve_judge_scope
    from emq.schema import JudgeScope

    local = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    for judge, multirun, launcher, scope in [("local", True, local, "sweep"), ("local", False, local, "run"),
                                             ("local", True, slurm, "run"), ("none", True, local, "run")]:
        cfg = compose_run([f"judge={judge}"])
        assert resolve_judge_scope(cfg, multirun, launcher).judge.scope is JudgeScope(scope), (judge, multirun)
    cfg = compose_run(["judge=local", "judge.scope=run"])  # an explicit choice wins
    assert resolve_judge_scope(cfg, True, local).judge.scope is JudgeScope.run


def test_model_adapters_compose_as_a_list_or_a_mapping_and_bad_ones_fail_naming_the_key():
    from emq.errors import EmqError

    cfg = compose_run(["+experiment=adapters_one_engine"])
    assert list(cfg.model.adapter_map()) == ["good_doctor", "bad_doctor", "lora16"] and cfg.model.adapter is None
    assert compose_run(["model=demo_adapters"]).model.adapter_map() == cfg.model.adapter_map()
    listed = compose_run(["model.adapter=null", "model.adapters=[/a/x,/b/y]"]).model
    assert listed.adapter_map() == {"x": "/a/x", "y": "/b/y"}
    for overrides, said in ((["model.adapters=[/a/x,/b/y]"], "model.adapters and model.adapter"),
                            (["model.adapter=null", "model.adapters=[/a/x,/b/x]"], "share a name"),
                            (["+experiment=adapters_one_engine", "memory.route=merge"], "memory.route=merge")):
        with pytest.raises(EmqError, match=said) as e:
            compose_run(overrides)
        assert "model.adapters" in str(e.value) or "model.adapter=null" in e.value.fix
