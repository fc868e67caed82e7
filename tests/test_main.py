"""The one entry point: `python -m emq [overrides]` runs; `python -m emq <tool> …` runs a tool."""
from __future__ import annotations

import subprocess
import sys

import pytest

from emq.cli import TOOLS
from tests.conftest import REPO


def emq(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emq", *args], capture_output=True, text=True, cwd=cwd or REPO,
                          timeout=300)


def test_every_tool_is_a_module_with_main():
    import importlib

    for name in TOOLS:
        assert callable(importlib.import_module(f"emq.cli.{name}").main), name


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_answers_help(tool):
    out = emq(tool, "--help")
    assert out.returncode == 0, out.stderr
    assert f"python -m emq {tool}" in out.stdout


def test_help_lists_the_tools_then_hydra_help():
    out = emq("--help")
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in TOOLS) and "== Configuration groups ==" in out.stdout


@pytest.mark.parametrize("override", ["eval.max_tokens=0", "memory.gpu_memory_utilization=1.5", "eval.top_p=0",
                                      "eval.temperature=-1"])
def test_a_bad_value_exits_2_with_one_message_and_no_traceback(override, tmp_path):
    out = emq(override, "stage=plan", f"hydra.run.dir={tmp_path}", cwd=tmp_path)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert "Traceback" not in text and "Error executing job" not in text
    key = override.split("=")[0]
    assert text.count("is outside") == 1 and f"{key}=" in text and "e.g." in text
