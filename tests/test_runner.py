"""The runner: status.json always written (failure included), a dry run stops after plan, stages are timed."""
from __future__ import annotations

import json

from emq.runner import run
from tests.conftest import compose_run


def test_failed_run_still_writes_status(tmp_path, monkeypatch):
    monkeypatch.setenv("EMQ_HOME", str(tmp_path / "home"))
    cfg = compose_run(["model=demo_base", "model.demo=false", f"model.base={tmp_path / 'missing'}", "judge=none"])
    status = run(cfg, tmp_path / "run")
    assert status.status == "failed" and status.stage == "detect"
    record = json.loads((tmp_path / "run" / "status.json").read_text())
    assert record["status"] == "failed" and "does not exist" in record["error"]
    assert (tmp_path / "run" / "versions.json").is_file()


def test_a_dry_run_stops_after_plan_and_times_each_stage(demo, tmp_path):
    cfg = compose_run(["stage=plan", f"paths.data_dir={demo.root.parent}", f"paths.cache_dir={tmp_path / 'cache'}"])
    status = run(cfg, tmp_path / "run")
    assert status.status == "ok" and status.stage == "plan" and status.route == "merge-then-serve"
    record = json.loads((tmp_path / "run" / "status.json").read_text())
    assert list(record["stage_seconds"]) == ["detect", "plan"] and all(v >= 0 for v in record["stage_seconds"].values())
    assert (tmp_path / "run" / "plan.json").is_file() and not (tmp_path / "run" / "load.json").exists()
    assert not (tmp_path / "cache").exists()  # nothing merged, nothing loaded


def test_a_stage_part_is_split_out_in_order():
    from emq.report.tables import where_time_went
    from emq.runner import RunStatus

    status = RunStatus(stage_seconds={"generate": 10.0, "judge": 30.0})
    status.split("judge", "judge start", 22.5)
    assert list(status.stage_seconds.items()) == [("generate", 10.0), ("judge start", 22.5), ("judge", 7.5)]
    status.split("judge", "judge start", None)  # an endpoint judge: nothing to split
    assert status.stage_seconds["judge"] == 7.5
    assert where_time_went(status.stage_seconds, 45.0) == "generate 10.0 · judge start 22.5 · judge 7.5 · other 5.0 s"


def test_the_runner_hands_the_plan_the_evals_token_budget(demo, tmp_path, monkeypatch):
    """CUDA graphs or eager is chosen from what the eval will generate: the runner passes build_prompts' budget
    (a GPU machine is faked: nothing loads in a dry run)."""
    import emq.runner
    from emq.evaluate import build_prompts
    from tests.plans import cuda_vllm, fake_machine

    monkeypatch.setattr(emq.runner, "snapshot", lambda *a, **k: fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    cfg = compose_run(["stage=plan", "eval=quick", f"paths.data_dir={demo.root.parent}",
                       f"paths.cache_dir={tmp_path / 'cache'}"])
    assert run(cfg, tmp_path / "run").status == "ok"
    eager = json.loads((tmp_path / "run" / "plan.json").read_text())["plan"]["eager"]
    sequences = sum(p["n"] for p in build_prompts(cfg.eval))
    assert eager["decided_by"] == "estimate" and eager["estimate"]["sequences"] == sequences
    assert eager["estimate"]["max_tokens"] == cfg.eval.max_tokens
