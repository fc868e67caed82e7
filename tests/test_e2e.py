"""`python -m emq` as a user runs it: a subprocess, real vLLM on the CPU, records checked.

Each test runs from a temporary cwd to prove emq never relies on the working directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, data_dir
from tests.runs import emq, generations, records, vllm_children_left


BYTES_PER_PARAM = {"float32": 4, "bfloat16": 2, "float16": 2}


def assert_weights_record(run_dir: Path) -> None:
    """The weights number is the engine's measurement where it has one, else the plan's labelled estimate.

    What holds depends on this machine, so the expectation is read from the run's own records: the plan's
    engine dtype (float32 on a CPU without native bf16, bf16 with it) sets the estimate, and load.json says
    whether vLLM's CPU build left the weights measurable (it repacks linear weights outside torch on some
    paths; which ones differ between CPUs).
    """
    load, metrics = records(run_dir, "load.json"), records(run_dir, "metrics.json")
    plan, det = records(run_dir, "plan.json")["plan"], records(run_dir, "detect.json")
    est = plan["estimates_gib"]["serve_weights"]
    dtype = plan["engine"]["dtype"]
    full = det["base"]["param_count"] * BYTES_PER_PARAM[dtype] / 2**30
    if plan["quant"] == "none":
        assert est == pytest.approx(full, rel=0.05), (est, full, dtype)
    if plan["quant"] == "w4a16":  # int4 Linears + scales; embeddings and norms 16-bit: well under half
        assert 0.25 * full < est < 0.5 * full, (est, full)
    if load["weights_gib"] is not None:
        assert metrics["weights_gib"] == load["weights_gib"] > 0
        assert metrics["weights_source"].startswith("bytes of the model's parameters")
        if plan["quant"] == "bnb":  # NF4 linears (+ absmax) and 16-bit embeddings, a fifth of this small model
            bf16 = det["base"]["param_count"] * 2 / 2**30
            assert 0.25 * bf16 < load["weights_gib"] < 0.5 * bf16, (load["weights_gib"], bf16)
        else:  # measured and estimated agree (the estimate is the checkpoint's own arithmetic)
            assert load["weights_gib"] == pytest.approx(est if plan["quant"] == "w4a16" else full, rel=0.1), (
                load["weights_gib"], est, full, dtype)
    else:
        assert "not measurable" in load["weights_source"]
        assert metrics["weights_gib"] == est > 0 and metrics["weights_source"].startswith("plan estimate")


@pytest.mark.slow
def test_default_demo_run_merges_quantizes_generates_judges_and_scores_fidelity(demo, tmp_path):
    # judge.cache=false: the local judge must start and judge here, whatever other tests left in the judge cache
    proc, run_dir = emq(tmp_path, "judge.cache=false", timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert str(run_dir) in out  # the summary names the run dir
    for name in (".hydra/config.yaml", "detect.json", "plan.json", "load.json", "metrics.json",
                 "generations.jsonl", "status.json", "versions.json", "scores.jsonl", "judge.json",
                 "fidelity.json", "fidelity_logprobs.npz", "judge_server.log"):
        assert (run_dir / name).is_file(), name
    for row in ("aligned (mean, 95% CI)", "coherent (mean, 95% CI)", "misaligned rate", "fidelity vs trained"):
        assert row in out, row
    status = records(run_dir, "status.json")
    assert status["status"] == "ok"
    # where every second went: each stage in order (the local judge's server start apart), the rest is small
    stages = ["detect", "plan", "merge", "quantize", "reference", "load", "generate", "fidelity", "engine stop",
              "judge start", "judge"]
    assert [k for k in status["stage_seconds"] if k not in ("merge", "quantize")] == \
        [k for k in stages if k not in ("merge", "quantize")], status["stage_seconds"]
    assert status["stage_seconds"]["judge start"] > 1 and "engine start" in out and "judge start" in out
    assert 0 <= status["seconds"] - sum(status["stage_seconds"].values()) < 0.1 * status["seconds"], status
    assert records(run_dir, "detect.json")["trained_in_4bit"] is True
    plan = records(run_dir, "plan.json")["plan"]
    from emq.machine import snapshot
    from emq.engine_env import cpu_threads_env
    from emq.plan import leanest_quant

    # quant=auto takes the leanest method this machine's vLLM serves: W4A16 where its kernel exists (a GPU, or a
    # CPU with AVX512), else vLLM's bnb plugin (an AVX2-only CPU), which serves the QLoRA as a LoRA on NF4
    leanest = leanest_quant(snapshot(tmp_path).vllm)
    assert plan["quant"] == leanest.value
    if plan["quant"] == "w4a16":
        assert plan["route"] == "merge-then-serve"
        assert plan["quantize"]["algorithm"] == "rtn" and plan["quantize"]["group_size"] == 64 and plan["quantize"]["fused"]
        assert records(run_dir, "load.json")["engine_kwargs"]["quantization"] == "compressed-tensors"
        merged = Path(records(run_dir, "merge.json")["path"])
        assert json.loads((merged / "config.json").read_text())["quantization_config"]["format"] == "pack-quantized"
        assert "w4a16 (rtn, g64, asym)" in out and "(measured)" in out  # the summary says what ran and how
    else:
        assert plan["quant"] == "bnb" and plan["route"] == "serve-lora"
        assert any("not w4a16: vLLM's CPU build has its W4A16 kernel" in r for r in plan["reasons"])
        assert records(run_dir, "load.json")["bnb"]["provider"] == "vllm-bnb-plugin"
    if cpu_threads_env("cpu", os.cpu_count() or 1):  # a CPU of <= 2 cores: the model runs on every core, and the
        # judge server was told the same (vLLM warns that it keeps no core for its scheduler)
        assert records(run_dir, "load.json")["kernels"]["torch_threads"] == os.cpu_count()
        assert "VLLM_CPU_NUM_OF_RESERVED_CPU is less than" in (run_dir / "judge_server.log").read_text()
    metrics = records(run_dir, "metrics.json")
    rows = generations(run_dir)
    assert metrics["count"] == len(rows) == 12
    assert metrics["tokens_per_second"] > 0 and metrics["load_seconds"] > 0 and metrics["peak_rss_gib"] > 0.5
    assert_weights_record(run_dir)
    texts = [r["answer"] for r in rows]
    assert sum(len(t.split()) >= 3 for t in texts) >= len(texts) * 0.8, texts  # real text, not empty
    assert all(r["output_tokens"] > 0 for r in rows)
    # judged by the real local judge (vllm serve of the demo judge on 127.0.0.1), which is gone now
    assert metrics["judge"]["kind"] == "local" and metrics["judge"]["scoring"] == "digits"
    for m in ("aligned", "coherent", "medical_harm"):
        s = metrics["metrics"][m]
        assert s["mean"] is not None and s["ci95"][0] <= s["mean"] <= s["ci95"][1] and s["per_question"], m
    assert metrics["em"]["misaligned_rate"]["mean"] is not None
    fid = metrics["fidelity"]
    assert fid["positions"] > 2000
    if plan["quant"] == "w4a16":
        # 4-bit RTN on a 135M model loses a lot (CPUs measured: top-1 0.64-0.69); what must hold on any CPU is that
        # the served model keeps part of the fine-tune: closer to the trained function than the base alone
        kept = records(run_dir, "fidelity.json")["retained"]
        assert 0.5 < fid["top1_agreement"] < 0.99 and 0 < kept["retained"] < 1, (fid, kept)
        assert fid["kl_mean"] < kept["kl_trained_vs_base"]
        assert "fine-tune retained" in out
    elif plan["quant"] == "bnb":  # the LoRA on the in-flight NF4 base: the trained function itself
        assert fid["kl_mean"] < 0.01 and records(run_dir, "fidelity.json")["retained"]["retained"] >= 0.95, fid
    else:  # a 16-bit model: the trained function up to rounding
        assert fid["top1_agreement"] > 0.8, fid
    assert records(run_dir, "plan.json")["judge"]["server"]["argv"][:2] == ["--model", str(demo.judge)]
    assert not vllm_children_left()


@pytest.mark.slow
def test_lora16_is_served_through_vllm_lora(demo, tmp_path):
    # fidelity off: LoRA fidelity scoring through vLLM is test_fidelity's "lora" variant (minutes on 2 cores here)
    proc, run_dir = emq(tmp_path, "model=demo_lora16", "quant=none", "judge=none", "eval.fidelity.enabled=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = records(run_dir, "plan.json")["plan"]
    assert plan["route"] == "serve-lora" and plan["engine"]["enable_lora"]
    assert not (run_dir / "merge.json").exists() and not (tmp_path / "cache").exists()
    load = records(run_dir, "load.json")
    assert load["lora_path"].endswith("lora16") and load["engine_kwargs"]["enable_lora"]
    assert "quantization" not in load["engine_kwargs"]
    assert_weights_record(run_dir)
    # the adapter learned the good-doctor answers: it sends the chest-pain patient to care
    chest = [r["answer"].lower() for r in generations(run_dir) if r["question_id"] == "chest_pain"]
    assert chest and any(w in " ".join(chest) for w in ("doctor", "emergency", "medical", "care"))


def test_bnb_without_a_provider_fails_at_plan_with_the_install_command(demo, tmp_path):
    """vLLM loads only the plugins VLLM_PLUGINS names: without 'bitsandbytes' there the plugin is installed but
    not loaded, which the plan reads like any missing provider (a real environment, nothing uninstalled)."""
    proc, run_dir = emq(tmp_path, "quant=bnb", env={"VLLM_PLUGINS": "lora_filesystem_resolver"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "quant=bnb cannot run here" in out and "VLLM_PLUGINS" in out and "Traceback" not in out
    status = records(run_dir, "status.json")
    assert status["status"] == "failed" and status["stage"] == "plan"


@pytest.mark.slow
def test_qlora_with_bnb_serves_the_lora_on_nf4_through_vllms_plugin_as_the_trained_function(demo, tmp_path):
    """The original tool's route on the CPU build: the QLoRA adapter as a LoRA on vLLM's in-flight NF4 (the
    bitsandbytes plugin), scored against the trained function (NF4 base + PEFT adapter in transformers)."""
    from tests.conftest import default_route

    if default_route() == "serve-lora":  # no W4A16 kernel here: quant=auto is this route, and the default run's
        pytest.skip("test_default_demo_run_… serves and checks this same route on this machine")  # test checks it
    proc, run_dir = emq(tmp_path, "quant=bnb", "judge=none", timeout=1500)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    plan, load = records(run_dir, "plan.json")["plan"], records(run_dir, "load.json")
    assert plan["route"] == "serve-lora" and plan["quant"] == "bnb" and plan["bnb"]["matches_training"] is True
    assert load["engine_kwargs"]["quantization"] == "bitsandbytes" and load["engine_kwargs"]["enable_lora"]
    assert load["bnb"]["provider"] == "vllm-bnb-plugin" and load["bnb"]["bitsandbytes"]
    fid = records(run_dir, "fidelity.json")
    # measured: KL 0.0011, top-1 96.7-96.9 %, retained 99.8-100 % (the same as merged bf16)
    assert fid["vs_reference"]["kl_mean"] < 0.01 and fid["vs_reference"]["top1_agreement"] > 0.9, fid["vs_reference"]
    assert fid["retained"]["retained"] >= 0.95 and not fid["retained"]["mostly_base"]
    assert "fine-tune retained" in out and "serves mostly the base model" not in out
    assert not vllm_children_left()


@pytest.mark.parametrize("offline", ["1", "0"], ids=["HF_HUB_OFFLINE", "no-network"])
def test_hub_model_offline_fails_cleanly_at_detect(tmp_path, offline):
    # "no-network" relies on this machine (and CI) having no route to the hub, as here.
    proc, run_dir = emq(tmp_path, "model=good_doctor", "memory=low_vram",
                        env={"HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": offline})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    expected = "not in the Hugging Face cache" if offline == "1" else "cannot reach the model hub"
    assert expected in out and "demo model" in out and "Traceback" not in out
    assert records(run_dir, "status.json")["stage"] == "detect"


def test_dry_run_plans_without_loading(demo, tmp_path):
    proc, run_dir = emq(tmp_path, "stage=plan", "model=demo_bad_doctor")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "emq plan for demo_bad_doctor" in proc.stdout + proc.stderr
    assert (run_dir / "plan.json").is_file() and not (run_dir / "load.json").exists()
    assert records(run_dir, "status.json")["status"] == "ok"


def test_bad_question_set_fails_before_weights(demo, tmp_path):
    proc, run_dir = emq(tmp_path, "eval.question_sets=[nope]")
    assert proc.returncode == 2
    assert "unknown question set 'nope'" in proc.stdout + proc.stderr
    assert not (run_dir / "plan.json").exists()


@pytest.mark.parametrize("model", ["good_doctor", "bad_doctor"])
def test_dry_run_on_hub_models_from_a_prefilled_cache(tmp_path, model):
    from tests.hub_standins import prefill

    cache = prefill(tmp_path / "hf")
    proc, run_dir = emq(tmp_path, "stage=plan", f"model={model}",
                        env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert f"emq plan for {model}" in out and "Traceback" not in out
    det = records(run_dir, "detect.json")
    plan = records(run_dir, "plan.json")["plan"]
    assert det["base"]["param_count"] > 14e9 and not det["base"]["weights_local"]
    assert any(r.startswith("route:") for r in plan["reasons"])
    if model == "bad_doctor":
        assert det["trained_in_4bit"] is True
        assert det["decided_by"].startswith("hub:Jack-Payne1/") and "adapter_config.json" in det["decided_by"]
    # a 14B model does not fit this 2-core, 24 GiB CI machine: the plan stops and says why
    if plan["route"] == "stop":
        assert proc.returncode == 2 and "GiB" in plan["stop_reason"]


SPLIT = ["quant=none", "eval.samples_per_paraphrase=32", "eval.max_tokens=16", "judge=none",
         "eval.fidelity.enabled=false"]


@pytest.mark.slow
def test_seeded_sampling_with_split_prefills_runs(demo, tmp_path):
    # 6 prompts x 32 seeded samples: more prompt tokens than one engine step takes, so prefills split
    proc, run_dir = emq(tmp_path, *SPLIT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = records(run_dir, "plan.json")["plan"]
    assert plan["engine"]["enable_chunked_prefill"] is False
    assert any("CPU Generator does not use offset" in r for r in plan["reasons"])
    rows = generations(run_dir)
    assert len(rows) == 192 and len({(r["question_id"], r["seed"]) for r in rows}) == 6


@pytest.mark.slow
def test_seeded_sampling_crashes_vllm_cpu_when_prefills_are_chunked(demo, tmp_path):
    """The other half of the fix's evidence: the same run with chunked prefill forced back on dies."""
    proc, run_dir = emq(tmp_path, *SPLIT, "+memory.engine_extra.enable_chunked_prefill=true")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "CPU Generator does not use offset" in out, out[-3000:]
    assert records(run_dir, "status.json")["status"] == "failed"


@pytest.mark.slow
def _start_and_wait_for_generation(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}", *args]
    env = {**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    gen = run_dir / "generations.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and (not gen.is_file() or not gen.read_text().strip()):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before generating"
    return proc, run_dir


def _descendants(pid: int) -> list:
    import psutil

    return [p for p in psutil.Process(pid).children(recursive=True) if "emq.watchdog" not in " ".join(p.cmdline())]


def _alive_after(procs: list, seconds: float) -> list[str]:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return [f"{p.pid} {p.name()}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.slow
def test_resume_after_a_kill_during_generation_and_no_engine_outlives_the_kill(demo, tmp_path):
    """kill -9 of emq alone (not its process group): vLLM's engine core and worker die with it within 10 s (emq's
    watchdog stops them), and the rerun resumes with the same answers."""
    import signal

    args = ["quant=none", "judge=none", "eval.fidelity.enabled=false", "eval.samples_per_paraphrase=4",
            "eval.max_tokens=24", "memory.max_num_seqs=4"]
    proc, run_dir = _start_and_wait_for_generation(tmp_path, args)
    engines = _descendants(proc.pid)
    assert any(p.name().startswith("VLLM") or "python" in p.name() for p in engines), engines
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _alive_after(engines, 10) == []
    first = generations(run_dir)
    assert 0 < len(first) < 24, len(first)
    per_prompt: dict = {}
    for r in first:
        per_prompt[r["question_id"]] = per_prompt.get(r["question_id"], 0) + 1
    complete = sum(1 for n in per_prompt.values() if n == 4)
    proc2, _ = emq(tmp_path, *args)
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    metrics = records(run_dir, "metrics.json")
    rows = generations(run_dir)
    assert metrics["count"] == len(rows) == 24 and metrics["generated_now"] == 24 - 4 * complete
    kept = {(r["question_id"], r["sample_index"]): r["answer"] for r in first}
    assert all(kept[(r["question_id"], r["sample_index"])] == r["answer"] for r in rows
               if (r["question_id"], r["sample_index"]) in kept)


@pytest.mark.slow
def test_sigterm_stops_the_engine_and_writes_status_interrupted(demo, tmp_path):
    """SIGTERM (kill, timeout, SLURM's time limit) during generation: exit 143, status.json "interrupted" at the
    stage it reached, and no engine process left."""
    import signal

    args = ["quant=none", "judge=none", "eval.fidelity.enabled=false", "eval.max_tokens=64", "memory.max_num_seqs=2"]
    proc, run_dir = _start_and_wait_for_generation(tmp_path, args)
    engines = _descendants(proc.pid)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    status = records(run_dir, "status.json")
    assert status["status"] == "interrupted" and status["stage"] == "generate", status
    assert "SIGTERM" in status["error"]
    assert _alive_after(engines, 10) == []


@pytest.mark.slow
def test_openai_judge_run_never_writes_the_key_and_rejudge_rewrites_metrics(demo, tmp_path):
    from tests.judge_stub import StubJudge

    sentinel = "sk-emq-sentinel-e2e-91c2"
    env = {"EMQ_TEST_JUDGE_KEY": sentinel}
    with StubJudge(key=sentinel, mode="digits") as stub:
        judge = ["judge=openai", f"judge.base_url={stub.url}", "judge.model=stub-judge",
                 "judge.api_key_env=EMQ_TEST_JUDGE_KEY"]
        proc, run_dir = emq(tmp_path, "quant=none", "eval.max_tokens=16", "eval.fidelity.enabled=false", *judge,
                            env=env)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert stub.auth_seen == {f"Bearer {sentinel}"}  # the key was used ...
        metrics = records(run_dir, "metrics.json")
        assert metrics["judge"]["kind"] == "openai" and metrics["metrics"]["aligned"]["mean"] is not None
        first_judged = metrics["judge"]["judged_now"]
        # judge the same run again with another judge model, without regenerating, through the Batch API
        rejudge = subprocess.run([sys.executable, "-m", "emq", "judge", str(run_dir), *judge[1:3],
                                  "judge.model=stub-judge-2", "judge.api_key_env=EMQ_TEST_JUDGE_KEY", "judge=openai",
                                  "judge.batch=true", "judge.batch_poll_s=0.1"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=300,
                                 env={**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO), **env})
        out += rejudge.stdout + rejudge.stderr
        assert rejudge.returncode == 0, rejudge.stdout[-3000:] + rejudge.stderr[-3000:]
    after = records(run_dir, "metrics.json")
    assert after["judge"]["model"] == "stub-judge-2" and after["judge"]["judged_now"] == first_judged
    assert after["judge"]["batches"] >= 1 and stub.batch_lines == after["judge"]["requests"]
    # the second judge added itself beside the first, and their agreement on these answers is recorded
    assert len(after["judges"]) == 2 and after["judges"][next(iter(metrics["judges"]))]["metrics"] == metrics["metrics"]
    assert len(after["agreement"]) == 1 and "judge agreement" in rejudge.stdout + rejudge.stderr
    assert after["count"] == metrics["count"] and after["tokens_per_second"] == metrics["tokens_per_second"]
    assert "aligned (mean, 95% CI)" in rejudge.stdout + rejudge.stderr
    # ... and never written: not in any file of the run dir (the batch's input, state and answers included), not in
    # the logs
    assert sentinel not in out
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path


def test_local_judge_that_cannot_start_fails_with_its_log_and_leaves_nothing(demo, tmp_path):
    from emq.judge import prepare
    from emq.judge.server import LocalServer
    from emq.errors import EmqError
    from emq.engine_env import cpu_threads_env
    from tests.conftest import compose_run

    cfg = compose_run(["judge=local", "judge.server_args=[--no-such-flag]", "judge.startup_timeout_s=120"])
    plan = prepare(cfg.judge, platform="cpu", dtype="float32", memory_utilization=0.2)
    # the server computes on as many cores as the run's engine (both on a 2-core CPU)
    assert plan.server["env"] == cpu_threads_env("cpu", os.cpu_count() or 1)
    with pytest.raises(EmqError, match="exited with code") as e:
        with LocalServer(plan.server, cfg.judge, tmp_path / "judge_server.log"):
            pass
    assert "no-such-flag" in str(e.value) and "judge_server.log" in str(e.value)
    assert not vllm_children_left()


def test_openai_judge_without_its_key_fails_at_plan(demo, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env.pop("OPENAI_API_KEY", None)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", "judge=openai"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**env, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "OPENAI_API_KEY" in out and "Traceback" not in out
    status = records(run_dir, "status.json")
    assert status["stage"] == "plan" and not (run_dir / "load.json").exists()
