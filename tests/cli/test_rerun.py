"""Reproducible answers on the default demo path (whatever dtype and quantization the plan picks here, fidelity on):
a rerun from the run dir gives identical answers, greedy and with seeded sampling, and a run killed mid-generation
and resumed gives exactly the answers of the uninterrupted run (README, "Reproducibility")."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emq.cli.rerun import compare_answers
from emq.records import read_generations
from tests.conftest import REPO, data_dir

# 12 prompts (6 questions of each set, one paraphrase) × 128 tokens, the judge off, the merged demo served 16-bit
# (the same route on every machine; the default quant=auto differs by CPU: W4A16, or LoRA on bnb at ~5 tok/s on AVX2)
PROMPTS = ["judge=none", "eval.max_questions_per_set=6", "eval.max_paraphrases=1", "eval.max_tokens=128",
           "quant=none", "memory.route=merge"]
GREEDY = [*PROMPTS, "eval.temperature=0", "eval.samples_per_paraphrase=1", "eval.group_size=4"]  # 3 groups of 4
SAMPLED = [*PROMPTS, "eval.temperature=1", "eval.samples_per_paraphrase=2"]  # eval.group_size=null: one group


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one merge for the module's runs


def _env() -> dict[str, str]:
    return {**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO)}


def _cmd(run_dir: Path, cache: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", *overrides]


def _run(run_dir: Path, cache: Path, overrides: list[str]) -> None:
    proc = subprocess.run(_cmd(run_dir, cache, overrides), cwd=run_dir.parent, env=_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _rerun(run_dir: Path, out: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "emq", "rerun", str(run_dir), "--out", str(out), "--check"],
                          cwd=run_dir.parent, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "answers identical" in proc.stderr


def _answers(run_dir: Path) -> dict[tuple, str]:
    return {(r["set"], r["question_id"], r["paraphrase_index"], r["sample_index"]): r["answer"]
            for r in read_generations(run_dir)}


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_greedy_rerun_and_a_killed_then_resumed_run_give_the_same_answers(demo, tmp_path, cache):
    first = tmp_path / "first"
    _run(first, cache, GREEDY)
    for name in ("versions.json", "run_config.json", "inputs.json", "fidelity.json", ".hydra/config.pickle"):
        assert (first / name).is_file(), name
    versions = json.loads((first / "versions.json").read_text())
    assert versions["python"] and "git_dirty" in versions and versions["seed"] == 0
    det = versions["determinism"]  # the conditions the promise holds under
    assert det["dtype"] in ("bfloat16", "float32", "float16") and "quantization" in det
    assert det["max_num_seqs"] >= 1 and det["schedule"]["group_size"] == 4 and det["schedule"]["groups"] == 3
    assert det["submission"].startswith("held") and det["kernels"]["linear"] and det["kernels"]["attention"]
    assert json.loads((first / "run_config.json").read_text())["eval"]["group_size"] == 4
    inputs = json.loads((first / "inputs.json").read_text())
    assert inputs["adapter"]["files_sha256"] and inputs["merged"]["files_sha256"]
    answers = _answers(first)
    assert len(answers) == 12 and all(a for a in answers.values())
    # long enough for near-ties to be possible; how long depends on the demo as this machine trained it (a fresh
    # build on an AVX512-BF16 EPYC answered at most 59 of 128 tokens, an older build more than 64)
    assert max(r["output_tokens"] for r in read_generations(first)) > 32

    # the README's rerun: a new run dir from the first one alone; --check fails unless every answer is identical
    again = tmp_path / "again"
    _rerun(first, again)
    assert _answers(again) == answers and _metrics(again)["generated_now"] == 12  # made again, not resumed

    # killed (SIGKILL, the engine's processes too) once a group is written and the next has begun, then resumed
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    proc = subprocess.Popen(_cmd(resumed, cache, GREEDY), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 900
        while len(read_generations(resumed)) < 5 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    at_kill = len(read_generations(resumed))
    assert 5 <= at_kill < 12, f"{at_kill} answers written when killed (need a run killed mid-generation)"
    assert not (resumed / "metrics.json").exists()
    _run(resumed, cache, GREEDY)
    kept = 4 * (at_kill // 4)  # whole groups kept; the group in flight is generated again whole
    m = _metrics(resumed)
    assert m["count"] == 12 and m["generated_now"] == 12 - at_kill
    cmp = compare_answers(first, resumed)
    assert cmp.same, (cmp.differ, at_kill, kept)


@pytest.mark.slow
def test_seeded_sampling_rerun_gives_the_same_answers(demo, tmp_path, cache):
    first = tmp_path / "first"
    _run(first, cache, SAMPLED)
    answers = _answers(first)
    assert len(answers) == 24 and len({answers[k] for k in answers if k[3] == 0} - {
        answers[k] for k in answers if k[3] == 1}) > 0  # two samples per prompt, not copies of each other
    assert json.loads((first / "versions.json").read_text())["determinism"]["schedule"]["groups"] == 1
    again = tmp_path / "again"
    _rerun(first, again)
    assert _answers(again) == answers
