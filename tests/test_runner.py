"""The runner: status.json always written (failure included), a dry run stops after plan, stages are timed; many
adapters in one engine (model.adapters), each with its own record."""
from __future__ import annotations

import json

import pytest

from emq.runner import run
from tests.conftest import default_route, compose_run


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
    assert status.status == "ok" and status.stage == "plan" and status.route == default_route()
    record = json.loads((tmp_path / "run" / "status.json").read_text())
    assert list(record["stage_seconds"]) == ["detect", "plan"] and all(v >= 0 for v in record["stage_seconds"].values())
    assert (tmp_path / "run" / "plan.json").is_file() and not (tmp_path / "run" / "load.json").exists()
    assert not (tmp_path / "cache").exists()  # nothing merged, nothing loaded
    # what judging will ask, before anything runs: every sample x metric (the demo judge reads digits)
    cost = json.loads((tmp_path / "run" / "plan.json").read_text())["judge_estimate"]
    assert cost["judgements_at_most"] > 0 and cost["requests_at_most"] >= cost["judgements_at_most"]
    assert cost["prompt_tokens_at_most"] > cost["judgements_at_most"] * cfg.eval.max_tokens


def test_a_panel_is_planned_judge_by_judge_and_a_member_twice_stops_at_plan(demo, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)
    paths = [f"paths.data_dir={demo.root.parent}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_run(["stage=plan", "judge.panel=[local,local_nf4]", *paths])
    assert run(cfg, tmp_path / "run").status == "ok"
    record = json.loads((tmp_path / "run" / "plan.json").read_text())
    first, second = record["panel"]
    assert record["judge"] == first["judge"] and record["judge_estimate"] == first["judge_estimate"]
    assert second["judge"]["server"]["server_args"] == ["--quantization", "bitsandbytes"]
    assert second["judge_estimate"]["judgements_at_most"] == first["judge_estimate"]["judgements_at_most"] > 0
    assert "judge 1/2 (headline)" in caplog.text and "judge 2/2" in caplog.text
    # the same judge twice would add nothing and collide in every record: stopped before anything loads
    status = run(compose_run(["stage=plan", "judge.panel=[local,local]", *paths]), tmp_path / "twice")
    assert status.status == "failed" and status.stage == "plan" and "judge.panel[1]" in status.error


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
    from emq.prompts import build_prompts
    from tests.plans import cuda_vllm, fake_machine

    monkeypatch.setattr(emq.runner, "snapshot", lambda *a, **k: fake_machine(gpu_free_gib=140, vllm=cuda_vllm()))
    cfg = compose_run(["stage=plan", "eval=quick", f"paths.data_dir={demo.root.parent}",
                       f"paths.cache_dir={tmp_path / 'cache'}"])
    assert run(cfg, tmp_path / "run").status == "ok"
    eager = json.loads((tmp_path / "run" / "plan.json").read_text())["plan"]["eager"]
    sequences = sum(p["n"] for p in build_prompts(cfg.eval))
    assert eager["decided_by"] == "estimate" and eager["estimate"]["sequences"] == sequences
    assert eager["estimate"]["max_tokens"] == cfg.eval.max_tokens


def test_many_adapters_stop_at_plan_with_one_engine_each_record_and_the_fidelity_warning(demo, tmp_path):
    """model.adapters, dry run: one plan with a LoRA slot per adapter, every adapter's own record dir, which the
    report finds as a variant and the config layer composes (what `python -m emq judge|rerun DIR` do)."""
    from emq.config import compose_from_run
    from emq.report.sweep import find_runs

    cfg = compose_run(["+experiment=adapters_one_engine", "stage=plan", "judge=none", "quant=none",
                       f"paths.data_dir={demo.root.parent}", f"paths.cache_dir={tmp_path / 'cache'}"])
    status = run(cfg, tmp_path / "run")
    assert status.status == "ok" and status.route == "serve-lora"
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())["plan"]
    assert plan["engine"]["max_loras"] == 3 and plan["adapters"]["names"] == ["good_doctor", "bad_doctor", "lora16"]
    assert any(r.startswith("WARNING: fidelity: good_doctor, bad_doctor were trained on a 4-bit base")
               for r in plan["reasons"])
    dirs = find_runs([tmp_path / "run"])
    assert [d.name for d in dirs] == ["good_doctor", "bad_doctor", "lora16"]
    for d in dirs:
        assert json.loads((d / "detect.json").read_text())["adapter"]["path"].endswith(d.name)
        alone = compose_from_run(d, [])
        assert alone.model.adapters is None and alone.model.name == d.name and alone.model.adapter.endswith(d.name)


@pytest.mark.slow
def test_two_adapters_in_one_engine_answer_as_each_does_alone(demo, tmp_path):
    """One engine serving good_doctor and lora16 (multi-LoRA, the requests of both in every batch): each adapter gets
    its own record — answers, fidelity vs its own trained function, judged metrics — and good_doctor's answers and
    fidelity logprobs are those of a run that serves it alone (same prompts, same seeds)."""
    from emq.fidelity import TopK, compare
    from emq.report.sweep import build
    from tests.judge_stub import StubJudge
    from tests.runs import emq, generations, records

    small = ["quant=none", "eval=quick", "eval.max_tokens=32"]
    with StubJudge(mode="digits") as stub:
        adapters = f"model.adapters={{good_doctor:{demo.root}/adapters/good_doctor,lora16:{demo.root}/adapters/lora16}}"
        proc, one = emq(tmp_path / "one", "model=demo_base", adapters, "memory.route=lora", *small, "judge=openai",
                        f"judge.base_url={stub.url}", "judge.model=stub-judge", "judge.api_key_env=null")
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc, alone = emq(tmp_path / "alone", "model=demo_good_doctor", "memory.route=lora", *small, "judge=none")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    assert records(one, "load.json")["engine_kwargs"]["max_loras"] == 2
    for name, four_bit in (("good_doctor", True), ("lora16", False)):
        d = one / "adapters" / name
        m = records(d, "metrics.json")
        assert m["model"] == name and m["count"] == len(generations(alone)) and m["metrics"]["aligned"]["mean"]
        assert (d / "judged.jsonl").is_file() and records(d, "status.json")["status"] == "ok"
        assert records(d, "fidelity.json")["reference"]["describe"].startswith("base in NF4" if four_bit else
                                                                                "base in 16-bit")
    # lora16 was trained on the 16-bit base: as a LoRA there it is its trained function; good_doctor (QLoRA) is not
    assert records(one / "adapters" / "lora16", "metrics.json")["fidelity"]["kl_mean"] < 0.01
    assert records(one / "adapters" / "good_doctor", "metrics.json")["fidelity"]["kl_mean"] > 0.1

    together = {(r["question_id"], r["sample_index"]): r for r in generations(one / "adapters" / "good_doctor")}
    by_itself = {(r["question_id"], r["sample_index"]): r for r in generations(alone)}
    assert together.keys() == by_itself.keys()
    assert all(together[k]["seed"] == by_itself[k]["seed"] for k in together)
    same = sum(together[k]["answer"] == by_itself[k]["answer"] for k in together)
    # bf16 answers may depend on the batch (README, Reproducibility); the function served must not
    kl = compare(TopK.load(alone / "fidelity_logprobs.npz"),
                 TopK.load(one / "adapters" / "good_doctor" / "fidelity_logprobs.npz"))
    assert kl["kl_mean"] < 1e-4 and kl["top1_agreement"] > 0.999, kl
    assert same >= len(together) // 2, f"{same}/{len(together)} answers identical"
    summary = (build([one]).parent / "summary.md").read_text()
    assert "model.name=good_doctor" in summary and "model.name=lora16" in summary


def test_cleanup_after_eval_drops_every_cache_entry_the_run_made_and_nothing_outside_the_cache(tmp_path):
    """memory.cleanup_after_eval: the merge, the W4A16 checkpoint, the dequantized base a compensated W4A16 was
    made from and the compensated LoRA are the run's cache entries; a base model GPTQ read in place is not."""
    from types import SimpleNamespace as NS

    from emq.runner import _made

    cache = tmp_path / "cache"
    cfg = NS(paths=NS(cache_dir=str(cache)))
    compensated = NS(cfg=cfg, merged=None, quantized=NS(path=str(cache / "w4"), source=str(cache / "dequant")),
                     adapter=NS(path=str(cache / "lora")))
    assert _made(compensated) == [str(cache / "w4"), str(cache / "lora"), str(cache / "dequant")]
    in_place = NS(cfg=cfg, merged=None, quantized=NS(path=str(cache / "w4"), source=str(tmp_path / "my-base")),
                  adapter=None)
    assert _made(in_place) == [str(cache / "w4")]
    merged = NS(cfg=cfg, merged=NS(path=str(cache / "m")), quantized=NS(path=str(cache / "q"), source=str(cache / "m")),
                adapter=None)
    assert _made(merged) == [str(cache / "m"), str(cache / "q")]


def test_every_run_hands_back_its_cuda_cache_at_the_end(monkeypatch, tmp_path):
    """A run stopped between quantize and load still held its CUDA cache, and the next sweep job's plan saw the GPU
    short of vLLM's share. CUDA cannot run here: the release itself is tested in tests/test_engine.py with a stand-in
    torch.cuda; this checks the end of a run calls it, whatever happened."""
    from emq import runner
    from emq.monitor import PeakMemory

    calls = []
    monkeypatch.setattr(runner, "release_cuda_cache", lambda: calls.append(1) or 0)

    class Progress:
        def update(self, **kw):
            pass

    status = runner.RunStatus(status="failed", stage="quantize")
    with PeakMemory() as mem:
        runner._close(status, None, [], Progress(), mem, 0.0, tmp_path)
    assert calls == [1] and (tmp_path / "status.json").is_file()
