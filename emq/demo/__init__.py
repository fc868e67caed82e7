"""The embedded demo: a tiny base model and LoRA adapters built locally, offline."""
from __future__ import annotations

from emq.demo.build import DemoPaths, demo_built, demo_paths, ensure_demo

__all__ = ["DemoPaths", "demo_built", "demo_paths", "ensure_demo"]
