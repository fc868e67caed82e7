"""GPU check: `python -m emq -m +experiment=lora_vs_bnb` on a 7B-shaped QLoRA-style model, real bnb.

Builds a Llama-2-7B-shaped model (random bf16 weights, the demo's SmolLM2 tokenizer from
.gpu_assets/, vocab 49152) and an r=32 adapter on all 7 linear kinds whose training config says
load_in_4bit, then runs the lora_vs_bnb sweep — LoRA on the bf16 base, LoRA on the bnb base, merged
bf16, merged + in-flight bnb — with 270 sequences x 256 tokens per variant (CUDA graphs on, no judge:
random weights have nothing to judge), and prints the sweep's summary.md (written by emq's report
callback). Random weights make the text meaningless; memory and tokens/s are real.

    VLLM_USE_FLASHINFER_SAMPLER=0 python3 scripts/gpu/sweep_check.py [--out DIR] [--route lora|merge] [--extra OVERRIDE ...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ROOT = Path("/root/emq-sweep-check")
RANK = 32


def build_adapter(base: Path, out: Path, seed: int = 1) -> Path:
    """An r=32 LoRA on all 7 linear kinds (random, `seed`: adapters of different seeds are different LoRAs)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        for m, (o, f) in shapes.items():
            parent = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            n = f"base_model.model.model.layers.{i}.{parent}.{m}"
            t[f"{n}.lora_A.weight"] = (torch.randn(RANK, f, generator=g) * 0.01).to(torch.bfloat16)
            t[f"{n}.lora_B.weight"] = (torch.randn(o, RANK, generator=g) * 0.01).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(shapes),
        "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base), "bias": "none"}))
    (out / "training_config.json").write_text(json.dumps({
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="copy summary.md / csv / report.html here")
    parser.add_argument("--route", choices=["lora", "merge"], default=None,
                        help="run only this half of the sweep (one device call may not fit all four variants); "
                             "a second call with the other half adds to the same sweep dir and the report")
    parser.add_argument("--extra", nargs="*", default=[],
                        help="more overrides, e.g. quant=bnb memory.tensor_parallel_size=2 (the TP=2 check)")
    args = parser.parse_args()
    from benchmarks.eval_bench import build_7b

    base = ROOT / "model-7b"
    if not (base / "config.json").is_file():
        build_7b(base, REPO / ".gpu_assets")
    adapter = ROOT / "adapter" if (ROOT / "adapter" / "adapter_config.json").is_file() else \
        build_adapter(base, ROOT / "adapter")
    sweep = ROOT / "sweep"
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "emq", "-m", "+experiment=lora_vs_bnb", "model=demo_base", "model.demo=false",
           "model.name=synth7b_qlora", f"model.base={base}", f"model.adapter={adapter}", "judge=none",
           "eval.question_sets=[general,medical]", "eval.max_questions_per_set=null", "eval.max_paraphrases=1",
           "eval.samples_per_paraphrase=15", "eval.max_tokens=256", "eval.temperature=1.0",
           "eval.fidelity.enabled=false", "memory.max_model_len=1024", f"hydra.sweep.dir={sweep}",
           f"paths.cache_dir={ROOT / 'cache'}", f"paths.data_dir={ROOT / 'home'}"]
    if args.route:
        cmd.append(f"memory.route={args.route}")
    cmd += args.extra
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"})
    print(proc.stdout[-2000:], proc.stderr[-6000:])
    print(f"sweep wall {time.perf_counter() - t0:.0f} s, rc {proc.returncode}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "summary.csv", "report.html"):
            if (sweep / name).is_file():
                (args.out / name).write_bytes((sweep / name).read_bytes())
    print((sweep / "summary.md").read_text() if (sweep / "summary.md").is_file() else "no summary.md")


if __name__ == "__main__":
    main()
