"""Python API, a drop-in for the original tool's quant_utils: the same detect / plan / merge / cache
code the CLI runs, callable from a researcher's own script.

    import emq
    from vllm import LLM
    prep = emq.prepare_model_for_vllm("path/or/hub-id-of-adapter", use_quantization=True)
    llm = LLM(model=prep.model, **prep.engine_kwargs)
    outputs = llm.chat(messages, lora_request=prep.lora_request())
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
from emq.schema import MemoryConfig, MergeBase, MergeMethod, ModelConfig, QuantConfig, QuantMethod

log = logging.getLogger(__name__)


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
    import torch

    det = detect(_model_config(lora, base), fetch_weights=True)
    devices = (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]) if device == "auto" else [device]
    result = merge_adapter(det, devices, cache_dir or default_root(),
                           settings=MergeSettings(MergeMethod(method), MergeBase(merge_base), out_dtype),
                           force_recreate=force_recreate)
    return Path(result.path)


@dataclass(frozen=True)
class VllmModel:
    """What to hand to vllm.LLM: `LLM(model=m.model, **m.engine_kwargs)` and, when the route serves
    the adapter, `lora_request=m.lora_request()` on every generate/chat call."""

    model: str
    engine_kwargs: dict[str, Any]
    lora_path: str | None
    plan: Plan
    detect: DetectResult
    merged: bool = False
    notes: list[str] = field(default_factory=list)

    def lora_request(self):
        """A vllm LoRARequest for the adapter, or None when the model is merged or has no adapter."""
        if self.lora_path is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("adapter", 1, self.lora_path)


def prepare_model_for_vllm(lora: str | None = None, *, base: str | None = None, use_quantization: bool = True,
                           quant: str = "auto", memory: MemoryConfig | None = None,
                           cache_dir: str | Path | None = None, trained_in_4bit: bool | None = None,
                           **memory_overrides: Any) -> VllmModel:
    """Detect, plan and (if the plan says so) merge; return what vllm.LLM needs.

    Args:
        lora: adapter path or hub id (None: serve `base`).
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        use_quantization: quantize in flight (the memory policy's knob).
        quant: "auto", "none", "bnb", "int8" or "fp8".
        memory: a memory policy; `memory_overrides` replace its fields (e.g. max_model_len=4096).
        cache_dir: merge cache root.
        trained_in_4bit: override detection.

    Raises:
        EmqError: the plan stops (with the reason) or a choice cannot run here.
    """
    model = _model_config(lora, base, trained_in_4bit)
    memory = dataclasses.replace(memory or MemoryConfig(), use_quantization=use_quantization,
                                 **memory_overrides)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_root()
    det = detect(model)
    plan = make_plan(det, memory, QuantConfig(method=QuantMethod(quant)), snapshot(cache_root))
    if plan.route is Route.stop:
        raise EmqError(f"plan stopped: {plan.stop_reason}", "see the plan's reasons (emq.plan.make_plan)")
    model_path, lora_path, merged = det.base.ref, None, False
    if plan.route is Route.merge_then_serve:
        det = detect(model, fetch_weights=True)
        result = merge_adapter(det, plan.merge_devices, cache_root,
                               settings=MergeSettings(memory.merge_method, memory.merge_base),
                               force_recreate=memory.force_recreate)
        model_path, merged = result.path, True
    elif plan.route is Route.serve_lora:
        lora_path = str(hub.resolve(lora, revision=None, what="adapter", key="lora", full=True))
    from emq.engine import engine_kwargs

    kwargs = engine_kwargs(model_path, plan.engine, lora=lora_path is not None, seed=0)
    kwargs.pop("model")
    return VllmModel(model_path, kwargs, lora_path, plan, det, merged, list(plan.reasons))
