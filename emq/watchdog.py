"""Nothing emq starts outlives it: a watchdog process that stops emq's children when emq dies, however it dies.

vLLM runs its engine core and workers (and a local judge, `vllm serve`) as child processes. When emq is killed
with SIGKILL they are reparented to init and keep running — on a GPU box, holding the GPU's memory until someone
notices. A signal handler cannot help there, so `start()` launches a small watchdog in its own session (so a
Ctrl-C to emq's process group does not reach it): it keeps a list of emq's descendants (pid + start time) and,
the moment the pipe from emq closes (emq exited or was killed), kills every one still alive. It also writes that
list to `<run dir>/pids.json` for `stop_leftovers`, which a later run of the same run dir calls first.

Run as `python -m emq.watchdog PARENT_PID` with emq's end of a pipe on stdin (started by `start()`).
"""
from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import psutil

log = logging.getLogger(__name__)
PIDS = "pids.json"  # the run's descendants, as the watchdog last saw them: {pid: start time}
POLL_S = 0.5
GRACE_S = 3.0  # after emq is gone: how long its children get to end by themselves before they are stopped
_started: subprocess.Popen | None = None


def start(run_dir: Path | None = None) -> None:
    """Start the watchdog for this process once; later calls only point it at a new run dir."""
    global _started
    if _started is None or _started.poll() is not None:
        _started = subprocess.Popen([sys.executable, "-m", "emq.watchdog", str(os.getpid())],
                                    stdin=subprocess.PIPE, start_new_session=True, close_fds=True)
    if run_dir is not None and _started.stdin is not None:
        try:
            _started.stdin.write(f"{Path(run_dir).resolve()}\n".encode())
            _started.stdin.flush()
        except OSError:  # the watchdog died (killed by hand): the run goes on without it
            log.warning("watchdog: not running; a killed run may leave vLLM processes behind")


def _name(p: psutil.Process) -> str:
    """What a process is, for the message that says it was stopped (its command line, shortened)."""
    try:
        return " ".join(p.cmdline())[:80] or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"


def _alive(pid: int, created: float) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - created) < 0.01 else None  # a reused pid is somebody else's
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def kill_all(known: dict[int, float], grace_s: float = 3.0) -> list[int]:
    """SIGTERM every still-living process of `known` (pid → start time), then SIGKILL what is left after
    `grace_s`. Returns the pids that were alive."""
    procs = [p for pid, t in known.items() if (p := _alive(pid, t)) is not None]
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=grace_s)
    return [p.pid for p in procs]


def stop_leftovers(run_dir: Path) -> list[int]:
    """Stop the processes an earlier, killed run of this run dir left alive (from its pids.json), saying so."""
    path = Path(run_dir) / PIDS
    if not path.is_file():
        return []
    try:
        known = {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (ValueError, OSError, AttributeError):
        return []
    stopped = kill_all({pid: t for pid, t in known.items() if pid != os.getpid()})
    if stopped:
        log.warning("stopped %d process(es) an earlier run of %s left running (pids %s)", len(stopped), run_dir,
                    ", ".join(map(str, stopped)))
    path.unlink(missing_ok=True)
    return stopped


def _write(run_dir: Path | None, known: dict[int, float]) -> None:
    if run_dir is None or not run_dir.is_dir():
        return
    tmp = run_dir / f".{PIDS}.tmp"
    tmp.write_text(json.dumps({str(k): v for k, v in known.items()}))
    os.replace(tmp, run_dir / PIDS)


def watch(parent_pid: int) -> None:
    """The watchdog's loop: follow `parent_pid`'s descendants until stdin closes, then kill them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # emq handles Ctrl-C itself; this process must outlive it
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = psutil.Process(parent_pid)
    known: dict[int, float] = {}
    names: dict[int, str] = {}
    run_dir: Path | None = None
    buf = b""
    fd = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([fd], [], [], POLL_S)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break  # emq exited or was killed
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                run_dir = Path(line.decode())
                known = {}
        try:
            children = [c for c in parent.children(recursive=True) if c.pid != os.getpid()]
            seen = {c.pid: c.create_time() for c in children}
        except psutil.NoSuchProcess:
            break
        if seen.keys() - known.keys():
            for c in children:
                if c.pid not in known:
                    names[c.pid] = _name(c)
            known |= seen
            _write(run_dir, known)
        known = {pid: t for pid, t in known.items() if _alive(pid, t) is not None}
    # a normal exit's helpers (vLLM's engine core as it shuts down, multiprocessing's resource tracker) end by
    # themselves once emq is gone: give them a moment, then stop what is still running
    procs = [p for pid, t in known.items() if (p := _alive(pid, t)) is not None]
    _, procs = psutil.wait_procs(procs, timeout=GRACE_S)
    # multiprocessing's resource tracker cleans up after the processes that share its pipe and ends when the last
    # of them has: stop the others first, then give it its moment; it is not something emq left running
    tracker = [p for p in procs if "resource_tracker" in names.get(p.pid, "")]
    killed = kill_all({p.pid: known[p.pid] for p in procs if p not in tracker})
    _, tracker = psutil.wait_procs(tracker, timeout=GRACE_S)
    kill_all({p.pid: known[p.pid] for p in tracker})
    if killed:
        print(f"[emq watchdog] emq (pid {parent_pid}) is gone; stopped {len(killed)} process(es) it left: "
              + ", ".join(f"{pid} ({names.get(pid, '?')})" for pid in killed), file=sys.stderr, flush=True)
    if run_dir is not None:
        (run_dir / PIDS).unlink(missing_ok=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
