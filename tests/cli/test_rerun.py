"""Rerun a run from its directory alone: with greedy decoding the generations are identical."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO, data_dir
from tests.runs import emq, generations


@pytest.mark.slow
def test_greedy_rerun_reproduces_the_generations(demo, tmp_path):
    proc, run_dir = emq(tmp_path, "quant=none", "judge=none", "eval.fidelity.enabled=false", "eval.temperature=0",
                        "eval.samples_per_paraphrase=1", "eval.max_tokens=24")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("versions.json", "run_config.json", "inputs.json", ".hydra/config.pickle"):
        assert (run_dir / name).is_file(), name
    versions = json.loads((run_dir / "versions.json").read_text())
    assert versions["python"] and "git_dirty" in versions and versions["seed"] == 0
    inputs = json.loads((run_dir / "inputs.json").read_text())
    assert inputs["adapter"]["files_sha256"] and inputs["merged"]["files_sha256"]
    again = tmp_path / "again"
    rerun = subprocess.run([sys.executable, "-m", "emq", "rerun", str(run_dir), "--out", str(again)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=900,
                           env={**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO)})
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    first, second = generations(run_dir), generations(again)
    assert len(first) == len(second) == 6
    key = lambda r: (r["set"], r["question_id"], r["paraphrase_index"], r["sample_index"])  # noqa: E731
    # rows are written as requests finish, so compare by prompt, not by line
    assert {key(r): r["answer"] for r in first} == {key(r): r["answer"] for r in second}
    assert json.loads((again / "metrics.json").read_text())["generated_now"] == 6  # made again, not resumed
