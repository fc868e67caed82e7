"""Why merged + in-flight bnb erases a QLoRA adapter, on a synthetic layer: dequant(NF4(W)) lies on the NF4 grid,
so re-quantizing it plus a small low-rank update (the size a fine-tune's s·B·A has) rounds back to NF4(W)."""
from __future__ import annotations

import torch

from emq.checkpoint.nf4 import nf4_roundtrip

NF4 = {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}


def _codes(w: torch.Tensor):
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(w, blocksize=NF4["blocksize"], quant_type="nf4", compress_statistics=True)
    return packed, dequantize_4bit(packed, state)


def test_requantizing_a_qlora_merge_returns_the_base_codes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 512, generator=g) * 0.02
    base = nf4_roundtrip(w, "cpu", NF4)  # the weights the adapter was trained on
    b, a = torch.randn(512, 8, generator=g), torch.randn(8, 512, generator=g)
    update = b @ a
    base_codes, _ = _codes(base)
    kept = {}
    for size in (0.02, 0.05, 0.1):  # |s·B·A| as a share of |W|: fine-tunes sit at the low end
        delta = update * (size * w.abs().mean() / update.abs().mean())
        codes, served = _codes(base + delta)  # what vLLM's in-flight bnb serves of the merged checkpoint
        same = (codes == base_codes).float().mean().item()
        kept[size] = (((served - base) * delta).sum() / (delta * delta).sum()).item()  # the update's share served
        if size == 0.02:
            assert same > 0.999, same  # every NF4 code but a handful is the base's: the adapter is rounded away
    assert kept[0.02] < 0.05 < kept[0.05] < kept[0.1], kept  # measured 0.017, 0.33, 0.85
    # 16-bit serving keeps a 2 % update: bf16's relative step is 2^-8
    delta = update * (0.02 * w.abs().mean() / update.abs().mean())
    bf16 = (base + delta).to(torch.bfloat16).float() - base
    assert ((bf16 * delta).sum() / (delta * delta).sum()).item() > 0.9


def test_retained_is_the_share_of_the_fine_tune_kept():
    from emq.fidelity import retained

    base = {"kl_mean": 1.0, "top1_agreement": 0.5}
    assert retained({"kl_mean": 0.25, "top1_agreement": 0.9}, base, 0.5) == {
        "retained": 0.75, "retained_top1": 0.8, "kl_trained_vs_base": 1.0, "top1_trained_vs_base": 0.5,
        "min_retained": 0.5, "mostly_base": False}
    erased = retained({"kl_mean": 1.07, "top1_agreement": 0.499}, base, 0.5)
    assert erased["retained"] == 0 and erased["mostly_base"]  # clipped: worse than the base is nothing kept
    assert retained({"kl_mean": 0.1, "top1_agreement": 0.9}, None, 0.5) is None
