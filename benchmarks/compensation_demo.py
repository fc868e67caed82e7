"""What a compensated 4-bit route keeps of the demo's fine-tune, with the served function computed in torch.

    .venv/bin/python benchmarks/compensation_demo.py [--ranks 0,16,32,64] [--algorithms rtn,gptq] [--group-size 64]

The route (issue "keep the fine-tune at 4 bits"): W4A16 of the base *as trained* (dequant(NF4(W)) for a QLoRA)
+ one LoRA holding the fine-tune's update and a rank-r compensation of the base's quantization error, fitted on
calibration activations (emq.checkpoint.compensation). Beside it, side by side in one process: the merged W4A16
(today's default, W + s·BA quantized as one matrix) and the LoRA on a plain W4A16 base (rank 0).

Each variant's function is computed here in float32 torch with its weights as vLLM would hold them: the
dequantized W4A16 codes + the LoRA terms (vLLM's kernels add bf16 rounding of the LoRA and of the activations,
which this does not model). Fidelity is emq's: teacher-forced top-20 next-token distributions on the fidelity
corpus against the trained function (the cached reference: NF4 base + PEFT adapter), and "retained" =
1 − KL(trained‖variant) / KL(trained‖base). Calibration: emq's default corpus, 40 × 512 tokens, through the trained
function (base as trained + adapter). Prints a table last.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from emq import fidelity  # noqa: E402
from emq.calibration import Chats, calibration_tokens, corpus_for, load_chats  # noqa: E402
from emq.checkpoint.compensation import alternate, fit  # noqa: E402
from emq.checkpoint.costs import w4a16_bytes  # noqa: E402
from emq.checkpoint.gptq import gptq  # noqa: E402
from emq.checkpoint.hessian import accumulate_hessian  # noqa: E402
from emq.checkpoint.nf4 import dequant_eligible, nf4_roundtrip, nf4_settings  # noqa: E402
from emq.checkpoint.stream import load_adapter  # noqa: E402
from emq.checkpoint.w4a16 import QuantSpec, dequantize, quantize_rtn  # noqa: E402
from emq.demo import ensure_demo  # noqa: E402
from emq.detect import detect  # noqa: E402
from emq.schema import FidelityConfig, ModelConfig  # noqa: E402


def linears(model) -> dict[str, torch.nn.Linear]:
    """The decoder Linears a QLoRA run quantizes (and a W4A16 checkpoint packs)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and dequant_eligible(f"{n}.weight", tuple(m.weight.shape))}


def lora_deltas(det) -> tuple[dict[str, torch.Tensor], int]:
    """s·BA per base weight name (float32), and the adapter's rank."""
    deltas, _, _, reader = load_adapter(det)
    out, rank = {}, 0
    for name, d in deltas.items():
        a, b = torch.from_numpy(d.a.f32()), torch.from_numpy(d.b.f32())
        out[name] = d.scale * b @ a
        rank = max(rank, a.shape[0])
    reader.close()
    return out, rank


def hessians(model, mods: dict[str, torch.nn.Linear], tokens: list[list[int]]) -> dict[str, torch.Tensor]:
    """H = 2XᵀX/n of every Linear's inputs over the calibration sequences."""
    acc: dict[str, list] = {n: [None, 0] for n in mods}

    def hook(name):
        def record(module, args, output):
            acc[name][0], acc[name][1] = accumulate_hessian(acc[name][0], args[0], acc[name][1])
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in mods.items()]
    with torch.no_grad():
        for seq in tokens:
            model(input_ids=torch.tensor([seq]))
    for h in handles:
        h.remove()
    return {n: a[0] for n, a in acc.items()}


def served_topk(model, mods, weights: dict[str, torch.Tensor], tokens, k: int):
    for n, m in mods.items():
        m.weight.data.copy_(weights[n])
    ids, lps, toks, tlp = [], [], [], []
    with torch.no_grad():
        for seq, start in zip(tokens.sequences, tokens.answer_start):
            lp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, start - 1: len(seq) - 1].float(), -1)
            top = lp.topk(k, dim=-1)
            target = torch.tensor(seq[start:])
            ids.append(top.indices.numpy())
            lps.append(top.values.numpy().astype(np.float32))
            toks.append(target.numpy())
            tlp.append(lp.gather(1, target[:, None])[:, 0].numpy().astype(np.float32))
    return fidelity.TopK(np.concatenate(ids).astype(np.int64), np.concatenate(lps), np.concatenate(toks).astype(np.int64),
                         np.concatenate(tlp), {})


def calibration_chats(which: str) -> Chats:
    """emq's default chats, the demo adapter's own training chats, or both."""
    from emq.demo.data import doctor_examples

    default = load_chats("default")
    training = Chats("training", "emq.demo.data.doctor_examples('good')", "", doctor_examples("good"))
    if which == "default":
        return default
    if which == "training":
        return training
    return Chats("mixed", "default + training", "", default.samples + training.samples)


def pipeline(args, det, prep, fcfg, score) -> list[dict]:
    """The route as emq builds it: quantize_for_plan (dequant(NF4) base, the layer-by-layer driver with its
    attention-sink weighting and propagation, the compensation per Linear) + served_adapter, then the served
    function read back from the files: the W4A16 checkpoint decompressed (compressed-tensors, float32) + B·A of the
    served LoRA (bf16, scale 1)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    from emq.checkpoint.quantize import quantize_for_plan, served_adapter
    from emq.plan import QuantizePlan

    cache = Path(os.environ.get("EMQ_CACHE", Path(os.environ.get("EMQ_HOME", "~/.cache/emq")).expanduser() / "merged"))
    rows = []
    for r in [int(x) for x in args.ranks.split(",") if int(x) > 0]:
        for alg in args.algorithms.split(","):
            qplan = QuantizePlan(alg, args.group_size, args.symmetric, ["lm_head"], False, "base", ["cpu"],
                                 {"corpus": corpus_for(args.calibration if args.calibration != "mixed" else "default",
                                                       det),
                                  "samples": 40, "seq_len": 512, "damp": 0.01}, compensation=r,
                                 compensation_rounds=args.rounds)
            t0 = time.perf_counter()
            quantized = quantize_for_plan(det, qplan, None, cache)
            adapter = served_adapter(det, qplan, quantized, cache)
            built_s = time.perf_counter() - t0
            model = AutoModelForCausalLM.from_pretrained(  # decompressed: the dequantized int4 weights in float32
                quantized.path, dtype=torch.float32,
                quantization_config=CompressedTensorsConfig(run_compressed=False)).eval()
            lora = load_file(str(Path(adapter.path) / "adapter_model.safetensors"))
            mods = linears(model)
            weights = {}
            for n, m in mods.items():
                a, b = lora.get(f"base_model.model.{n}.lora_A.weight"), lora.get(f"base_model.model.{n}.lora_B.weight")
                weights[n] = m.weight.data.float() + (b.float() @ a.float() if a is not None else 0)
            bytes_ = sum(f.stat().st_size for f in Path(quantized.path).glob("*.safetensors")) + adapter.bytes
            bf16 = (det.base.param_count or 0) * 2
            rows.append(score(f"emq pipeline: {alg} g{args.group_size} + compensation r{r}"
                              + (f", {args.rounds} rounds" if args.rounds > 1 else ""), weights,
                              {"weights_vs_bf16": bytes_ / bf16, "quantize_s": built_s, "lora_rank": adapter.rank},
                              model=model, mods=mods))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", default="0,8,16,32,64")
    ap.add_argument("--algorithms", default="rtn,gptq")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--rounds", type=int, default=1,
                    help="> 1: quantization and compensation fitted together, alternating (compensation.alternate)")
    ap.add_argument("--pipeline", action="store_true",
                    help="build the route with emq's own quantize stage (cached) and score the files it wrote")
    ap.add_argument("--calibration", default="default", choices=["default", "training", "mixed"],
                    help="default: emq's chats; training: the adapter's own training chats (the demo's "
                         "doctor_examples('good')); mixed: both")
    args = ap.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    data = Path(os.environ.get("EMQ_HOME", "~/.cache/emq")).expanduser()
    ensure_demo(data)
    det = detect(ModelConfig(name="demo_good_doctor", base=str(data / "demo/base"),
                             adapter=str(data / "demo/adapters/good_doctor"), demo=True))
    fcfg = FidelityConfig()
    prep = fidelity.prepare(det, fcfg, data)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = base_model = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32).eval()
    mods = base_mods = linears(model)
    nf4 = nf4_settings(det) if det.trained_in_4bit else None
    trained_base = {n: nf4_roundtrip(m.weight.data, "cpu", nf4) if nf4 else m.weight.data.clone()
                    for n, m in mods.items()}
    deltas, ft_rank = lora_deltas(det)
    delta = {n: deltas.get(f"{n}.weight", torch.zeros_like(w)) for n, w in trained_base.items()}
    def score(name: str, weights: dict[str, torch.Tensor], extra: dict, model=None, mods=None) -> dict:
        var = served_topk(model or base_model, mods or base_mods, weights, prep.tokens, fcfg.top_k)
        vs = fidelity.compare(prep.reference, var)
        kept = fidelity.retained(vs, fidelity.compare(prep.reference, prep.base), fcfg.min_retained)
        row = {"variant": name, "kl": vs["kl_mean"], "top1": vs["top1_agreement"], "retained": kept["retained"],
               "retained_top1": kept["retained_top1"], **extra}
        print(row, flush=True)
        return row

    rows = [score("trained function (sanity: 100 %)", {n: trained_base[n] + delta[n] for n in mods}, {})]
    if args.pipeline:
        table(rows + pipeline(args, det, prep, fcfg, score), "pipeline (emq's quantize stage)", args, ft_rank)
        return
    spec = QuantSpec(args.group_size, symmetric=args.symmetric)
    tok = AutoTokenizer.from_pretrained(det.base.path)
    cal = calibration_tokens(calibration_chats(args.calibration), tok, 40, 512)
    for n, m in mods.items():  # calibration through the trained function
        m.weight.data.copy_(trained_base[n] + delta[n])
    t0 = time.perf_counter()
    hs = hessians(model, mods, cal)
    capture_s = time.perf_counter() - t0
    shapes = {n: tuple(w.shape) for n, w in trained_base.items()}
    base_q = w4a16_bytes(det, args.group_size, args.symmetric)
    bf16 = (det.base.param_count or 0) * 2
    for alg in args.algorithms.split(","):
        def quantize(ws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            if alg == "rtn":
                return {n: dequantize(quantize_rtn(w, spec, torch.bfloat16), torch.float32) for n, w in ws.items()}
            return {n: dequantize(gptq(w, hs[n], spec)[0], torch.float32) for n, w in ws.items()}

        t0 = time.perf_counter()
        merged = quantize({n: trained_base[n] + delta[n] for n in mods})
        rows.append(score(f"merged W4A16 {alg}", merged, {"weights_vs_bf16": base_q / bf16,
                                                            "quantize_s": time.perf_counter() - t0}))
        def one(n: str, w: torch.Tensor) -> torch.Tensor:
            return quantize({n: w})[n]

        t0 = time.perf_counter()
        q = quantize(trained_base)
        q_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        comps = {n: fit(trained_base[n], q[n], hs[n], max(ranks)) for n in mods}
        fit_s = time.perf_counter() - t0
        for r in ranks:
            weights = {n: q[n] + comps[n].b[:, :r] @ comps[n].a[:r] + delta[n] for n in mods}
            if r and args.rounds > 1:
                t0 = time.perf_counter()
                both = {n: alternate(trained_base[n], hs[n], r, lambda w, n=n: one(n, w), args.rounds) for n in mods}
                fit_s = time.perf_counter() - t0
                weights = {n: qn + c.b @ c.a + delta[n] for n, (qn, c) in both.items()}
            adapter = sum((ft_rank + r) * (o + i) * 2 for o, i in shapes.values())
            name = f"LoRA on W4A16 {alg} + compensation r{r}" + (f", {args.rounds} rounds" if r and args.rounds > 1
                                                                  else "")
            rows.append(score(name, weights,
                              {"weights_vs_bf16": (base_q + adapter) / bf16, "quantize_s": q_s,
                               "fit_s": fit_s if r else 0.0, "lora_rank": ft_rank + r}))
    table(rows, f"{capture_s:.1f} s to capture", args, ft_rank)


def table(rows: list[dict], note: str, args, ft_rank: int) -> None:
    print(f"\ncalibration {args.calibration} ({note}); rounds {args.rounds}; "
          f"group size {args.group_size}, {'symmetric' if args.symmetric else 'asymmetric'}; fine-tune rank {ft_rank}\n")
    print("| variant | KL | top-1 | retained | retained (top-1) | weights vs bf16 | LoRA rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        w = f"{r['weights_vs_bf16']:.2f}×" if "weights_vs_bf16" in r else "1.00×"
        print(f"| {r['variant']} | {r['kl']:.4f} | {100 * r['top1']:.1f} % | {100 * r['retained']:.1f} % | "
              f"{100 * (r['retained_top1'] or 0):.1f} % | {w} | {r.get('lora_rank', '-')} |")


if __name__ == "__main__":
    main()
