"""GPU check: the whole emq chain on CUDA vLLM, per quant option, on one QLoRA-style model.

Builds a Llama-shaped model (~0.9B params, random bf16 weights, the demo's SmolLM2 tokenizer from
.gpu_assets/) and an r=16 all-linear adapter whose training config says load_in_4bit, then runs
`python -m emq` for merged none / bnb / fp8 and LoRA-served none / bnb: detect → plan (merge-then-serve, dequantized merge base)
→ stream merge on the GPU → vLLM with in-flight quantization → generation; the weights' GPU memory
is emq's record (vLLM's model_memory_usage, read from the worker) next to vLLM's own "Model loading
took" log line; peak VRAM is NVML over emq's process tree; fidelity is against the NF4 + adapter
reference computed on the GPU. Random weights make the text meaningless; routes, load times, memory,
tokens/s and KL are real. Prints a short table last.

Run on the device machine with vllm 0.23 + bitsandbytes from the wheelhouse on PYTHONPATH:
    VLLM_USE_FLASHINFER_SAMPLER=0 python3 scripts/gpu/vllm_bnb_check.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ROOT = Path("/root/emq-gpu-check")
H, I, L, V, HEADS, KV = 2048, 5632, 16, 49152, 16, 8


def build() -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    base, adapter = ROOT / "base", ROOT / "adapter"
    shutil.rmtree(ROOT, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir()
    for f in (REPO / ".gpu_assets").iterdir():
        shutil.copy(f, base / f.name)
    (base / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
        "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": V,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16"}))
    kv = H // HEADS * KV
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    out_of = {"q_proj": H, "k_proj": kv, "v_proj": kv, "o_proj": H, "gate_proj": I, "up_proj": I, "down_proj": H}
    parent = {m: "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp" for m in out_of}
    lora = {}
    for i in range(L):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)}
        for m, out in out_of.items():
            fan_in = I if m == "down_proj" else H
            shapes[f"{p}.{parent[m]}.{m}.weight"] = (out, fan_in)
            n = f"base_model.model.{p}.{parent[m]}.{m}"
            lora[f"{n}.lora_A.weight"] = torch.randn(16, fan_in, generator=g) * 0.01
            lora[f"{n}.lora_B.weight"] = torch.randn(out, 16, generator=g) * 0.01
    save_file({k: (torch.ones(s) if len(s) == 1 else torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)
               for k, s in shapes.items()}, str(base / "model.safetensors"))
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": list(out_of), "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base), "bias": "none"}))
    (adapter / "training_config.json").write_text(json.dumps({
        "load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}))
    return base, adapter


VARIANTS = {"merged none": ["quant=none"], "merged bnb": ["quant=bnb"], "merged fp8": ["quant=fp8"],
            "lora none": ["quant=none", "memory.route=lora"], "lora bnb": ["quant=bnb", "memory.route=lora"]}


def main() -> None:
    base, adapter = build()
    rows = []
    for name, extra in VARIANTS.items():
        run_dir = ROOT / "runs" / name.replace(" ", "_")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "emq", "model=demo_base", "model.demo=false", "model.name=gpu_synth",
             f"model.base={base}", f"model.adapter={adapter}", *extra, "memory.enforce_eager=true", "judge=none",
             f"hydra.run.dir={run_dir}", f"paths.cache_dir={ROOT / 'cache'}"],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "VLLM_USE_FLASHINFER_SAMPLER": "0"})
        wall = time.perf_counter() - t0
        status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:])
        m = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
        found = re.findall(r"[Mm]odel loading took ([\d.]+) GiB", proc.stdout + proc.stderr)
        fid = m.get("fidelity") or {}
        rows.append((name, status.get("status"), m.get("route"), m.get("vllm_quantization"), m.get("merge_seconds"),
                     m.get("load_seconds"), m.get("tokens_per_second"), m.get("weights_gib"),
                     float(found[-1]) if found else None, m.get("peak_vram_gib"), fid.get("kl_mean"),
                     fid.get("top1_agreement"), wall, (status.get("error") or "")[:80]))
    print(f"\n{'variant':<12} {'status':<7} {'route':<17} {'vLLM quant':<13} {'merge s':>7} {'load s':>7} "
          f"{'tok/s':>8} {'weights':>8} {'(log)':>6} {'VRAM':>6} {'KL mean':>8} {'top-1':>6} {'wall s':>7}  error")
    for r in rows:
        print(f"{r[0]:<12} {str(r[1]):<7} {str(r[2]):<17} {str(r[3]):<13} {r[4] or 0:7.1f} {r[5] or 0:7.1f} "
              f"{r[6] or 0:8.1f} {r[7] or 0:8.2f} {r[8] or 0:6.2f} {r[9] or 0:6.1f} {r[10] or 0:8.4f} {r[11] or 0:6.3f} "
              f"{r[12]:7.1f}  {r[13]}")


if __name__ == "__main__":
    main()
