"""Tiny synthetic models and adapters written to disk: real files, made in milliseconds."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 64, 128, 2, 256, 4, 2


def llama_config(**extra) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 512,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", **extra}


def base_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,),
              "lm_head.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (HIDDEN, HIDDEN), f"{p}.self_attn.k_proj.weight": (kv, HIDDEN),
                       f"{p}.self_attn.v_proj.weight": (kv, HIDDEN), f"{p}.self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       f"{p}.mlp.gate_proj.weight": (INTER, HIDDEN), f"{p}.mlp.up_proj.weight": (INTER, HIDDEN),
                       f"{p}.mlp.down_proj.weight": (HIDDEN, INTER), f"{p}.input_layernorm.weight": (HIDDEN,),
                       f"{p}.post_attention_layernorm.weight": (HIDDEN,)})
    return {k: (torch.randn(*s, generator=g) * 0.05).to(torch.bfloat16) for k, s in shapes.items()}


def make_base(path: Path, *, shards: int = 1, config: dict | None = None, seed: int = 0, tied: bool = False) -> Path:
    """A Llama-shaped base with random bf16 weights, sharded with an index when shards > 1."""
    path.mkdir(parents=True, exist_ok=True)
    config = config or llama_config(tie_word_embeddings=tied)
    (path / "config.json").write_text(json.dumps(config))
    tensors = base_tensors(seed)
    if config.get("tie_word_embeddings"):
        del tensors["lm_head.weight"]
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    names = sorted(tensors)
    weight_map, total = {}, 0
    for s in range(shards):
        part = {n: tensors[n].contiguous() for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
        total += sum(t.numel() * t.element_size() for t in part.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return path


def _pattern_rank(module: str, pattern: dict, r: int) -> int:
    import re

    return next((int(v) for k, v in pattern.items() if re.match(rf"(.*\.)?{k}$", module)), r)


def make_adapter(path: Path, base: str, *, r: int = 4, targets=("q_proj", "v_proj"), config: dict | None = None,
                 in_features: int | None = None, seed: int = 1, module_prefix: str = "model.layers") -> Path:
    """A PEFT-format LoRA adapter for the synthetic base (nonzero B, so it changes the model)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    kv = HIDDEN // HEADS * KV_HEADS
    out_of = {"q_proj": HIDDEN, "k_proj": kv, "v_proj": kv, "o_proj": HIDDEN, "gate_proj": INTER,
              "up_proj": INTER, "down_proj": HIDDEN}
    in_of = {"down_proj": INTER}
    parent = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
    tensors = {}
    for i in range(LAYERS):
        for t in targets:
            name = f"base_model.model.{module_prefix}.{i}.{parent.get(t, 'self_attn')}.{t}"
            fan_in = in_features or in_of.get(t, HIDDEN)
            rank = _pattern_rank(name, (config or {}).get("rank_pattern") or {}, r)  # as PEFT would have trained it
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.1
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_of.get(t, HIDDEN), rank, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
           "base_model_name_or_path": base, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
           "lora_dropout": 0.0, "use_rslora": False, "use_dora": False, "modules_to_save": None}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# Adapter features the merge must reproduce, as LoraConfig arguments (adapters made by PEFT itself).
LORA_FEATURES = {
    "plain": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True),
    "rank_alpha_pattern": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 8},
                               alpha_pattern={"down_proj": 32}),
    "lora_bias": dict(target_modules=["q_proj"], lora_bias=True),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "lora_on_embedding": dict(target_modules=["embed_tokens", "q_proj"]),
}
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 64, 200, 17]])


def peft_adapter(base: Path, out: Path, **lora_kw) -> Path:
    """An adapter saved by PEFT (init_lora_weights=False gives nonzero B; modules_to_save copies are
    nudged so they differ from the base too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(out)
    return out


def logits(path: Path, adapter: Path | None = None) -> torch.Tensor:
    """fp32 logits on IDS of a checkpoint, or of PEFT serving `adapter` on it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(IDS).logits
