"""merge: one merged checkpoint per (base, adapter, settings), made once and cached.

Method `peft`: PeftModel.merge_and_unload with the weights in fp32 (bf16 matmuls are slow and
lossy on CPU), saved as bf16 safetensors. The devices are tried in the plan's order: a CUDA
out-of-memory error moves on to the next device (the GPU → CPU cascade).
"""
from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock

import emq
from emq.detect import DetectResult
from emq.errors import EmqError
from emq.records import write_json

log = logging.getLogger(__name__)

FULL_HASH_LIMIT = 2 * 1024**3  # hash base weights in full below this; above, hash their headers
_COPY_FROM_BASE = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")
MANIFEST = "manifest.json"


class MergeFailed(EmqError):
    """Every merge attempt failed; `attempts` says how."""

    def __init__(self, message: str, fix: str, attempts: list[dict]):
        super().__init__(message, fix)
        self.attempts = attempts


@dataclass(frozen=True)
class MergeResult:
    path: str
    key: str
    cached: bool
    device: str | None
    method: str
    seconds: float
    attempts: list[dict] = field(default_factory=list)


def _sha256(path: Path, limit: int | None = None) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if limit is not None:
            h.update(f.read(limit))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _base_identity(base_dir: Path) -> dict[str, str]:
    """Hash of each base file; weights above FULL_HASH_LIMIT in total are identified by
    size + header (names, dtypes, shapes, offsets) so a 28 GB base is not read twice."""
    weights = sorted(base_dir.glob("*.safetensors"))
    full = sum(p.stat().st_size for p in weights) <= FULL_HASH_LIMIT
    ident = {}
    for p in sorted(base_dir.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.suffix == ".safetensors" and not full:
            with p.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
            ident[p.name] = f"size={p.stat().st_size};header-sha256={_sha256(p, 8 + n)}"
        else:
            ident[p.name] = _sha256(p)
    return ident


def merge_inputs(det: DetectResult) -> dict:
    """Everything the merged bytes depend on: the cache key is their hash."""
    assert det.adapter is not None
    adir = Path(det.adapter.path)
    adapter_files = {p.name: _sha256(p) for p in sorted(adir.iterdir())
                     if p.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")}
    return {
        "base": {"path": det.base.path, "files": _base_identity(Path(det.base.path))},
        "adapter": {"path": det.adapter.path, "files": adapter_files},
        "settings": {"method": "peft", "math_dtype": "float32", "out_dtype": "bfloat16", "merge_base": "original"},
    }


def merge_key(inputs: dict) -> str:
    blob = json.dumps({"base": inputs["base"]["files"], "adapter": inputs["adapter"]["files"],
                       "settings": inputs["settings"]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _is_complete(entry: Path) -> bool:
    return (entry / MANIFEST).is_file() and (entry / "config.json").is_file()


def _peft_merge(det: DetectResult, device: str, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log.info("merge: loading %s in fp32 on %s", det.base.path, device)
    model = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32,
                                                 device_map=device, low_cpu_mem_usage=True)
    model = PeftModel.from_pretrained(model, det.adapter.path, device_map=device)
    log.info("merge: merge_and_unload (safe_merge: NaN/inf is an error)")
    try:
        merged = model.merge_and_unload(safe_merge=True, progressbar=True)
    except ValueError as e:  # PEFT raises ValueError on NaN in a merged weight
        raise EmqError(f"merging {det.adapter.path} produced NaN/inf: {e}",
                       "check the adapter weights (adapter_model.safetensors)") from None
    merged = merged.to(torch.bfloat16)
    merged.config.dtype = torch.bfloat16
    if hasattr(merged.config, "quantization_config"):
        delattr(merged.config, "quantization_config")
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    del merged, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    for name in _COPY_FROM_BASE:
        src = Path(det.base.path) / name
        if src.is_file():
            shutil.copy2(src, out / name)


def merge_adapter(det: DetectResult, devices: list[str], cache_dir: str | Path, *,
                  force_recreate: bool = False) -> MergeResult:
    """Return a merged checkpoint for the detected base + adapter, building it if needed.

    Args:
        det: detect record (with an adapter).
        devices: devices to try in order, e.g. ["cuda", "cpu"].
        cache_dir: merge cache root.
        force_recreate: rebuild even if a complete entry exists.

    Raises:
        MergeFailed: no device could merge (attempts say why).
    """
    import torch

    t0 = time.perf_counter()
    inputs = merge_inputs(det)
    key = merge_key(inputs)
    root = Path(cache_dir).expanduser()
    (root / ".locks").mkdir(parents=True, exist_ok=True)
    entry = root / key
    with FileLock(str(root / ".locks" / f"{key}.lock")):
        if _is_complete(entry) and not force_recreate:
            log.info("merge: cache hit %s", entry)
            return MergeResult(str(entry), key, True, None, "peft", time.perf_counter() - t0)
        attempts: list[dict] = []
        for device in devices:
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
            a0 = time.perf_counter()
            try:
                _peft_merge(det, device, tmp)
                files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
                write_json(tmp / MANIFEST, {
                    "key": key, "emq_version": emq.__version__, "device": device, **inputs,
                    "created_unix": time.time(), "files_sha256": files,
                })
                if entry.exists():
                    shutil.rmtree(entry)
                os.replace(tmp, entry)
                attempts.append({"device": device, "ok": True, "seconds": round(time.perf_counter() - a0, 2)})
                log.info("merge: wrote %s on %s in %.1f s", entry, device, time.perf_counter() - a0)
                return MergeResult(str(entry), key, False, device, "peft", time.perf_counter() - t0, attempts)
            except torch.OutOfMemoryError as e:
                attempts.append({"device": device, "ok": False, "error": f"out of memory: {str(e)[:300]}"})
                log.warning("merge on %s ran out of memory; trying the next device", device)
                del e  # its traceback holds the half-loaded model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except (MemoryError, RuntimeError) as e:
                attempts.append({"device": device, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                log.warning("merge on %s failed (%s); trying the next device", device, type(e).__name__)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise MergeFailed(f"every merge attempt failed: {attempts}",
                          "free memory, allow CPU merging (memory.allow_cpu_merge=true) or serve the LoRA "
                          "(memory.stop_on_failure=false)", attempts)
