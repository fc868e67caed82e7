"""Low-rank compensation of a quantized weight's error, fitted on calibration activations (EoRA-style:
arXiv 2410.21271, "eigenspace low-rank approximation").

A Linear y = W x quantized to Q leaves the error E = W − Q. On the calibration inputs X (rows x), the output error
is ‖X Eᵀ‖²_F = n/2 · tr(E H Eᵀ) with H = 2XᵀX/n (the statistics emq.checkpoint.layerwise captures for GPTQ). A rank-r
term L = B A (B: out × r, A: r × in) added to Q leaves ‖(E − L) S‖²_F with S = H^½. The best L of rank r in that
norm (Eckart-Young in the eigenspace of H) is

    H = U Λ Uᵀ,  S = U Λ^½ Uᵀ,  E S ≈ P_r Σ_r V_rᵀ (truncated SVD),  B = P_r Σ_r,  A = V_rᵀ S⁺

(S⁺ the pseudo-inverse over the eigenvalues H has). Its output error is the tail Σ_{i>r} σ_i² of E S, never more
than ‖E S‖² (no compensation) and non-increasing in r — exactly, not only in expectation: every row of E S lies in
the range of S, so A S = V_rᵀ. Directions the calibration never excites (λ = 0) get no compensation.

The factors are served as a LoRA beside the fine-tune's own: W4A16(base) + B A + the adapter, one LoRA of rank
(adapter rank + r). Pure torch; float64 inside (the eigenvalues of H span many decades), float32 out.

Above EXACT_MAX rows and columns (7B-sized Linears: a full float64 SVD per Linear costs seconds) the top-r subspace
of E S comes from a seeded randomized range finder (Halko, Martinsson & Tropp 2011: oversampling and power
iterations, `torch.svd_lowrank`'s method) instead. The fit stays the projection of E S onto an r-dimensional
subspace, so it still never raises the output error; it is the best rank-r term only up to the range finder's
accuracy (`tests/checkpoint/test_compensation.py` bounds the gap on a synthetic layer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EIG_FLOOR = 1e-10  # eigenvalues below this × the largest are treated as 0 (directions the calibration never saw)
EXACT_MAX = 2048  # a Linear with more rows and more columns than this gets the randomized range finder
OVERSAMPLE, POWER_ITERATIONS, SEED = 16, 4, 0


@dataclass(frozen=True)
class Compensation:
    """A rank-r compensation B A of one Linear's quantization error, and what it leaves on the calibration inputs.

    Attributes:
        b: [out, r] float32.
        a: [r, in] float32.
        error_before: tr(E H Eᵀ) / tr(W H Wᵀ): the quantization's output error on the calibration inputs, relative
            to the output's own energy (0 when W is 0).
        error_after: the same with B A added.
    """

    b: torch.Tensor
    a: torch.Tensor
    error_before: float
    error_after: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def output_error(error: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(E H Eᵀ): the output error of the weight error E on inputs whose statistics are H (∝ ‖X Eᵀ‖²)."""
    e = error.double()
    return float(((e @ hessian.double()) * e).sum())


def hessian_root(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, S⁺): the symmetric square root of H (symmetrized, float64) and its pseudo-inverse."""
    h = hessian.double()
    h = (h + h.T) / 2
    lam, u = torch.linalg.eigh(h)
    keep = lam > EIG_FLOOR * max(float(lam.max()), 0.0)
    root = torch.where(keep, lam.clamp(min=0).sqrt(), torch.zeros_like(lam))
    inv = torch.where(keep, 1 / root.where(keep, torch.ones_like(root)), torch.zeros_like(lam))
    return (u * root) @ u.T, (u * inv) @ u.T


def fit(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor, rank: int,
        root: tuple[torch.Tensor, torch.Tensor] | None = None) -> Compensation:
    """The best rank-`rank` term B A to add to `quantized` (the dequantized W4A16 weight) so that its outputs on the
    calibration inputs come closest to `weight`'s (module docstring).

    Args:
        weight: [out, in] the weight the quantized one stands for (for a QLoRA: dequant(NF4(W)), the base the
            adapter was trained on).
        quantized: [out, in] the dequantized quantized weight.
        hessian: [in, in] H = 2XᵀX/n of the Linear's calibration inputs (emq.checkpoint.hessian).
        rank: r ≥ 0 (0: no compensation; capped at min(out, in)).
        root: `hessian_root(hessian)`, when the caller already has it (refitting against the same inputs).
    """
    if weight.shape != quantized.shape or tuple(hessian.shape) != (weight.shape[1],) * 2:
        raise ValueError(f"shapes: weight {tuple(weight.shape)}, quantized {tuple(quantized.shape)}, "
                         f"hessian {tuple(hessian.shape)}")
    if rank < 0:
        raise ValueError(f"rank={rank} must be ≥ 0")
    w, e = weight.double(), weight.double() - quantized.double()
    root, pinv = root if root is not None else hessian_root(hessian)
    energy = output_error(w, hessian) or 1.0
    before = output_error(e, hessian) / energy
    r = min(rank, *e.shape)
    if r == 0:
        return Compensation(e.new_zeros(e.shape[0], 0).float(), e.new_zeros(0, e.shape[1]).float(), before, before)
    p, sigma, vh = top_singular(e @ root, r)
    b = p * sigma
    a = vh @ pinv
    after = output_error(e - b @ a, hessian) / energy
    return Compensation(b.float(), a.float(), before, after)


def top_singular(m: torch.Tensor, r: int, exact: bool | None = None) -> tuple[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
    """The top-r singular triplets (P_r, σ_r, V_rᵀ) of m: its full SVD when m is at most EXACT_MAX on a side (or
    `exact`), else a randomized range finder seeded with SEED (the same m gives the same factors on one device)."""
    if exact if exact is not None else min(m.shape) <= EXACT_MAX:
        p, sigma, vh = torch.linalg.svd(m, full_matrices=False)
        return p[:, :r], sigma[:r], vh[:r]
    g = torch.Generator(m.device).manual_seed(SEED)
    q = torch.linalg.qr(m @ torch.randn(m.shape[1], min(r + OVERSAMPLE, *m.shape), generator=g, device=m.device,
                                        dtype=m.dtype)).Q
    for _ in range(POWER_ITERATIONS):  # each pass sharpens the subspace towards the top singular vectors
        q = torch.linalg.qr(m @ torch.linalg.qr(m.T @ q).Q).Q
    u, sigma, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ u)[:, :r], sigma[:r], vh[:r]


def alternate(weight: torch.Tensor, hessian: torch.Tensor, rank: int, quantize, rounds: int) -> tuple[torch.Tensor,
                                                                                                    Compensation]:
    """Quantization and compensation fitted together (LoftQ's alternation, in H's eigenspace): Q = quantize(W − L),
    then L = the best rank-r fit of W − Q, `rounds` times. Each round starts from the last one's L, so the low-rank
    term carries what the grid cannot, and the grid no longer spends its steps on it.

    Args:
        quantize: the dequantized quantization of a weight ([out, in] → [out, in]).
        rounds: ≥ 1 (1: quantize W, then fit: `fit` alone).

    Returns:
        (the dequantized Q of the round kept, its compensation): the round whose output error is lowest.
    """
    root = hessian_root(hessian)
    low = torch.zeros_like(weight, dtype=torch.float32)
    best = None
    for _ in range(max(1, rounds)):
        q = quantize((weight.float() - low).to(weight.dtype))
        c = fit(weight, q, hessian, rank, root=root)
        if best is None or c.error_after < best[1].error_after:
            best = (q, c)
        low = c.b @ c.a
    return best
