"""AWQ (emq.checkpoint.awq): activation-aware per-channel scales folded into the previous op, then round to
nearest. Llama-style decoder layers only (the folds need their module layout)."""
from __future__ import annotations

from typing import Any

from emq.checkpoint.quantizers import Quantizer


class Awq(Quantizer):
    name = "awq"
    summary_key = "groups"
    compensable = False  # it folds 1/s into the norms: the layer's error is not its weights' alone
    # measured: the demo (106M Linear parameters, 40 × 512 tokens) on 2 shared CPU cores 220-230 s; an H200, a
    # Llama-1B shape (~0.9B Linear parameters, 40 × 512 tokens) 12 s
    seconds_per_param_token = {"cpu": 1.05e-10, "cuda": 6.5e-13}

    def check(self, config: dict[str, Any], layer: Any = None) -> None:
        from emq.checkpoint.awq import awq_groups, check_model_type

        check_model_type(config)
        if layer is not None:
            awq_groups(layer, config["model_type"])

    def quantize_layer(self, layer: Any, names: list[str], stats: Any, job: Any) -> tuple[dict[str, Any], dict]:
        from emq.checkpoint.awq import awq_groups, awq_layer

        return awq_layer(layer, names, stats, job, awq_groups(layer, job.model_type))


QUANTIZER = Awq()
