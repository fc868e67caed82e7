"""judge.panel: several judges on the same answers, composed from conf/judge options by the config layer, judged
in turn (`python -m emq judge RUN_DIR`), each kept under its own name, the first one the headline.

The judges here are two OpenAI-compatible stubs on 127.0.0.1 (tests/judge_stub.py) that score differently; the real
demo judge in a panel runs in tests/test_e2e.py.
"""
from __future__ import annotations

import json

import pytest

from emq.cli import judge as judge_cli
from emq.errors import EmqError
from emq.schema import JudgeKind
from tests.conftest import compose_run
from tests.judge.test_validation import KEY_ENV, SENTINEL, write_run
from tests.judge_stub import StubJudge


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SENTINEL)


def member(stub: StubJudge, model: str) -> str:
    return f"{{name:openai,base_url:'{stub.url}',model:{model},api_key_env:{KEY_ENV}}}"


def test_panel_members_are_composed_from_the_judge_options_with_shared_and_own_fields():
    cfg = compose_run(["judge.panel=[local,{name:openai,model:gpt-4o-mini,api_key_env:null}]", "judge.validate=false",
                       "judge.max_concurrency=3"])
    first, second = cfg.judges
    assert cfg.judge is first and cfg.panel() == [first, second]
    assert first.kind is JudgeKind.local and first.demo and first.model.endswith("/demo/judge")  # local.yaml
    assert second.kind is JudgeKind.openai and second.model == "gpt-4o-mini" and second.api_key_env is None
    assert second.base_url == "https://api.openai.com/v1"  # openai.yaml's, not overridden
    # judge.* on the command line go to every member; the entry's own fields to that member only
    assert not first.validate and not second.validate and first.max_concurrency == second.max_concurrency == 3
    assert first.panel == second.panel == []
    assert compose_run([]).panel() == [compose_run([]).judge]  # no panel: the one judge


@pytest.mark.parametrize("panel,says", [
    ("[local,nope]", "judge.panel[1]='nope' is not a judge option"),
    ("[none]", "is not a judge option"),
    ("[{name:local,colour:red}]", "judge.panel[0] (local): Key 'colour' not in 'JudgeConfig'"),
    ("[{model:x}]", "is not a judge option"),
])
def test_a_bad_panel_entry_is_one_error_that_names_it(panel, says):
    with pytest.raises(EmqError) as e:
        compose_run([f"judge.panel={panel}"])
    assert says in e.value.message and "conf/judge" in e.value.fix + e.value.message or "JudgeConfig" in e.value.fix


def test_judges_is_not_set_directly():
    with pytest.raises(EmqError) as e:
        compose_run(["judges=[{kind:local,model:x}]"])
    assert "judges is set directly" in e.value.message and "judge.panel" in e.value.fix


def test_a_panel_member_with_a_bad_value_names_its_place():
    with pytest.raises(EmqError) as e:
        compose_run(["judge.panel=[local,{name:openai,top_logprobs:50}]"])
    assert "judge.panel[1] (openai)" in e.value.message and "top_logprobs" in e.value.message


def test_a_panel_judges_a_run_with_each_judge_the_first_the_headline_and_again_asks_nothing(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, answers=("a good answer", "a bad answer", "a fine answer", "a poor answer"))
    # two judges that score differently: one reads digit by digit, the other one token per number
    with StubJudge(key=SENTINEL, mode="digits") as a, StubJudge(key=SENTINEL, mode="single") as b:
        panel = f"judge.panel=[{member(a, 'judge-a')},{member(b, 'judge-b')}]"
        assert judge_cli.main([str(run_dir), panel]) == 0
        asked = a.requests, b.requests
        assert all(asked)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert list(metrics["judges"]) == ["openai:judge-a (digits)", "openai:judge-b (single_token)"]
        # the headline is the first judge, though the second judged last
        assert metrics["judge"]["model"] == "judge-a" and metrics["metrics"] == metrics["judges"][
            "openai:judge-a (digits)"]["metrics"] != metrics["judges"]["openai:judge-b (single_token)"]["metrics"]
        assert len(metrics["agreement"]) == 1
        record = json.loads((run_dir / "judge.json").read_text())
        assert record["plan"]["model"] == "judge-a" and set(record["judges"]) == set(metrics["judges"])
        for label, stub in zip(metrics["judges"], (a, b)):
            res = record["judges"][label]["result"]
            # emq counts attempts: one the stub's backlog refused (retried) never reached its count
            assert res["prompt_tokens"] == stub.prompt_tokens > 0
            assert stub.requests <= res["requests"] <= stub.requests + res["retries"]
        rows = [json.loads(ln) for ln in (run_dir / "judged.jsonl").read_text().splitlines()]
        assert all(set(r["by_judge"]) == set(metrics["judges"]) for r in rows)
        assert all(r["judged"] == r["by_judge"]["openai:judge-a (digits)"] for r in rows)
        # judging again asks neither judge anything; the record says it all came from before
        assert judge_cli.main([str(run_dir), panel]) == 0
        assert (a.requests, b.requests) == asked
    again = json.loads((run_dir / "metrics.json").read_text())
    assert again["metrics"] == metrics["metrics"] and again["agreement"] == metrics["agreement"]


def test_a_sweeps_deferred_runs_are_judged_by_every_judge_of_the_panel_one_opening_each(tmp_path):
    """judge.scope=sweep: after the sweep, each judge of the panel is opened once for all runs (`judge_deferred`),
    and each run ends with both judges, the first the headline."""
    import yaml

    with StubJudge(key=SENTINEL, mode="digits") as a, StubJudge(key=SENTINEL, mode="single") as b:
        panel = f"judge.panel=[{member(a, 'judge-a')},{member(b, 'judge-b')}]"
        dirs = [tmp_path / "0", tmp_path / "1"]
        for d, answers in zip(dirs, (("a good answer", "a bad answer"), ("a good answer", "something new"))):
            write_run(d, answers)
            (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["eval=quick", panel]))
            (d / "metrics.json").write_text(json.dumps({"judge": {"deferred_to_sweep": True}, "metrics": {}}))
        assert judge_cli.judge_deferred(dirs + [tmp_path / "not-deferred"]) == dirs
        per_run = [a.requests, b.requests]
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert list(metrics["judges"]) == ["openai:judge-a (digits)", "openai:judge-b (single_token)"]
        assert metrics["judge"]["model"] == "judge-a" and metrics["judge"]["sweep"]["runs"] == 2
        assert len(metrics["agreement"]) == 1
    # the second run borrowed what the first had judged of "a good answer", from each judge
    second = json.loads((dirs[1] / "metrics.json").read_text())
    assert all(second["judges"][j]["judge"]["sweep"]["borrowed_from_other_runs"] > 0 for j in second["judges"])
    assert all(per_run)
