"""GPU check: emq's bnb routes through vLLM's bitsandbytes PLUGIN (vllm-bnb-plugin 0.0.3 + bitsandbytes 0.50.2 on
vLLM 0.34 / torch 2.14), next to w4a16, one `python -m emq` process per variant. Run each phase behind the
wheelhouse (scripts/gpu/with_wheelhouse_latest.sh puts it first on PYTHONPATH); each phase fits one 600 s call:

    bash scripts/gpu/with_wheelhouse_latest.sh python3 scripts/gpu/bnb_latest_check.py serve \
        [--only lora-bnb,merge-w4a16] [--sequences 270|18|both]
        7b-gqa shape (random weights) + one r=32 all-linear QLoRA-style adapter: LoRA on bnb, merged + bnb, w4a16
        merged (RTN default), LoRA on w4a16, each at 270 and at 18 sequences x 256 tokens (judge=none, fidelity
        off): tok/s, weights GiB, load s, the bnb provider (load.json), the process wall. Rows that do not fit the
        call's budget are skipped: run them with --only in the next call.
    bash scripts/gpu/with_wheelhouse_latest.sh python3 scripts/gpu/bnb_latest_check.py demo GGUF ADAPTER_DIR \
        [--only lora-bnb,merge-bnb,merge-none,merge-w4a16]
        the demo good doctor (SmolLM2-135M-Instruct.Q4_1.gguf, the good_doctor adapter) with fidelity on, as
        w4a16_check's demo phase runs it: LoRA on bnb, merged + bnb, merged bf16, w4a16 merged (default):
        KL, top-1, retained, tok/s, weights GiB, the bnb provider.

Results accumulate across calls in /root/emq-bnb-latest/results.json (one row per variant and size, the latest
kept), copied to $OUT/bnb_latest.json after every run; a short table of everything so far is printed last.
--dry-run prints the `python -m emq` command lines instead of building or running anything.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from scripts.gpu import time_check as tc  # noqa: E402  (its emq runner, run-dir reader, cache dirs, eval overrides)
from scripts.gpu import w4a16_check as w4  # noqa: E402  (its 7B-shaped model + adapter builder)

ROOT = Path(os.environ.get("EMQ_BNB_ROOT", "/root/emq-bnb-latest"))
OUT = Path(os.environ.get("OUT", "/tmp/bnb-latest-out"))
tc.ROOT = w4.ROOT = ROOT  # their logs/, caches/, model and adapter dirs go under this check's root
SHAPE = "7b-gqa"
VARIANTS = {  # name → (label, overrides)
    "lora-bnb": ("LoRA on bnb", ["quant=bnb", "memory.route=lora"]),
    "merge-bnb": ("merged + bnb", ["quant=bnb", "memory.route=merge"]),
    "merge-w4a16": ("w4a16 merged (RTN default)", ["quant=w4a16", "memory.route=merge"]),
    "lora-w4a16": ("LoRA on w4a16", ["quant=w4a16", "memory.route=lora"]),
    "merge-none": ("merged bf16", ["quant=none", "memory.route=merge"]),
}
# the most important rows first: LoRA on bnb and w4a16 merged at 270, then the 18-sequence ones, then the rest
SERVE_ORDER = [("lora-bnb", 270), ("merge-w4a16", 270), ("lora-bnb", 18), ("merge-w4a16", 18),
               ("merge-bnb", 270), ("lora-w4a16", 270), ("merge-bnb", 18), ("lora-w4a16", 18)]
DEMO_ORDER = ["lora-bnb", "merge-bnb", "merge-none", "merge-w4a16"]
# w4a16_check's demo overrides (eager, greedy, 48 tokens, fidelity on by default)
DEMO_EVAL = ["judge=none", "memory.enforce_eager=true", "model.trained_in_4bit=true", "eval.temperature=0",
             "eval.samples_per_paraphrase=1", "eval.max_tokens=48"]
MIN_LEFT = 90.0  # seconds: a variant is not started with less of the call's budget left


def collect(run_dir: Path) -> dict:
    """What a run dir says: time_check's run record, and metrics.json / load.json's figures (the bnb provider)."""
    m, load = tc._read(run_dir / "metrics.json"), tc._read(run_dir / "load.json")
    r = tc.run_record(run_dir)
    v, kept = m.get("fidelity") or {}, m.get("retained") or {}
    return {"status": r["status"], "error": r["error"], "eager": r["eager"], "stage_seconds": r["stage_seconds"],
            "tok_s": m.get("tokens_per_second"), "tokens": m.get("output_tokens_now"), "count": m.get("count"),
            "weights_gib": m.get("weights_gib"), "weights_source": m.get("weights_source"),
            "load_s": m.get("load_seconds", load.get("load_seconds")), "merge_s": m.get("merge_seconds"),
            "quantize_s": m.get("quantize_seconds"), "peak_vram_gib": m.get("peak_vram_gib"),
            "route": m.get("route"), "quant": m.get("quant"), "quant_detail": m.get("quant_detail"),
            "vllm_quantization": m.get("vllm_quantization"), "bnb": load.get("bnb"),
            "kl": v.get("kl_mean"), "top1": v.get("top1_agreement"), "retained": kept.get("retained"),
            "retained_top1": kept.get("retained_top1"), "mostly_base": kept.get("mostly_base")}


def store() -> dict:
    return tc._read(ROOT / "results.json") or {"rows": {}}


def save(data: dict) -> None:
    (ROOT / "results.json").write_text(json.dumps(data, indent=1, default=str))
    shutil.copy(ROOT / "results.json", OUT / "bnb_latest.json")


def run_variant(key: str, name: str, args: list[str], run_dir: Path, env: dict, budget: float, dry: bool) -> None:
    if dry:
        print("$ " + " ".join([sys.executable, "-m", "emq", *args]), flush=True)
        return
    left = budget - (time.perf_counter() - tc.T0)
    if left < MIN_LEFT:
        size = f" --sequences {key.split('@')[1]}" if "@" in key else ""
        print(f"skip {key}: {left:.0f} s of the call's budget left (a later call: --only {name}{size})", flush=True)
        return
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, not a resumed one
    r = tc.emq(args, env, key.replace(":", "_").replace("@", "_"), budget)
    data = store()
    data["rows"][key] = {"variant": name, "label": VARIANTS[name][0], "rc": r["rc"], "wall_s": r["wall_s"],
                         "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "run_dir": str(run_dir),
                         **collect(run_dir), "vllm_lines": r["vllm_lines"], "tail": r["tail"]}
    save(data)


def phase_serve(only: list[str], sizes: list[int], budget: float, dry: bool) -> None:
    if dry:
        base, adapter = ROOT / f"model-{SHAPE}", ROOT / f"adapter-{SHAPE}"  # where w4a16_check.seven_b puts them
    else:
        t = time.perf_counter()
        base, adapter = w4.seven_b(SHAPE)
        print(f"7B ({SHAPE}) + r=32 adapter ready in {time.perf_counter() - t:.0f} s", flush=True)
    env, paths = tc.cache_env("serve", fresh=False)  # one warm set of caches (merges, compile cache) for all calls
    for name, n in SERVE_ORDER:
        if (only and name not in only) or n not in sizes:
            continue
        run_dir = ROOT / "runs" / f"{name}-{n}"
        # time_check's eval (general+medical, 1 paraphrase, 256 tokens, T=1, judge=none, fidelity off) with
        # 15 samples per question → 270 sequences, or 1 → 18
        args = [*tc.base_args(base, "synth7b_qlora"), f"eval.samples_per_paraphrase={n // 18}",
                f"model.adapter={adapter}", *VARIANTS[name][1], *paths, f"hydra.run.dir={run_dir}"]
        run_variant(f"serve:{name}@{n}", name, _dedup(args), run_dir, env, budget, dry)


def _dedup(args: list[str]) -> list[str]:
    """One value per override key, the last one (the sample count replaces time_check's 15), first place kept."""
    seen: dict[str, str] = {}
    for a in args:
        seen[a.split("=", 1)[0]] = a
    return list(seen.values())


def phase_demo(gguf: Path, adapter: Path, only: list[str], budget: float, dry: bool) -> None:
    base = ROOT / "demo-base"
    if not dry and not (base / "config.json").is_file():
        from emq.demo.build import build_base

        base.mkdir(parents=True, exist_ok=True)
        build_base(base, gguf)
    env, paths = tc.cache_env("demo", fresh=False)
    for name in DEMO_ORDER:
        if only and name not in only:
            continue
        run_dir = ROOT / "runs" / f"demo-{name}"
        args = ["model=demo_good_doctor", "model.demo=false", f"model.base={base}", f"model.adapter={adapter}",
                *DEMO_EVAL, *paths, f"hydra.run.dir={run_dir}", *VARIANTS[name][1]]
        run_variant(f"demo:{name}", name, args, run_dir, env, budget, dry)


def _f(x, fmt: str = ".0f", scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, fmt)


def table(data: dict) -> str:
    head = ("| row | rc | status | wall s | load s | weights GiB | tok/s | eager | bnb provider | KL | top-1 % "
            "| retained % |")
    lines = [head, "|" + "---|" * (len(head.split("|")) - 2)]
    for key, r in data["rows"].items():
        b = r.get("bnb") or {}
        prov = f"{b.get('provider')} {b.get('version')} (bnb {b.get('bitsandbytes')})" if b else "-"
        eager = r.get("eager")
        eager = eager.get("enforce_eager") if isinstance(eager, dict) else eager
        lines.append(f"| {key} ({r['label']}) | {r['rc']} | {r.get('status')} | {r['wall_s']} | "
                     f"{_f(r.get('load_s'), '.1f')} | {_f(r.get('weights_gib'), '.2f')} | {_f(r.get('tok_s'))} | "
                     f"{eager} | {prov} | "
                     f"{_f(r.get('kl'), '.3f')} | {_f(r.get('top1'), '.1f', 100)} | "
                     f"{_f(r.get('retained'), '.0f', 100)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=["serve", "demo"])
    ap.add_argument("paths", nargs="*", type=Path, help="demo: GGUF ADAPTER_DIR")
    ap.add_argument("--only", default="", help="comma-separated variants, e.g. lora-bnb,merge-w4a16 (serve: also "
                    "merge-bnb, lora-w4a16; demo: lora-bnb, merge-bnb, merge-none, merge-w4a16)")
    ap.add_argument("--sequences", choices=["270", "18", "both"], default="both", help="serve: which sizes")
    ap.add_argument("--budget", type=float, default=570.0, help="seconds this call may take (a run is killed past it)")
    ap.add_argument("--dry-run", action="store_true", help="print the emq command lines, build and run nothing")
    a = ap.parse_args()
    only = [x for x in a.only.split(",") if x]
    allowed = DEMO_ORDER if a.phase == "demo" else list(dict.fromkeys(n for n, _ in SERVE_ORDER))
    if bad := [x for x in only if x not in allowed]:
        ap.error(f"--only {bad}: {a.phase} runs {','.join(allowed)}")
    if a.phase == "demo" and len(a.paths) != 2:
        ap.error("demo needs GGUF ADAPTER_DIR")
    if not a.dry_run:
        ROOT.mkdir(parents=True, exist_ok=True)
        OUT.mkdir(parents=True, exist_ok=True)
        from emq.machine import installed_vllm, probe_bnb

        dist, version = installed_vllm()
        probe = probe_bnb(dist, version)
        why = "" if probe.kind else f" — {probe.why_not}"
        print(f"{dist} {version}; bnb provider here: {probe.record()}{why}", flush=True)
        data = store()
        data["probe"] = {"vllm": [dist, version], **probe.record(), "why_not": probe.why_not}
        save(data)
    if a.phase == "serve":
        sizes = [270, 18] if a.sequences == "both" else [int(a.sequences)]
        phase_serve(only, sizes, a.budget, a.dry_run)
    else:
        phase_demo(a.paths[0].resolve(), a.paths[1].resolve(), only, a.budget, a.dry_run)
    if not a.dry_run:
        data = store()
        save(data)
        print(f"\n== bnb latest check: {a.phase} (call {time.perf_counter() - tc.T0:.0f} s; all rows so far) ==")
        print(table(data))


if __name__ == "__main__":
    main()
