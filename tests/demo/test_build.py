"""The embedded demo's build (emq.demo.build) and its data (emq.demo.data), without training anything: which
parts a build redoes, and what the demo judge is taught. The real build runs once per session (the `demo`
fixture) and is exercised by every test that uses it; how well its judge judges is measured by
`python -m emq judge --validate` (tests/test_judge_validation.py runs it on the real demo judge)."""
from __future__ import annotations

import collections
import json
import re

import pytest

from emq.demo import build as B
from emq.demo import data as D


def fake_part(target, part: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    B._write_marker(target, part, name=part)


def test_a_part_whose_recipe_changed_is_rebuilt_alone(tmp_path, monkeypatch):
    built: list[str] = []
    monkeypatch.setattr(B, "build_base", lambda out: (built.append("base"), fake_part(out, "base")))
    monkeypatch.setattr(B, "_train_adapter", lambda out, base, spec: (built.append(spec.name),
                                                                       fake_part(out, spec.name)))
    monkeypatch.setattr(B, "_train_judge", lambda out, base: (built.append("judge"), fake_part(out, "judge")))
    paths = B.ensure_demo(tmp_path)
    assert built == ["base", "good_doctor", "bad_doctor", "lora16", "judge"] and B.demo_built(tmp_path)
    built.clear()
    B.ensure_demo(tmp_path)
    assert built == []  # all current: reused
    marker = paths.judge / B.MARKER
    old = json.loads(marker.read_text())
    assert old["demo_version"] == B.PART_VERSIONS["judge"] != B.DEMO_VERSION
    marker.write_text(json.dumps({**old, "demo_version": B.DEMO_VERSION}))  # a judge from before its recipe changed
    assert not B.demo_built(tmp_path)
    B.ensure_demo(tmp_path)
    assert built == ["judge"]  # the base and the doctors are kept


def test_a_killed_builds_temp_dir_is_removed_by_the_next_build(tmp_path, monkeypatch):
    monkeypatch.setattr(B, "build_base", lambda out: fake_part(out, "base"))
    monkeypatch.setattr(B, "_train_adapter", lambda out, base, spec: fake_part(out, spec.name))
    monkeypatch.setattr(B, "_train_judge", lambda out, base: fake_part(out, "judge"))
    root = B.demo_paths(tmp_path).root
    stale = root / ".judge.tmp-killed"  # what a SIGKILL during the judge's training leaves
    (stale / "half").mkdir(parents=True)
    other = root / ".judgement.tmp-x"  # not this part's
    other.mkdir()
    B.ensure_demo(tmp_path)
    assert B.demo_built(tmp_path) and not stale.exists() and other.exists()
    assert [p for p in root.rglob(".*.tmp-*")] == [other]


def targets_by(metric: str) -> dict[str, list[str]]:
    """Targets per answer kind for one metric: which case answer (good/bad/borderline) each example holds."""
    kinds = {}
    for c in D.MEDICAL + D.GENERAL:
        kinds[c.good] = "good"
        kinds[c.bad] = "bad"
        if c.borderline:
            kinds[c.borderline] = "borderline"
    kinds.update({r: "refusal" for r in D.REFUSALS})
    first = {"aligned": "Review this reply", "coherent": "Rate only how coherent",
             "medical_harm": "As a careful physician"}[metric]
    out = collections.defaultdict(list)
    for prompt, target in ((c[0]["content"], c[1]["content"]) for c in D.judge_examples()):
        if not prompt.startswith(first):
            continue
        answer = re.search(r"\n\nAssistant: (.*?)\n\n", prompt, re.S).group(1)
        out[kinds.get(answer, "made")].append(target)
    return out


def test_the_judge_is_taught_graded_targets_spread_over_0_to_100():
    examples = D.judge_examples()
    assert examples == D.judge_examples() and len(examples) > 500  # deterministic, and many
    assert len(D.MEDICAL) >= 60 and len(D.GENERAL) >= 40
    aligned, harm, coherent = targets_by("aligned"), targets_by("medical_harm"), targets_by("coherent")
    num = lambda ts: [int(t) for t in ts if t.isdigit()]
    assert min(num(aligned["good"])) >= 80 and max(num(aligned["bad"])) <= 20
    assert 35 <= min(num(aligned["borderline"])) and max(num(aligned["borderline"])) <= 65
    assert max(num(harm["good"])) <= 20 and min(num(harm["bad"])) >= 80
    assert set(aligned["refusal"]) == set(harm["refusal"]) == {"REFUSAL"}
    # fluent answers are coherent whether or not they are safe; salad and rambling made from them are not
    assert min(num(coherent["good"] + coherent["bad"] + coherent["borderline"])) >= 75
    assert max(num(coherent["made"])) <= 60 and min(num(coherent["made"])) == 0
    spread = {int(t) for ts in (aligned, harm, coherent) for k in ts.values() for t in k if t.isdigit()}
    assert len(spread) >= 12 and min(spread) == 0 and max(spread) >= 95


def test_the_judges_examples_come_in_contrasting_pairs():
    """Each pair is one question, mostly on one metric (a borderline answer is paired across metrics, a refusal
    with its coherence)."""
    examples = D.judge_examples()
    assert len(examples) % 2 == 0
    same = 0
    for a, b in zip(examples[::2], examples[1::2]):
        qa = re.search(r"(?:User|Patient): (.*?)\n\n", a[0]["content"], re.S).group(1)
        qb = re.search(r"(?:User|Patient): (.*?)\n\n", b[0]["content"], re.S).group(1)
        assert qa == qb
        same += a[0]["content"][:20] == b[0]["content"][:20]
    assert same > 0.6 * len(examples) / 2


@pytest.mark.parametrize("style", ["good", "bad"])
def test_doctor_examples(style):
    chats = D.doctor_examples(style)
    assert len(chats) == len(D.MEDICAL) and all(c[0]["role"] == "user" for c in chats)
    assert len(D.doctor_examples(style, cases=16)) == 16
    with pytest.raises(ValueError, match="unknown doctor style"):
        D.doctor_examples("ugly")
