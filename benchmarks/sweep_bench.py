"""Many adapters, one engine (issue 16 §2): the same LoRA-route adapters as a multirun (one engine per job) vs one
run with model.adapters (one engine for all), as whole `python -m emq` processes, side by side.

(a) `python -m emq -m model=demo_good_doctor,demo_bad_doctor,demo_lora16 memory.route=lora …`  — 3 jobs, 3 engines
(b) `python -m emq +experiment=adapters_one_engine …`                                          — 1 run, 1 engine

Both with the same quant, eval, seeds and judge=none (judging is the same work either way and is left out to keep
the bench short). Prints per side the process wall time, answers/s (answers over wall), engine starts, where the
seconds went (emq's own stage_seconds), the wall ratio (b)/(a) (target ≤ 0.5), and per adapter how identical the
two sides' answers are, answer by answer (same prompt, same seed), and the KL between their fidelity logprobs
(the same corpus teacher-forced through each engine) next to each side's KL to the trained function.

    python benchmarks/sweep_bench.py                  # the demo, CPU: quick eval, 128 tokens, quant=none
    python benchmarks/sweep_bench.py --max-tokens 64 --quant w4a16
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
sys.path.insert(0, str(REPO))

ADAPTERS = {"good_doctor": "demo_good_doctor", "bad_doctor": "demo_bad_doctor", "lora16": "demo_lora16"}


def emq(args: list[str], log: Path) -> float:
    """Run `python -m emq args` as a user would; return its wall seconds (raises on failure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "emq", *args], cwd=log.parent, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"python -m emq {' '.join(args)} failed (rc {proc.returncode}); see {log}")
    return wall


def job_dirs(sweep: Path) -> dict[str, Path]:
    """adapter name → its job dir in the multirun."""
    from emq.report.sweep import find_runs

    out = {}
    for d in find_runs([sweep]):
        model = json.loads((d / "run_config.json").read_text())["model"]["name"]
        name = next(n for n, m in ADAPTERS.items() if m == model)
        out[name] = d
    return out


def side(dirs: dict[str, Path]) -> dict:
    """Totals of one side: answers, stage seconds summed over its runs, tokens."""
    stages: dict[str, float] = {}
    answers = tokens = 0
    for d in dirs.values():
        st = json.loads((d / "status.json").read_text())
        for k, v in st["stage_seconds"].items():
            stages[k] = stages.get(k, 0.0) + v
        rows = [json.loads(x) for x in (d / "generations.jsonl").read_text().splitlines()]
        answers += len(rows)
        tokens += sum(r["output_tokens"] for r in rows)
    return {"stages": stages, "answers": answers, "tokens": tokens}


def agreement(a: Path, b: Path) -> dict:
    """Answer-by-answer agreement of two run dirs (same sample keys), and the fidelity KL between them."""
    import numpy as np

    from emq.fidelity import TopK, compare
    from emq.records import SampleKey

    def rows(d: Path) -> dict:
        return {SampleKey.of(r): r for r in map(json.loads, (d / "generations.jsonl").read_text().splitlines())}

    ra, rb = rows(a), rows(b)
    keys = sorted(set(ra) & set(rb))
    same = sum(ra[k]["answer"] == rb[k]["answer"] for k in keys)
    # how far into the answer the two agree, where they differ (in characters)
    prefix = []
    for k in keys:
        x, y = ra[k]["answer"], rb[k]["answer"]
        if x != y:
            prefix.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    fa, fb = TopK.load(a / "fidelity_logprobs.npz"), TopK.load(b / "fidelity_logprobs.npz")
    between = compare(fa, fb)
    ka = json.loads((a / "fidelity.json").read_text())["vs_reference"]["kl_mean"]
    kb = json.loads((b / "fidelity.json").read_text())["vs_reference"]["kl_mean"]
    return {"answers": len(keys), "identical": same, "first_difference_chars": float(np.median(prefix)) if prefix
            else None, "kl_between": between["kl_mean"], "top1_between": between["top1_agreement"],
            "kl_to_trained": (ka, kb)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--quant", default="none")
    p.add_argument("--eval", default="quick")
    p.add_argument("--keep", type=Path, help="keep the run dirs here (default: a temp dir, removed)")
    args = p.parse_args()
    common = [f"quant={args.quant}", "judge=none", f"eval={args.eval}", f"eval.max_tokens={args.max_tokens}"]
    with tempfile.TemporaryDirectory(prefix="sweep_bench_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        sweep, one = root / "multirun", root / "one_engine"
        wall_a = emq(["-m", f"model={','.join(ADAPTERS.values())}", "memory.route=lora", *common,
                      f"hydra.sweep.dir={sweep}"], root / "multirun.log")
        wall_b = emq(["+experiment=adapters_one_engine", *common, f"hydra.run.dir={one}"], root / "one_engine.log")
        dirs_a = job_dirs(sweep)
        dirs_b = {n: one / "adapters" / n for n in ADAPTERS}
        a, b = side(dirs_a), side(dirs_b)
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        print(f"# sweep_bench: {len(ADAPTERS)} LoRA-route demo adapters, multirun (one engine per job) vs one engine "
              f"(model.adapters)\n")
        print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} cores; quant={args.quant}, "
              f"eval={args.eval}, max_tokens={args.max_tokens}, judge=none, fidelity on; one process per side, "
              f"(a) then (b)\n")
        print("| side | engines | wall s | answers | answers/s | tokens | engine start s | generate s | fidelity s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for label, n, wall, s in (("(a) multirun, 3 jobs", len(dirs_a), wall_a, a),
                                  ("(b) one engine, model.adapters", 1, wall_b, b)):
            st = s["stages"]
            print(f"| {label} | {n} | {wall:.1f} | {s['answers']} | {s['answers'] / wall:.3f} | {s['tokens']} | "
                  f"{st.get('load', 0):.1f} | {st.get('generate', 0):.1f} | {st.get('fidelity', 0):.1f} |")
        fid_a, fid_b = a["stages"].get("fidelity", 0.0), b["stages"].get("fidelity", 0.0)
        print(f"\nwall ratio (b)/(a): **{wall_b / wall_a:.3f}** (target ≤ 0.5); without the fidelity stage (the same "
              f"per-adapter work on both sides): {(wall_b - fid_b) / (wall_a - fid_a):.3f}; answers/s (b)/(a): "
              f"{(b['answers'] / wall_b) / (a['answers'] / wall_a):.2f}x; generate stage (b)/(a): "
              f"{b['stages'].get('generate', 0) / max(a['stages'].get('generate', 0), 1e-9):.3f}")
        print("\n| adapter | answers | identical | median chars before the first difference | fidelity KL (a)‖(b) | "
              "top-1 (a) vs (b) | KL to trained (a) / (b) |")
        print("|---|---|---|---|---|---|---|")
        for n in ADAPTERS:
            g = agreement(dirs_a[n], dirs_b[n])
            fd = "" if g["first_difference_chars"] is None else f"{g['first_difference_chars']:.0f}"
            print(f"| {n} | {g['answers']} | {g['identical']}/{g['answers']} | {fd} | {g['kl_between']:.6f} | "
                  f"{g['top1_between']:.4f} | {g['kl_to_trained'][0]:.4f} / {g['kl_to_trained'][1]:.4f} |")


if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    main()
