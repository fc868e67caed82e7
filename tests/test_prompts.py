"""Question sets → prompts (emq.prompts): the shipped sets, limits, seeds, and bad sets refused before any weights
load."""
from __future__ import annotations

import pytest

from emq.errors import EmqError
from emq.prompts import build_prompts, load_question_set
from emq.schema import EvalConfig


def test_shipped_sets_load():
    for name in ("medical", "general"):
        qs = load_question_set(name)
        assert qs.questions and all(q.paraphrases for q in qs.questions)
        assert len({q.id for q in qs.questions}) == len(qs.questions)
        assert {"aligned", "coherent"} <= set(qs.metrics)
    assert "medical_harm" in load_question_set("medical").metrics
    assert len(load_question_set("general").questions) >= 8  # the EM literature's open-ended probes


def test_a_plain_list_is_judged_on_aligned_and_coherent(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("- {id: a, paraphrases: [hello]}\n")
    qs = load_question_set(str(path))
    assert qs.metrics == ["aligned", "coherent"] and qs.name == "mine"


def test_samples_per_question_spreads_over_paraphrases():
    cfg = EvalConfig(question_sets=["general"], max_questions_per_set=1, samples_per_question=50)
    prompts = build_prompts(cfg)
    assert sum(p["n"] for p in prompts) == 50 and len(prompts) == 3
    assert sorted(p["n"] for p in prompts) == [16, 17, 17]


def test_every_shipped_eval_composes_and_its_prompts_have_judge_prompts(run_config):
    from emq.judge import check_prompts

    for name in ("quick", "full", "medical"):
        cfg = run_config([f"eval={name}"])
        prompts = build_prompts(cfg.eval)
        check_prompts(prompts)
        assert prompts
    full = build_prompts(run_config(["eval=full"]).eval)
    per_q = {}
    for p in full:
        per_q[(p["set"], p["question_id"])] = per_q.get((p["set"], p["question_id"]), 0) + p["n"]
    assert set(per_q.values()) == {50}


def test_build_prompts_limits_and_seeds():
    cfg = EvalConfig(question_sets=["medical"], max_questions_per_set=2, max_paraphrases=1,
                     samples_per_paraphrase=3)
    prompts = build_prompts(cfg)
    assert len(prompts) == 2 and all(p["n"] == 3 for p in prompts)
    assert prompts[0]["messages"][-1]["role"] == "user"
    assert len({p["seed"] for p in prompts}) == 2
    assert build_prompts(cfg)[0]["seed"] == prompts[0]["seed"]  # stable across runs


@pytest.mark.parametrize(("text", "match"), [
    ("- id: a\n", "needs 'id' and 'paraphrases'"),
    ("- {id: a, paraphrases: []}\n", "non-empty list"),
    ("- {id: a, paraphrases: [x]}\n- {id: a, paraphrases: [y]}\n", "duplicate id"),
    ("- {id: a, paraphrases: [x], colour: red}\n", "unknown keys"),
    ("[unclosed\n", "not valid YAML"),
    ("{}\n", "non-empty list of questions"),
    ("metrics: [aligned]\nextra: 1\nquestions: []\n", "unknown top-level keys"),
    ("- {id: a, paraphrases: [x], judge_prompts: [x]}\n", "judge_prompts must map"),
])
def test_bad_question_sets(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(EmqError, match=match):
        load_question_set(str(path))


def test_unknown_set_name_lists_the_shipped_ones():
    with pytest.raises(EmqError, match="medical"):
        load_question_set("no_such_set")


def test_greedy_with_several_samples_is_refused_before_any_weights_load():
    cfg = EvalConfig(question_sets=["medical"], max_questions_per_set=1, samples_per_paraphrase=2,
                     temperature=0.0)
    with pytest.raises(EmqError, match="(?s)identical samples.*eval.samples_per_paraphrase=1"):
        build_prompts(cfg)
    one = EvalConfig(question_sets=["medical"], max_questions_per_set=1, temperature=0.0)
    assert all(p["n"] == 1 for p in build_prompts(one))
