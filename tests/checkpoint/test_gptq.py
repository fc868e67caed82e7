"""GPTQ: lower layer-output error than round-to-nearest at the same spec; on layers small enough to
enumerate every code it reports the true objective, never beats the optimum, and keeps what a greedy
method guarantees; a Hessian Cholesky cannot factor still gives a valid (RTN) weight and says so.

What GPTQ guarantees (and what these tests hold it to): it quantizes columns left to right, each
rounded to nearest after the errors of the earlier columns were compensated optimally (the OBS update)
— a greedy method (Babai's nearest plane on the lattice H defines), not an optimal one. So:
- with a diagonal H the objective separates per column: GPTQ = RTN = the enumerated optimum;
- its reported loss ½ Σ err²/U_jj² is exactly ½ δᵀ(H + λI)δ of the codes it returns;
- the last column's code is the best one given all the others (its step is an exact 1-D problem);
- it is *not* guaranteed to beat RTN on every instance; on correlated inputs it does on average.
"""
from __future__ import annotations

import pytest
import torch

from emq.checkpoint.gptq import gptq
from emq.checkpoint.hessian import accumulate_hessian
from emq.checkpoint.w4a16 import (
    QuantSpec,
    decode,
    dequantize,
    expand_groups,
    quantize_rtn,
)


def correlated_inputs(n: int, d: int, seed: int, dist: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels (as LLM activations are) and uneven magnitudes.

    `dist` picks the distribution (mixing matrix, channel magnitudes), `seed` the samples drawn from it.
    """
    g = torch.Generator().manual_seed(10_000 + dist)
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    mag = 0.5 + torch.rand(d, generator=g)
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * mag


def hessian_of(x: torch.Tensor, batch: int = 300) -> torch.Tensor:
    h, n = None, 0
    for xb in x.split(batch):
        h, n = accumulate_hessian(h, xb, n)
    assert n == x.shape[0]
    return h


def decoded(qw) -> torch.Tensor:
    """(q - z)·s exactly, in float32 (the values GPTQ's objective is about)."""
    gs = qw.spec.group_size
    zp = None if qw.zero_point is None else expand_groups(qw.zero_point, gs)
    return decode(qw.codes, expand_groups(qw.scale, gs), zp)


def test_accumulate_hessian_is_2xtx_over_n_in_any_batching():
    x = correlated_inputs(1000, 48, seed=0)
    want = 2 * x.T @ x / x.shape[0]
    for batch in (1000, 333, 64):
        torch.testing.assert_close(hessian_of(x, batch), want, rtol=1e-5, atol=1e-5)
    # 3-D activations [batch, seq, in] flatten to tokens
    h, n = accumulate_hessian(None, x.reshape(10, 100, 48), 0)
    assert n == 1000
    torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_layer_output(symmetric):
    out_f, d = 64, 256
    x, x_test = correlated_inputs(2048, d, seed=1), correlated_inputs(2048, d, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out_f, d, generator=g) * 0.05
    h = hessian_of(x)
    spec = QuantSpec(group_size=64, symmetric=symmetric)

    qw, info = gptq(w, h, spec)
    rtn = quantize_rtn(w, spec)
    assert info["fallback"] is None and info["damp"] == 0.01 and info["dead_columns"] == 0

    def err(xs, wq):
        return float(((xs @ (w - wq).T) ** 2).sum())

    for xs in (x, x_test):  # calibration data and fresh data from the same distribution
        assert err(xs, dequantize(qw)) < 0.85 * err(xs, dequantize(rtn))
    # the reported loss is ‖X(W-Ŵ)ᵀ‖²/n + (λ/2)‖W-Ŵ‖² for H = 2XᵀX/n
    delta = w - decoded(qw)
    lam = info["damp"] * float(torch.diagonal(h).mean())
    exact = err(x, decoded(qw)) / x.shape[0] + lam / 2 * float((delta**2).sum())
    assert info["loss"] == pytest.approx(exact, rel=1e-4)
    # a valid checkpoint weight: codes in range, zero points in range
    assert int(qw.codes.min()) >= -8 and int(qw.codes.max()) <= 7
    if not symmetric:
        assert int(qw.zero_point.min()) >= -8 and int(qw.zero_point.max()) <= 7


def test_lazy_blocks_are_the_same_arithmetic():
    d = 256
    x = correlated_inputs(1024, d, seed=4)
    w = torch.randn(32, d, generator=torch.Generator().manual_seed(5)) * 0.05
    h = hessian_of(x)
    spec = QuantSpec(group_size=64)
    a, ia = gptq(w, h, spec, block_size=32)  # rounded up to one group per block
    b, ib = gptq(w, h, spec, block_size=256)  # one block
    assert (a.codes == b.codes).float().mean() > 0.999  # float rounding may flip a tie
    assert ia["loss"] == pytest.approx(ib["loss"], rel=1e-3)


def all_codes(d: int) -> torch.Tensor:
    return torch.cartesian_prod(*[torch.arange(-8, 8, dtype=torch.int8)] * d)


def objective(codes: torch.Tensor, w: torch.Tensor, s: torch.Tensor, z, h: torch.Tensor) -> torch.Tensor:
    """½ δᵀHδ for every row of codes (δ = w - decoded)."""
    delta = w[None, :].double() - decode(codes, s, z).double()
    return 0.5 * ((delta @ h.double()) * delta).sum(dim=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_brute_force_on_a_tiny_layer(symmetric):
    """One output row, 5 inputs, one group: 16⁵ code vectors, all enumerated.

    GPTQ computes the group's scale (and zero point) when the group starts — at column 0, before any
    error moved a weight — so it equals RTN's; the enumeration uses that same scale.
    """
    d = 5
    spec = QuantSpec(group_size=d, symmetric=symmetric)
    grid = all_codes(d)
    gptq_f, rtn_f, optimal = [], [], 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, d, generator=g) @ torch.randn(d, d, generator=g)
        h = 2 * x.T @ x / 64
        w = torch.randn(1, d, generator=g)
        qw, info = gptq(w, h, spec, damp=0.0)  # undamped: its objective is exactly ½ δᵀHδ
        rtn = quantize_rtn(w, spec)
        assert torch.equal(qw.scale, rtn.scale)
        s = qw.scale[0, 0]
        z = None if symmetric else qw.zero_point[0, 0]

        best = float(objective(grid, w[0], s, z, h).min())
        f_gptq = float(objective(qw.codes, w[0], s, z, h)[0])
        f_rtn = float(objective(rtn.codes, w[0], s, z, h)[0])
        assert info["loss"] == pytest.approx(f_gptq, rel=1e-3, abs=1e-9)
        assert best <= f_gptq + 1e-9 and best <= f_rtn + 1e-9

        # greedy guarantee: no other code for the last column does better, the rest held fixed
        last = qw.codes.repeat(16, 1)
        last[:, -1] = torch.arange(-8, 8, dtype=torch.int8)
        assert float(objective(last, w[0], s, z, h).min()) >= f_gptq - 1e-9 * max(1.0, f_gptq)

        gptq_f.append(f_gptq)
        rtn_f.append(f_rtn)
        optimal += f_gptq <= best * (1 + 1e-6) + 1e-12
    # not a per-instance guarantee (2 of these 20 seeds do worse than RTN), but on correlated inputs
    # GPTQ is better than RTN on average (seen: 0.78 sym / 0.87 asym of RTN's total) and often reaches
    # the optimum (seen: 10 of 20)
    assert sum(gptq_f) < 0.95 * sum(rtn_f)
    assert optimal >= 4


@pytest.mark.parametrize("symmetric", [True, False])
def test_diagonal_hessian_gptq_equals_rtn_equals_optimum(symmetric):
    d = 5
    spec = QuantSpec(group_size=d, symmetric=symmetric)
    grid = all_codes(d)
    for seed in range(3):
        g = torch.Generator().manual_seed(100 + seed)
        h = torch.diag(torch.rand(d, generator=g) + 0.1)
        w = torch.randn(3, d, generator=g)
        qw, _ = gptq(w, h, spec, damp=0.0)
        rtn = quantize_rtn(w, spec)
        assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale)
        for row in range(3):
            z = None if symmetric else qw.zero_point[row, 0]
            f = objective(qw.codes[row:row + 1], w[row], qw.scale[row, 0], z, h)[0]
            assert float(f) == pytest.approx(float(objective(grid, w[row], qw.scale[row, 0], z, h).min()),
                                             rel=1e-12, abs=1e-15)


def test_dead_columns_are_rounded_not_zeroed():
    d = 64
    x = correlated_inputs(512, d, seed=6)
    x[:, [3, 40]] = 0.0  # two inputs that never fire on the calibration data
    w = torch.randn(16, d, generator=torch.Generator().manual_seed(7)) * 0.05
    qw, info = gptq(w, hessian_of(x), QuantSpec(group_size=32))
    assert info["dead_columns"] == 2 and info["fallback"] is None
    deq = decoded(qw)
    steps = expand_groups(qw.scale, 32)
    for j in (3, 40):
        assert bool((deq[:, j] != 0).any())  # kept: the input may fire at inference
        assert bool(((w[:, j] - deq[:, j]).abs() <= steps[:, j] * 0.53).all())


def test_singular_hessian_without_damping_retries_with_more():
    """All inputs identical (H = c·11ᵀ, rank 1): the undamped Cholesky hits a zero pivot."""
    d = 64
    h = torch.ones(d, d) * 2.0
    w = torch.randn(8, d, generator=torch.Generator().manual_seed(8)) * 0.05
    qw, info = gptq(w, h, QuantSpec(group_size=32), damp=0.0)
    assert info["fallback"] is None and info["tries"] == 2 and info["damp"] == 0.01
    assert qw.codes.shape == (8, d) and torch.isfinite(qw.scale).all()


@pytest.mark.parametrize("bad", ["indefinite", "nan", "negative diagonal"])
def test_unfactorable_hessian_falls_back_to_rtn_and_says_so(bad):
    d = 64
    if bad == "indefinite":
        # eigenvalue 1 - 3 = -2 along the all-ones direction: no damping up to mean(diag) fixes it
        h = torch.eye(d) - 3.0 * torch.ones(d, d) / d
    elif bad == "nan":
        h = torch.eye(d)
        h[5, 7] = h[7, 5] = float("nan")
    else:
        h = torch.eye(d)
        h[2, 2] = -1.0
    w = torch.randn(16, d, generator=torch.Generator().manual_seed(9)) * 0.05
    spec = QuantSpec(group_size=32, symmetric=False)
    qw, info = gptq(w, h, spec)
    assert info["fallback"] is not None and info["fallback"].startswith("rtn")
    assert info["loss"] is None and info["damp"] is None
    rtn = quantize_rtn(w, spec)
    assert torch.equal(qw.codes, rtn.codes) and torch.equal(qw.scale, rtn.scale)
    assert torch.equal(qw.zero_point, rtn.zero_point)
    if bad == "indefinite":
        assert info["tries"] == 3  # damp 0.01, 0.1, 1.0


def test_gptq_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="Hessian shape"):
        gptq(torch.zeros(4, 64), torch.eye(32), QuantSpec(group_size=32))
    with pytest.raises(ValueError, match="multiple of group_size"):
        gptq(torch.zeros(4, 48), torch.eye(48), QuantSpec(group_size=32))


@pytest.mark.parametrize("symmetric", [True, False])
def test_linears_sharing_an_input_quantize_as_one_stacked_weight(symmetric):
    """Rows are independent given H, so q/k/v (or gate/up) stacked give each Linear's own codes, scales and loss:
    the layerwise quantizer runs the launch-bound column loop once per input on that guarantee."""
    h = hessian_of(correlated_inputs(600, 64, seed=3))
    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(rows, 64, generator=g) * 0.05 for rows in (64, 16, 16)]
    spec = QuantSpec(group_size=32, symmetric=symmetric)
    alone = [gptq(w, h, spec) for w in ws]
    stacked, meta = gptq(torch.cat(ws), h, spec)
    assert torch.equal(stacked.codes, torch.cat([q.codes for q, _ in alone]))
    assert torch.equal(stacked.scale, torch.cat([q.scale for q, _ in alone]))
    start = 0
    for w, (_, info) in zip(ws, alone):
        rows = meta["row_loss"][start:start + w.shape[0]]
        start += w.shape[0]
        assert float(rows.sum()) == pytest.approx(info["loss"], rel=1e-9)
    assert meta["loss"] == pytest.approx(sum(i["loss"] for _, i in alone), rel=1e-9)
