"""GPTQ (emq.checkpoint.gptq): second-order error compensation from each Linear's input Hessian."""
from __future__ import annotations

from typing import Any

from emq.checkpoint.quantizers import Quantizer


class Gptq(Quantizer):
    name = "gptq"
    uses_damp = True
    summary_key = "modules"
    # measured: the demo (106M Linear parameters, 40 × 512 tokens) on 2 shared CPU cores 230-250 s; an H200, a
    # Llama-1B shape (~0.9B Linear parameters, 40 × 512 tokens) 84 s
    seconds_per_param_token = {"cpu": 1.15e-10, "cuda": 4.6e-12}

    def quantize_layer(self, layer: Any, names: list[str], stats: Any, job: Any) -> tuple[dict[str, Any], dict]:
        from emq.checkpoint.gptq import gptq_layer

        return gptq_layer(layer, names, stats, job)


QUANTIZER = Gptq()
