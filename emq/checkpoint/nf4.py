"""NF4 as a QLoRA run used it: its settings (from the training config) and the round trip dequant(NF4(W))
with bitsandbytes — the weights a QLoRA adapter saw in training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emq.detect import DetectResult


def nf4_settings(det: DetectResult) -> dict[str, Any]:
    """Blocksize / double quant of the training run (from its training config), else QLoRA's defaults."""
    settings = {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}
    for e in det.evidence:
        src = Path(e.source)
        if e.weight and src.suffix == ".json" and src.is_file() and "training" in src.name:
            cfg = json.loads(src.read_text())
            settings["double_quant"] = bool(cfg.get("bnb_4bit_use_double_quant", settings["double_quant"]))
            settings["quant_type"] = str(cfg.get("bnb_4bit_quant_type", "nf4"))
            settings["blocksize"] = int(cfg.get("bnb_4bit_blocksize", 64))
    return settings



def dequant_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """The weights bitsandbytes quantizes in a QLoRA run: 2-D linear weights, not embeddings/lm_head."""
    return len(shape) == 2 and name.endswith(".weight") and not any(
        k in name for k in ("embed", "lm_head", "wte", "wpe", "norm"))


def nf4_roundtrip(t, device: str, nf4: dict[str, Any]):
    """dequant(NF4(t)) with bitsandbytes (a torch tensor in, the same dtype out)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = t.to(device)
    packed, state = quantize_4bit(w, blocksize=nf4["blocksize"], quant_type=nf4["quant_type"],
                                  compress_statistics=nf4["double_quant"])
    return dequantize_4bit(packed, state).to(t.dtype)


