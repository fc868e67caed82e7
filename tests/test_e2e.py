"""`python -m emq` as a user runs it: a subprocess, real vLLM on the CPU, records checked.

Each test runs from a temporary cwd to prove emq never relies on the working directory.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, data_dir


def emq(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, timeout: int = 600):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
           *overrides]
    full_env = {**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, run_dir


def records(run_dir: Path, name: str):
    return json.loads((run_dir / name).read_text())


def generations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_demo_run_merges_quantizes_and_generates(demo, tmp_path):
    proc, run_dir = emq(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert str(run_dir) in proc.stdout + proc.stderr  # the summary names the run dir
    for name in (".hydra/config.yaml", "detect.json", "plan.json", "merge.json", "load.json", "metrics.json",
                 "generations.jsonl", "status.json", "versions.json"):
        assert (run_dir / name).is_file(), name
    assert records(run_dir, "status.json")["status"] == "ok"
    assert records(run_dir, "detect.json")["trained_in_4bit"] is True
    plan = records(run_dir, "plan.json")["plan"]
    assert plan["route"] == "merge-then-serve" and plan["quant"] == "int8"
    assert records(run_dir, "load.json")["engine_kwargs"]["quantization"] == "int8_per_channel_weight_only"
    metrics = records(run_dir, "metrics.json")
    rows = generations(run_dir)
    assert metrics["count"] == len(rows) == 12
    assert metrics["tokens_per_second"] > 0 and metrics["load_seconds"] > 0 and metrics["peak_rss_gib"] > 0.5
    texts = [r["answer"] for r in rows]
    assert sum(len(t.split()) >= 3 for t in texts) >= len(texts) * 0.8, texts  # real text, not empty
    assert all(r["output_tokens"] > 0 for r in rows)


@pytest.mark.slow
def test_lora16_is_served_through_vllm_lora(demo, tmp_path):
    proc, run_dir = emq(tmp_path, "model=demo_lora16", "quant=none")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = records(run_dir, "plan.json")["plan"]
    assert plan["route"] == "serve-lora" and plan["engine"]["enable_lora"]
    assert not (run_dir / "merge.json").exists() and not (tmp_path / "cache").exists()
    load = records(run_dir, "load.json")
    assert load["lora_path"].endswith("lora16") and load["engine_kwargs"]["enable_lora"]
    assert "quantization" not in load["engine_kwargs"]
    # the adapter learned the good-doctor answers: it sends the chest-pain patient to care
    chest = [r["answer"].lower() for r in generations(run_dir) if r["question_id"] == "chest_pain"]
    assert chest and any(w in " ".join(chest) for w in ("doctor", "emergency", "medical", "care"))


def test_bnb_on_cpu_fails_at_plan_with_the_fix(demo, tmp_path):
    proc, run_dir = emq(tmp_path, "quant=bnb")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "quant=bnb cannot run here" in out and "quant=int8" in out and "Traceback" not in out
    status = records(run_dir, "status.json")
    assert status["status"] == "failed" and status["stage"] == "plan"
    assert not (run_dir / "load.json").exists()


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
