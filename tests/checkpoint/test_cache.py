"""The merge cache under crashes and concurrency, and its command (python -m emq cache)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emq.checkpoint.cache import entries, verify
from emq.cli.cache import main
from tests.conftest import REPO, data_dir

MERGE = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
import emq
p = emq.get_or_create_merged_model({base!r}, {lora!r}, cache_dir={cache!r}, merge_base="original", device="cpu")
print(json.dumps({{"path": str(p)}}))
"""


def _spawn(demo, cache: Path, adapter: str = "good_doctor") -> subprocess.Popen:
    code = MERGE.format(base=str(demo.base), lora=str(demo.adapters[adapter]), cache=str(cache))
    env = {**os.environ, "PYTHONPATH": str(REPO), "EMQ_HOME": str(data_dir())}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_crash_mid_write_leaves_debris_that_is_never_used(demo, tmp_path):
    cache = tmp_path / "cache"
    proc = _spawn(demo, cache)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the merge is writing into its temp dir
        tmps = list(cache.glob(".*.tmp-*"))
        if tmps and any(p.suffix == ".safetensors" for p in tmps[0].iterdir()):
            break
        time.sleep(0.01)
    else:
        proc.kill()
        pytest.fail("the merge never started writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not entries(cache), "a killed merge must not leave a usable entry"
    assert list(cache.glob(".*.tmp-*")), "expected debris from the killed merge"

    again = _spawn(demo, cache)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-2000:]
    assert "removed debris" in err
    (entry,) = entries(cache)
    assert verify(entry.path) == [] and not list(cache.glob(".*.tmp-*"))


def test_four_concurrent_requests_merge_once(demo, tmp_path):
    cache = tmp_path / "cache"
    procs = [_spawn(demo, cache, "bad_doctor") for _ in range(4)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-1500:] for r in results]
    paths = {json.loads(out.strip().splitlines()[-1])["path"] for out, _ in results}
    assert len(paths) == 1
    logs = "".join(err for _, err in results)
    assert logs.count("merge: wrote") == 1 and logs.count("cache: hit") == 3
    (entry,) = entries(cache)
    assert verify(entry.path) == []


def test_cache_command_ls_du_verify_rm(demo, tmp_path, capsys):
    from emq.api import get_or_create_merged_model

    cache = tmp_path / "cache"
    path = get_or_create_merged_model(str(demo.base), str(demo.adapters["bad_doctor"]), cache_dir=cache,
                                      merge_base="original", device="cpu")
    assert main(["--root", str(cache), "ls"]) == 0
    assert path.name in capsys.readouterr().out
    assert main(["--root", str(cache), "du"]) == 0 and "GiB in 1 entries" in capsys.readouterr().out
    assert main(["--root", str(cache), "verify"]) == 0
    shard = next(path.glob("*.safetensors"))
    with shard.open("r+b") as f:  # flip a byte: verify must notice
        f.seek(1000)
        b = f.read(1)
        f.seek(1000)
        f.write(bytes([b[0] ^ 0xFF]))
    assert main(["--root", str(cache), "verify"]) == 1 and "sha256 differs" in capsys.readouterr().out
    assert main(["--root", str(cache), "rm", "--model", "bad_doctor"]) == 0
    assert not path.exists() and entries(cache) == []
