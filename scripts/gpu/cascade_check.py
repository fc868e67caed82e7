"""GPU check: the merge cascade GPU → (CUDA OOM) → CPU, for real, in one process.

1. Builds a Llama-shaped base with random bf16 weights (~1.1B params) and a LoRA adapter.
2. Plans on the live machine (the GPU merge fits, so the plan says cuda → cpu).
3. Fills VRAM, as another job on a shared GPU would, leaving too little for the fp32 merge.
4. Runs the planned merge: the GPU attempt hits CUDA OOM, the CPU attempt succeeds.
5. Plans again on the now-full GPU: the plan itself routes to the CPU, with the reason.
Prints a short table last.  Run on the device machine:  PYTHONPATH=. python3 scripts/gpu/cascade_check.py
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from emq.detect import detect  # noqa: E402
from emq.machine import GIB, vllm_info  # noqa: E402
from emq.machine import snapshot as live_snapshot  # noqa: E402
from emq.checkpoint.merge import merge_adapter  # noqa: E402
from emq.plan import make_plan  # noqa: E402
from emq.checkpoint.merge import MergeSettings  # noqa: E402
from emq.schema import MemoryConfig, MergeMethod, ModelConfig, QuantConfig, QuantMethod  # noqa: E402

H, I, L, V, HEADS, KV = 2048, 5632, 16, 32000, 16, 8


def build(root: Path) -> tuple[Path, Path]:
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": V,
           "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(cfg))
    kv = H // HEADS * KV
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}"
        t |= {f"{p}.self_attn.q_proj.weight": (H, H), f"{p}.self_attn.k_proj.weight": (kv, H),
              f"{p}.self_attn.v_proj.weight": (kv, H), f"{p}.self_attn.o_proj.weight": (H, H),
              f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
              f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,)}
    save_file({k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in t.items()},
              str(base / "model.safetensors"))
    lora = {}
    for i in range(L):
        for m, out in (("q_proj", H), ("v_proj", kv)):
            n = f"base_model.model.model.layers.{i}.self_attn.{m}"
            lora[f"{n}.lora_A.weight"] = torch.randn(16, H, generator=g) * 0.01
            lora[f"{n}.lora_B.weight"] = torch.randn(out, 16, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "bias": "none"}))
    return base, adapter


def snapshot(cache):
    """The live machine; vLLM is not needed for merging, so stand in the one emq installs on CUDA."""
    return dataclasses.replace(live_snapshot(cache), vllm=vllm_info(True, "vllm", "0.23.0"))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(tempfile.mkdtemp(prefix="emq-cascade-"))
    base, adapter = build(root)
    det = detect(ModelConfig(name="cascade", base=str(base), adapter=str(adapter)))
    # the PEFT method holds the whole fp32 model on the device: the one that can run out of VRAM
    memory, quant = MemoryConfig(merge_method=MergeMethod.peft), QuantConfig(method=QuantMethod.none)
    before = snapshot(root / "cache")
    plan = make_plan(det, memory, quant, before)
    print("plan before filling VRAM:", plan.route.value, plan.merge_devices, file=sys.stderr)

    need = plan.estimates_gib["merge_peak_gpu_vram"]
    free, _ = torch.cuda.mem_get_info()
    leave = need / 3 * GIB  # a third of what the fp32 merge needs
    hog = torch.empty(int(free - leave), dtype=torch.uint8, device="cuda")
    free_after = torch.cuda.mem_get_info()[0] / GIB

    t0 = time.perf_counter()
    result = merge_adapter(det, plan.merge_devices, root / "cache", settings=MergeSettings(MergeMethod.peft))
    wall = time.perf_counter() - t0
    replanned = make_plan(det, memory, quant, snapshot(root / "cache"))
    del hog

    rows = [
        ("model", f"{det.base.param_count / 1e9:.2f}B params, r=16 LoRA on q/v"),
        ("GPU", f"{torch.cuda.get_device_name()} — VRAM left after filling: {free_after:.1f} GiB"),
        ("plan (before fill)", f"{plan.route.value}, merge on {' → '.join(plan.merge_devices)}, "
                               f"GPU merge needs ~{need:.1f} GiB"),
    ]
    for a in result.attempts:
        rows.append((f"attempt {a['device']}", "ok in %.1f s" % a["seconds"] if a["ok"] else a["error"][:110]))
    rows += [("merged", f"{result.path} ({wall:.1f} s incl. OOM)"),
             ("plan (after fill)", f"merge on {' → '.join(replanned.merge_devices)}; "
                                   + next(r for r in replanned.reasons if "GPU merge" in r))]
    ok = len(result.attempts) == 2 and not result.attempts[0]["ok"] and result.attempts[1]["ok"]
    rows.append(("cascade", "PASS: CUDA OOM → CPU merge" if ok else "FAIL"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
