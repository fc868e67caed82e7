"""Quantization algorithms as things, not branches: each is one module here providing one object, `QUANTIZER`,
found by its name (the `quant.algorithm` value).

A quantizer says what it needs (calibration data or not), refuses what it cannot do before any work (`check`),
quantizes one decoder layer's Linears from the statistics the driver captured (`quantize_layer`), and what it costs
(`seconds_per_param_token`). The driver (emq.checkpoint.layerwise) loads a layer, captures its inputs, asks the
quantizer, writes; the stream merge fuses an uncalibrated one (rtn) into its single pass.

Adding an algorithm: a module here (its math where it likes), a `QuantAlgorithm` value in emq/schema.py, and a
config file conf/quant/w4a16_<name>.yaml. These modules import no torch at module level, so the planner (which
reads `calibrated` and the costs) stays light.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from emq.errors import EmqError


class Quantizer:
    """One W4A16 quantization algorithm.

    Attributes:
        name: its `quant.algorithm` value.
        calibrated: it needs calibration activations, so it runs layer by layer (emq.checkpoint.layerwise);
            otherwise it is fused into the stream merge's one pass.
        uses_damp: `quant.damp` means something to it (recorded in the manifest).
        compensable: the error it leaves is the weight's alone (it rewrites no other parameter), so a low-rank
            compensation fitted on the layer's inputs can be added to it (quant.compensation.rank).
        summary_key: where a layer's per-algorithm details go in the layer summary ("modules", "groups").
        seconds_per_param_token: measured wall seconds per (decoder Linear parameter × calibration token), per
            device ("cpu", "cuda"); the plan's time estimate.
    """

    name: str = ""
    calibrated: bool = True
    uses_damp: bool = False
    compensable: bool = True
    summary_key: str = "modules"
    seconds_per_param_token: dict[str, float] = {}

    def check(self, config: dict[str, Any], layer: Any = None) -> None:
        """Refuse, before any work, a model this algorithm cannot quantize: from its config.json, and from its
        first decoder layer (on the meta device) when the driver has built it."""

    def quantize_layer(self, layer: Any, names: list[str], stats: Any, job: Any) -> tuple[dict[str, Any], dict]:
        """Quantize the Linears `names` of one decoder layer (float32, on the job's device) from `stats`
        (emq.checkpoint.layerwise.LayerStats: per input H = 2XᵀX/n and mean |x|). May rewrite the layer's float
        parameters (AWQ folds scales into norms). Returns (QWeight by Linear name, details for the summary)."""
        raise NotImplementedError


def names() -> list[str]:
    """Every algorithm this package provides."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def quantizer(name: str) -> Quantizer:
    """The algorithm called `name`.

    Raises:
        EmqError: no such algorithm; the message lists the ones there are.
    """
    if name not in names():
        raise EmqError(f"unknown quantization algorithm {name!r}", f"use quant.algorithm={' or '.join(names())}")
    return importlib.import_module(f"{__name__}.{name}").QUANTIZER
