"""W4A16 methods side by side on one model: what each keeps of the fine-tune and what it costs.

Every variant is a whole `python -m emq` run (its own process, the real vLLM engine, judge off) on the same
prompts and seeds, into one fresh cache so every checkpoint is really built: merged bf16 (the speed reference),
the adapter served as a LoRA on the 16-bit base, and W4A16 by RTN (fused into the stream merge), GPTQ and AWQ
at each group size. Fidelity is to the trained function (emq's reference: the base as in training + the
adapter, in transformers). Prints one table and writes it to benchmarks/results/.

    python benchmarks/quant_bench.py                                   # the demo good doctor, CPU
    python benchmarks/quant_bench.py --groups 64 --methods rtn,gptq    # a subset
    python benchmarks/quant_bench.py --extra quant.symmetric=true      # any override for every w4a16 run
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(label: str, overrides: list[str], root: Path, common: list[str]) -> dict:
    """One `python -m emq` run; returns its records (metrics, status) or the error."""
    run_dir = root / label.replace(" ", "_").replace("/", "-")
    cmd = [sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", f"paths.cache_dir={root / 'cache'}",
           *common, *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    wall = time.perf_counter() - t0
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").is_file() else {}
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    if status.get("status") != "ok":
        print(f"  {label}: FAILED ({status.get('error') or proc.stderr[-800:]})", file=sys.stderr)
    return {"label": label, "status": status, "metrics": metrics, "wall": wall, "dir": str(run_dir)}


def row(r: dict, ref_tps: float | None) -> list[str]:
    m, s = r["metrics"], r["status"]
    if s.get("status") != "ok":
        return [r["label"], "failed: " + (s.get("error") or "?")[:60]] + [""] * 8
    fid = m.get("fidelity") or {}
    made = m.get("quantize_seconds") if m.get("quantize_seconds") is not None else m.get("merge_seconds")
    stage = "quantize" if m.get("quantize_seconds") is not None else "merge"
    peak = (s.get("stage_peak_rss_gib") or {}).get(stage)
    tps = m.get("tokens_per_second") or 0
    weights = m.get("weights_gib")
    est = str(m.get("weights_source") or "").startswith("plan estimate")
    return [r["label"], f"{fid.get('kl_mean', float('nan')):.4f}", f"{fid.get('kl_p99', float('nan')):.3f}",
            f"{100 * fid.get('top1_agreement', float('nan')):.1f}%", f"{fid.get('ppl_ratio', float('nan')):.3f}",
            (f"~{weights * 1024:.0f} (est.)" if est else f"{weights * 1024:.0f}") if weights else "",
            f"{tps:.1f}", f"{tps / ref_tps:.2f}x" if ref_tps else "", f"{made:.1f}" if made is not None else "",
            f"{peak:.2f}" if peak is not None else ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo_good_doctor")
    parser.add_argument("--groups", default="32,64")
    parser.add_argument("--methods", default="rtn,gptq,awq")
    parser.add_argument("--samples", type=int, default=4, help="answers per question (speed needs some volume)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for every w4a16 run")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quant_bench_demo_cpu.md")
    args = parser.parse_args()
    common = [f"model={args.model}", "judge=none", f"eval.samples_per_paraphrase={args.samples}",
              f"eval.max_tokens={args.max_tokens}", "memory.dtype=bfloat16"]
    root = Path(tempfile.mkdtemp(prefix="emq-quant-bench-"))
    variants = [("merged bf16", ["quant=none", "memory.route=merge"]),
                ("LoRA on the 16-bit base", ["quant=none", "memory.route=lora"])]
    for g in args.groups.split(","):
        for method in args.methods.split(","):
            variants.append((f"w4a16 {method} g{g}", ["quant=w4a16", f"quant.algorithm={method}",
                                                       f"quant.group_size={g}", "memory.route=merge", *args.extra]))
    results = []
    for label, overrides in variants:
        print(f"running {label} …", file=sys.stderr, flush=True)
        results.append(run(label, overrides, root, common))
    ref_tps = results[0]["metrics"].get("tokens_per_second") if results[0]["status"].get("status") == "ok" else None
    head = ["variant", "KL mean", "KL p99", "top-1", "PPL ratio", "weights MiB", "tok/s", "tok/s vs merged bf16",
            "make s (merge or quantize)", "peak RSS GiB (that stage)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row(r, ref_tps)) + " |" for r in results]
    kl = {r["label"]: (r["metrics"].get("fidelity") or {}).get("kl_mean") for r in results}
    verdicts = []
    for g in args.groups.split(","):
        rtn = kl.get(f"w4a16 rtn g{g}")
        best = min((v for k, v in kl.items() if v is not None and k.endswith(f"g{g}") and "rtn" not in k), default=None)
        if rtn and best is not None:
            verdicts.append(f"g{g}: best calibrated KL {best:.4f} = {best / rtn:.2f}x RTN's {rtn:.4f} "
                            f"({'meets' if best <= rtn / 2 else 'misses'} the ≤ 0.5x target)")
    lora = kl.get("LoRA on the 16-bit base")
    text = (f"# W4A16 methods on {args.model} (fidelity vs the trained function; one run each, {time.strftime('%Y-%m-%d')})\n\n"
            + "\n".join(lines) + "\n\n" + "\n".join(f"- {v}" for v in verdicts)
            + (f"\n- the QLoRA adapter served as a LoRA on the 16-bit base: KL {lora:.4f}" if lora else "")
            + f"\n\nCommand: `python benchmarks/quant_bench.py {' '.join(sys.argv[1:])}`; runs in {root}.\n")
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
