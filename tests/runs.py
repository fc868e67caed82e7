"""Running `python -m emq` as a user does (a subprocess from a temporary cwd) and reading its run dir: shared by
the end-to-end tests (test_e2e, test_rerun, test_fidelity, …)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from emq.records import GENERATIONS
from tests.conftest import REPO, data_dir


def emq(tmp_path: Path, *overrides: str, env: dict[str, str] | None = None, timeout: int = 600):
    run_dir = tmp_path / "run"
    tmp_path.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
           *overrides]
    full_env = {**os.environ, "EMQ_HOME": str(data_dir()), "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(cmd, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=timeout)
    return proc, run_dir


def records(run_dir: Path, name: str):
    return json.loads((run_dir / name).read_text())


def generations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / GENERATIONS).read_text().splitlines()]


def vllm_children_left(grace_s: float = 15.0) -> list[str]:
    """vLLM processes still running (a judge server or engine that was not stopped).

    Zombies do not count: a killed engine core is reparented to PID 1, which in a container may never
    reap it (seen in CI: a VLLM:: zombie with an empty cmdline). Processes get `grace_s` to finish exiting.
    """
    import psutil

    deadline = time.monotonic() + grace_s
    while True:
        left = []
        for p in psutil.process_iter(["cmdline", "name", "status"]):
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(p.info["cmdline"] or [])
            if "vllm.entrypoints.openai.api_server" in cmd or (p.info["name"] or "").startswith("VLLM::"):
                left.append(f"{p.pid} {p.info['status']} {cmd[:120]}")
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)
