"""The statistic calibrated quantizers read: H = 2XᵀX/n of a Linear's inputs, accumulated batch by batch by the
layerwise driver (GPTQ's Hessian; AWQ's output error is measured through it too)."""
from __future__ import annotations

import math

import torch


def accumulate_hessian(h: torch.Tensor | None, x: torch.Tensor, n_seen: int) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs into the running H = 2XᵀX/n.

    A running mean (rescale then add) keeps the magnitude independent of how many tokens were seen.

    Args:
        h: the Hessian so far ([in, in] float32), or None before the first batch.
        x: inputs of the Linear, [..., in] (any float dtype; flattened to tokens × in).
        n_seen: tokens already folded into `h`.

    Returns:
        (updated H, tokens seen).
    """
    x = x.reshape(-1, x.shape[-1]).float()
    m = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float32, device=x.device)
        n_seen = 0
    n = n_seen + m
    if m == 0:
        return h, n_seen
    h = h * (n_seen / n)
    x = x * math.sqrt(2.0 / n)
    return h + x.T @ x, n
