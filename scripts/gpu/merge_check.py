"""GPU check: the stream merge on CUDA writes what the CPU stream merge writes, and serves what
PEFT serves, feature by feature — in one process.

For each adapter feature (made by PEFT itself on a tiny synthetic Llama base, with the helpers
tests/test_merge_features.py uses), merge with `stream` on cuda and on cpu (fp32 output), then compare
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
from emq.checkpoint.merge import MergeSettings, merge_adapter  # noqa: E402
from emq.schema import MergeBase, MergeMethod, ModelConfig  # noqa: E402
from tests.synthetic import LORA_FEATURES, logits, make_base, peft_adapter  # noqa: E402

# lora_bias is left out: it needs a base with attention biases (covered on the CPU by the tests)
FEATURES = {k: v for k, v in LORA_FEATURES.items() if k != "lora_bias"}
ATOL = 1e-4


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
            lora = peft_adapter(base, root / feature, **kw)
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
