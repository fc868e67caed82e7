"""emq: prepare LoRA / QLoRA fine-tunes for memory-lean vLLM inference and evaluate them.

Importing the package is cheap: no torch, vLLM or Hydra is imported here.
"""
from __future__ import annotations

__version__ = "0.1.0"
