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

One judge per sweep (issue 16 §3): `python benchmarks/sweep_bench.py judge` runs the demo's lora_vs_bnb sweep twice,
whole processes, the local demo judge once per job (judge.scope=run) and once for the sweep (judge.scope=sweep),
and prints each side's wall, judge server starts and seconds, and the sweep's wall against the sum of its
generation, judging and one engine start per variant (target ≤ 1.3x). `--no-fidelity` runs both benches without
the fidelity stage (`eval.fidelity.enabled=false`), the work the issue's formula leaves out; `--scopes sweep` runs
one side only.

    python benchmarks/sweep_bench.py judge --max-tokens 48 --no-fidelity --scopes sweep
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
    out = {"answers": len(keys), "identical": same,
           "first_difference_chars": float(np.median(prefix)) if prefix else None}
    if not (a / "fidelity_logprobs.npz").is_file():  # --no-fidelity
        return {**out, "kl_between": float("nan"), "top1_between": float("nan"), "kl_to_trained": (np.nan, np.nan)}
    fa, fb = TopK.load(a / "fidelity_logprobs.npz"), TopK.load(b / "fidelity_logprobs.npz")
    between = compare(fa, fb)
    ka = json.loads((a / "fidelity.json").read_text())["vs_reference"]["kl_mean"]
    kb = json.loads((b / "fidelity.json").read_text())["vs_reference"]["kl_mean"]
    return {**out, "kl_between": between["kl_mean"], "top1_between": between["top1_agreement"],
            "kl_to_trained": (ka, kb)}


def judge_seconds(d: Path) -> tuple[float, float, str]:
    """(judge server start s, judging s, which server) of one run: its own stages and server, or the sweep-end
    judge's record in metrics.json (the sweep's servers are numbered)."""
    st = json.loads((d / "status.json").read_text())["stage_seconds"]
    j = json.loads((d / "metrics.json").read_text()).get("judge") or {}
    if j.get("sweep"):
        return (float(j["sweep"].get("server_start_seconds") or 0.0), float(j.get("seconds") or 0.0),
                f"sweep server {j['sweep'].get('server', 0)}")
    return float(st.get("judge start", 0.0)), float(st.get("judge", 0.0)), f"{d.name}'s own"


def no_fidelity(args) -> list[str]:
    return ["eval.fidelity.enabled=false"] if args.no_fidelity else []


def judge_bench(args) -> None:
    """lora_vs_bnb with the local demo judge per job vs one per sweep; see the module docstring."""
    from emq.report.sweep import find_runs

    common = [f"eval={args.eval}", f"eval.max_tokens={args.max_tokens}", "judge=local", *no_fidelity(args)]
    with tempfile.TemporaryDirectory(prefix="sweep_bench_") as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        sides = {}
        for scope in args.scopes.split(","):
            sweep = root / f"scope_{scope}"
            wall = emq(["-m", "+experiment=lora_vs_bnb", *common, f"judge.scope={scope}", f"hydra.sweep.dir={sweep}"],
                       root / f"scope_{scope}.log")
            runs = find_runs([sweep])
            stages: dict[str, float] = {}
            for d in runs:
                for k, v in json.loads((d / "status.json").read_text())["stage_seconds"].items():
                    stages[k] = stages.get(k, 0.0) + v
            judged = [judge_seconds(d) for d in runs]
            starts = {server: start for start, _, server in judged}  # a shared server is started once
            sides[scope] = {"wall": wall, "runs": len(runs), "stages": stages, "judge_starts": len(starts),
                            "judge_start_s": sum(starts.values()), "judge_s": sum(j for _, j, _ in judged),
                            "answers": sum(len((d / "generations.jsonl").read_text().splitlines()) for d in runs)}
        cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        print("# sweep_bench judge: lora_vs_bnb on the demo, the local judge per job vs one per sweep\n")
        print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {os.cpu_count()} cores; eval={args.eval}, "
              f"max_tokens={args.max_tokens}, judge=local (the demo judge), "
              f"fidelity {'off' if args.no_fidelity else 'on'}; "
              f"one process per side, in the order {args.scopes}\n")
        print("| judge.scope | runs | answers | wall s | judge starts | judge start s | judging s | engine start s | "
              "generate s | fidelity s | other stages s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for scope, x in sides.items():
            st = x["stages"]
            named = st.get("load", 0) + st.get("generate", 0) + st.get("fidelity", 0)
            rest = sum(st.values()) - named - st.get("judge start", 0) - st.get("judge", 0)
            print(f"| {scope} | {x['runs']} | {x['answers']} | {x['wall']:.1f} | {x['judge_starts']} | "
                  f"{x['judge_start_s']:.1f} | {x['judge_s']:.1f} | {st.get('load', 0):.1f} | {st.get('generate', 0):.1f}"
                  f" | {st.get('fidelity', 0):.1f} | {rest:.1f} |")
        sweep_ = sides["sweep"]
        parts = sweep_["stages"].get("generate", 0) + sweep_["judge_s"] + sweep_["stages"].get("load", 0) \
            + sweep_["judge_start_s"]
        if "run" in sides:
            run_ = sides["run"]
            print(f"\nwall, one judge per sweep / per job: **{sweep_['wall'] / run_['wall']:.3f}** "
                  f"({sweep_['wall']:.0f} vs {run_['wall']:.0f} s; judge server starts {sweep_['judge_starts']} vs "
                  f"{run_['judge_starts']}, {sweep_['judge_start_s']:.0f} vs {run_['judge_start_s']:.0f} s)")
        print(f"one judge per sweep: wall / (generation + judging + one start per engine, {sweep_['runs']} engines and "
              f"1 judge server) = {sweep_['wall']:.0f} / {parts:.0f} = **{sweep_['wall'] / parts:.2f}x** (target ≤ 1.3); "
              f"with every stage (merge, quantize, reference, fidelity, engine stop, …): "
              f"{sweep_['wall']:.0f} / {sum(sweep_['stages'].values()) + sweep_['judge_s'] + sweep_['judge_start_s']:.0f}"
              f" = {sweep_['wall'] / (sum(sweep_['stages'].values()) + sweep_['judge_s'] + sweep_['judge_start_s']):.2f}x")
        fid = sweep_["stages"].get("fidelity", 0)
        if fid:
            print(f"counting the fidelity stage as engine work (the corpus teacher-forced through the same engines, at "
                  f"their speed): {sweep_['wall']:.0f} / {parts + fid:.0f} = **{sweep_['wall'] / (parts + fid):.2f}x**")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", nargs="?", choices=["adapters", "judge"], default="adapters",
                   help="adapters: one engine vs one per job (default); judge: one judge per sweep vs per job")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--quant", default="none")
    p.add_argument("--eval", default="quick")
    p.add_argument("--no-fidelity", action="store_true", help="both sides without the fidelity stage")
    p.add_argument("--scopes", default="run,sweep", choices=["run,sweep", "sweep"],
                   help="judge: both judge.scope sides (the ratio needs both), or the sweep side alone (the 1.3x)")
    p.add_argument("--keep", type=Path, help="keep the run dirs here (default: a temp dir, removed)")
    args = p.parse_args()
    if args.what == "judge":
        return judge_bench(args)
    common = [f"quant={args.quant}", "judge=none", f"eval={args.eval}", f"eval.max_tokens={args.max_tokens}",
              *no_fidelity(args)]
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
              f"eval={args.eval}, max_tokens={args.max_tokens}, judge=none, "
              f"fidelity {'off' if args.no_fidelity else 'on'}; one process per side, "
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
