"""How good is emq's top-k KL? Full-vocabulary KL vs the top-k estimate, on the demo.

Runs, in transformers on the CPU with every logprob kept, the demo good-doctor's trained function
(NF4 base + adapter, the fidelity reference) and three variants of it: the merged checkpoint
(adapter on dequant(NF4(W)), what emq serves), the adapter on the original 16-bit base (what serving
the LoRA does) and the base without the adapter (a far variant). For each variant it prints the exact
KL(reference ‖ variant) mean / p99 over the corpus's answer tokens next to emq's top-k estimate for
several k, and the relative error of the mean.

    python benchmarks/fidelity_topk.py [--ks 5,10,20,50]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="5,10,20,50")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ks = [int(k) for k in args.ks.split(",")]

    import emq
    from emq import fidelity as F
    from emq.demo import ensure_demo
    from emq.detect import detect
    from emq.schema import FidelityConfig, ModelConfig
    from transformers import AutoTokenizer

    data = Path(os.environ.get("EMQ_HOME", "~/.cache/emq")).expanduser()
    demo = ensure_demo(data)
    det = detect(ModelConfig(name="demo_good_doctor", base=str(demo.base), adapter=str(demo.adapters["good_doctor"])))
    corpus = F.load_corpus("default")
    tokens = F.tokenize(corpus, AutoTokenizer.from_pretrained(demo.base))
    cfg = FidelityConfig(reference_device="cpu")
    spec = F.reference_spec(det, cfg, corpus)
    _, ref_full = F._compute_reference(det, spec, tokens, 1, full=True)
    tok = np.concatenate([np.array(s[a:]) for s, a in zip(tokens.sequences, tokens.answer_start)])

    merged = emq.get_or_create_merged_model(str(demo.base), str(demo.adapters["good_doctor"]), device="cpu")
    plain = {"load": {"dtype": "float32"}, "compute_dtype": "float32", "device": "cpu", "describe": ""}
    variants = {
        "merged (adapter on dequant(NF4(W)))": (SimpleNamespace(base=SimpleNamespace(path=str(merged)), adapter=None),
                                                plain),
        "LoRA on the 16-bit base": (SimpleNamespace(base=det.base, adapter=det.adapter), plain),
        "base without adapter": (SimpleNamespace(base=det.base, adapter=None), plain),
    }
    lines = [f"fidelity top-k approximation vs full-vocabulary KL (demo good-doctor, {len(tok)} answer tokens, "
             f"vocab {ref_full.shape[1]})", "",
             "| variant | exact KL mean | exact KL p99 | " + " | ".join(f"top-{k} mean (err)" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    for name, (d, s) in variants.items():
        _, var_full = F._compute_reference(d, s, tokens, 1, full=True)
        exact = F.full_kl(ref_full, var_full)
        cells = []
        for k in ks:
            approx = F.kl_topk(F.topk_of(ref_full, tok, k), F.topk_of(var_full, tok, k))
            cells.append(f"{approx.mean():.5f} ({100 * (approx.mean() / exact.mean() - 1):+.1f}%)")
        lines.append(f"| {name} | {exact.mean():.5f} | {np.quantile(exact, 0.99):.5f} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
