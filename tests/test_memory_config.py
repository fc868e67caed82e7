"""emq.memory_config: the original tool's memory_config.py, its recommendations computed by emq's planner."""
from __future__ import annotations

import subprocess
import sys

import pytest

from emq import memory_config
from emq.cli.resources import LOW_VRAM_GIB, HIGH_VRAM_GIB

FLAGS = ("USE_QUANTIZATION", "USE_CPU_FOR_MERGING", "SKIP_QUANTIZATION_ON_LOW_VRAM", "STOP_ON_FAILURE")


@pytest.mark.parametrize("vram_gb, preset", [(0, "cpu_only"), (8, "low_vram"), (LOW_VRAM_GIB - 1, "low_vram"),
                                             (LOW_VRAM_GIB, "default"), (HIGH_VRAM_GIB, "high_vram"),
                                             (141, "high_vram")])
def test_get_memory_config_is_the_preset_emq_recommends(vram_gb, preset):
    config = memory_config.get_memory_config(vram_gb)
    assert config["emq_memory"] == preset and config["name"] and config["description"]
    memory = memory_config.preset(preset)  # the flags are that preset's values, read from conf/memory/<preset>.yaml
    assert config["USE_QUANTIZATION"] == memory.use_quantization
    assert config["USE_CPU_FOR_MERGING"] == memory.prefer_cpu_merge
    assert config["SKIP_QUANTIZATION_ON_LOW_VRAM"] == memory.skip_quantization_on_low_vram
    assert config["STOP_ON_FAILURE"] == memory.stop_on_failure


def test_presets_read_as_hydra_composes_them():
    from tests.conftest import compose_run

    for name in ("cpu_only", "low_vram", "default", "high_vram"):
        assert memory_config.preset(name) == compose_run([f"memory={name}"]).memory


def test_generate_config_file_is_python_that_sets_the_flags():
    config = memory_config.get_memory_config(16)
    text = memory_config.generate_config_file(config)
    namespace: dict = {}
    exec(compile(text, "generated", "exec"), namespace)  # the original wrote `true`, which does not run
    assert {k: namespace[k] for k in FLAGS} == {k: config[k] for k in FLAGS}
    assert "python -m emq memory=low_vram" in text


def test_main_prints_the_flags_and_the_emq_preset():
    out = subprocess.run([sys.executable, "-m", "emq.memory_config"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    config = memory_config.get_memory_config(memory_config.check_vram_capacity())
    for flag in FLAGS:
        assert f"{flag} = {config[flag]}" in out.stdout
    assert f"python -m emq memory={config['emq_memory']}" in out.stdout


def test_check_vram_capacity_is_a_float():
    assert isinstance(memory_config.check_vram_capacity(), float)
