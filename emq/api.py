"""Python API, a drop-in for the original tool's quant_utils: the same detect / plan / merge / cache
code the CLI runs, callable from a researcher's own script.

    import emq
    from vllm import LLM
    prep = emq.prepare_model_for_vllm("path/or/hub-id-of-adapter", use_quantization=True)
    for k, v in prep.env.items():                                    # before vLLM starts (e.g. W4A16 on a CPU)
        os.environ.setdefault(k, v)
    llm = LLM(model=prep.model, **prep.engine_kwargs)
    outputs = llm.chat(messages, lora_request=prep.lora_request())

    emq.quantize("path/to/16-bit-model", algorithm="gptq")            # → a cached W4A16 checkpoint
    emq.get_or_create_quantized_model(None, "org/adapter")            # merge + quantize, cached
    emq.quantize_to_awq(model_path, awq_path)                        # the original tool's names
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emq import hub
from emq.checkpoint.cache import default_root
from emq.checkpoint.merge import MergeSettings, merge_adapter
from emq.detect import DetectResult, detect, read_json
from emq.errors import EmqError
from emq.machine import snapshot
from emq.plan import Plan, Route, make_plan
from emq.checkpoint.quantize import quantize_for_plan, rtn_settings
from emq.schema import (
    CalibrationConfig,
    MemoryConfig,
    MergeBase,
    MergeMethod,
    ModelConfig,
    QuantAlgorithm,
    QuantConfig,
    QuantMethod,
    RoutePolicy,
)

log = logging.getLogger(__name__)


def _devices(device: str) -> list[str]:
    import torch

    return (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]) if device == "auto" else [device]


def _model_config(lora: str | None, base: str | None, trained_in_4bit: bool | None = None) -> ModelConfig:
    if base is None:
        if lora is None:
            raise EmqError("give a base model or an adapter", "e.g. prepare_model_for_vllm('org/adapter')")
        adir = hub.resolve(lora, revision=None, what="adapter", key="lora")
        base = read_json(adir / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise EmqError(f"{adir}/adapter_config.json names no base_model_name_or_path", "pass base= explicitly")
    return ModelConfig(name=Path(lora or base).name, base=base, adapter=lora, trained_in_4bit=trained_in_4bit)


def was_trained_in_4bit(lora: str, base: str | None = None) -> bool | None:
    """Whether the adapter was trained on a 4-bit base: True, False or None (unknown).

    The evidence behind the answer is in `emq.detect.detect(...)`'s record.
    """
    return detect(_model_config(lora, base)).trained_in_4bit


def get_or_create_merged_model(base: str | None, lora: str, *, method: str = "stream", merge_base: str = "auto",
                               out_dtype: str = "bfloat16", device: str = "auto", cache_dir: str | Path | None = None,
                               force_recreate: bool = False) -> Path:
    """The merged checkpoint for base + lora, from the cache or built once (thread- and process-safe).

    Args:
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        lora: adapter path or hub id.
        method: "stream" (shard by shard, lean) or "peft" (merge_and_unload).
        merge_base: "auto", "original" or "dequantized" (see emq.checkpoint.merge).
        out_dtype: dtype of the merged weights.
        device: "auto" (cuda if available, then cpu), "cuda" or "cpu".
        cache_dir: cache root (default: EMQ_CACHE or ~/.cache/emq/merged).
        force_recreate: rebuild even if cached.
    """
    det = detect(_model_config(lora, base), fetch_weights=True)
    result = merge_adapter(det, _devices(device), cache_dir or default_root(),
                           settings=MergeSettings(MergeMethod(method), MergeBase(merge_base), out_dtype),
                           force_recreate=force_recreate)
    return Path(result.path)


@dataclass(frozen=True)
class VllmModel:
    """What to hand to vllm.LLM: `LLM(model=m.model, **m.engine_kwargs)` and, when the route serves
    the adapter, `lora_request=m.lora_request()` on every generate/chat call; `m.env` into os.environ first."""

    model: str
    engine_kwargs: dict[str, Any]
    lora_path: str | None
    plan: Plan
    detect: DetectResult
    merged: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables the plan sets before vLLM starts (which kernels serve the checkpoint, vLLM's
        compile cache); `python -m emq` sets them itself, a script sets them before `LLM(...)`."""
        return dict(self.plan.engine.env)

    def lora_request(self):
        """A vllm LoRARequest for the adapter, or None when the model is merged or has no adapter."""
        if self.lora_path is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("adapter", 1, self.lora_path)


def prepare_model_for_vllm(lora: str | None = None, *, base: str | None = None, use_quantization: bool = True,
                           quant: str = "auto", memory: MemoryConfig | None = None,
                           cache_dir: str | Path | None = None, trained_in_4bit: bool | None = None,
                           algorithm: str = "rtn", **memory_overrides: Any) -> VllmModel:
    """Detect, plan and (if the plan says so) merge; return what vllm.LLM needs.

    Args:
        lora: adapter path or hub id (None: serve `base`).
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        use_quantization: quantize (the memory policy's knob).
        quant: "auto", "none", "w4a16" (offline int4, made and cached here; RTN unless `algorithm`), "bnb",
            "int8" or "fp8".
        memory: a memory policy; `memory_overrides` replace its fields (e.g. max_model_len=4096).
        cache_dir: merge cache root.
        trained_in_4bit: override detection.
        algorithm: for w4a16: "rtn", "gptq" or "awq".

    Raises:
        EmqError: the plan stops (with the reason) or a choice cannot run here.
    """
    model = _model_config(lora, base, trained_in_4bit)
    memory = dataclasses.replace(memory or MemoryConfig(), use_quantization=use_quantization,
                                 **memory_overrides)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_root()
    det = detect(model)
    plan = make_plan(det, memory, QuantConfig(method=QuantMethod(quant), algorithm=QuantAlgorithm(algorithm)),
                     snapshot(cache_root), cache_dir=str(cache_root))
    if plan.route is Route.stop:
        raise EmqError(f"plan stopped: {plan.stop_reason}", "see the plan's reasons (emq.plan.make_plan)")
    model_path, lora_path, merged, result = det.base.ref, None, False, None
    if plan.route is Route.merge_then_serve or plan.quantize is not None:
        det = detect(model, fetch_weights=True)
    if plan.route is Route.merge_then_serve:
        result = merge_adapter(det, plan.merge_devices, cache_root,
                               settings=MergeSettings(memory.merge_method, memory.merge_base,
                                                      rtn=rtn_settings(plan.quantize)),
                               force_recreate=memory.force_recreate)
        model_path, merged = result.path, True
    elif plan.route is Route.serve_lora:
        lora_path = str(hub.resolve(lora, revision=None, what="adapter", key="lora", full=True))
    quantized = quantize_for_plan(det, plan.quantize, result, cache_root, force_recreate=memory.force_recreate)
    if quantized is not None:
        model_path = quantized.path
    from emq.engine import engine_kwargs

    kwargs = engine_kwargs(model_path, plan.engine, lora=lora_path is not None, seed=0)
    kwargs.pop("model")
    return VllmModel(model_path, kwargs, lora_path, plan, det, merged, list(plan.reasons))


def _w4a16_plan(model: ModelConfig, *, algorithm: str, group_size: int | None, symmetric: bool, ignore: tuple[str, ...],
                calibration: str, samples: int, seq_len: int, device: str, cache_root: Path):
    """Detect `model` and plan its w4a16 checkpoint (merged first when it has an adapter)."""
    quant = QuantConfig(method=QuantMethod.w4a16, algorithm=QuantAlgorithm(algorithm), group_size=group_size,
                        symmetric=symmetric, ignore=list(ignore), device="auto" if device == "auto" else device,
                        calibration=CalibrationConfig(corpus=calibration, samples=samples, seq_len=seq_len))
    memory = MemoryConfig(route=RoutePolicy.merge if model.adapter else RoutePolicy.auto)
    det = detect(model, fetch_weights=True)
    plan = make_plan(det, memory, quant, snapshot(cache_root), cache_dir=str(cache_root))
    if plan.route is Route.stop:
        raise EmqError(f"plan stopped: {plan.stop_reason}", "see the plan's reasons (emq.plan.make_plan)")
    return det, plan, memory


def get_or_create_quantized_model(base: str | None, lora: str | None, *, algorithm: str = "rtn",
                                  group_size: int | None = None, symmetric: bool = False,
                                  ignore: tuple[str, ...] = ("lm_head",), calibration: str = "default",
                                  samples: int = 40, seq_len: int = 512, device: str = "auto",
                                  cache_dir: str | Path | None = None, force_recreate: bool = False) -> Path:
    """A W4A16 checkpoint (compressed-tensors pack-quantized: every vLLM loads it with no quantization=
    argument) of base + lora merged, or of the base alone when `lora` is None; cached, built once.

    Args:
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        lora: adapter path or hub id, or None.
        algorithm: "rtn" (fused into the merge, seconds), "gptq" or "awq" (calibrated, layer by layer).
        group_size: 128, 64 or 32; None: the largest that divides every quantized in-feature.
        symmetric: symmetric int4 (no zero points); asymmetric is more accurate at the same size.
        ignore: Linear modules kept in 16 bits (lm_head always).
        calibration: "default" (emq's chats) or a JSONL of chats, e.g. the fine-tuning set.
        samples: calibration sequences.
        seq_len: tokens per calibration sequence.
        device: "auto", "cuda" or "cpu".
        cache_dir: cache root (default: EMQ_CACHE or ~/.cache/emq/merged).
        force_recreate: rebuild even if cached.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_root()
    det, plan, memory = _w4a16_plan(_model_config(lora, base), algorithm=algorithm, group_size=group_size,
                                    symmetric=symmetric, ignore=ignore, calibration=calibration, samples=samples,
                                    seq_len=seq_len, device=device, cache_root=cache_root)
    merged = None
    if plan.route is Route.merge_then_serve:
        merged = merge_adapter(det, plan.merge_devices, cache_root, force_recreate=force_recreate,
                               settings=MergeSettings(rtn=rtn_settings(plan.quantize)))
    quantized = quantize_for_plan(det, plan.quantize, merged, cache_root, force_recreate=force_recreate)
    return Path((quantized or merged).path)


def quantize(model_path: str | Path, out: str | Path | None = None, *, algorithm: str = "rtn",
             group_size: int | None = None, symmetric: bool = False, ignore: tuple[str, ...] = ("lm_head",),
             calibration: str = "default", samples: int = 40, seq_len: int = 512, device: str = "auto",
             cache_dir: str | Path | None = None, force_recreate: bool = False) -> Path:
    """Quantize a 16-bit checkpoint to W4A16 (compressed-tensors pack-quantized). Returns the cached checkpoint's
    path, or `out` when given (a copy of it there). Arguments as `get_or_create_quantized_model`."""
    import shutil

    path = get_or_create_quantized_model(str(model_path), None, algorithm=algorithm, group_size=group_size,
                                         symmetric=symmetric, ignore=ignore, calibration=calibration, samples=samples,
                                         seq_len=seq_len, device=device, cache_dir=cache_dir,
                                         force_recreate=force_recreate)
    if out is None:
        return path
    out = Path(out).expanduser()
    if out.exists():
        raise EmqError(f"{out} already exists", "pass a new directory as out, or out=None for the cached path")
    shutil.copytree(path, out, ignore=shutil.ignore_patterns(".last_used"))
    return out


def quantize_to_awq(model_path: str | Path, awq_path: str | Path, bits: int = 4, group_size: int = 128,
                    **kwargs: Any) -> Path:
    """The original tool's `quantize_to_awq`: AWQ 4-bit of `model_path` into `awq_path`. emq runs its own AWQ and
    writes compressed-tensors pack-quantized (not AutoAWQ's format): vLLM loads it natively on every version, CPU
    build included. A group size the model cannot take fails with the sizes that work."""
    if bits != 4:
        raise EmqError(f"bits={bits}: emq writes 4-bit weights only (W4A16)", "bits=4")
    return quantize(model_path, awq_path, algorithm="awq", group_size=group_size, **kwargs)


def get_or_create_awq_model(base_model: str | None, lora_model: str | None, **kwargs: Any) -> Path:
    """The original tool's `get_or_create_awq_model`: merge the LoRA, then AWQ 4-bit, cached (compressed-tensors
    pack-quantized, not AutoAWQ's format; see `quantize_to_awq`)."""
    return get_or_create_quantized_model(base_model, lora_model, algorithm="awq", **kwargs)
