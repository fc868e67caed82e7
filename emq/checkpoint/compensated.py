"""The compensated adapter: one LoRA holding the fine-tune's update and the low-rank compensation of the base's
W4A16 error (quant.compensation.rank), served by vLLM on the W4A16 checkpoint of the base the adapter was trained on.

Per Linear, with the adapter's s·B_ft·A_ft (s its lora_alpha / r) and the compensation B_c·A_c:

    lora_A = [A_ft ; A_c]          ([r_ft + r_c, in])
    lora_B = [s·B_ft | B_c]        ([out, r_ft + r_c]),   lora_alpha = r = r_ft + r_c  (scale 1)

so B·A = s·B_ft·A_ft + B_c·A_c exactly. A Linear with only one of the two gets zeros for the other (one rank for the
whole adapter, as vLLM allocates it). Written in bfloat16 (what vLLM serves LoRA weights in) as a content-keyed
cache entry: the W4A16 checkpoint's key, the adapter's files, the rank.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emq.checkpoint import cache
from emq.checkpoint.identity import adapter_identity
from emq.checkpoint.layerwise import COMPENSATION_FILE
from emq.checkpoint.stream import load_adapter
from emq.detect import DetectResult
from emq.errors import EmqError

log = logging.getLogger(__name__)
VERSION = 1  # of the adapter this module writes (part of the cache key)
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class CompensatedAdapter:
    """The served adapter's record (compensation.json)."""

    path: str
    key: str
    cached: bool
    rank: int  # the served LoRA's rank: the adapter's + the compensation's
    adapter_rank: int
    compensation_rank: int
    modules: int
    bytes: int
    seconds: float


def _factors(w4a16_path: Path) -> dict[str, tuple[Any, Any]]:
    """module → (B_c, A_c) float32, from the W4A16 entry's compensation file."""
    from safetensors.torch import load_file

    path = w4a16_path / COMPENSATION_FILE
    if not path.is_file():
        raise EmqError(f"{w4a16_path} has no {COMPENSATION_FILE}: it was quantized without quant.compensation.rank",
                       "rebuild it: memory.force_recreate=true")
    t = load_file(str(path))
    return {k[:-2]: (t[k], t[k[:-2] + ".a"]) for k in t if k.endswith(".b")}


def _fine_tune(det: DetectResult) -> dict[str, tuple[Any, Any]]:
    """module → (s·B_ft, A_ft) float32 ({} for a base without adapter)."""
    import torch

    if det.adapter is None:
        return {}
    deltas, bias, replaced, reader = load_adapter(det)
    try:
        if bias or replaced or det.adapter.bias != "none":
            raise EmqError(f"{det.adapter.path} trains biases or whole modules (bias={det.adapter.bias!r}, "
                           f"{len(replaced)} replaced tensors), which the compensated LoRA does not carry",
                           "quant.compensation.rank=0 (or merge the adapter: memory.route=merge)")
        return {name.removesuffix(".weight"): (torch.from_numpy(d.b.f32()) * d.scale, torch.from_numpy(d.a.f32()))
                for name, d in deltas.items() if not d.embedding}
    finally:
        reader.close()


def build_tensors(fine_tune: dict[str, tuple[Any, Any]], factors: dict[str, tuple[Any, Any]]
                  ) -> tuple[dict[str, Any], int, int]:
    """The PEFT tensors of the combined LoRA (bfloat16) and (its rank, the fine-tune's rank)."""
    import torch

    r_ft = max((a.shape[0] for _, a in fine_tune.values()), default=0)
    r_c = max((a.shape[0] for _, a in factors.values()), default=0)
    out = {}
    for module in sorted(set(fine_tune) | set(factors)):
        ref_b, ref_a = fine_tune.get(module) or factors[module]
        n_out, n_in = ref_b.shape[0], ref_a.shape[1]
        a = torch.zeros(r_ft + r_c, n_in)
        b = torch.zeros(n_out, r_ft + r_c)
        if module in fine_tune:
            fb, fa = fine_tune[module]
            a[: fa.shape[0]], b[:, : fa.shape[0]] = fa, fb
        if module in factors:
            cb, ca = factors[module]
            a[r_ft: r_ft + ca.shape[0]], b[:, r_ft: r_ft + ca.shape[0]] = ca, cb
        out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
        out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
    return out, r_ft + r_c, r_ft


def adapter_config(det: DetectResult, modules: list[str], rank: int, base: str) -> dict[str, Any]:
    """The original adapter's config with the combined rank at scale 1 and every compensated module targeted."""
    cfg: dict[str, Any] = {}
    if det.adapter is not None and (Path(det.adapter.path) / "adapter_config.json").is_file():
        cfg = json.loads((Path(det.adapter.path) / "adapter_config.json").read_text())
    cfg.update(peft_type="LORA", task_type=cfg.get("task_type", "CAUSAL_LM"), base_model_name_or_path=base, r=rank,
               lora_alpha=rank, use_rslora=False, use_dora=False, rank_pattern={}, alpha_pattern={},
               target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}), lora_dropout=0.0, bias="none",
               modules_to_save=None, layers_to_transform=None, inference_mode=True)
    return cfg


def compensated_adapter(det: DetectResult, w4a16: Any, cache_dir: str | Path, *,
                        force_recreate: bool = False) -> CompensatedAdapter:
    """The combined LoRA for the W4A16 checkpoint `w4a16` (a QuantizeResult made with quant.compensation.rank),
    built once per (checkpoint, adapter) in the cache."""
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    src = Path(w4a16.path)
    inputs = {"w4a16_key": w4a16.key, "version": VERSION,
              "adapter": None if det.adapter is None else {"path": det.adapter.path,
                                                           "files": adapter_identity(Path(det.adapter.path))}}
    key = cache.key_of(inputs)

    def build(tmp: Path) -> dict[str, Any]:
        factors = _factors(src)
        tensors, rank, r_ft = build_tensors(_fine_tune(det), factors)
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        modules = sorted({k[len(PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in tensors})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(det, modules, rank, str(src)), indent=2))
        return {"rank": rank, "adapter_rank": r_ft, "modules": len(modules)}

    built = cache.get_or_build(Path(cache_dir), key, inputs=inputs, build=build, force=force_recreate,
                               what="the compensated adapter", kind="adapter")
    m = built.manifest
    size = (built.path / "adapter_model.safetensors").stat().st_size
    seconds = round(time.perf_counter() - t0, 2)
    if not built.cached:
        log.info("quantize: wrote the compensated LoRA %s (rank %d = the adapter's %d + compensation %d) in %.1f s",
                 built.path, m["rank"], m["adapter_rank"], m["rank"] - m["adapter_rank"], seconds)
    return CompensatedAdapter(str(built.path), key, built.cached, m["rank"], m["adapter_rank"],
                              m["rank"] - m["adapter_rank"], m["modules"], size, seconds)
