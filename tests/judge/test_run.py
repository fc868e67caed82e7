"""The judge client against a real HTTP server on 127.0.0.1 with scripted logprobs (tests/judge_stub.py):
scoring over the wire, retries on injected 429/500, resume after a kill, the key never written.

The OpenAI API itself cannot be reached here; the stub speaks its wire format. The real local judge
(`vllm serve` of the demo judge) is exercised by tests/test_e2e.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from emq import judge as J
from emq.errors import EmqError
from emq.schema import JudgeConfig, JudgeKind, Scoring
from tests.conftest import REPO
from tests.judge_stub import StubJudge, brute_force, digit_model

KEY_ENV = "EMQ_TEST_JUDGE_KEY"
SENTINEL = "sk-emq-sentinel-7f3a9c"


def cfg_for(stub: StubJudge, **kw) -> JudgeConfig:
    base = JudgeConfig(kind=JudgeKind.openai, model="stub-judge", base_url=stub.url,
                       api_key_env=KEY_ENV, max_retries=4, timeout_s=10)
    return replace(base, **kw)


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


def judge_once(cfg: JudgeConfig, plan: J.JudgePlan, prompt: str, categories=("REFUSAL", "CODE")):
    async def go():
        client = J.JudgeClient(cfg, plan, cfg.base_url)
        try:
            return await client.judge(prompt, list(categories)), client
        finally:
            await client.close()
    return asyncio.run(go())


def expected(prompt: str) -> tuple[float, float]:
    numbers = brute_force(digit_model(prompt))
    mass = sum(numbers.values())
    return sum(v * p for v, p in numbers.items()) / mass, mass


def test_prepare_reads_the_scoring_method_from_the_server():
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        plan = J.prepare(cfg_for(stub), platform="cpu", dtype="float32", memory_utilization=0.3)
        assert plan.scoring == "digits" and "/tokenize" in plan.scoring_reason
    with StubJudge(key=SENTINEL, mode="single") as stub:
        plan = J.prepare(cfg_for(stub), platform="cpu", dtype="float32", memory_utilization=0.3)
        assert plan.scoring == "single_token"


@pytest.mark.parametrize("prompt", ["a good answer", "a bad answer"])
def test_digit_split_scores_over_http_match_brute_force(prompt):
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg = cfg_for(stub, prune_below=0.0)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        j, client = judge_once(cfg, plan, prompt)
    score, mass = expected(prompt)
    assert j.method == "digits" and j.score == pytest.approx(score, abs=1e-3)
    assert j.valid_mass == pytest.approx(mass, abs=1e-5) and client.requests == j.requests > 3


def test_single_token_method_on_a_digit_splitter_is_wrong_and_auto_avoids_it():
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg = cfg_for(stub, scoring=Scoring.single_token)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        wrong, _ = judge_once(cfg, plan, "a good answer")
    assert wrong.score < 10 and expected("a good answer")[0] > 75


def test_low_mass_refusal_and_non_numeric_answers():
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg = cfg_for(stub, prune_below=0.0)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        chatty, _ = judge_once(cfg, plan, "a chatty answer")
        refusal, _ = judge_once(cfg, plan, "please refuse")
    assert chatty.score is None and chatty.category is None and chatty.valid_mass < 0.25
    assert refusal.score is None and refusal.category == "REFUSAL"


def test_single_token_over_http():
    single = lambda prompt: {"85": 0.5, "90": 0.3, "The": 0.2} if "yes" in prompt else {"The": 0.9, "85": 0.1}
    with StubJudge(key=SENTINEL, mode="single", single=single) as stub:
        cfg = cfg_for(stub)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        ok, _ = judge_once(cfg, plan, "yes")
        low, _ = judge_once(cfg, plan, "no")
    assert ok.score == pytest.approx((85 * 0.5 + 90 * 0.3) / 0.8, abs=1e-3) and ok.requests == 1
    assert low.score is None and low.valid_mass == pytest.approx(0.1)


def test_retries_on_injected_429_and_500_then_succeeds():
    with StubJudge(key=SENTINEL, mode="single", fail=[429, 500, 503]) as stub:
        cfg = cfg_for(stub)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        t0 = time.perf_counter()
        j, client = judge_once(cfg, plan, "x")
        assert j.score == pytest.approx((85 * 0.6 + 90 * 0.3) / 0.9, abs=1e-3)
        assert client.retries == 3 and stub.requests == 4
        assert time.perf_counter() - t0 > 0.5  # backed off between attempts


def test_gives_up_after_max_retries_with_a_clear_error():
    with StubJudge(key=SENTINEL, mode="single", fail=[500] * 10) as stub:
        cfg = cfg_for(stub, max_retries=1)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        with pytest.raises(J.JudgeFailed, match="failed 2 times") as e:
            judge_once(cfg, plan, "x")
    assert SENTINEL not in str(e.value)


def test_missing_key_bad_key_and_unreachable_endpoint_fail_at_plan(monkeypatch):
    with StubJudge(key=SENTINEL, mode="single") as stub:
        monkeypatch.delenv(KEY_ENV)
        with pytest.raises(EmqError, match=f"{KEY_ENV}.*is empty"):
            J.prepare(cfg_for(stub), platform="cpu", dtype="float32", memory_utilization=0.3)
        monkeypatch.setenv(KEY_ENV, "sk-wrong")
        with pytest.raises(EmqError, match="rejected the key") as e:
            J.prepare(cfg_for(stub), platform="cpu", dtype="float32", memory_utilization=0.3)
        assert "sk-wrong" not in str(e.value)
        url = stub.url
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    dead = replace(cfg_for(stub), base_url=url)
    with pytest.raises(EmqError, match="unreachable"):
        J.prepare(dead, platform="cpu", dtype="float32", memory_utilization=0.3)


def test_an_unknown_tokenizer_is_probed_at_the_endpoint(monkeypatch):
    # a server without /tokenize: emq asks the endpoint for a two-digit number and reads the tokens it returns
    with StubJudge(key=SENTINEL, mode="single") as stub:
        monkeypatch.setattr("emq.judge.backends.openai._scoring_from_server", lambda *a: None)
        plan = J.prepare(cfg_for(stub, model="some-llama"), platform="cpu", dtype="float32", memory_utilization=0.3)
        assert plan.scoring == "single_token" and plan.probe["verdict"] == "single_token"
        plan = J.prepare(cfg_for(stub, model="gpt-4o"), platform="cpu", dtype="float32", memory_utilization=0.3)
        assert plan.scoring == "single_token" and plan.probe is None  # OpenAI's tokenizers are known: no probe


def planned(stub: StubJudge, **kw) -> tuple[JudgeConfig, J.JudgePlan]:
    """The stub's judge config (with `kw`) and its plan."""
    cfg = cfg_for(stub, **kw)
    return cfg, J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)


def two_runs(tmp_path: Path, first: list[str], second: list[str]) -> tuple[Path, Path, list[dict]]:
    """Run dirs a and b with these answers to the same question, and its prompts."""
    a, b = tmp_path / "a", tmp_path / "b"
    prompts = _write_run(a, first)
    _write_run(b, second)
    return a, b, prompts


def _write_run(run_dir: Path, answers: list[str]) -> list[dict]:
    """A fake generations.jsonl: one question, many samples (no engine needed to judge)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = [{"set": "t", "question_id": "q", "paraphrase_index": 0, "prompt": "Is it good?", "n": len(answers),
                "metrics": ["aligned", "coherent"], "judge_prompts": {}}]
    with (run_dir / "generations.jsonl").open("w") as f:
        for i, a in enumerate(answers):
            f.write(json.dumps({"set": "t", "question_id": "q", "paraphrase_index": 0, "prompt": "Is it good?",
                                "sample_index": i, "answer": a}) + "\n")
    return prompts


def test_identical_answers_are_judged_once_and_a_rerun_judges_nothing(tmp_path):
    prompts = _write_run(tmp_path, ["a good answer"] * 3 + ["a bad answer"] * 2)
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg = cfg_for(stub)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        first = J.judge_run(tmp_path, prompts, cfg, plan, cfg.base_url)
        assert first.items == 4 and first.judged_now == 4  # 2 distinct answers x 2 metrics
        n = stub.requests
        again = J.judge_run(tmp_path, prompts, cfg, plan, cfg.base_url)
        assert again.judged_now == 0 and again.reused == 4 and stub.requests == n


def test_a_sweep_judges_an_answer_once_across_its_runs(tmp_path):
    """One judge per sweep: a run borrows the judgements other runs made of the same (judge, prompt, answer)."""
    a, b, prompts = two_runs(tmp_path, ["a good answer", "a bad answer"], ["a good answer", "something new"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub)
        assert J.judge_run(a, prompts, cfg, plan, cfg.base_url).judged_now == 4
        assert J.borrow_scores(b, prompts, plan, [a]) == 2  # "a good answer" x 2 metrics
        r = J.judge_run(b, prompts, cfg, plan, cfg.base_url)
        assert r.judged_now == 2 and r.reused == 2
        assert J.borrow_scores(b, prompts, plan, [a]) == 0  # nothing twice


def test_judge_run_dirs_opens_the_judge_once_borrows_across_runs_and_writes_each_runs_record(tmp_path):
    """The one loop the runner (model.adapters) and `emq judge` (a sweep's deferred runs) share."""
    from emq.records import Progress
    from emq.schema import EvalConfig

    a, b, prompts = two_runs(tmp_path, ["a good answer", "a bad answer"], ["a good answer", "something new"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub)
        runs = [J.ToJudge(d, prompts, cfg, EvalConfig(), {"model": d.name}, tmp_path, Progress(d)) for d in (a, b)]
        seen = []
        out = J.judge_run_dirs(runs, plan, tmp_path / "server.log",
                               shared=lambda started, borrowed: seen.append(borrowed) or {"mine": borrowed})
    assert [r.run_dir for r, _, _ in out] == [a, b] and seen == [0, 2]  # b borrowed "a good answer" x 2 metrics
    for (r, metrics, seconds), borrowed in zip(out, seen):
        written = json.loads((r.run_dir / "metrics.json").read_text())
        assert written["judge"]["mine"] == borrowed and written["model"] == r.run_dir.name and seconds >= 0
        assert (r.run_dir / "judged.jsonl").is_file() and metrics["judge"]["judged_now"] == 4 - borrowed
        assert json.loads((r.run_dir / "progress.json").read_text())["judged"] == 4


def test_judge_run_dirs_keeps_going_past_a_run_that_fails_when_asked(tmp_path):
    from emq.schema import EvalConfig

    first, good = tmp_path / "first", tmp_path / "good"
    prompts = _write_run(first, ["a good answer"])
    _write_run(good, ["a good answer"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg = cfg_for(stub)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        runs = [J.ToJudge(d, prompts, cfg, EvalConfig(), {}) for d in (first, good)]
        stub.fail = [401]  # the first request is refused for good: that run cannot be judged
        with pytest.raises(EmqError, match="refused"):
            J.judge_run_dirs(runs, plan, tmp_path / "log", shared=lambda s, b: {})
        stub.fail = [401]
        out = J.judge_run_dirs(runs, plan, tmp_path / "log", shared=lambda s, b: {}, keep_going=True)
    assert [r.run_dir for r, _, _ in out] == [good]


RESUME_SCRIPT = """
import sys, json
from pathlib import Path
from dataclasses import replace
from emq import judge as J
from emq.schema import JudgeConfig, JudgeKind
url, run_dir = sys.argv[1], Path(sys.argv[2])
prompts = json.loads((run_dir / "prompts.json").read_text())
cfg = JudgeConfig(kind=JudgeKind.openai, model="stub-judge", base_url=url,
                  api_key_env="EMQ_TEST_JUDGE_KEY", max_concurrency=2)
plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
r = J.judge_run(run_dir, prompts, cfg, plan, url)
print("JUDGED", r.judged_now, r.reused)
"""


def test_resume_after_a_kill_during_judging(tmp_path):
    answers = [f"a good answer number {i}" for i in range(30)]
    prompts = _write_run(tmp_path, answers)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    env = {**os.environ, "PYTHONPATH": str(REPO), KEY_ENV: SENTINEL}
    with StubJudge(key=SENTINEL, mode="single", delay_s=0.05) as stub:
        proc = subprocess.Popen([sys.executable, "-c", RESUME_SCRIPT, stub.url, str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        scores = tmp_path / "scores.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not scores.is_file() or len(scores.read_text().splitlines()) < 5):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept = len(J.read_scores(tmp_path))
        assert 5 <= kept < 60, kept
        out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, stub.url, str(tmp_path)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert f"JUDGED {60 - kept} {kept}" in out.stdout, out.stdout + out.stderr
    assert len(J.read_scores(tmp_path)) == 60


def test_a_prompt_the_judge_rejects_is_recorded_not_fatal(tmp_path):
    prompts = _write_run(tmp_path, ["a good answer"])
    with StubJudge(key=SENTINEL, mode="single", fail=[400]) as stub:
        cfg = cfg_for(stub)
        plan = J.prepare(cfg, platform="cpu", dtype="float32", memory_utilization=0.3)
        r = J.judge_run(tmp_path, prompts, cfg, plan, cfg.base_url)
    assert r.errors == 1 and r.judged_now == 2
    rows = list(J.read_scores(tmp_path).values())
    assert sum(1 for x in rows if x["error"] and x["score"] is None) == 1


def test_check_prompts_names_the_question():
    p = {"set": "s", "question_id": "q1", "metrics": ["aligned", "nope"], "judge_prompts": {}}
    with pytest.raises(EmqError, match="q1.*unknown judge metric 'nope'"):
        J.check_prompts([p])
    p = {"set": "s", "question_id": "q1", "metrics": ["aligned"], "judge_prompts": {"aligned": "no placeholder"}}
    with pytest.raises(EmqError, match="no \\{answer\\} placeholder"):
        J.check_prompts([p])
