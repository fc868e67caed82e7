"""The safetensors header: tensor names, dtypes and shapes, read without touching the weights.

detect reads it to learn a model's shapes and sizes; the checkpoint producers (emq.checkpoint.safetensors_io)
read it before streaming tensors. Its own module, so that detect does not import the checkpoint package that
imports detect.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from emq.errors import EmqError


def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes), weights untouched."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise EmqError(f"{path} is empty or truncated (no safetensors header)", "re-download or re-save the weights")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100_000_000:
            raise EmqError(f"{path} is truncated or not a safetensors file (header says {n} bytes, file has {size})",
                           "re-download or re-save the weights")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EmqError(f"{path} has a corrupt safetensors header", "re-download or re-save the weights") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + n + end > size:
        raise EmqError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file has {size}",
                       "re-download or re-save the weights")
    return header


def shard_names(model_dir: Path) -> list[str]:
    """The safetensors files of a checkpoint: its index's, else every *.safetensors in the dir."""
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
