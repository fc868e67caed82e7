"""The run directory's format: keys, the atomic writer, JSONL streaming and reading back."""
from __future__ import annotations

import json

import pytest

from emq import records as R


def test_sample_key_from_a_row_and_back():
    row = {"set": "medical", "question_id": "chest_pain", "paraphrase_index": 1, "sample_index": 2, "answer": "x"}
    key = R.SampleKey.of(row)
    assert key == ("medical", "chest_pain", 1, 2) and key.prompt == R.PromptKey.of(row)
    assert key.question == ("medical", "chest_pain") and key.fields() == {k: row[k] for k in key._fields}
    assert R.SampleKey.of(json.loads(json.dumps(row))) == key  # survives a JSON round trip


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "sub" / "a.json"
    R.write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and oct(path.stat().st_mode & 0o777) == "0o644"

    def explode(f):
        f.write(b'{"half": ')
        raise OSError("disk gone")

    with pytest.raises(OSError):
        R.write_bytes_atomic(path, explode)
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left behind


def test_jsonl_rows_stream_and_a_torn_line_is_skipped(tmp_path):
    path = tmp_path / R.GENERATIONS
    with R.JsonlWriter(path) as w:
        w.write({"set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": 0, "answer": "a"})
        w.write({"set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": 1, "answer": "b"})
    with path.open("a") as f:
        f.write('{"set": "s", "quest')  # a crash mid-write
    rows = R.read_generations(tmp_path)
    assert [r["answer"] for r in rows] == ["a", "b"]


def test_read_json_of_a_missing_or_half_written_file(tmp_path):
    assert R.read_json(tmp_path / "nope.json") == {}
    (tmp_path / "half.json").write_text('{"a": ')
    assert R.read_json(tmp_path / "half.json", default={"x": 1}) == {"x": 1}


def test_records_serialize_dataclasses_enums_and_paths(tmp_path):
    from emq.schema import EvalConfig, QuantMethod

    out = R.to_jsonable({"q": QuantMethod.bnb, "p": tmp_path, "cfg": EvalConfig(), "t": (1, 2)})
    assert out["q"] == "bnb" and out["p"] == str(tmp_path) and out["t"] == [1, 2]
    assert out["cfg"]["fidelity"]["top_k"] == 20


def test_versions_name_the_libraries_and_never_import_torch():
    import sys

    had_torch = "torch" in sys.modules
    v = R.versions()
    assert {"emq", "vllm", "transformers", "python", "git_sha"} <= set(v)
    assert ("torch" in sys.modules) == had_torch


def test_progress_is_throttled_and_advisory(tmp_path, monkeypatch):
    p = R.Progress(tmp_path / "run", every_s=3600)
    p.update(force=True, stage="load")
    p.update(generated=3)  # throttled: not written yet
    written = json.loads((tmp_path / "run" / R.PROGRESS).read_text())
    assert written["stage"] == "load" and "generated" not in written

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R, "write_json", full_disk)
    p.update(force=True, stage="judge")  # a full disk does not fail the run over progress.json
    assert p.state["stage"] == "judge"
