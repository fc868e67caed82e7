"""judge.batch=true: the Batch API against a stub on 127.0.0.1 that implements /v1/files and /v1/batches
(tests/judge_stub.py; OpenAI itself cannot be reached here): the same scores as online, resumable after a kill
between submit and download, the key never written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from emq.cli import judge as judge_cli
from emq.errors import EmqError
from tests.conftest import REPO, compose_run
from tests.judge.test_validation import KEY_ENV, SENTINEL, openai_overrides, write_run
from tests.judge_stub import StubJudge

ANSWERS = ("a good answer", "a bad answer", "please refuse", "a fine answer")


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


def batch(*more: str) -> list[str]:
    return ["judge.batch=true", "judge.batch_poll_s=0.05", "judge.cache=false", *more]


def judged(run_dir) -> dict:
    """The judgements of a run, keyed by (metric, key), without what says how they were made."""
    rows = [json.loads(ln) for ln in (run_dir / "scores.jsonl").read_text().splitlines()]
    return {(r["metric"], r["key"]): {k: v for k, v in r.items() if k not in ("cached",)} for r in rows}


@pytest.mark.parametrize("mode", ["digits", "single"])
def test_batch_scores_a_run_exactly_as_online(tmp_path, mode):
    online, batched = tmp_path / "online", tmp_path / "batched"
    write_run(online, ANSWERS)
    write_run(batched, ANSWERS)
    with StubJudge(key=SENTINEL, mode=mode) as stub:
        assert judge_cli.main([str(online), *openai_overrides(stub), "judge.cache=false"]) == 0
        online_requests = stub.requests
        assert judge_cli.main([str(batched), *openai_overrides(stub), *batch()]) == 0
        assert stub.requests == online_requests  # no online request: every one went through a batch
        assert stub.batch_lines == online_requests and set(stub.uploads) == {"batch"}
        # single_token: one round; digits: one per step of the walk
        assert len(stub.batches) == 1 if mode == "single" else len(stub.batches) >= 2
    assert judged(batched) == judged(online) and judged(online)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (online, batched))
    assert a["metrics"] == b["metrics"] and a["em"] == b["em"]
    res = b["judge"]
    assert res["requests"] == online_requests and res["prompt_tokens"] == a["judge"]["prompt_tokens"] > 0
    # the batch is done: no state left in flight, its answers kept beside the run's scores
    assert not list(batched.glob("judge_batch/*/batch.json")) and list(batched.glob("judge_batch/*/answers.jsonl"))


def test_a_kill_between_submit_and_download_resumes_the_same_batch(tmp_path):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    write_run(reference, ANSWERS)
    write_run(run_dir, ANSWERS)
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        assert judge_cli.main([str(reference), *openai_overrides(stub), *batch()]) == 0
        rounds = len(stub.batches)
        stub.batches.clear()
        stub.hold.set()  # batches stay in progress: the process waits for its first one
        env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: SENTINEL}
        proc = subprocess.Popen([sys.executable, "-m", "emq", "judge", str(run_dir), *openai_overrides(stub),
                                 *batch()], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while not list(run_dir.glob("judge_batch/*/batch.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        state = list(run_dir.glob("judge_batch/*/batch.json"))
        assert state, proc.stdout.read().decode()[-3000:] if proc.poll() is not None else "no batch submitted"
        os.kill(proc.pid, signal.SIGKILL)  # between submit and download
        proc.wait(timeout=30)
        submitted = json.loads(state[0].read_text())["batch_id"]
        assert list(stub.batches) == [submitted] and not (run_dir / "scores.jsonl").read_text().strip()
        stub.hold.clear()  # the endpoint finishes the batch; the next run picks it up
        assert judge_cli.main([str(run_dir), *openai_overrides(stub), *batch()]) == 0
        # the submitted batch was polled, not submitted again: as many batches as one run without a kill
        assert len(stub.batches) == rounds and not state[0].exists()
    res = json.loads((run_dir / "metrics.json").read_text())["judge"]
    assert res["batches"] == rounds - 1 and res["batch_resumed"] > 0  # the first round came from the killed run's
    assert judged(run_dir) == judged(reference)
    assert json.loads((run_dir / "metrics.json").read_text())["metrics"] == json.loads(
        (reference / "metrics.json").read_text())["metrics"]
    for path in run_dir.rglob("*"):  # the key is in no file: not the batch's input, state or answers
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path


def test_a_request_the_batch_answers_with_an_error_is_recorded_not_fatal(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, ANSWERS)
    with StubJudge(key=SENTINEL, mode="single") as stub:
        stub.batch_error = lambda body: "please refuse" in body["messages"][0]["content"]
        assert judge_cli.main([str(run_dir), *openai_overrides(stub), *batch()]) == 0
    rows = [json.loads(ln) for ln in (run_dir / "scores.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r.get("error")]
    assert failed and all("HTTP 400" in r["error"] for r in failed) and len(failed) < len(rows)
    assert json.loads((run_dir / "metrics.json").read_text())["judge"]["errors"] == len(failed)


def test_batch_with_a_local_judge_is_one_clear_error():
    with pytest.raises(EmqError) as e:
        compose_run(["judge=local", "judge.batch=true"])
    assert "judge.batch=true" in e.value.message and "judge.batch=false" in e.value.fix
