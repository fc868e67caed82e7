"""W4A16: 4-bit integer weights with group-wise scales, stored in compressed-tensors' `pack-quantized` format.

vLLM loads such a checkpoint natively (no `quantization=` argument): Marlin/Machete on CUDA, CPUWNA16 on
its CPU build; transformers loads it through its compressed-tensors integration.

Conventions (chosen to match what compressed-tensors does when it *decompresses*, so that its
`PackedQuantizationCompressor.decompress` returns exactly `dequantize(qw)`):
- codes are signed: q ∈ [-2^(b-1), 2^(b-1)-1] ([-8, 7] for 4 bits); `pack_to_int32` adds 2^(b-1) when it
  packs, which is the unsigned `uint4b8` / `uint4` layout the vLLM kernels read.
- decode: w ≈ (q - z)·s per group of `group_size` input columns; z = 0 (and not stored) when symmetric.
- symmetric: s = absmax / ((qmax - qmin)/2) = absmax/7.5 — compressed-tensors' own min-max rule; the
  largest positive value lands on 7.5 and is clipped to 7 (half a step at most).
- asymmetric: the range is widened to include 0 (so 0 decodes exactly and z fits in the code range),
  s = (max - min)/(qmax - qmin), z = round(qmin - min/s) clamped to the code range, stored as a signed
  int and packed along the *output* dim.
- the scale is rounded to the scale dtype (bf16/fp16, the model dtype) *before* the codes are computed,
  so the codes are optimal for the scale that is actually stored.

Numbers are float32 throughout; tensors may live on CPU or CUDA.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32


log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
SCALE_SEARCHES = ("minmax", "mse")
SHRINKS = tuple(1 - i / 100 for i in range(0, 32, 2))  # scale_search="mse": the range × 1.00, 0.98, …, 0.70
ERROR_NORM = 2.4  # the error measure it minimizes, |w − ŵ|^2.4 summed over the group (GPTQ's reference value)
SEARCH_BLOCK_ELEMENTS = 1 << 24  # weights × candidates searched at once (64 MiB of float32 per temporary)


@dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized.

    Attributes:
        group_size: input columns that share one scale (and zero point).
        symmetric: no zero point (int range [-8, 7] around 0) when True; a per-group zero point when False.
        bits: code width; 4 (W4A16). 8 is accepted too (same format, `uint8b128`).
        scale_search: "minmax" (each group's range as it is) or "mse" (the range shrunk by the factor in
            SHRINKS that leaves the least |error|^ERROR_NORM in the group: GPTQ's reference `mse` option).
    """

    group_size: int
    symmetric: bool = True
    bits: int = 4
    scale_search: str = "minmax"

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            # 3/5/6/7 bits pack differently in compressed-tensors (32 // bits values per int32) and
            # vLLM (ceil(in·bits/32) words): they disagree on the packed shape.
            raise ValueError(f"bits={self.bits}: only {SUPPORTED_BITS} are supported")
        if self.group_size <= 0:
            raise ValueError(f"group_size={self.group_size} must be positive")
        if self.scale_search not in SCALE_SEARCHES:
            raise ValueError(f"scale_search={self.scale_search!r}: one of {SCALE_SEARCHES}")

    @property
    def qmin(self) -> int:
        """Smallest signed code."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest signed code."""
        return (1 << (self.bits - 1)) - 1


@dataclass(frozen=True, eq=False)
class QWeight:
    """One quantized Linear weight.

    Attributes:
        codes: int8 [out, in], signed codes in [spec.qmin, spec.qmax].
        scale: float32 [out, in // group_size]; every value is exactly representable in `scale_dtype`.
        zero_point: int8 [out, in // group_size] (signed, in the code range), or None when symmetric.
        spec: the spec it was quantized with.
        scale_dtype: the dtype the scales are stored in (and the dequantized weight comes out in).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    spec: QuantSpec
    scale_dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return (int(self.codes.shape[0]), int(self.codes.shape[1]))


def scale_dtype_for(model_dtype: torch.dtype | str) -> torch.dtype:
    """The dtype to store scales in for a model of this dtype.

    vLLM allocates `weight_scale` in the model's dtype and compressed-tensors dequantizes in the scale
    dtype, so the scales follow the model: bf16 → bf16, fp16 → fp16. A float32 model gets bf16 (same
    exponent range, so no scale can overflow); W4A16 kernels run 16-bit activations, so such a
    checkpoint should declare torch_dtype bfloat16.

    Args:
        model_dtype: a torch dtype or its name ("bfloat16", "torch.float16", "float32", ...).

    Returns:
        torch.bfloat16 or torch.float16.
    """
    if isinstance(model_dtype, str):
        name = model_dtype.removeprefix("torch.")
        model_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
                       "float32": torch.float32, "float": torch.float32}.get(name, None)
        if model_dtype is None:
            raise ValueError(f"unknown model dtype {name!r}")
    if model_dtype == torch.float16:
        return torch.float16
    if model_dtype in (torch.bfloat16, torch.float32):
        return torch.bfloat16
    raise ValueError(f"no W4A16 scale dtype for a {model_dtype} model")


def expand_groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """Repeat per-group values [out, groups] along the columns to [out, groups·group_size]."""
    return t.repeat_interleave(group_size, dim=1)


def round_scale(scale: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales as float32 values the scale dtype can hold exactly, floored at its smallest normal.

    The floor keeps the scale positive (an all-zero group would give 0 → division by zero) and out of
    fp16's subnormals; a group that small decodes within half a floor of its values anyway.
    """
    info = torch.finfo(scale_dtype)
    return scale.float().clamp(min=info.tiny, max=info.max).to(scale_dtype).float()


def group_params(w: torch.Tensor, spec: QuantSpec,
                 scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) for each group of `spec.group_size` columns of `w`: min-max, or with
    spec.scale_search="mse" the shrunk range that leaves the least error in the group.

    Args:
        w: [out, k·group_size] weights (float; read as float32). GPTQ passes one group at a time.
        spec: the quantization spec.
        scale_dtype: the dtype the scales will be stored in; they are rounded to it here.

    Returns:
        (scale float32 [out, k], zero point int8 [out, k] or None when symmetric).
    """
    w = w.float()
    out, cols = w.shape
    if cols % spec.group_size:
        raise ValueError(f"{cols} columns are not a whole number of groups of {spec.group_size}")
    wg = w.reshape(out, cols // spec.group_size, spec.group_size)
    if spec.scale_search == "minmax":
        return _range_params(wg, 1.0, spec, scale_dtype)
    # every candidate at once ([shrinks, rows, groups]: GPTQ asks once per group, so few launches matter on a GPU),
    # in blocks of rows that keep the candidates' copies of the weights near SEARCH_BLOCK_ELEMENTS (a whole 7B
    # Linear at once, as the fused RTN pass asks, would take gigabytes)
    rows = max(1, SEARCH_BLOCK_ELEMENTS // (len(SHRINKS) * cols))
    parts = [_searched_params(wg[r:r + rows], spec, scale_dtype) for r in range(0, out, rows)]
    return (torch.cat([p[0] for p in parts]),
            None if spec.symmetric else torch.cat([p[1] for p in parts]))


def _searched_params(wg: torch.Tensor, spec: QuantSpec,
                     scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """scale_search="mse" for the groups `wg` [rows, groups, size]: each group's least-error shrink of its range."""
    shrink = torch.tensor(SHRINKS, dtype=torch.float32, device=wg.device)[:, None, None]
    scale, zero = _range_params(wg, shrink, spec, scale_dtype)
    s, z = scale[..., None], None if zero is None else zero[..., None]
    err = (decode(quantize_codes(wg, s, z, spec), s, z) - wg).abs().pow(ERROR_NORM).sum(dim=-1)
    pick = err.argmin(dim=0, keepdim=True)  # the first (least shrunk) of equals: min-max when nothing helps
    return scale.gather(0, pick)[0], None if zero is None else zero.gather(0, pick)[0]


def _range_params(wg: torch.Tensor, shrink: float | torch.Tensor, spec: QuantSpec,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and zero points) [out, groups] for the range of each group of `wg` [out, groups, size] × shrink
    (a number, or a tensor that broadcasts against [out, groups])."""
    span = float(spec.qmax - spec.qmin)
    if spec.symmetric:
        return round_scale(wg.abs().amax(dim=-1) * shrink / (span / 2), scale_dtype), None
    lo = wg.amin(dim=-1).clamp(max=0.0) * shrink
    hi = wg.amax(dim=-1).clamp(min=0.0) * shrink
    scale = round_scale((hi - lo) / span, scale_dtype)
    # z from the stored (rounded) scale so that `lo` lands on qmin as closely as the scale allows
    zero = torch.round(spec.qmin - lo / scale).clamp(spec.qmin, spec.qmax).to(torch.int8)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes of `w` for fixed scales/zero points (broadcast against `w`).

    Computed as compressed-tensors' quantize does: clamp(round(w/s + z), qmin, qmax).

    Args:
        w: weights (a column, a group or a whole matrix).
        scale: float32 scales broadcastable to `w`.
        zero_point: int8 zero points broadcastable to `w`, or None (symmetric).
        spec: gives the code range.

    Returns:
        int8 codes, same shape as `w`.
    """
    x = w.float() / scale
    if zero_point is not None:
        x = x + zero_point.float()
    return torch.round(x).clamp(spec.qmin, spec.qmax).to(torch.int8)


def decode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """(q - z)·s in float32, exact (a ≤ 16-bit-mantissa scale times a 4–9 bit integer fits float32).

    Args:
        codes: int8 codes.
        scale: float32 scales broadcastable to `codes`.
        zero_point: int8 zero points broadcastable to `codes`, or None.

    Returns:
        float32 tensor, the shape of `codes`.
    """
    q = codes.float()
    if zero_point is not None:
        q = q - zero_point.float()
    return q * scale


def quantize_rtn(w: torch.Tensor, spec: QuantSpec, scale_dtype: torch.dtype = torch.bfloat16) -> QWeight:
    """Round-to-nearest quantization with per-group min-max scales.

    Args:
        w: [out, in] weight; in must be a multiple of `spec.group_size`.
        spec: the quantization spec.
        scale_dtype: the dtype the scales will be stored in (see `scale_dtype_for`).

    Returns:
        The quantized weight.
    """
    check_weight(w, spec)
    scale, zero = group_params(w, spec, scale_dtype)
    gs = spec.group_size
    codes = quantize_codes(w, expand_groups(scale, gs), None if zero is None else expand_groups(zero, gs), spec)
    return QWeight(codes=codes, scale=scale, zero_point=zero, spec=spec, scale_dtype=scale_dtype)


def check_weight(w: torch.Tensor, spec: QuantSpec) -> None:
    """Raise ValueError unless `w` is a finite 2-D weight with whole groups of columns."""
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    if w.shape[1] % spec.group_size:
        raise ValueError(f"in-features {w.shape[1]} are not a multiple of group_size {spec.group_size}")
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} holds NaN/inf")


def dequantize(qw: QWeight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weight the checkpoint decodes to.

    (q - z)·s computed exactly, then rounded once to the scale dtype — which is what compressed-tensors'
    decompress returns (it computes in the scale dtype) and what 16-bit kernels multiply by.

    Args:
        qw: the quantized weight.
        dtype: output dtype; float32 by default (holding values exactly representable in the scale dtype).

    Returns:
        [out, in] tensor.
    """
    gs = qw.spec.group_size
    zero = None if qw.zero_point is None else expand_groups(qw.zero_point, gs)
    w = decode(qw.codes, expand_groups(qw.scale, gs), zero).to(qw.scale_dtype)
    return w.to(dtype if dtype is not None else torch.float32)


def pack(qw: QWeight, scale_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one quantized Linear, named relative to the module.

    - weight_packed: int32 [out, ceil(in/8)], 8 codes per word along the input dim (code + 8, low bits first)
    - weight_scale: scale dtype [out, in/group_size]
    - weight_zero_point (asymmetric only): int32 [ceil(out/8), in/group_size], packed along the output dim
    - weight_shape: int64 [2] = (out, in)

    Args:
        qw: the quantized weight.
        scale_dtype: optional check: must equal `qw.scale_dtype` (the codes were computed against scales
            rounded to that dtype, so it cannot change after quantization).

    Returns:
        name → contiguous tensor, on the device of `qw`.
    """
    if scale_dtype is not None and scale_dtype != qw.scale_dtype:
        raise ValueError(f"weight was quantized for {qw.scale_dtype} scales, not {scale_dtype}: "
                         f"quantize with scale_dtype={scale_dtype} instead")
    bits = qw.spec.bits
    out = {
        "weight_packed": pack_to_int32(qw.codes.to(torch.int8), bits).contiguous(),
        "weight_scale": qw.scale.to(qw.scale_dtype).contiguous(),
        "weight_shape": torch.tensor(qw.shape, dtype=torch.int64, device=qw.codes.device),
    }
    if qw.zero_point is not None:
        out["weight_zero_point"] = pack_to_int32(qw.zero_point.to(torch.int8), bits, packed_dim=0).contiguous()
    return out


def quantization_config(spec: QuantSpec, ignore: list[str]) -> dict:
    """The config.json `quantization_config` for a checkpoint of `pack` tensors.

    Only fields vLLM and transformers need: vLLM validates `weights` against compressed-tensors'
    QuantizationArgs (extra fields forbidden), and transformers only loads packed tensors when
    `quantization_status` is "compressed".

    Args:
        spec: the quantization spec of every quantized Linear.
        ignore: modules left in 16-bit (names or "re:" patterns), e.g. ["lm_head"].

    Returns:
        A JSON-serializable dict.
    """
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": spec.bits,
                    "type": "int",
                    "symmetric": spec.symmetric,
                    "strategy": "group",
                    "group_size": spec.group_size,
                },
            },
        },
        "ignore": list(ignore),
    }
