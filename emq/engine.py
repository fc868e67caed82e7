"""load: the one wrapper around vllm.LLM. Starts an engine, serves a LoRA if asked, shuts down."""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Any

from emq.plan import EngineSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRecord:
    model_path: str
    lora_path: str | None
    engine_kwargs: dict[str, Any]
    load_seconds: float


class Engine:
    """A started vLLM engine plus the LoRARequest to send with every request (or None)."""

    def __init__(self, llm: Any, lora_request: Any, record: LoadRecord):
        self.llm = llm
        self.lora_request = lora_request
        self.record = record

    def shutdown(self) -> None:
        """Stop the engine core and its workers; safe to call twice."""
        if self.llm is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            self.llm = None
            gc.collect()
            log.info("engine shut down")


def load(model_path: str, settings: EngineSettings, *, lora_path: str | None, seed: int) -> Engine:
    """Start vLLM on `model_path` with the plan's settings.

    Args:
        model_path: merged checkpoint or base model directory (or hub id).
        settings: the plan's engine settings.
        lora_path: adapter to serve through vLLM's LoRA path, or None.
        seed: engine seed.
    """
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": settings.dtype,
        "gpu_memory_utilization": settings.memory_utilization,
        "max_model_len": settings.max_model_len,
        "enforce_eager": settings.enforce_eager,
        "seed": seed,
    }
    if settings.quantization:
        kwargs["quantization"] = settings.quantization
    if lora_path is not None:
        kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=1)
    log.info("load: starting vLLM on %s (quantization=%s%s)", model_path, settings.quantization,
             f", LoRA {lora_path}" if lora_path else "")
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    seconds = time.perf_counter() - t0
    log.info("load: engine ready in %.1f s", seconds)
    lora = LoRARequest("adapter", 1, lora_path) if lora_path else None
    return Engine(llm, lora, LoadRecord(model_path, lora_path, kwargs, round(seconds, 2)))
