"""AWQ: on inputs with a few large-magnitude channels (the case AWQ is for), quantizing W·s and feeding
x/s has lower output error than plain RTN, on the calibration batch and on fresh inputs; folding 1/s
into the previous norm or Linear leaves the float function unchanged."""
from __future__ import annotations

import pytest
import torch

from emq.checkpoint.awq import awq_scales, fold_into_previous, scale_columns
from emq.checkpoint.w4a16 import QuantSpec, dequantize, quantize_rtn

D = 256


def outlier_inputs(n: int, seed: int) -> torch.Tensor:
    """Activations where 8 of 256 channels are ~30× larger than the rest (fixed channels, fresh samples)."""
    mag = torch.ones(D)
    mag[torch.randperm(D, generator=torch.Generator().manual_seed(0))[:8]] = 30.0
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * mag


def weights() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(out, D, generator=g) * 0.05 for out in (128, 64, 64)]  # q, k, v sharing x


def output_err(x: torch.Tensor, ws: list[torch.Tensor], approx: list[torch.Tensor], s: torch.Tensor) -> float:
    """Σ ‖x Wᵀ − (x/s) Âᵀ‖², computed on the activations directly."""
    return sum(float(((x @ w.T - (x / s) @ a.T) ** 2).sum()) for w, a in zip(ws, approx))


@pytest.mark.parametrize("symmetric", [True, False])
def test_awq_beats_rtn_on_outlier_channels(symmetric):
    spec = QuantSpec(group_size=64, symmetric=symmetric)
    ws = weights()
    calib, fresh = outlier_inputs(512, seed=2), outlier_inputs(512, seed=3)
    s, info = awq_scales(calib, ws, spec)

    assert s.dtype == torch.float32 and s.shape == (D,) and bool((s > 0).all())
    assert 0 < info["alpha"] < 1 and info["loss"] <= info["loss_rtn"] and info["clamped"] == 0
    awq = [dequantize(quantize_rtn(scale_columns(w, s), spec)) for w in ws]
    rtn = [dequantize(quantize_rtn(w, spec)) for w in ws]
    ones = torch.ones(D)
    for x in (calib, fresh):
        assert output_err(x, ws, awq, s) < 0.7 * output_err(x, ws, rtn, ones)
    # the searched objective is the same error
    assert info["loss"] == pytest.approx(output_err(calib, ws, awq, s), rel=1e-3)
    # the large channels got the large scales
    mag = calib.abs().mean(0)
    big = mag > 10 * mag.median()
    assert float(s[big].min()) > float(s[~big].max())


def test_alpha_zero_is_plain_rtn():
    spec = QuantSpec(group_size=64)
    ws = weights()
    x = outlier_inputs(256, seed=4)
    s, info = awq_scales(x, ws, spec, grid=1)  # only α = 0
    assert info["alpha"] == 0 and torch.equal(s, torch.ones(D))
    assert info["loss"] == info["loss_rtn"] and info["ratio"] == 1.0


def test_inputs_without_outliers_do_not_get_worse():
    spec = QuantSpec(group_size=64)
    ws = weights()
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(5))
    _, info = awq_scales(x, ws, spec)
    assert info["loss"] <= info["loss_rtn"]


def test_dead_channels_get_finite_scales():
    spec = QuantSpec(group_size=64)
    x = outlier_inputs(256, seed=6)
    x[:, :5] = 0.0
    s, _ = awq_scales(x, weights(), spec)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


def test_folding_into_a_norm_keeps_the_float_function():
    gen = torch.Generator().manual_seed(7)
    h = torch.randn(32, D, generator=gen)
    g = 1 + 0.1 * torch.randn(D, generator=gen)
    ws = weights()
    s, _ = awq_scales(rms_norm(outlier_inputs(256, seed=8), g), ws, QuantSpec(group_size=64))
    g2 = fold_into_previous(g, s)
    for w in ws:
        before = rms_norm(h, g) @ w.T
        after = rms_norm(h, g2) @ scale_columns(w, s).T
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_folding_into_a_layernorm_bias_and_previous_linear_keeps_the_float_function():
    gen = torch.Generator().manual_seed(9)
    h = torch.randn(32, 64, generator=gen)
    # LayerNorm with a bias feeding the Linears: weight and bias both divide by s
    ln = torch.nn.LayerNorm(D)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.1 * torch.randn(D, generator=gen))
        ln.bias.copy_(0.1 * torch.randn(D, generator=gen))
    x = torch.randn(32, D, generator=gen)
    w = weights()[0]
    s = torch.exp(torch.randn(D, generator=gen))  # any positive scales
    before = ln(x) @ w.T
    ln2 = torch.nn.LayerNorm(D)
    with torch.no_grad():
        ln2.weight.copy_(fold_into_previous(ln.weight, s))
        ln2.bias.copy_(fold_into_previous(ln.bias, s))
    torch.testing.assert_close(ln2(x) @ scale_columns(w, s).T, before, rtol=1e-5, atol=1e-5)

    # MLP: down_proj reads act(gate x) ⊙ (up x); the scales fold into up_proj's output rows (and bias)
    gate = torch.randn(D, 64, generator=gen) * 0.1
    up = torch.randn(D, 64, generator=gen) * 0.1
    up_bias = torch.randn(D, generator=gen) * 0.1
    down = torch.randn(48, D, generator=gen) * 0.1
    mid = torch.nn.functional.silu(h @ gate.T) * (h @ up.T + up_bias)
    s, _ = awq_scales(mid, [down], QuantSpec(group_size=64))
    before = mid @ down.T
    mid2 = torch.nn.functional.silu(h @ gate.T) * (h @ fold_into_previous(up, s).T + fold_into_previous(up_bias, s))
    torch.testing.assert_close(mid2 @ scale_columns(down, s).T, before, rtol=1e-5, atol=1e-5)


def test_fold_rejects_mismatched_shapes_and_bad_scales():
    s = torch.ones(8)
    with pytest.raises(ValueError, match="does not match"):
        fold_into_previous(torch.ones(7), s)
    with pytest.raises(ValueError, match="output rows"):
        fold_into_previous(torch.ones(7, 8), s)
    with pytest.raises(ValueError, match="positive"):
        fold_into_previous(torch.ones(8), torch.zeros(8))
    with pytest.raises(ValueError, match="does not read"):
        awq_scales(torch.ones(4, 8), [torch.ones(3, 9)], QuantSpec(group_size=8))
