"""The device cascade every checkpoint producer runs: try each device in the plan's order; a CUDA
out-of-memory (or a MemoryError / RuntimeError) moves on to the next one with the temp dir emptied;
every attempt is recorded. Used inside `cache.get_or_build`'s build step, so nothing half-made is published.
"""
from __future__ import annotations

import gc
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emq.errors import EmqError

log = logging.getLogger(__name__)


class DevicesFailed(EmqError):
    """Every device failed; `attempts` says how."""

    def __init__(self, message: str, fix: str, attempts: list[dict]):
        super().__init__(message, fix)
        self.attempts = attempts


class _NeverRaised(Exception):
    pass


def _torch_oom() -> type[BaseException]:
    """torch's out-of-memory error when torch is loaded: a CPU stream merge never imports torch
    (an except clause evaluates this only once an exception is on its way, so torch is loaded
    if it raised one)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", _NeverRaised) if torch is not None else _NeverRaised


def _empty(d: Path) -> None:
    for p in d.iterdir():  # the next device starts from an empty dir
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def try_devices(devices: list[str], make: Callable[[str], dict[str, Any]], out: Path, *, what: str,
                attempts: list[dict], failed: type[DevicesFailed], fix: str) -> dict[str, Any]:
    """`make(device)` on each device in turn until one succeeds; returns what it returned plus the device.

    Args:
        devices: in the plan's order, e.g. ["cuda", "cpu"].
        make: writes into `out` on the given device; returns manifest fields.
        out: the temp dir `make` writes into (emptied between attempts).
        what: the step's name for messages ("merge", "gptq", …).
        attempts: filled with one record per attempt (device, ok, seconds or error).
        failed: the error to raise when no device succeeds.
        fix: that error's fix.

    Raises:
        `failed`: every device failed (its `attempts` say how). Other errors propagate at once.
    """
    for device in devices:
        a0 = time.perf_counter()
        try:
            log.info("%s on %s", what, device)
            fields = make(device)
            attempts.append({"device": device, "ok": True, "seconds": round(time.perf_counter() - a0, 2)})
            return {"device": device, **fields}
        except _torch_oom() as e:
            attempts.append({"device": device, "ok": False, "error": f"out of memory: {str(e)[:300]}"})
            log.warning("%s on %s ran out of memory; trying the next device", what, device)
            del e  # its traceback holds the half-loaded model
            gc.collect()
            torch = sys.modules["torch"]
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except (MemoryError, RuntimeError) as e:
            attempts.append({"device": device, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            log.warning("%s on %s failed (%s); trying the next device", what, device, type(e).__name__)
        _empty(out)
    raise failed(f"every {what} attempt failed: {attempts}", fix, attempts)
