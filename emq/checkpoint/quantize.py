"""quantize: a calibrated W4A16 checkpoint (GPTQ or AWQ) of a 16-bit checkpoint, made once and cached like merges.

The source is the merged checkpoint (merge-then-serve) or the base (a LoRA served on the quantized base). The
calibration tokens come from `emq.calibration` (emq's own chats, never the fidelity corpus, or the user's
JSONL). Round to nearest needs none of this: it runs inside the stream merge (emq.checkpoint.stream).

Cache key: the source's identity (the merged checkpoint's key, or the base files' identity), the quant settings,
the calibration corpus's hash and the exact calibration tokens, and the quantizer version. Devices are tried in
the plan's order (GPU, then CPU on out-of-memory); a kill leaves only a temp dir the next builder removes.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emq.checkpoint import cache
from emq.checkpoint.devices import DevicesFailed, try_devices
from emq.checkpoint.quantizers import quantizer
from emq.checkpoint.merge import QUANTIZER_VERSION, copy_side_files

log = logging.getLogger(__name__)


COMPENSATION_VERSION = 1  # of emq.checkpoint.compensation's fit and the driver's rounds (part of the cache key)


class QuantizeFailed(DevicesFailed):
    """Every quantize attempt failed; `attempts` says how."""


@dataclass(frozen=True)
class QuantizeSettings:
    """What a calibrated quantization does (the plan's QuantizePlan, as the quantizer needs it)."""

    algorithm: str  # gptq | awq
    group_size: int
    symmetric: bool
    ignore: tuple[str, ...]
    corpus: str  # calibration: "default" or a JSONL path
    samples: int
    seq_len: int
    damp: float = 0.01
    compensation_rank: int = 0  # > 0: fit and keep each Linear's low-rank error compensation (compensation.factors)
    compensation_rounds: int = 1
    scale_search: str = "minmax"  # emq.checkpoint.w4a16.QuantSpec.scale_search


@dataclass(frozen=True)
class QuantizeResult:
    """The quantize stage's record (quantize.json)."""

    path: str
    key: str
    cached: bool
    device: str | None
    algorithm: str
    group_size: int
    symmetric: bool
    source: str  # the checkpoint that was quantized
    seconds: float
    calibration: dict[str, Any]
    attempts: list[dict] = field(default_factory=list)
    layers: list[dict] = field(default_factory=list)  # per decoder layer: seconds, per-module loss / alpha


def settings_inputs(settings: QuantizeSettings) -> dict[str, Any]:
    """The settings part of a W4A16 checkpoint's cache key (and manifest); a setting at its default before it
    existed (rounds 1, min-max scales) is left out, so entries cached before it keep their keys."""
    return {"algorithm": settings.algorithm, "group_size": settings.group_size, "symmetric": settings.symmetric,
            "ignore": sorted(set(settings.ignore) | {"lm_head"}), "damp": settings.damp, "quantizer": QUANTIZER_VERSION,
            **({"compensation_rank": settings.compensation_rank, "compensation": COMPENSATION_VERSION}
               if settings.compensation_rank else {}),
            **({"compensation_rounds": settings.compensation_rounds} if settings.compensation_rounds > 1 else {}),
            **({"scale_search": settings.scale_search} if settings.scale_search != "minmax" else {})}


def quantize_checkpoint(src: str | Path, source_identity: dict[str, Any], settings: QuantizeSettings,
                        devices: list[str], cache_dir: str | Path, *, force_recreate: bool = False) -> QuantizeResult:
    """Return the W4A16 checkpoint of `src` under `settings`, building it once (under the cache's lock).

    Args:
        src: a 16-bit checkpoint dir (the merged model, or the base).
        source_identity: what `src`'s bytes are (the merged checkpoint's cache key, or the base's file identity).
        settings: algorithm, layout, calibration.
        devices: the cascade, e.g. ["cuda", "cpu"].
        cache_dir: the checkpoint cache root.
        force_recreate: rebuild even if a complete entry exists.

    Raises:
        EmqError: a bad calibration file, an already-quantized source, no disk (nothing is published).
        QuantizeFailed: no device could quantize (attempts say why).
    """
    from transformers import AutoTokenizer

    from emq.calibration import calibration_tokens, digest, load_chats

    t0 = time.perf_counter()
    src = Path(src)
    chats = load_chats(settings.corpus)
    tokens = calibration_tokens(chats, AutoTokenizer.from_pretrained(src), settings.samples, settings.seq_len)
    calibration = {"corpus": settings.corpus, "corpus_sha256": chats.sha256, "samples": settings.samples,
                   "seq_len": settings.seq_len, "tokens_sha256": digest(tokens)}
    quant = settings_inputs(settings)
    key = cache.key_of({"source": source_identity, "quant": quant, "calibration": calibration})
    inputs = {"source": {"path": str(src), "identity": source_identity}, "settings": quant, "calibration": calibration}
    attempts: list[dict] = []

    def make(tmp: Path, device: str) -> dict[str, Any]:
        from emq.checkpoint.layerwise import quantize_layerwise  # torch + transformers: only when quantizing
        from emq.checkpoint.w4a16 import QuantSpec

        fields = quantize_layerwise(src, tmp, algorithm=settings.algorithm, ignore=tuple(quant["ignore"]),
                                    spec=QuantSpec(group_size=settings.group_size, symmetric=settings.symmetric,
                                                   scale_search=settings.scale_search),
                                    tokens=tokens, device=device, damp=settings.damp,
                                    compensation_rank=settings.compensation_rank,
                                    compensation_rounds=settings.compensation_rounds)
        copy_side_files(src, tmp)
        return fields

    def build(tmp: Path) -> dict[str, Any]:
        return try_devices(devices, lambda device: make(tmp, device), tmp, what=settings.algorithm,
                           attempts=attempts, failed=QuantizeFailed,
                           fix="free memory, or quant.algorithm=rtn (no calibration, fused into the stream merge)")

    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    built = cache.get_or_build(Path(cache_dir), key, inputs=inputs, build=build, needed_bytes=size // 3 + (64 << 20),
                               force=force_recreate, what="the W4A16 checkpoint", kind="w4a16")
    seconds = round(time.perf_counter() - t0, 2)
    if not built.cached:
        log.info("quantize: wrote %s (%s, g%d) in %.1f s", built.path, settings.algorithm, settings.group_size, seconds)
    return QuantizeResult(str(built.path), key, built.cached, built.manifest.get("device"), settings.algorithm,
                          settings.group_size, settings.symmetric, str(src), seconds, calibration, attempts,
                          built.manifest.get("layers", []))


def rtn_settings(qplan) -> Any:
    """The stream merge's RTN settings for a fused w4a16 plan (None when the plan is not fused RTN)."""
    from emq.checkpoint.merge import RtnSettings

    if qplan is None or not qplan.fused:
        return None
    return RtnSettings(qplan.group_size, qplan.symmetric, tuple(qplan.ignore), qplan.scale_search)


def _merge_entry_key(path: Path) -> str | None:
    """The cache key of a 16-bit merge emq made (a cache entry, or a copy `emq.api.export_checkpoint` put
    elsewhere), read from its manifest; None for any other checkpoint."""
    import json

    try:
        m = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    settings = (m.get("inputs") or {}).get("settings") or {}
    if m.get("kind", "merge") != "merge" or settings.get("w4a16") or not m.get("key"):
        return None
    files = m.get("files_sha256") or {}
    return m["key"] if files and all((path / name).is_file() for name in files) else None


def quantize_for_plan(det, qplan, merged, cache_dir: str | Path, *, force_recreate: bool = False):
    """The W4A16 checkpoint a plan serves, when the merge stage did not already make it.

    Args:
        det: the detect record (weights local).
        qplan: the plan's QuantizePlan.
        merged: the merge stage's MergeResult (None when the base is the source).
        cache_dir: the checkpoint cache root.
        force_recreate: rebuild even if cached.

    Returns:
        None when nothing is left to do (the merge quantized in its own pass); a MergeResult for RTN in a stream
        pass of its own (over the base, or over a peft merge); else (gptq/awq) a QuantizeResult.
    """
    import dataclasses

    from emq.checkpoint.identity import base_identity
    from emq.checkpoint.merge import MergeSettings, merge_adapter
    from emq.detect import detect
    from emq.schema import ModelConfig

    if qplan is None or (qplan.fused and qplan.source == "merged"):
        return None
    if qplan.compensation:  # the base as the adapter was trained on, quantized layer by layer with its compensation
        return _quantize_compensated(det, qplan, cache_dir, force_recreate)
    if not quantizer(qplan.algorithm).calibrated:  # one stream pass that quantizes: over the base alone, or a peft merge
        src = det if merged is None else detect(ModelConfig(name=det.model, base=merged.path))
        return merge_adapter(dataclasses.replace(src, adapter=None), qplan.devices, cache_dir,
                             settings=MergeSettings(rtn=rtn_settings(dataclasses.replace(qplan, fused=True))),
                             force_recreate=force_recreate)
    made = _merge_entry_key(Path(det.base.path)) if merged is None else merged.key
    if made is not None:  # a merge from emq's cache (or exported from it): the same key however it is named
        src, identity = merged.path if merged is not None else det.base.path, {"merged_key": made}
    else:
        src, identity = det.base.path, {"base_files": base_identity(Path(det.base.path))}
    cal = qplan.calibration
    settings = QuantizeSettings(qplan.algorithm, qplan.group_size, qplan.symmetric, tuple(qplan.ignore),
                                cal["corpus"], cal["samples"], cal["seq_len"], cal["damp"],
                                scale_search=qplan.scale_search)
    return quantize_checkpoint(src, identity, settings, qplan.devices, cache_dir, force_recreate=force_recreate)


def _quantize_compensated(det, qplan, cache_dir: str | Path, force_recreate: bool) -> QuantizeResult:
    """W4A16 of the base the adapter was trained on — dequant(NF4(W)) for a QLoRA (a cached stream pass), the base
    itself otherwise — with each Linear's rank-r compensation fitted on the calibration activations."""
    import dataclasses

    from emq.checkpoint.identity import base_identity
    from emq.checkpoint.merge import MergeSettings, merge_adapter
    from emq.schema import MergeBase

    if det.trained_in_4bit:
        trained = merge_adapter(dataclasses.replace(det, adapter=None), qplan.devices if "cuda" in qplan.devices
                                else ["cpu"], cache_dir, settings=MergeSettings(merge_base=MergeBase.dequantized),
                                force_recreate=force_recreate)
        src, identity = trained.path, {"merged_key": trained.key}
    else:
        src, identity = det.base.path, {"base_files": base_identity(Path(det.base.path))}
    cal = qplan.calibration
    settings = QuantizeSettings(qplan.algorithm, qplan.group_size, qplan.symmetric, tuple(qplan.ignore),
                                cal["corpus"], cal["samples"], cal["seq_len"], cal["damp"], qplan.compensation,
                                qplan.compensation_rounds, qplan.scale_search)
    return quantize_checkpoint(src, identity, settings, qplan.devices, cache_dir, force_recreate=force_recreate)


def merge_in_cache(det, memory, cache_dir: str | Path) -> Callable[[Any], bool]:
    """The plan's question "is this merge already in the cache?" (emq.plan.make_plan's `merge_cached`) for `det`'s
    merge with memory.merge_method / merge_base, as a function of the W4A16 plan (RTN fused into the merge changes
    what the cache holds)."""
    from emq.checkpoint.merge import MergeSettings, merge_cached

    return lambda qplan: merge_cached(det, MergeSettings(memory.merge_method, memory.merge_base,
                                                         rtn=rtn_settings(qplan)), cache_dir)


def served_adapter(det, qplan, quantized, cache_dir: str | Path, *, force_recreate: bool = False):
    """The LoRA the engine serves when the plan compensates the base's W4A16 error (quant.compensation.rank): the
    adapter's update and the compensation in one (emq.checkpoint.compensated); None otherwise."""
    if qplan is None or not qplan.compensation:
        return None
    from emq.checkpoint.compensated import compensated_adapter

    return compensated_adapter(det, quantized, cache_dir, force_recreate=force_recreate)
