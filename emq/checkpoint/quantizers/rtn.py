"""Round to nearest: no calibration, fused into the stream merge's one pass (emq.checkpoint.stream); the layerwise
driver can run it too (each Linear rounded on its own)."""
from __future__ import annotations

from typing import Any

from emq.checkpoint.quantizers import Quantizer


class Rtn(Quantizer):
    name = "rtn"
    calibrated = False
    seconds_per_param_token: dict[str, float] = {}  # a stream pass: the merge's own cost model covers it

    def quantize_layer(self, layer: Any, names: list[str], stats: Any, job: Any) -> tuple[dict[str, Any], dict]:
        from emq.checkpoint.w4a16 import quantize_rtn

        return {n: quantize_rtn(layer.get_submodule(n).weight.detach(), job.spec, job.scale_dtype) for n in names}, {}


QUANTIZER = Rtn()
