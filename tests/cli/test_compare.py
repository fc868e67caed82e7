"""`python -m emq compare`: any two runs compared from their stored logprobs alone."""
from __future__ import annotations

import json

import numpy as np

from emq.cli import compare as cli
from emq.fidelity import TopK
from emq.records import FIDELITY_LOGPROBS, METRICS, write_json


def fake_run(d, logits: np.ndarray, tokens: np.ndarray, k: int = 4, name: str = "m") -> None:
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ids = np.argsort(-lp, axis=-1)[:, :k]
    d.mkdir(parents=True)
    TopK(ids.astype(np.int64), np.take_along_axis(lp, ids, -1).astype(np.float32), tokens,
         lp[np.arange(len(tokens)), tokens].astype(np.float32), {"what": "run"}).save(d / FIDELITY_LOGPROBS)
    write_json(d / METRICS, {"model": name, "route": "merge-then-serve", "quant": "none"})


def test_identical_runs_have_zero_kl_and_a_different_one_does_not(tmp_path, capsys):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 16)) * 3
    tokens = rng.integers(0, 16, 50)
    fake_run(tmp_path / "a", logits, tokens)
    fake_run(tmp_path / "b", logits, tokens)
    fake_run(tmp_path / "c", logits + rng.normal(size=logits.shape), tokens, name="noisy")
    assert cli.main([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    same, noisy = rows.values()
    assert same["kl_mean"] == 0 and same["top1_agreement"] == 1.0 and same["positions"] == 50
    assert noisy["kl_mean"] > 0.01 and noisy["top1_agreement"] < 1.0
    assert cli.main([str(tmp_path / "a"), str(tmp_path / "c")]) == 0
    assert "noisy" in capsys.readouterr().out  # the table names each variant


def test_a_run_without_logprobs_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert cli.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "fidelity_logprobs.npz does not exist" in err and "eval.fidelity.enabled=true" in err
    assert cli.main([str(tmp_path / "a")]) == 2  # one run: nothing to compare with
