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
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from emq.checkpoint.w4a16 import QuantSpec, QWeight, dequantize, quantize_rtn
from emq.errors import EmqError

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


# -- layer by layer (emq.checkpoint.layerwise drives, emq.checkpoint.quantizers.awq asks) ------------

# model types whose decoder layers have the Llama module layout AWQ folds into (RMSNorm: y = w·x/rms)
AWQ_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
AWQ_GRID = 20


@dataclass(frozen=True)
class AwqGroup:
    """Linears that read one input, and the op that produces it (names relative to the decoder layer).

    Attributes:
        prev: a norm (its weight, and bias if any, is divided by s) or a Linear (its output rows are).
        linears: the Linears reading prev's output (their input columns are multiplied by s).
    """

    prev: str
    linears: tuple[str, ...]


def awq_groups(layer: nn.Module, model_type: str) -> list[AwqGroup]:
    """The AWQ scale groups of a Llama/Qwen2/Mistral-style decoder layer.

    (input_layernorm → q, k, v), (v_proj rows → o_proj) only when v's out-features equal o's in-features
    (no grouped-query attention), (post_attention_layernorm → gate, up) and (up_proj rows → down_proj).

    Args:
        layer: the decoder layer (any device, meta included).
        model_type: the config's model_type.

    Raises:
        EmqError: the architecture is not one AWQ folds into.
    """
    names = {n for n, _ in layer.named_modules()}
    need = {"input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
            "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    if model_type not in AWQ_MODEL_TYPES or not need <= names:
        raise awq_refused(f"{type(layer).__name__} layers (model_type {model_type!r})")
    groups = [AwqGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    v, o = layer.get_submodule("self_attn.v_proj"), layer.get_submodule("self_attn.o_proj")
    if v.out_features == o.in_features:  # with GQA one v row feeds several heads' o columns: no per-row fold
        groups.append(AwqGroup("self_attn.v_proj", ("self_attn.o_proj",)))
    groups.append(AwqGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
    groups.append(AwqGroup("mlp.up_proj", ("mlp.down_proj",)))
    return groups


def awq_refused(what: str) -> EmqError:
    return EmqError(f"AWQ is not implemented for {what}; it folds scales into Llama-style decoder layers "
                    f"(model types {', '.join(AWQ_MODEL_TYPES)})",
                    "use quant.algorithm=gptq or quant.algorithm=rtn for this model")


def fold_awq_scales(layer: nn.Module, group: AwqGroup, scales: torch.Tensor) -> None:
    """Apply AWQ scales in place, leaving the layer's float function unchanged: prev ÷ s, Linears' columns × s.

    Args:
        layer: the decoder layer, float32 parameters.
        group: which ops.
        scales: [in] positive scales (on the layer's device).
    """
    prev = layer.get_submodule(group.prev)
    with torch.no_grad():
        prev.weight.copy_(fold_into_previous(prev.weight, scales))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_(fold_into_previous(prev.bias, scales))
        for name in group.linears:
            lin = layer.get_submodule(name)
            lin.weight.copy_(scale_columns(lin.weight, scales))


def search_awq_scales(hessian: torch.Tensor, absmean: torch.Tensor, weights: list[torch.Tensor], spec: QuantSpec,
                      scale_dtype: torch.dtype, grid: int = AWQ_GRID) -> tuple[torch.Tensor, dict]:
    """`emq.checkpoint.awq.awq_scales` on running statistics of every calibration token instead of a sample.

    The objective Σ_W ‖x Wᵀ - (x/s) Q(W·s)ᵀ‖² only needs xᵀx, which H = 2XᵀX/n holds; s_x = mean |x|.

    Args:
        hessian: [in, in] H of the group's input (`accumulate_hessian`).
        absmean: [in] mean |x| per input channel.
        weights: the float32 [out_i, in] weights being quantized.
        spec: the quantization spec.
        scale_dtype: the stored scale dtype.
        grid: α = i/grid for i in 0..grid-1 (α = 0 is plain RTN).

    Returns:
        (s float32 [in], info: alpha, loss (mean squared output error per token), loss_rtn, ratio, clamped).
    """
    sx = absmean.clamp(min=max(float(absmean.max()) * SX_FLOOR, torch.finfo(torch.float32).tiny))
    best = None
    loss_rtn = 0.0
    for i in range(grid):
        s, clamped = candidate_scales(sx, i / grid)
        approx = [dequantize(quantize_rtn(w * s, spec, scale_dtype)) / s for w in weights]
        loss = output_error(hessian, weights, approx) / 2  # H = 2XᵀX/n
        if i == 0:
            loss_rtn = loss
        if best is None or loss < best[0]:
            best = (loss, i / grid, s, clamped)
    loss, alpha, s, clamped = best
    ratio = loss / loss_rtn if loss_rtn else 1.0
    return s, {"alpha": alpha, "loss": loss, "loss_rtn": loss_rtn, "ratio": ratio, "clamped": clamped}

def check_model_type(config: dict[str, Any]) -> None:
    """Refuse a model whose decoder layers AWQ cannot fold into, from its config.json."""
    if config.get("model_type") not in AWQ_MODEL_TYPES:
        archs = ", ".join(config.get("architectures") or []) or "?"
        raise awq_refused(f"{archs} (model_type {config.get('model_type')!r})")


def awq_layer(layer: nn.Module, names: list[str], stats: Any, job: Any,
               groups: list[AwqGroup]) -> tuple[dict[str, QWeight], dict]:
    """AWQ: search every group's scales on the full-precision weights, fold them all, then RTN-quantize.

    `stats` is the driver's LayerStats (H and mean |x| per input), `job` its LayerJob (spec, scale and output dtypes).
    """
    found = []
    for g in groups:
        members = [n for n in g.linears if n in names and n in stats.key_of]
        if not members:  # every reader stays 16-bit (or never ran): scaling would only cost rounding
            continue
        weights = [layer.get_submodule(n).weight.detach() for n in members]
        s, meta = search_awq_scales(stats.h(members[0]), stats.absmean(members[0]), weights, job.spec,
                                    job.scale_dtype)
        found.append((g, s, meta))
    info: dict[str, Any] = {}
    for g, s, meta in found:
        fold_awq_scales(layer, g, s)
        info[g.prev] = {"linears": list(g.linears), "alpha": meta["alpha"], "ratio": meta["ratio"],
                        "loss": meta["loss"], "loss_rtn": meta["loss_rtn"], "clamped": meta["clamped"]}
    quantized = {f"{n}.weight" for n in names}
    with torch.no_grad():  # what stays 16-bit is served as stored: compute the next inputs with that rounding
        for pname, p in layer.named_parameters():
            if pname not in quantized:
                p.copy_(p.to(job.out_dtype).float())
    qweights = {n: quantize_rtn(layer.get_submodule(n).weight.detach(), job.spec, job.scale_dtype) for n in names}
    return qweights, info
