"""GPU check for issue 16 (time to answer for many adapters), in phases that each fit one 600 s device call.

    python3 scripts/gpu/time_check.py one [--cache fresh|keep] [--tag T] [--extra OVERRIDE ...]
        7b-gqa shape, 4 adapters (r=32, seeds 1-4) served by ONE `python -m emq` run (model.adapters, multi-LoRA)
    python3 scripts/gpu/time_check.py jobs [--cache fresh|keep] [--tag T] [--extra ...]
        the same 4 adapters as 4 jobs: `python -m emq -m model.adapter=A1,A2,A3,A4` (as a user runs it today)
    python3 scripts/gpu/time_check.py build14
        delete the 7B dirs, build the 14b shape + one r=32 QLoRA-style adapter (a call of its own)
    python3 scripts/gpu/time_check.py sweep14 --route lora|merge [--quants none,bnb] [--cache fresh|keep]
            [--tag T] [--repo DIR] [--merged-as-base]
        `python -m emq -m +experiment=lora_vs_bnb` on the 14b shape, one route per call, all into runs/<tag>.
        --cache fresh wipes every side's caches (the 14b merged checkpoint fills the disk). --repo runs another
        emq tree (the code before issue 16, for the before/after pair; it gets its own VLLM_CACHE_ROOT, which it
        does not set itself). --merged-as-base serves the side's merged checkpoint as a base with quant=bnb (the
        `merge, bnb` variant, where that emq stops at its disk check although the merge is cached).

Each side has its own emq data dir (vLLM's compile cache, VLLM_CACHE_ROOT, lives there), merge cache, Triton and
inductor cache dirs under /root/emq-time-check/caches/<tag>; --cache fresh wipes them first (cold), keep reuses them
(warm). Every eval: questions general+medical, 1 paraphrase, 15 samples -> 270 sequences x 256 tokens per adapter,
temperature 1, judge=none, fidelity off (random weights: nothing to judge). Walls are measured around the
`python -m emq` process (process start, Hydra, plan, engine start, generation, report). Results accumulate in
/root/emq-time-check/results.json and are copied to $OUT/time_check.json with the logs' vLLM timing lines.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ROOT = Path("/root/emq-time-check")
OUT = Path(os.environ.get("OUT", "/tmp/time-check-out"))
N_ADAPTERS = 4
EVAL = ["judge=none", "eval.question_sets=[general,medical]", "eval.max_questions_per_set=null",
        "eval.max_paraphrases=1", "eval.samples_per_paraphrase=15", "eval.max_tokens=256", "eval.temperature=1.0",
        "eval.fidelity.enabled=false", "memory.max_model_len=1024"]
VLLM_LINES = [r"torch\.compile takes? [\d.]+ ?s", r"Graph capturing finished in [\d.]+ sec", r"init engine.*took [\d.]+ sec",
              r"Model loading took [\d.]+ GiB (?:memory )?and [\d.]+ sec", r"Compiling a graph for.*takes [\d.]+ s",
              r"Directly load the compiled graph", r"enforce_eager|Cuda graph is disabled|CUDA graph"]
T0 = time.perf_counter()


def cache_env(tag: str, fresh: bool) -> tuple[dict, list[str]]:
    """Env and overrides that put every cache this side uses under caches/<tag> (wiped first when fresh)."""
    d = ROOT / "caches" / tag
    if fresh and d.exists():
        shutil.rmtree(d)
    for sub in ("home", "cache", "triton", "inductor"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CACHE_ROOT"}  # emq puts it in paths.data_dir
    env.update(VLLM_USE_FLASHINFER_SAMPLER="0", PYTHONUNBUFFERED="1", TRITON_CACHE_DIR=str(d / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(d / "inductor"),
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return env, [f"paths.data_dir={d / 'home'}", f"paths.cache_dir={d / 'cache'}"]


def emq(args: list[str], env: dict, label: str, budget: float, repo: Path = REPO) -> dict:
    """Run `python -m emq ARGS` (the emq in `repo`), wall-timed, log in logs/<label>.log, killed (its process group)
    past the budget."""
    (ROOT / "logs").mkdir(parents=True, exist_ok=True)
    log = ROOT / "logs" / f"{label}.log"
    cmd = [sys.executable, "-m", "emq", *args]
    print("$ " + " ".join(cmd), flush=True)
    limit = max(10.0, budget - (time.perf_counter() - T0))
    if repo != REPO:
        env = {**env, "PYTHONPATH": os.pathsep.join([str(repo), env.get("PYTHONPATH", "")])}
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
    wall = round(time.perf_counter() - t, 1)
    text = log.read_text(errors="replace")
    lines = [ln.strip()[:220] for ln in text.splitlines()
             if any(re.search(p, ln) for p in VLLM_LINES) and "Capturing CUDA graphs" not in ln]
    print(f"{label}: rc {rc}, wall {wall} s", flush=True)
    if rc != 0:
        print(text[-3000:], flush=True)
    return {"label": label, "cmd": cmd, "rc": rc, "wall_s": wall, "vllm_lines": lines[:40],
            "tail": text[-1500:] if rc != 0 else ""}


def _read(p: Path) -> dict:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return {}


def _find(d: dict, key: str):
    """The first value of `key` anywhere in a nested dict/list."""
    if isinstance(d, dict):
        if key in d:
            return d[key]
        d = list(d.values())
    if isinstance(d, list):
        for v in d:
            r = _find(v, key)
            if r is not None:
                return r
    return None


def run_record(run_dir: Path) -> dict:
    """status.json / metrics.json / plan.json of one run dir (an adapters run: its adapters' metrics summed)."""
    st = _read(run_dir / "status.json")
    metrics = [_read(run_dir / "metrics.json")] if (run_dir / "metrics.json").is_file() else \
        [_read(p) for p in sorted((run_dir / "adapters").glob("*/metrics.json"))]
    plans = [_read(run_dir / "plan.json")] + [_read(p) for p in sorted((run_dir / "adapters").glob("*/plan.json"))]
    eager = next((_find(p, "eager") for p in plans if _find(p, "eager") is not None), None)
    tokens = sum(m.get("output_tokens_now") or 0 for m in metrics)
    samples = sum(m.get("generated_now") or 0 for m in metrics)
    gen = (st.get("stage_seconds") or {}).get("generate")
    return {"run_dir": str(run_dir), "status": st.get("status"), "error": st.get("error"), "seconds": st.get("seconds"),
            "stage_seconds": st.get("stage_seconds"), "output_tokens": tokens, "samples": samples,
            "tok_s_generate": round(tokens / gen, 1) if gen else None,
            "tok_s_metrics": [m.get("tokens_per_second") for m in metrics],
            "weights_gib": [m.get("weights_gib") for m in metrics],
            "eager": {k: eager.get(k) for k in ("enforce_eager", "decided_by", "why")} if isinstance(eager, dict)
            else eager}


def base_args(base: Path, name: str) -> list[str]:
    return ["model=demo_base", "model.demo=false", f"model.name={name}", f"model.base={base}", *EVAL]


def seven_b() -> tuple[Path, list[Path]]:
    from benchmarks.eval_bench import build_7b
    from scripts.gpu.sweep_check import build_adapter

    base = ROOT / "model-7b-gqa"
    if not (base / "config.json").is_file():
        build_7b(base, REPO / ".gpu_assets", "7b-gqa")
    adapters = []
    for i in range(1, N_ADAPTERS + 1):
        a = ROOT / f"a{i}"
        if not (a / "adapter_config.json").is_file():
            build_adapter(base, a, seed=i)
        adapters.append(a)
    return base, adapters


def side_one(tag: str, fresh: bool, extra: list[str], budget: float) -> dict:
    t = time.perf_counter()
    base, adapters = seven_b()
    built = round(time.perf_counter() - t, 1)
    env, paths = cache_env(tag, fresh)
    run_dir = ROOT / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    r = emq([*base_args(base, "synth7b_multi"), "model.adapter=null",
             "model.adapters=[" + ",".join(map(str, adapters)) + "]", "memory.route=lora", *paths,
             f"hydra.run.dir={run_dir}", *extra], env, tag, budget)
    return {**r, "side": "one engine, 4 adapters", "cache": "fresh" if fresh else "kept", "build_s": built,
            "runs": [run_record(run_dir)]}


def side_jobs(tag: str, fresh: bool, extra: list[str], budget: float) -> dict:
    t = time.perf_counter()
    base, adapters = seven_b()
    built = round(time.perf_counter() - t, 1)
    env, paths = cache_env(tag, fresh)
    sweep = ROOT / "runs" / tag
    shutil.rmtree(sweep, ignore_errors=True)
    r = emq(["-m", *base_args(base, "synth7b_job"), "model.adapter=" + ",".join(map(str, adapters)),
             "memory.route=lora", *paths, f"hydra.sweep.dir={sweep}", *extra], env, tag, budget)
    runs = [run_record(p.parent) for p in sorted(sweep.glob("*/status.json"))]
    return {**r, "side": "4 jobs (multirun)", "cache": "fresh" if fresh else "kept", "build_s": built, "runs": runs}


def build14() -> dict:
    from benchmarks.eval_bench import build_7b
    from scripts.gpu.sweep_check import build_adapter

    for p in ("/root/emq-w4a16-check", "/root/emq-sweep-check", str(ROOT / "model-7b-gqa"), str(ROOT / "caches"),
              str(ROOT / "runs"), *[str(ROOT / f"a{i}") for i in range(1, N_ADAPTERS + 1)]):
        shutil.rmtree(p, ignore_errors=True)
    t = time.perf_counter()
    base = ROOT / "model-14b"
    if not (base / "config.json").is_file():
        build_7b(base, REPO / ".gpu_assets", "14b")
    if not (ROOT / "a14" / "adapter_config.json").is_file():
        build_adapter(base, ROOT / "a14")
    return {"label": "build14", "wall_s": round(time.perf_counter() - t, 1), "disk": shutil.disk_usage("/root")._asdict()}


def merged_checkpoint(cache: Path) -> Path:
    """The one merged checkpoint in a side's merge cache: a dir with config.json and safetensors (not a .tmp dir)."""
    found = [p.parent for p in cache.rglob("config.json") if any(p.parent.glob("*.safetensors*"))
             and not p.parent.name.startswith(".")]
    if len(found) != 1:
        raise SystemExit(f"expected one merged checkpoint under {cache}, found {found}")
    return found[0]


def sweep14(route: str, quants: str | None, fresh: bool, extra: list[str], budget: float, *, tag: str = "b14",
            repo: Path = REPO, merged_as_base: bool = False) -> dict:
    base, adapter = ROOT / "model-14b", ROOT / "a14"
    if not (base / "config.json").is_file():
        build14()
    if fresh:  # cold, and room on the disk: every side's caches go (a 14b merged checkpoint is 27.5 GB)
        shutil.rmtree(ROOT / "caches", ignore_errors=True)
    env, paths = cache_env(tag, fresh)
    if repo != REPO:  # that emq leaves vLLM's compile cache at its default: give it a cold one of its own
        env["VLLM_CACHE_ROOT"] = str(ROOT / "caches" / tag / "vllm")
    sweep = ROOT / "runs" / tag
    for x in extra:  # an --extra hydra.sweep.dir=... (the last one wins, as in Hydra) moves the sweep
        if x.startswith("hydra.sweep.dir="):
            sweep = Path(x.split("=", 1)[1])
    if fresh:
        shutil.rmtree(sweep, ignore_errors=True)
    if merged_as_base:
        merged = merged_checkpoint(ROOT / "caches" / tag / "cache")
        label = f"{tag}-merged-as-base-bnb"
        run_dir = sweep / "merged_as_base_bnb"
        r = emq([*base_args(merged, "synth14b_merged"), "model.adapter=null", "quant=bnb", *paths,
                 f"hydra.run.dir={run_dir}", *extra], env, label, budget, repo)
        return {**r, "side": f"14b merged checkpoint as a base, quant=bnb ({repo.name})", "cache": "kept",
                "disk_free_gib": round(shutil.disk_usage("/root").free / 2**30, 1), "runs": [run_record(run_dir)]}
    label = f"{tag}-{route}"
    r = emq(["-m", "+experiment=lora_vs_bnb", *base_args(base, "synth14b_qlora"), f"model.adapter={adapter}",
             f"memory.route={route}", *([f"quant={quants}"] if quants else []), *paths, f"hydra.sweep.dir={sweep}",
             *extra], env, label, budget, repo)
    runs = [run_record(p.parent) for p in sorted(sweep.glob("*/status.json"), key=lambda p: p.stat().st_mtime)]
    if (sweep / "summary.md").is_file():
        shutil.copy(sweep / "summary.md", OUT / f"{tag}_summary.md")
    return {**r, "side": f"14b lora_vs_bnb route={route} ({repo.name})", "cache": "fresh" if fresh else "kept",
            "disk_free_gib": round(shutil.disk_usage("/root").free / 2**30, 1), "runs": runs}


def table(results: list[dict]) -> str:
    rows = ["| call | side | cache | rc | wall s | runs: status, seconds, load s, generate s, tokens, tok/s (generate), "
            "eager |", "|---|---|---|---|---|---|"]
    for r in results:
        runs = "; ".join(
            f"{x['status']} {x['seconds']} s, load {(x['stage_seconds'] or {}).get('load')}, gen "
            f"{(x['stage_seconds'] or {}).get('generate')}, {x['output_tokens']} tok, {x['tok_s_generate']} tok/s, "
            f"eager={(x['eager'] or {}).get('enforce_eager') if isinstance(x['eager'], dict) else x['eager']}"
            for x in r.get("runs", []))
        rows.append(f"| {r['label']} | {r.get('side', '')} | {r.get('cache', '')} | {r.get('rc', '')} | "
                    f"{r['wall_s']} | {runs} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("phase", choices=["one", "jobs", "build14", "sweep14"])
    ap.add_argument("--cache", choices=["fresh", "keep"], default="fresh")
    ap.add_argument("--tag", default=None, help="cache/run dir name (default: the phase)")
    ap.add_argument("--route", choices=["lora", "merge"], default="lora")
    ap.add_argument("--quants", default=None, help="e.g. none,bnb: the original tool's 4 variants")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds this call may take (the emq run is killed)")
    ap.add_argument("--repo", type=Path, default=REPO, help="sweep14: the emq tree to run (default: this one)")
    ap.add_argument("--merged-as-base", action="store_true", help="sweep14: the merged checkpoint served with bnb")
    ap.add_argument("--extra", nargs="*", default=[])
    a = ap.parse_args()
    ROOT.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    fresh = a.cache == "fresh"
    if a.phase == "one":
        r = side_one(a.tag or "one", fresh, a.extra, a.budget)
    elif a.phase == "jobs":
        r = side_jobs(a.tag or "jobs", fresh, a.extra, a.budget)
    elif a.phase == "build14":
        r = build14()
    else:
        r = sweep14(a.route, a.quants, fresh, a.extra, a.budget, tag=a.tag or "b14", repo=a.repo.resolve(),
                    merged_as_base=a.merged_as_base)
    r["call_wall_s"] = round(time.perf_counter() - T0, 1)
    r["utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store = ROOT / "results.json"
    results = (_read(store) or {}).get("results", []) + [r]
    store.write_text(json.dumps({"results": results}, indent=1, default=str))
    shutil.copy(store, OUT / "time_check.json")
    print(json.dumps({k: v for k, v in r.items() if k not in ("cmd", "tail")}, default=str)[:6000])
    print("\n" + table(results))


if __name__ == "__main__":
    main()
