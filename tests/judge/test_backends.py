"""Judge backends (emq/judge/backends/): one module per judge.kind, found by name."""
from __future__ import annotations

import pytest

from emq.errors import EmqError
from emq.judge.backends import backend, names
from emq.judge.plan import JudgePlan
from emq.schema import JudgeConfig, JudgeKind


def test_every_judge_kind_has_one_backend_and_every_backend_a_kind():
    assert names() == sorted(k.value for k in JudgeKind)
    for k in JudgeKind:
        assert backend(k).name == k.value and backend(k.value) is backend(k)


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(EmqError) as e:
        backend("carrier-pigeon")
    assert "judge.kind='carrier-pigeon'" in str(e.value) and "local" in e.value.fix


def test_what_each_kind_says_about_itself():
    assert not backend("none").judges and backend("local").judges and backend("openai").judges
    assert backend("local").shared_by_sweep and not backend("openai").shared_by_sweep
    local = JudgePlan("local", "m", None, "digits", "x", None, server={})
    remote = JudgePlan("openai", "gpt-4o", "https://x/v1", "single_token", "x", "K")
    # a score's identity: a local server's port changes between runs, an endpoint's URL does not
    assert local.identity == "local|local|m|digits" and remote.identity == "openai|https://x/v1|gpt-4o|single_token"
    assert not JudgePlan("none", None, None, None, None, None).judges


def test_each_kind_names_what_its_config_lacks():
    assert backend("none").config_problems(JudgeConfig(kind=JudgeKind.none)) == []
    assert "judge.model" in backend("local").config_problems(JudgeConfig(kind=JudgeKind.local))[0][0]
    found = backend("openai").config_problems(JudgeConfig(kind=JudgeKind.openai, model="m", base_url=None,
                                                          top_logprobs=21))
    assert [w.split(" ")[0] for w, _ in found] == ["judge.top_logprobs=21", "judge.base_url"]


def test_judge_none_has_no_endpoint(tmp_path):
    plan = backend("none").prepare(JudgeConfig(kind=JudgeKind.none), platform="cpu", dtype="float32",
                                   memory_utilization=0.3)
    with pytest.raises(EmqError, match="no judge to ask"):
        with backend("none").endpoint(JudgeConfig(kind=JudgeKind.none), plan, tmp_path / "log"):
            pass
