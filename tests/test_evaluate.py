"""Generation: resume bookkeeping and the fixed schedule of closed groups (no engine needed)."""
from __future__ import annotations

import json

from emq.evaluate import _keep_complete
from emq.prompts import build_prompts
from emq.schema import EvalConfig


def test_resume_keeps_complete_prompts_and_drops_torn_lines(tmp_path):
    cfg = EvalConfig(question_sets=["medical"], max_questions_per_set=3, max_paraphrases=1,
                     samples_per_paraphrase=2)
    prompts = build_prompts(cfg)
    path = tmp_path / "generations.jsonl"

    def row(p, si):
        return json.dumps({"set": p["set"], "question_id": p["question_id"],
                           "paraphrase_index": p["paraphrase_index"], "sample_index": si, "answer": "x"})

    lines = [row(prompts[0], 0), row(prompts[0], 1), row(prompts[1], 0)]  # prompt 1 half done
    path.write_text("\n".join(lines) + "\n" + '{"set": "medical", "quest')  # torn last line
    done = _keep_complete(path, prompts)
    key0 = (prompts[0]["set"], prompts[0]["question_id"], 0)
    assert done == {key0}
    kept = path.read_text().splitlines()
    assert kept == lines[:2]


# --- the fixed schedule: closed groups in sorted order, and what a resume regenerates ---------------------------

class _Out:
    def __init__(self, index, text):
        self.index, self.text, self.token_ids, self.finish_reason = index, text, [1] * len(text.split()), "length"


class _Finished:
    def __init__(self, outputs):
        self.outputs = outputs


class FakeEngine:
    """What evaluate needs of emq.engine.Engine; answers are a function of the prompt, its seed and its batch."""

    def __init__(self, max_num_seqs=4, answer=None):
        self.max_num_seqs = max_num_seqs
        self.batches: list[list[str]] = []
        self.answer = answer or (lambda rid, seed, batch, si: f"{rid} seed={seed} sample={si}")

    def chat_ids(self, messages):
        return [len(m["content"]) for m in messages]

    def conditions(self):
        return {"dtype": "bfloat16", "kernels": {"linear": {"Fake": 1}}, "max_num_seqs": self.max_num_seqs}

    def run(self, requests, on_done, desc="generate", unit_of=None):
        batch = [r.id for r in requests]
        self.batches.append(batch)
        for r in requests:
            on_done(r, _Finished([_Out(i, self.answer(r.id, r.params.seed, tuple(batch), i))
                                  for i in range(r.params.n)]), 0.01)


def _cfg(**kw):
    base = dict(question_sets=["medical", "general"], max_questions_per_set=3, max_paraphrases=1,
                samples_per_paraphrase=1, temperature=0.0, max_tokens=8, group_size=2)
    return EvalConfig(**{**base, **kw})


def test_groups_are_sorted_closed_and_a_function_of_the_whole_prompt_list():
    from emq.evaluate import group_prompts
    from emq.records import PromptKey

    prompts = build_prompts(EvalConfig(question_sets=["medical", "general"], max_questions_per_set=4,
                                       max_paraphrases=2, samples_per_paraphrase=3))
    groups = group_prompts(prompts, 7)
    flat = [PromptKey.of(p) for g in groups for p in g]
    assert flat == sorted(PromptKey.of(p) for p in prompts)  # every prompt once, in (set, question, paraphrase) order
    assert all(sum(p["n"] for p in g) <= 7 for g in groups) and [len(g) for g in groups][:-1] == [2] * (len(groups) - 1)
    assert group_prompts(list(reversed(prompts)), 7) == groups  # the file's order does not matter
    big = group_prompts(prompts, 2)  # a prompt with more samples than a group holds is a group alone
    assert all(len(g) == 1 for g in big) and len(big) == len(prompts)


def test_evaluate_submits_each_group_whole_and_records_the_conditions(tmp_path):
    from emq.evaluate import evaluate
    from emq.records import read_generations, read_json

    engine = FakeEngine()
    result = evaluate(engine, _cfg(), tmp_path)
    assert [len(b) for b in engine.batches] == [2, 2, 2] and result.groups == result.groups_generated == 3
    assert [rid for b in engine.batches for rid in b] == sorted(rid for b in engine.batches for rid in b)
    rows = read_generations(tmp_path)
    det = read_json(tmp_path / "versions.json")["determinism"]
    assert det["schedule"]["group_size"] == 2 and det["schedule"]["groups"] == 3 and det["dtype"] == "bfloat16"
    assert det["sampling"]["temperature"] == 0.0 and det["kernels"] == {"linear": {"Fake": 1}}
    assert len(rows) == 6 and {r["conditions"] for r in rows} == {det["fingerprint"]}
    null = evaluate(FakeEngine(max_num_seqs=5), _cfg(group_size=None), tmp_path / "auto")
    assert null.groups == 1  # null: 4 × max_num_seqs = 20 samples per group


def test_a_resume_regenerates_partly_written_groups_whole_and_equals_an_uninterrupted_run(tmp_path, caplog):
    from emq.evaluate import evaluate
    from emq.records import read_generations

    # an answer that depends on the batch it ran in, as bf16 rounding can: only equal batches give equal answers
    def answer(rid, seed, batch, si):
        return f"{rid}|{seed}|{'+'.join(batch)}|{si}"

    whole = FakeEngine(answer=answer)
    evaluate(whole, _cfg(), tmp_path / "whole")
    rows = (tmp_path / "whole" / "generations.jsonl").read_text().splitlines()
    # killed after the first group and one prompt of the second, mid-write of the next line
    (tmp_path / "resumed").mkdir()
    (tmp_path / "resumed" / "generations.jsonl").write_text("\n".join(rows[:3]) + "\n" + rows[3][:20])
    again = FakeEngine(answer=answer)
    result = evaluate(again, _cfg(), tmp_path / "resumed")
    assert again.batches == whole.batches[1:]  # group 1 kept; group 2 generated again whole, then group 3
    assert result.generated_now == 3 and result.regenerated == 1 and result.regenerated_differ == 0
    key = lambda r: (r["set"], r["question_id"], r["paraphrase_index"], r["sample_index"])  # noqa: E731
    assert {key(r): r["answer"] for r in read_generations(tmp_path / "resumed")} == \
           {key(r): r["answer"] for r in read_generations(tmp_path / "whole")}
    # a resume under other conditions says so: the regenerated answer differs from the one kept
    (tmp_path / "changed").mkdir()
    (tmp_path / "changed" / "generations.jsonl").write_text("\n".join(rows[:3]) + "\n")
    changed = FakeEngine(answer=lambda *a: "other " + answer(*a))
    changed.conditions = lambda: {"dtype": "float32"}
    with caplog.at_level("WARNING"):
        result = evaluate(changed, _cfg(), tmp_path / "changed")
    assert result.regenerated == 1 and result.regenerated_differ == 1
    assert "other conditions" in caplog.text and "1 of them differ" in caplog.text


def test_many_adapters_share_every_group_interleaved_each_with_its_own_file_and_resume(tmp_path):
    """model.adapters: each closed group holds every adapter's requests, prompt by prompt, each carrying its
    adapter's LoRA; each adapter writes its own generations.jsonl with the prompts and seeds of a run alone; a group
    one adapter lacks is generated again whole, for every adapter (the kept rows stay)."""
    from emq.evaluate import Target, evaluate, evaluate_many
    from emq.records import read_generations

    def answer(rid, seed, batch, si):
        return f"{rid}|{seed}|{si}"

    engine = FakeEngine(answer=answer)
    targets = [Target(tmp_path / n, lora=f"lora-{n}", name=n) for n in ("good", "bad")]
    for t in targets:
        t.out_dir.mkdir()
    loras, fake_run = [], engine.run

    def run_recording_loras(requests, *a, **k):
        loras.append([r.lora for r in requests])
        return fake_run(requests, *a, **k)

    engine.run = run_recording_loras
    results = evaluate_many(engine, _cfg(), targets)
    assert [len(b) for b in engine.batches] == [4, 4, 4]  # 3 groups of 2 prompts, × 2 adapters each
    assert engine.batches[0][:2] == [f"good|{engine.batches[0][0].split('|')[1]}",
                                     f"bad|{engine.batches[0][0].split('|')[1]}"]  # interleaved prompt by prompt
    assert loras[0] == ["lora-good", "lora-bad", "lora-good", "lora-bad"]
    alone = evaluate(FakeEngine(answer=answer), _cfg(), tmp_path / "alone")
    for t, r in zip(targets, results):
        rows = read_generations(t.out_dir)
        assert r.samples == alone.samples == len(rows) and r.groups == alone.groups
        assert [(x["question_id"], x["seed"]) for x in rows] == \
               [(x["question_id"], x["seed"]) for x in read_generations(tmp_path / "alone")]
        assert all(x["answer"].startswith(t.name + "|") for x in rows)
    # bad lost its last row: the last group runs again for both, only bad's missing row is written
    lines = (tmp_path / "bad" / "generations.jsonl").read_text().splitlines()
    (tmp_path / "bad" / "generations.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    again = FakeEngine(answer=answer)
    good, bad = evaluate_many(again, _cfg(), targets)
    assert [len(b) for b in again.batches] == [4]
    assert (good.generated_now, good.regenerated, bad.generated_now, bad.regenerated) == (0, 2, 1, 1)
    assert len(read_generations(tmp_path / "bad")) == 6 and good.regenerated_differ == bad.regenerated_differ == 0
