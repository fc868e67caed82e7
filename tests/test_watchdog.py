"""The watchdog (emq.watchdog) with real processes: what emq leaves running is stopped and named; a helper that
ends by itself right after emq is not reported."""
from __future__ import annotations

import subprocess
import sys
import time

import psutil

from tests.conftest import REPO

SCRIPT = """
import subprocess, sys, time
from emq import watchdog
watchdog.start()
left = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)  # left-behind"])
quick = subprocess.Popen([sys.executable, "-c", "import os, time\\nppid = os.getppid()\\n"
                          "while os.getppid() == ppid: time.sleep(0.05)\\n"])  # ends once its parent is gone
time.sleep(1.5)  # the watchdog sees both
print(left.pid, quick.pid, flush=True)
"""


def test_a_left_process_is_stopped_and_named_and_one_that_ends_by_itself_is_not_reported():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    left, quick = map(int, proc.stdout.split())
    deadline = time.time() + 15
    while time.time() < deadline and psutil.pid_exists(left):
        time.sleep(0.2)
    assert not psutil.pid_exists(left) or psutil.Process(left).status() == psutil.STATUS_ZOMBIE
    assert not psutil.pid_exists(quick) or psutil.Process(quick).status() == psutil.STATUS_ZOMBIE
    # the watchdog shares the script's stderr, so run() returned only after it had finished and said what it did
    err = proc.stderr
    assert f"stopped 1 process(es) it left: {left} (" in err and "left-behind" in err and str(quick) not in err
