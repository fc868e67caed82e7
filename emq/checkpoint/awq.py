"""AWQ scale search (Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"), implemented from the paper's math.

Linears that read one input x (q/k/v after the input norm, gate/up after the post-attention norm,
down_proj after up_proj, o_proj after v_proj when the shapes line up) share a per-input-channel scale s:
    x Wᵀ = (x / s)(W·s)ᵀ
The weights are quantized as Q(W·s) and 1/s is folded into whatever produced x (the norm's weight, or
the previous Linear's output rows), so the float function is unchanged and only the rounding moves:
channels with large activations get larger weights, hence a finer relative grid where errors cost most.

s = s_x^α with s_x = mean|x| per channel; α is searched on a grid over [0, 1) to minimise the output
error Σ_W ‖x Wᵀ - (x/s) Q(W·s)ᵀ‖² on the calibration batch (α = 0 is plain round-to-nearest, so the
result is never worse than RTN on that batch). The error is evaluated through the Gram matrix xᵀx, so a
batch of many tokens costs one [in, in] matmul up front. All math is float32.
"""
from __future__ import annotations

import logging

import torch

from emq.checkpoint.w4a16 import QuantSpec, dequantize, quantize_rtn

log = logging.getLogger(__name__)

# Bounds on s after normalisation. Folding 1/s into an fp16 norm weight must stay a normal fp16 number
# (≥ 6.1e-5 for weights ~1) and W·s must not overflow; the search never gets near them for real
# activations (s_x spread ≤ 1e5 and α < 1 give s within ~[3e-3, 3e2]).
SCALE_MIN = 1e-4
SCALE_MAX = 1e4
# Channels that never fire would get s_x^α → 0; floor s_x relative to the busiest channel.
SX_FLOOR = 1e-5


def output_error(gram: torch.Tensor, weights: list[torch.Tensor], approx: list[torch.Tensor]) -> float:
    """Σ ‖x Wᵀ - x Ŵᵀ‖² from the Gram matrix G = xᵀx: Σ_W sum((ΔW G) ⊙ ΔW)."""
    total = 0.0
    for w, a in zip(weights, approx):
        dw = w - a
        total += float(((dw @ gram) * dw).sum())
    return total


def awq_scales(x: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec, grid: int = 20,
               scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, dict]:
    """Search the AWQ per-input-channel scales for Linears that share the input `x`.

    Args:
        x: calibration inputs [..., in] (flattened to tokens × in).
        weights: the [out_i, in] weights that read `x`.
        spec: the quantization spec (Q in the objective is round-to-nearest with it).
        grid: number of α values, α = i/grid for i in 0..grid-1.
        scale_dtype: the dtype scales will be stored in (Q rounds its scales to it).

    Returns:
        (s float32 [in], info) with info keys "alpha" (best α), "loss" (its output error), "loss_rtn"
        (α = 0, plain RTN), "ratio" (loss/loss_rtn), "clamped" (scales that hit the sane-range bounds).
        Multiply the weights' columns by s (`scale_columns`) and divide the previous op by s
        (`fold_into_previous`).
    """
    if grid < 1:
        raise ValueError(f"grid={grid} must be at least 1")
    x = x.reshape(-1, x.shape[-1]).float()
    cols = x.shape[-1]
    ws = [w.detach().float() for w in weights]
    for w in ws:
        if w.ndim != 2 or w.shape[1] != cols:
            raise ValueError(f"weight of shape {tuple(w.shape)} does not read inputs of width {cols}")
    if not torch.isfinite(x).all():
        raise ValueError("calibration inputs hold NaN/inf")

    gram = x.T @ x
    sx = x.abs().mean(dim=0)
    sx = sx.clamp(min=max(float(sx.max()) * SX_FLOOR, torch.finfo(torch.float32).tiny))

    best: tuple[float, float, torch.Tensor, int] | None = None
    loss_rtn = None
    losses = []
    for i in range(grid):
        alpha = i / grid
        s, clamped = candidate_scales(sx, alpha)
        approx = [dequantize(quantize_rtn(w * s, spec, scale_dtype)) / s for w in ws]
        loss = output_error(gram, ws, approx)
        losses.append(loss)
        if i == 0:
            loss_rtn = loss
        if best is None or loss < best[0]:
            best = (loss, alpha, s, clamped)
    loss, alpha, s, clamped = best
    if clamped:
        log.warning("AWQ: %d scales hit the [%g, %g] bound at alpha=%g", clamped, SCALE_MIN, SCALE_MAX, alpha)
    ratio = loss / loss_rtn if loss_rtn else 1.0
    return s, {"alpha": alpha, "loss": loss, "loss_rtn": loss_rtn, "ratio": ratio,
               "clamped": clamped, "losses": losses}


def candidate_scales(sx: torch.Tensor, alpha: float) -> tuple[torch.Tensor, int]:
    """s = s_x^α / sqrt(max·min), clamped to the sane range; returns (s, how many were clamped)."""
    s = sx.pow(alpha)
    # geometric centring: the largest and smallest scale are reciprocal, so neither the folded
    # previous op nor W·s drifts in magnitude as α grows
    s = s / torch.sqrt(s.max() * s.min())
    clamped = int(((s < SCALE_MIN) | (s > SCALE_MAX)).sum())
    return s.clamp(SCALE_MIN, SCALE_MAX), clamped


def scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W·s: multiply the input columns of a Linear that reads the scaled input (float32 out).

    Args:
        weight: [out, in] weight of a Linear reading x.
        scales: [in] AWQ scales.

    Returns:
        float32 [out, in]; quantize this, not a 16-bit rounding of it.
    """
    if weight.ndim != 2 or weight.shape[1] != scales.shape[0]:
        raise ValueError(f"weight {tuple(weight.shape)} does not have {scales.shape[0]} input columns")
    return weight.float() * scales.float()[None, :]


def fold_into_previous(prev_weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Divide the op that produces x by s, so that it produces x/s.

    - a vector (a norm's weight, a LayerNorm's bias, or the previous Linear's bias): prev / s;
    - a matrix (the previous Linear's weight [out_prev, in_prev], whose output rows are x's channels):
      prev[out] / s[out].

    Args:
        prev_weight: [in] vector or [in, in_prev] Linear weight.
        scales: [in] AWQ scales.

    Returns:
        float32 tensor of the same shape (cast when saving).
    """
    s = scales.float()
    if not torch.isfinite(s).all() or bool((s <= 0).any()):
        raise ValueError("AWQ scales must be finite and positive")
    if prev_weight.ndim == 1:
        if prev_weight.shape[0] != s.shape[0]:
            raise ValueError(f"vector of length {prev_weight.shape[0]} does not match {s.shape[0]} scales")
        return prev_weight.float() / s
    if prev_weight.ndim == 2:
        if prev_weight.shape[0] != s.shape[0]:
            raise ValueError(f"previous Linear has {prev_weight.shape[0]} output rows, not {s.shape[0]}")
        return prev_weight.float() / s[:, None]
    raise ValueError(f"cannot fold scales into a tensor of shape {tuple(prev_weight.shape)}")
