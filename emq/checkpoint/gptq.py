"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"), implemented from the paper's math.

Objective per Linear: minimise ‖X Wᵀ - X Ŵᵀ‖² over codes Ŵ, i.e. ½ Σ_rows δwᵀ H δw with
H = 2XᵀX/n (δw = w - ŵ). Columns are quantized left to right; after fixing column j to its code, the
remaining columns absorb the error optimally (the OBS update) using the upper Cholesky factor U of H⁻¹:
    err = (w_j - ŵ_j) / U_jj,   w_{j+1:} -= err · U_{j, j+1:}
and the objective grows by exactly ½ err². Updates are applied inside a block of columns eagerly and
to the columns after the block lazily (one matmul per block), which is the same arithmetic.

Choices:
- group scales/zeros are computed when a group starts, from the weights as updated by every error so
  far (blocks are whole groups, so a group never straddles the lazy boundary); groups stay in column
  order (no act-order), which is the layout every kernel reads without a g_idx;
- dead columns (H_jj = 0: the input never fired on calibration data) get H_jj = 1, so they are
  rounded to nearest and pass no error on; unlike the reference implementation they are *not* zeroed,
  since an input that was silent on calibration data may still fire at inference;
- dampening λ = damp · mean(diag H); if a Cholesky factorisation fails, damp is retried ×10 up to 1,
  then the weight falls back to round-to-nearest and the info says so.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from emq.checkpoint.awq import output_error

from emq.checkpoint.w4a16 import (
    QuantSpec,
    QWeight,
    check_weight,
    decode,
    dequantize,
    group_params,
    quantize_codes,
    quantize_rtn,
)

log = logging.getLogger(__name__)

MAX_DAMP = 1.0


def inverse_cholesky(h: torch.Tensor, damp: float) -> tuple[torch.Tensor | None, float, int]:
    """Upper Cholesky factor of (H + λI)⁻¹, retrying with 10× the dampening when a factorisation fails.

    Args:
        h: [in, in] float32 Hessian with a positive diagonal.
        damp: relative dampening (λ = damp · mean diag H).

    Returns:
        (U or None when every try failed, damp used (or last tried), tries).
    """
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    tries = 0
    while True:
        tries += 1
        lower, info = torch.linalg.cholesky_ex(h + (damp * mean_diag) * eye)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, damp, tries
        nxt = max(10.0 * damp, 0.01)
        if nxt > MAX_DAMP * (1 + 1e-9):
            return None, damp, tries
        log.info("GPTQ: Cholesky failed at damp=%g, retrying with damp=%g", damp, nxt)
        damp = nxt


def _inverse_factor(hessian: torch.Tensor, damp: float, device) -> tuple[torch.Tensor | None, float, int, int,
                                                                          str | None]:
    """GPTQ's upper Cholesky factor of (H + λI)⁻¹, H symmetrized and its dead columns (H_jj = 0) set to 1.

    Returns:
        (factor or None, relative damp used, Cholesky tries, dead columns, why the factor could not be made).
    """
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()
    h = (h + h.T) / 2  # accumulated sums can drift from exact symmetry
    diag = torch.diagonal(h)
    dead = diag == 0
    n_dead = int(dead.sum())
    if not torch.isfinite(h).all():
        return None, damp, 0, n_dead, "Hessian holds NaN/inf"
    if bool((diag < 0).any()):
        return None, damp, 0, n_dead, "Hessian has a negative diagonal (not positive semi-definite)"
    h[dead, dead] = 1.0
    upper, used, tries = inverse_cholesky(h, damp)
    why = None if upper is not None else f"Cholesky failed {tries} times (damp up to {used:g})"
    return upper, used, tries, n_dead, why


def gptq(w: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *, damp: float = 0.01,
         block_size: int = 128, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[QWeight, dict]:
    """Quantize one Linear weight with GPTQ.

    Args:
        w: [out, in] weight (any float dtype, any device; math in float32).
        hessian: [in, in] H = 2XᵀX/n of the Linear's inputs (see `accumulate_hessian`).
        spec: the quantization spec.
        damp: relative dampening, λ = damp · mean(diag H).
        block_size: columns per lazy-update block; rounded up to whole groups.
        scale_dtype: the dtype the scales will be stored in.

    Returns:
        (quantized weight, info) with info keys:
        - "damp": relative dampening used (None on fallback),
        - "fallback": None, or why the weight was quantized round-to-nearest instead,
        - "loss": ½ Σ err²/U_jj², exactly ½ Σ_rows δwᵀ(H + λI)δw of the returned codes; for H = 2XᵀX/n
          and no dead columns that is ‖X(W-Ŵ)ᵀ‖²/n + (λ/2)‖W-Ŵ‖² (None on fallback),
        - "row_loss": the same per output row ([out] float64; absent on fallback): rows are independent, so
          Linears that share an input can be quantized as one stacked weight and split afterwards,
        - "dead_columns": columns with H_jj = 0,
        - "tries": Cholesky attempts.
    """
    check_weight(w, spec)
    out_f, cols = w.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match in-features {cols}")
    upper, used, tries, n_dead, reason = _inverse_factor(hessian, damp, w.device)
    if reason is not None:
        log.warning("GPTQ: %s for a %d×%d weight; falling back to round-to-nearest", reason, out_f, cols)
        qw = quantize_rtn(w, spec, scale_dtype)
        return qw, {"damp": None, "fallback": f"rtn: {reason}", "loss": None,
                    "dead_columns": n_dead, "tries": tries}

    gs = spec.group_size
    block = max(gs, -(-block_size // gs) * gs)
    weight = w.detach().to(torch.float32).clone()
    codes = torch.empty(out_f, cols, dtype=torch.int8, device=w.device)
    scales = torch.empty(out_f, cols // gs, dtype=torch.float32, device=w.device)
    zeros = None if spec.symmetric else torch.empty(out_f, cols // gs, dtype=torch.int8, device=w.device)
    row_loss = torch.zeros(out_f, dtype=torch.float64, device=w.device)

    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = weight[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                # params from the group as it stands now: every earlier error already propagated
                s, z = group_params(w1[:, i:i + gs], spec, scale_dtype)
                scales[:, col // gs] = s[:, 0]
                if zeros is not None:
                    zeros[:, col // gs] = z[:, 0]
                s = s[:, 0]
                z = None if z is None else z[:, 0]
            wj = w1[:, i]
            q = quantize_codes(wj, s, z, spec)
            codes[:, col] = q
            d = u1[i, i]
            e = (wj - decode(q, s, z)) / d
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        row_loss += 0.5 * (err1.double() ** 2).sum(dim=1)  # once per block: the column loop is launch-bound
        weight[:, i2:] -= err1 @ upper[i1:i2, i2:]

    qw = QWeight(codes=codes, scale=scales, zero_point=zeros, spec=spec, scale_dtype=scale_dtype)
    return qw, {"damp": used, "fallback": None, "loss": float(row_loss.sum()), "row_loss": row_loss,
                "dead_columns": n_dead, "tries": tries}


# -- one decoder layer (emq.checkpoint.layerwise drives, emq.checkpoint.quantizers.gptq asks) -------------

def gptq_layer(layer: Any, names: list[str], stats: Any, job: Any) -> tuple[dict[str, QWeight], dict]:
    """GPTQ each Linear from its Hessian; Linears that read one input (q/k/v, gate/up) as one stacked weight.

    GPTQ's update is row by row with a shared H, so stacking is the same arithmetic; it runs the column loop,
    which is launch-bound on a GPU, once per input instead of once per Linear (7B: 23k columns, not 36k).
    `stats` is the driver's LayerStats (H per input), `job` its LayerJob (spec, damp, scale dtype).
    """
    qweights, info = {}, {}
    readers: dict[str, list[str]] = {}
    for name in names:
        if name not in stats.key_of:  # never called on calibration data (e.g. an unrouted expert)
            w = layer.get_submodule(name).weight.detach()
            qweights[name] = quantize_rtn(w, job.spec, job.scale_dtype)
            info[name] = {"loss": None, "damp": None, "fallback": "rtn: no calibration input reached it",
                          "dead_columns": w.shape[1]}
            continue
        readers.setdefault(stats.key_of[name], []).append(name)
    for key, members in readers.items():
        h = stats.hessian[key]
        ws = [layer.get_submodule(n).weight.detach() for n in members]
        stacked, meta = gptq(torch.cat(ws) if len(ws) > 1 else ws[0], h, job.spec, damp=job.damp,
                             scale_dtype=job.scale_dtype)
        start = 0
        for name, w in zip(members, ws):
            rows = slice(start, start + w.shape[0])
            start = rows.stop
            qw = _rows(stacked, rows) if len(ws) > 1 else stacked
            qweights[name] = qw
            info[name] = {k: meta[k] for k in ("damp", "fallback", "dead_columns")}
            info[name]["loss"] = float(meta["row_loss"][rows].sum()) if "row_loss" in meta else None
            if len(ws) > 1:
                info[name]["stacked_with"] = [n for n in members if n != name]
            # the Linear's own objective (undamped; sink-weighted for q/k/v), for GPTQ and for RTN
            obj = output_error(h, [w], [dequantize(qw)]) / 2
            obj_rtn = output_error(h, [w], [dequantize(quantize_rtn(w, job.spec, job.scale_dtype))]) / 2
            info[name].update(objective=obj, objective_rtn=obj_rtn, ratio=obj / obj_rtn if obj_rtn else 1.0)
    return qweights, info


def _rows(qw: QWeight, rows: slice) -> QWeight:
    """The output rows `rows` of a quantized weight."""
    return QWeight(codes=qw.codes[rows].contiguous(), scale=qw.scale[rows].contiguous(),
                   zero_point=None if qw.zero_point is None else qw.zero_point[rows].contiguous(),
                   spec=qw.spec, scale_dtype=qw.scale_dtype)
