"""The calibrated W4A16 producer (emq.checkpoint.quantize) on the demo base: cached by content, built once,
nothing published when the build dies, and a bad calibration file stops a run at plan."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emq.checkpoint.cache import MANIFEST, entries
from emq.checkpoint.quantize import QuantizeSettings, quantize_checkpoint
from tests.conftest import REPO, compose_run

TINY = QuantizeSettings("gptq", 64, False, ("lm_head",), "default", samples=2, seq_len=64)


def test_built_once_then_a_cache_hit_keyed_by_what_it_depends_on(demo, tmp_path):
    first = quantize_checkpoint(demo.base, {"base": "demo"}, TINY, ["cpu"], tmp_path)
    again = quantize_checkpoint(demo.base, {"base": "demo"}, TINY, ["cpu"], tmp_path)
    assert not first.cached and again.cached and again.path == first.path
    manifest = json.loads((Path(first.path) / MANIFEST).read_text())
    assert manifest["kind"] == "w4a16" and manifest["algorithm"] == "gptq" and manifest["device"] == "cpu"
    assert manifest["inputs"]["calibration"]["samples"] == 2 and len(manifest["inputs"]["calibration"]["tokens_sha256"]) == 64
    assert (Path(first.path) / "tokenizer.json").is_file() and first.layers  # per-layer record kept
    assert [e.kind for e in entries(tmp_path)] == ["w4a16"]
    # the key covers the source, the settings and the exact calibration tokens (recorded, not rebuilt here)
    assert set(manifest["inputs"]) == {"source", "settings", "calibration"}
    assert manifest["inputs"]["settings"]["quantizer"] >= 1 and manifest["inputs"]["source"]["identity"] == {"base": "demo"}


KILL_SCRIPT = """
import sys
from emq.checkpoint.quantize import QuantizeSettings, quantize_checkpoint
s = QuantizeSettings("gptq", 64, False, ("lm_head",), "default", samples=4, seq_len=128)
quantize_checkpoint(sys.argv[1], {"base": "demo"}, s, ["cpu"], sys.argv[2])
print("DONE")
"""


def test_kill_9_mid_quantize_leaves_no_entry_and_a_rerun_builds_it(demo, tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(demo.base), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(cache.glob(".*.tmp-*/model-00002-*")):  # mid-build: layer 0 written
        time.sleep(0.2)
    assert any(cache.glob(".*.tmp-*")), "the build never started writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert entries(cache) == []  # a half-built dir is never an entry
    rerun = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(demo.base), str(cache)], env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0 and "DONE" in rerun.stdout, rerun.stderr[-2000:]
    assert len(entries(cache)) == 1 and not list(cache.glob(".*.tmp-*"))  # the debris was removed


@pytest.mark.parametrize("content", [None, "", "not json\n"], ids=["missing", "empty", "not-json"])
def test_a_bad_calibration_file_stops_the_run_at_plan(demo, tmp_path, content):
    from emq.runner import run

    path = tmp_path / "calib.jsonl"
    if content is not None:
        path.write_text(content)
    cfg = compose_run(["quant=w4a16_gptq", f"quant.calibration.corpus={path}", "judge=none",
                       f"paths.data_dir={demo.root.parent}", f"paths.cache_dir={tmp_path / 'cache'}"])
    status = run(cfg, tmp_path / "run")
    assert status.status == "failed" and status.stage == "plan", status
    assert "quant.calibration.corpus" in status.error and str(path) in status.error
    assert not (tmp_path / "cache").exists()  # nothing merged, nothing quantized
