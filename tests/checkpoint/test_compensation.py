"""Low-rank compensation of the quantization error (emq.checkpoint.compensation) on a synthetic layer."""
from __future__ import annotations

import pytest
import torch

from emq.checkpoint.compensation import fit, output_error
from emq.checkpoint.w4a16 import QuantSpec, dequantize, quantize_rtn


def synthetic_layer(out_f: int = 96, in_f: int = 128, n: int = 2048, seed: int = 0):
    """A weight, its W4A16 (RTN g32), and calibration inputs with a few dominant directions (as LLM activations
    have outlier channels), so the error's cost is very uneven across input directions."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05
    basis = torch.linalg.qr(torch.randn(in_f, in_f, generator=g))[0]
    spread = torch.logspace(1, -2, in_f)  # eigenvalues over three decades
    x = torch.randn(n, in_f, generator=g) * spread @ basis.T
    q = dequantize(quantize_rtn(w, QuantSpec(32, symmetric=False), torch.float32))
    return w, q, x, 2 * x.T @ x / n


@pytest.mark.parametrize("rank", [1, 4, 16, 32, 64])
def test_compensation_reduces_the_output_error_on_the_calibration_inputs_at_every_rank(rank):
    w, q, x, h = synthetic_layer()
    c = fit(w, q, h, rank)
    assert c.b.shape == (96, rank) and c.a.shape == (rank, 128)
    # measured on the activations themselves, not through H: ‖X (W − Q − BA)ᵀ‖ < ‖X (W − Q)ᵀ‖
    plain = ((x @ (w - q).T) ** 2).sum()
    compensated = ((x @ (w - q - c.b @ c.a).T) ** 2).sum()
    assert compensated < plain
    assert c.error_after < c.error_before
    assert c.error_after == pytest.approx(float(compensated / (x @ w.T).pow(2).sum()), rel=1e-3)


def test_a_higher_rank_never_leaves_more_error_and_full_rank_leaves_none():
    w, q, _, h = synthetic_layer()
    errors = [fit(w, q, h, r).error_after for r in (0, 2, 8, 32, 96)]
    assert errors == sorted(errors, reverse=True)
    assert errors[0] == fit(w, q, h, 0).error_before and errors[-1] < 1e-9 * errors[0]


def test_it_beats_the_plain_svd_of_the_error_where_the_inputs_are_uneven():
    """The point of fitting in H's eigenspace: the unweighted best rank-r approximation of E spends its rank on
    directions the inputs rarely excite."""
    w, q, _, h = synthetic_layer()
    e = w - q
    u, s, vh = torch.linalg.svd(e, full_matrices=False)
    plain = output_error(e - (u[:, :8] * s[:8]) @ vh[:8], h)
    assert output_error(e - fit(w, q, h, 8).b @ fit(w, q, h, 8).a, h) < 0.8 * plain


def test_directions_the_calibration_never_saw_get_no_compensation():
    w, q, _, _ = synthetic_layer()
    h = torch.zeros(128, 128)
    h[:64, :64] = torch.eye(64)  # the inputs live in the first 64 coordinates
    c = fit(w, q, h, 16)
    assert c.a[:, 64:].abs().max() == 0 and c.error_after < c.error_before


def test_bad_shapes_and_ranks_are_refused():
    w, q, _, h = synthetic_layer()
    with pytest.raises(ValueError, match="shapes"):
        fit(w, q[:, :64], h, 4)
    with pytest.raises(ValueError, match="rank"):
        fit(w, q, h, -1)


def test_alternating_quantization_and_compensation_never_ends_worse_than_one_fit():
    from emq.checkpoint.compensation import alternate

    w, q, _, h = synthetic_layer()
    spec = QuantSpec(32, symmetric=False)

    def rtn(x):
        return dequantize(quantize_rtn(x, spec, torch.float32))

    once = fit(w, q, h, 8)
    q2, twice = alternate(w, h, 8, rtn, rounds=4)
    assert twice.error_after <= once.error_after
    assert output_error(w - q2 - twice.b @ twice.a, h) == pytest.approx(twice.error_after * output_error(w, h),
                                                                          rel=1e-4)


@pytest.mark.parametrize("rank", [4, 16, 32])
def test_the_randomized_range_finder_large_linears_get_still_reduces_the_error_and_nearly_matches_the_svd(rank):
    """Linears over EXACT_MAX a side get the top-r subspace from a seeded randomized range finder: still a
    projection (never more error than none), within 2 % of the exact SVD's remaining error, and reproducible."""
    from emq.checkpoint import compensation

    w, q, x, h = synthetic_layer()
    exact = fit(w, q, h, rank)
    e, root = (w - q).double(), compensation.hessian_root(h)
    p, sigma, vh = compensation.top_singular(e @ root[0], rank, exact=False)
    p2, _, _ = compensation.top_singular(e @ root[0], rank, exact=False)
    assert torch.equal(p, p2)
    left = e - (p * sigma) @ (vh @ root[1])
    after = output_error(left, h) / output_error(w.double(), h)
    assert after < exact.error_before
    assert exact.error_after <= after <= exact.error_after * 1.02 + 1e-12
