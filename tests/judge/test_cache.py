"""The judge cache across runs (emq.judge.cache) and token / cost accounting, against the HTTP stub on 127.0.0.1
(tests/judge_stub.py; the OpenAI API itself cannot be reached here)."""
from __future__ import annotations

import json
import multiprocessing
from dataclasses import replace

import pytest

from emq import judge as J
from emq.judge.cache import FILE, JudgeCache
from emq.schema import EvalConfig, JudgePriceConfig
from tests.judge.test_run import SENTINEL, _write_run, planned, two_runs
from tests.judge_stub import StubJudge


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("EMQ_TEST_JUDGE_KEY", SENTINEL)


def _row(key: str, error: str | None = None) -> dict:
    return {"key": key, "metric": "aligned", "score": 80.0, "category": None, "valid_mass": 0.9,
            "method": "digits", "error": error}


def test_put_get_stats_and_clear(tmp_path):
    with JudgeCache(tmp_path) as c:
        assert c.put("j1", [_row("a"), _row("b"), _row("bad", error="HTTP 500")]) + c.put("j2", [_row("c")]) == 3
        assert c.put("j1", [_row("a")]) == 0  # a key already there is kept
        assert set(c.get("j1", ["a", "b", "bad", "zzz", "c"])) == {"a", "b"}  # a failed judgement is never stored
        assert set(c.get("j2", ["a", "c"])) == {"c"}  # another judge's judgements are its own
        assert c.get("j1", ["a"])["a"]["score"] == 80.0
        st = c.stats()
        assert st.judgements == {"j1": 2, "j2": 1} and st.bytes > 0 and st.path == tmp_path / FILE
        assert c.clear("j2") == 1 and c.stats().judgements == {"j1": 2}
        assert c.clear() == 2 and c.stats().judgements == {}


def test_many_keys_are_read_in_chunks(tmp_path):
    with JudgeCache(tmp_path) as c:
        c.put("j1", (_row(f"k{i}") for i in range(1300)))
        assert len(c.get("j1", (f"k{i}" for i in range(-5, 1305)))) == 1300


def _writer(path: str, start: int) -> None:
    with JudgeCache(path) as c:
        for i in range(start, start + 200, 20):
            c.put("j1", (_row(f"k{j}") for j in range(i, i + 20)))


def test_concurrent_writers_lose_nothing(tmp_path):
    """Runs of a sweep in parallel processes write the same file: SQLite's lock serializes them."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), s)) for s in (0, 100, 300)]  # 100-299 overlap
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with JudgeCache(tmp_path) as c:
        assert c.stats().judgements == {"j1": 500}


def test_a_second_run_with_the_same_answers_is_judged_from_the_cache_without_a_request(tmp_path):
    a, b, prompts = two_runs(tmp_path, ["a good answer", "a bad answer"], ["a bad answer", "a good answer", "a good answer"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub)
        with JudgeCache(tmp_path / "home") as cache:
            first = J.judge_run(a, prompts, cfg, plan, cfg.base_url, cache=cache)
            asked, tokens = stub.requests, stub.prompt_tokens
            assert first.judged_now == 4 and first.cached == 0 and first.requests == asked > 0
            # tokens as the endpoint reported them in its usage fields
            assert first.prompt_tokens == tokens > 0 and first.completion_tokens == stub.completion_tokens == asked
            second = J.judge_run(b, prompts, cfg, plan, cfg.base_url, cache=cache)
        assert stub.requests == asked  # not one request
    assert second.cached == 4 and second.judged_now == 0 and second.cache_hit_rate == 1.0
    assert second.prompt_tokens == 0 and second.requests == 0
    assert J.read_scores(b).keys() == J.read_scores(a).keys()
    assert all(r["score"] == J.read_scores(a)[k]["score"] for k, r in J.read_scores(b).items())


def test_another_judge_identity_is_not_served_from_the_cache(tmp_path):
    a, b, prompts = two_runs(tmp_path, ["a good answer"], ["a good answer"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub)
        other = J.prepare(replace(cfg, model="stub-judge-2"), platform="cpu", dtype="float32",
                          memory_utilization=0.3)
        with JudgeCache(tmp_path / "home") as cache:
            J.judge_run(a, prompts, cfg, plan, cfg.base_url, cache=cache)
            r = J.judge_run(b, prompts, replace(cfg, model="stub-judge-2"), other, cfg.base_url, cache=cache)
    assert r.cached == 0 and r.judged_now == 2


def test_judge_and_summarize_opens_no_judge_when_the_cache_has_every_judgement_and_records_the_cost(tmp_path):
    a, b, prompts = two_runs(tmp_path, ["a good answer", "a bad answer"], ["a good answer", "a bad answer"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub, price=JudgePriceConfig(input_per_million=2.5, output_per_million=10.0))
        m = J.judge_and_summarize(a, prompts, cfg, EvalConfig(), plan, {}, data_dir=tmp_path / "home")
    rec = m["judge"]
    assert rec["prompt_tokens"] == stub.prompt_tokens and rec["completion_tokens"] == stub.completion_tokens
    assert rec["cost"] == pytest.approx((stub.prompt_tokens * 2.5 + stub.completion_tokens * 10.0) / 1e6)
    assert json.loads((a / "judge.json").read_text())["result"]["cost"] == rec["cost"]
    # the stub is gone: judging b asks nothing of it, so nothing needs it
    m2 = J.judge_and_summarize(b, prompts, cfg, EvalConfig(), plan, {}, data_dir=tmp_path / "home")
    assert m2["judge"]["cached"] == 4 and m2["judge"]["judged_now"] == 0 and m2["judge"]["start_seconds"] is None
    assert m2["metrics"] == m["metrics"]


def test_judge_cache_false_neither_reads_nor_writes(tmp_path):
    prompts = _write_run(tmp_path / "a", ["a good answer"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub, cache=False)
        J.judge_and_summarize(tmp_path / "a", prompts, cfg, EvalConfig(), plan, {}, data_dir=tmp_path / "home")
    assert not (tmp_path / "home" / FILE).exists()


def test_the_cache_command_lists_sizes_and_clears_the_judge_cache(tmp_path, capsys):
    from emq.cli.cache import main

    home = tmp_path / "home"
    args = ["--root", str(tmp_path / "merged"), "--data-dir", str(home)]
    assert main([*args, "rm", "--judge"]) == 1  # nothing there yet
    with JudgeCache(home) as c:
        c.put("j1", [_row("a"), _row("b")])
        c.put("openai|https://x|gpt-4o|single_token", [_row("c")])
    capsys.readouterr()
    assert main([*args, "ls"]) == 0
    out = capsys.readouterr().out
    assert "2 judgements  j1" in out and "3 judgements of 2 judge(s)" in out
    assert main([*args, "du"]) == 0 and "3 judgements" in capsys.readouterr().out
    assert main([*args, "rm", "--judge", "gpt-4o"]) == 0 and "removed 1 judgement(s)" in capsys.readouterr().out
    assert main([*args, "rm", "--judge", "no-such-judge"]) == 1
    assert main([*args, "rm", "--judge"]) == 0 and "removed 2 judgement(s)" in capsys.readouterr().out


def test_a_knob_that_shapes_a_score_is_another_judge_for_the_cache(tmp_path):
    """judge.min_valid_mass (or top_logprobs, prune_below, a local judge's weights) changes what a score is: the
    judge cache keys by the judge's fingerprint, not only by what scores.jsonl keys by."""
    a, b, prompts = two_runs(tmp_path, ["a good answer"], ["a good answer"])
    with StubJudge(key=SENTINEL, mode="digits") as stub:
        cfg, plan = planned(stub)
        with JudgeCache(tmp_path / "home") as cache:
            J.judge_run(a, prompts, cfg, plan, cfg.base_url, cache=cache)
            r = J.judge_run(b, prompts, replace(cfg, min_valid_mass=0.5), plan, cfg.base_url, cache=cache)
    assert r.cached == 0 and r.judged_now == 2
