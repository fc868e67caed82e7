"""emq: prepare LoRA / QLoRA fine-tunes for memory-lean vLLM inference and evaluate them.

Importing the package is cheap: the API functions below import torch and friends on first use.

    emq.was_trained_in_4bit(lora)                     -> True / False / None
    emq.get_or_create_merged_model(base, lora, ...)   -> Path of the cached merged checkpoint
    emq.prepare_model_for_vllm(lora, ...)             -> model path, engine kwargs, LoRARequest
    emq.quantize(model_path, algorithm=...)           -> a cached W4A16 checkpoint (compressed-tensors)
    emq.get_or_create_quantized_model(base, lora)     -> merged + W4A16, cached
    emq.quantize_to_awq / get_or_create_awq_model     -> AWQ → compressed-tensors, typed (Path)

The original tool's scripts import `emq.quant_utils` / `emq.memory_config` instead: its names, signatures and
str returns, over this API.
"""
from __future__ import annotations

from typing import Any

from emq.version import __version__  # noqa: F401 - the package's version

__all__ = ["get_or_create_awq_model", "get_or_create_merged_model", "get_or_create_quantized_model",
           "prepare_model_for_vllm", "quantize", "quantize_to_awq", "was_trained_in_4bit"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from emq import api

        return getattr(api, name)
    raise AttributeError(f"module 'emq' has no attribute {name!r}")
