"""merge: one merged checkpoint per (base, adapter, settings), made once and cached.

Methods
- `stream` (default): shard by shard, W + s·B·A in fp32, rounded once (emq.checkpoint.stream). Peak
  memory ≈ a few tensors per parallel part + the adapter, whatever the model size.
- `peft` (reference): PeftModel.merge_and_unload with the weights in fp32, then save_pretrained.

Merge base (for the linear weights a QLoRA run quantized):
- `original`: the 16-bit base weights.
- `dequantized`: dequant(NF4(W)) with the training's blocksize and double-quant setting — the
  weights the adapter actually saw in training.
- `auto` (default): `dequantized` when detect found 4-bit training, else `original`. Reason: a
  QLoRA adapter learned corrections to the quantized weights; merging them into the NF4 round
  trip reproduces the trained function (up to bf16 rounding), while merging into the original
  weights adds the quantization error back.

Devices are tried in the plan's order; a CUDA out-of-memory error moves on to the next device
(the GPU → CPU cascade). NaN/inf in a merged tensor is an error that names the module.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emq.checkpoint import cache
from emq.checkpoint.costs import merge_disk_bytes
from emq.checkpoint.devices import DevicesFailed, try_devices
from emq.checkpoint.identity import adapter_identity, base_identity
from emq.checkpoint.nf4 import dequant_eligible, nf4_roundtrip, nf4_settings
from emq.checkpoint.stream import check_supported, stream_merge
from emq.detect import DetectResult
from emq.errors import EmqError
from emq.machine import GIB, Machine
from emq.schema import MergeBase, MergeMethod

log = logging.getLogger(__name__)

# what a checkpoint carries besides its weights and config (tokenizer, chat template, generation settings)
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json")


class MergeFailed(DevicesFailed):
    """Every merge attempt failed; `attempts` says how."""


@dataclass(frozen=True)
class MergeSettings:
    method: MergeMethod = MergeMethod.stream
    merge_base: MergeBase = MergeBase.auto
    out_dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    rtn: RtnSettings | None = None  # quantize in the same pass (stream only): the served W4A16 checkpoint


@dataclass(frozen=True)
class RtnSettings:
    """W4A16 by round to nearest, fused into the stream merge."""

    group_size: int
    symmetric: bool
    ignore: tuple[str, ...] = ("lm_head",)
    scale_search: str = "minmax"  # emq.checkpoint.w4a16.QuantSpec.scale_search


# Bump when a quantizer's output changes for the same inputs: cached W4A16 checkpoints are rebuilt.
QUANTIZER_VERSION = 1


@dataclass(frozen=True)
class MergeResult:
    path: str
    key: str
    cached: bool
    device: str | None
    method: str
    merge_base: str
    seconds: float
    attempts: list[dict] = field(default_factory=list)


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the tokenizer, chat template and generation config of `src` (those it has) into `dst`."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def resolve_merge_base(det: DetectResult, merge_base: MergeBase) -> MergeBase:
    if merge_base is MergeBase.auto:
        return MergeBase.dequantized if det.trained_in_4bit else MergeBase.original
    return merge_base



def merge_inputs(det: DetectResult, settings: MergeSettings) -> dict:
    """Everything the merged (or merged and quantized) bytes depend on; the cache key is their hash."""
    as_trained = det.adapter is None and settings.merge_base is MergeBase.dequantized  # the base a QLoRA run saw
    if det.adapter is None and settings.rtn is None and not as_trained:
        raise EmqError("nothing to merge: the model config has no adapter", "set model.adapter")
    if settings.rtn is not None and settings.method is not MergeMethod.stream:
        raise EmqError("quant.algorithm=rtn quantizes inside the stream merge; memory.merge_method=peft cannot",
                       "memory.merge_method=stream, or quant.algorithm=gptq/awq (they quantize the merged model)")
    base = resolve_merge_base(det, settings.merge_base) if det.adapter or as_trained else MergeBase.original
    s = {"method": settings.method.value, "math_dtype": "float32", "out_dtype": settings.out_dtype,
         "merge_base": base.value}
    if base is MergeBase.dequantized:
        s["nf4"] = nf4_settings(det)
    if settings.rtn is not None:
        s["w4a16"] = {"algorithm": "rtn", "group_size": settings.rtn.group_size, "symmetric": settings.rtn.symmetric,
                      "ignore": sorted(set(settings.rtn.ignore) | {"lm_head"}), "quantizer": QUANTIZER_VERSION,
                      **({"scale_search": settings.rtn.scale_search} if settings.rtn.scale_search != "minmax" else {})}
    adapter = ({"path": det.adapter.path, "files": adapter_identity(Path(det.adapter.path))} if det.adapter
               else {"path": None, "files": None})
    return {"base": {"path": det.base.path, "files": base_identity(Path(det.base.path))}, "adapter": adapter,
            "settings": s}


def _peft_merge(det: DetectResult, inputs: dict, device: str, out: Path) -> dict[str, str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if det.adapter.use_dora:
        check_supported(det.adapter)  # the DoRA error, before loading anything
    settings = inputs["settings"]
    log.info("merge (peft): loading %s in fp32 on %s", det.base.path, device)
    model = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32, device_map=device)
    if settings.get("nf4"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if dequant_eligible(name, tuple(p.shape)):
                    p.copy_(nf4_roundtrip(p.data.to(torch.bfloat16), device, settings["nf4"]).float())
    model = PeftModel.from_pretrained(model, det.adapter.path, device_map=device)
    try:
        merged = model.merge_and_unload(safe_merge=True, progressbar=True)
    except ValueError as e:  # PEFT raises ValueError on NaN in a merged weight
        raise EmqError(f"merging {det.adapter.path} produced NaN/inf: {e}",
                       "check the adapter weights (adapter_model.safetensors)") from None
    merged = merged.to(getattr(torch, settings["out_dtype"]))
    if hasattr(merged.config, "quantization_config"):
        delattr(merged.config, "quantization_config")
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    del merged, model
    return {}


_KERNELS = {MergeMethod.stream: stream_merge, MergeMethod.peft: _peft_merge}


def merge_key(inputs: dict) -> str:
    """The merge cache's key of `merge_inputs(...)`."""
    return cache.key_of({"base": inputs["base"]["files"], "adapter": inputs["adapter"]["files"],
                         "settings": inputs["settings"]})


def merge_cached(det: DetectResult, settings: MergeSettings, cache_dir: str | Path) -> bool:
    """Whether the merge cache already holds this merge, complete (False when the weights are not local yet)."""
    if not Path(det.base.path).is_dir() or (det.adapter is not None and not Path(det.adapter.path).is_dir()):
        return False
    return cache.is_complete(Path(cache_dir) / merge_key(merge_inputs(det, settings)))


def merge_adapter(det: DetectResult, devices: list[str], cache_dir: str | Path, *,
                  settings: MergeSettings | None = None, force_recreate: bool = False) -> MergeResult:
    """Return a merged checkpoint for the detected base + adapter, building it if needed.

    Args:
        det: detect record (with an adapter; weights local).
        devices: devices to try in order, e.g. ["cuda", "cpu"].
        cache_dir: merge cache root.
        settings: method, merge base, output dtype.
        force_recreate: rebuild even if a complete entry exists.

    Raises:
        EmqError: unsupported adapter, NaN/inf, no disk space (nothing is published).
        MergeFailed: no device could merge (attempts say why).
    """
    settings = settings or MergeSettings()
    t0 = time.perf_counter()
    inputs = merge_inputs(det, settings)
    key = merge_key(inputs)
    s = inputs["settings"]
    attempts: list[dict] = []

    def make(tmp: Path, device: str) -> dict[str, Any]:
        log.info("merge: %s on %s (merge base: %s%s)", s["method"], device, s["merge_base"],
                 ", w4a16 rtn in the same pass" if "w4a16" in s else "")
        hashes = _KERNELS[MergeMethod(s["method"])](det, inputs, device, tmp)
        copy_side_files(Path(det.base.path), tmp)
        return {"files_sha256": hashes}

    def build(tmp: Path) -> dict[str, Any]:
        return try_devices(devices, lambda device: make(tmp, device), tmp, what="merge", attempts=attempts,
                           failed=MergeFailed, fix="free memory, allow CPU merging (memory.allow_cpu_merge=true) "
                                               "or serve the LoRA (memory.stop_on_failure=false)")

    quantized = "w4a16" in s
    if not det.base.param_count:
        needed = None
    else:  # with RTN in the same pass the merge writes the W4A16 checkpoint only
        needed = merge_disk_bytes(det, (s["w4a16"]["group_size"], s["w4a16"]["symmetric"]) if quantized else None,
                                  s["out_dtype"])
    built = cache.get_or_build(Path(cache_dir), key, inputs=inputs, build=build, needed_bytes=needed,
                               force=force_recreate, kind="w4a16" if quantized else "merge",
                               what="the W4A16 checkpoint" if quantized else "the merged checkpoint")
    if not built.cached:
        log.info("merge: wrote %s on %s in %.1f s", built.path, attempts[-1]["device"], attempts[-1]["seconds"])
    return MergeResult(str(built.path), key, built.cached, None if built.cached else built.manifest.get("device"),
                       s["method"], s["merge_base"], time.perf_counter() - t0, attempts)


@dataclass(frozen=True)
class MergeOutcome:
    """What the merge stage ends with: the checkpoint (None when the LoRA is served instead) and the route."""

    merged: MergeResult | None
    fell_back: bool  # every attempt failed and the plan allowed serving the LoRA
    attempts: list[dict]


def merge_or_fall_back(det: DetectResult, devices: list[str], cache_dir: str | Path, *, settings: MergeSettings,
                       force_recreate: bool, may_fall_back: bool, estimates_gib: dict[str, float],
                       machine: Machine) -> MergeOutcome:
    """`merge_adapter` with the plan's last resort: when every device fails, serve the LoRA if the plan allows
    it (memory.stop_on_failure=false), else stop with what was needed and what this machine had.

    Raises:
        EmqError: every device failed and no fallback is allowed (the diagnostic of `explain_failure`).
    """
    try:
        merged = merge_adapter(det, devices, cache_dir, settings=settings, force_recreate=force_recreate)
        return MergeOutcome(merged, False, merged.attempts)
    except MergeFailed as e:
        if not may_fall_back:
            raise explain_failure(e, estimates_gib, machine) from None
        log.warning("merge failed on every device; serving the LoRA instead (memory.stop_on_failure=false)")
        return MergeOutcome(None, True, e.attempts)


def explain_failure(e: MergeFailed, estimates_gib: dict[str, float], machine: Machine) -> EmqError:
    """What a merge needed, what this machine had, and the options that would work."""
    tried = "; ".join(f"{a['device']}: {a.get('error', 'ok')}" for a in e.attempts) or "no device allowed"
    gpu_free = max((g.free_bytes for g in machine.gpus), default=0) / GIB
    options = ["memory.stop_on_failure=false (serve the LoRA through vLLM instead)",
               f"a machine with ≥ {estimates_gib['merge_peak_cpu_ram']:.0f} GiB free RAM or "
               f"≥ {estimates_gib['merge_peak_gpu_vram']:.0f} GiB free VRAM", "free memory held by other processes"]
    return EmqError(f"merge failed on every device ({tried}); GPU merge needs ~{estimates_gib['merge_peak_gpu_vram']:.1f} "
                    f"GiB VRAM ({gpu_free:.1f} free at plan time), CPU merge ~{estimates_gib['merge_peak_cpu_ram']:.1f} "
                    f"GiB RAM ({machine.ram_available_bytes / GIB:.1f} available)", "; or ".join(options))
