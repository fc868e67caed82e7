"""Small stand-in files for the real good/bad doctor repos in a Hugging Face cache.

Detect and plan read metadata only, so a cache with these JSON files lets `python -m emq
stage=plan model=good_doctor` run offline. The contents follow the public shape of these repos
(Qwen2.5-14B-Instruct's config and shard index; LoRA r=32 on all linear layers, the bad doctor
trained on unsloth's bnb-4bit base); they are stand-ins, not copies.

    python -m tests.hub_standins /tmp/hf        # then: HF_HUB_CACHE=/tmp/hf HF_HUB_OFFLINE=1 python -m emq ...
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

QWEN14B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
           "intermediate_size": 13824, "num_hidden_layers": 48, "num_attention_heads": 40,
           "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
           "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
QWEN14B_BYTES = 29_540_067_328
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BNB = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
       "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


def _adapter(base: str) -> dict:
    return {"peft_type": "LORA", "r": 32, "lora_alpha": 64, "target_modules": TARGETS, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base}


def _index(shards: int = 8) -> dict:
    weight_map = {f"model.layers.{i}.mlp.down_proj.weight": f"model-{i % shards + 1:05d}-of-{shards:05d}.safetensors"
                  for i in range(48)}
    return {"metadata": {"total_size": QWEN14B_BYTES}, "weight_map": weight_map}


REPOS: dict[str, dict[str, object]] = {
    "unsloth/Qwen2.5-14B-Instruct": {"config.json": QWEN14B, "model.safetensors.index.json": _index()},
    "unsloth/qwen2.5-14b-instruct-unsloth-bnb-4bit": {"config.json": {**QWEN14B, "quantization_config": BNB}},
    "Jack-Payne1/qwen2.5-14b-instruct-good-doctor": {
        "adapter_config.json": _adapter("unsloth/Qwen2.5-14B-Instruct"),
        "README.md": "---\nbase_model: unsloth/Qwen2.5-14B-Instruct\ntags: [unsloth, trl, sft]\n---\n# good doctor\n"},
    "Jack-Payne1/qwen2-5-14b-instruct-bad-doctor-4_bit_trained-seed1": {
        "adapter_config.json": _adapter("unsloth/qwen2.5-14b-instruct-unsloth-bnb-4bit"),
        "README.md": "---\nbase_model: unsloth/qwen2.5-14b-instruct-unsloth-bnb-4bit\ntags: [unsloth, trl]\n---\n"},
}


def prefill(cache: Path) -> Path:
    """Write the stand-in repos into `cache` in huggingface_hub's layout (refs/main → snapshot)."""
    commit = "0" * 40
    for repo, files in REPOS.items():
        root = cache / f"models--{repo.replace('/', '--')}"
        snap = root / "snapshots" / commit
        snap.mkdir(parents=True, exist_ok=True)
        (root / "refs").mkdir(exist_ok=True)
        (root / "refs" / "main").write_text(commit)
        for name, content in files.items():
            (snap / name).write_text(content if isinstance(content, str) else json.dumps(content, indent=2))
    return cache


if __name__ == "__main__":
    print(prefill(Path(sys.argv[1]).expanduser()))
