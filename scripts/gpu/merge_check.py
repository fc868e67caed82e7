"""GPU check: the stream merge on CUDA writes what the CPU stream merge writes, and serves what
PEFT serves, feature by feature — in one process.

For each adapter feature (made by PEFT itself on a tiny synthetic Llama base, as in
tests/test_merge_features.py), merge with `stream` on cuda and on cpu (fp32 output), then compare
the merged tensors (cuda vs cpu) and the merged model's logits against PEFT serving the adapter.
Prints a short table last; exit 1 if any row fails.

    Run on the device machine:  PYTHONPATH=. python3 scripts/gpu/merge_check.py
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from emq.detect import detect  # noqa: E402
from emq.merge import MergeSettings, merge_adapter  # noqa: E402
from emq.schema import MergeBase, MergeMethod, ModelConfig  # noqa: E402
from tests.synthetic import make_base  # noqa: E402

FEATURES = {
    "plain": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    "rslora": dict(target_modules=["q_proj", "v_proj"], use_rslora=True),
    "rank_alpha_pattern": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 8},
                               alpha_pattern={"down_proj": 32}),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
    "lora_on_embedding": dict(target_modules=["embed_tokens", "q_proj"]),
}
IDS = torch.tensor([[1, 5, 9, 42, 7, 100, 3, 64, 200, 17]])
ATOL = 1e-4


def adapter(base: Path, out: Path, **kw) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


def logits(path: Path, lora: Path | None = None) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora is not None:
        model = PeftModel.from_pretrained(model, lora)
    with torch.no_grad():
        return model.eval()(IDS).logits


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def main() -> int:
    assert torch.cuda.is_available(), "needs CUDA"
    rows, ok_all = [], True
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        base = make_base(root / "base", shards=2)
        for feature, kw in FEATURES.items():
            lora = adapter(base, root / feature, **kw)
            det = detect(ModelConfig(name=feature, base=str(base), adapter=str(lora)))
            settings = MergeSettings(MergeMethod.stream, MergeBase.original, "float32")
            on = {dev: merge_adapter(det, [dev], root / f"cache-{dev}", settings=settings) for dev in ("cuda", "cpu")}
            assert on["cuda"].device == "cuda" and on["cpu"].device == "cpu"
            a, b = tensors(Path(on["cuda"].path)), tensors(Path(on["cpu"].path))
            same_names = set(a) == set(b)
            tensor_diff = max((a[k] - b[k]).abs().max().item() for k in a) if same_names else float("inf")
            logit_diff = (logits(Path(on["cuda"].path)) - logits(base, lora)).abs().max().item()
            ok = same_names and tensor_diff < 1e-5 and logit_diff < ATOL
            ok_all &= ok
            rows.append((feature, tensor_diff, logit_diff, ok))
    print(f"\n{'feature':<20} {'max|cuda-cpu| tensors':>22} {'max|logits-PEFT|':>17}  result")
    for feature, td, ld, ok in rows:
        print(f"{feature:<20} {td:22.2e} {ld:17.2e}  {'PASS' if ok else 'FAIL'}")
    print(f"\nGPU stream merge vs CPU stream merge and PEFT (fp32, atol {ATOL}): {'PASS' if ok_all else 'FAIL'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
