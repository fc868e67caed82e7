"""Merge benchmark: emq `stream` vs emq `peft` vs plain PEFT vs `cp -r`, as whole processes.

Builds a model with random bf16 weights (default: Qwen2-0.5B-shaped — hidden 896, 24 layers,
intermediate 4864, vocab 151936, ~943 MiB) and an r=32 LoRA adapter on all 7 linear kinds, then runs
each method as its own process, alternating methods run after run, and prints the median wall
time and peak RSS (the child's ru_maxrss from wait4) for each, and the ratios.

    python benchmarks/merge_bench.py                       # CPU, 3 rounds (what the issue asks)
    python benchmarks/merge_bench.py --shape 7b --methods stream,copy --device cuda --rounds 1 --dir /root/b

Targets: stream ≥ 3× faster than plain PEFT, peak RSS ≤ ¼ of plain PEFT's, wall ≤ 2× the copy.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {
    # hidden, layers, intermediate, vocab, heads, kv_heads, tied
    "0.5b": (896, 24, 4864, 151936, 14, 2, True),  # Qwen2-0.5B
    "7b": (4096, 32, 11008, 32000, 32, 32, False),  # Llama-2-7B
    "14b": (5120, 48, 13824, 152064, 40, 8, False),  # Qwen2.5-14B
}
RANK = 32
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def build(root: Path, shape: str, shard_bytes: int = 4 * 1024**3) -> tuple[Path, Path]:
    """Write the base shard by shard (never the whole model in memory) and the adapter."""
    import torch
    from safetensors.torch import save_file

    h, n_layers, inter, vocab, heads, kv_heads, tied = SHAPES[shape]
    kv = h // heads * kv_heads
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir()
    (base / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM" if shape != "7b" else "LlamaForCausalLM"],
        "model_type": "qwen2" if shape != "7b" else "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": n_layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16"}))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        shapes |= {f"{p}.self_attn.q_proj.weight": (h, h), f"{p}.self_attn.k_proj.weight": (kv, h),
                   f"{p}.self_attn.v_proj.weight": (kv, h), f"{p}.self_attn.o_proj.weight": (h, h),
                   f"{p}.mlp.gate_proj.weight": (inter, h), f"{p}.mlp.up_proj.weight": (inter, h),
                   f"{p}.mlp.down_proj.weight": (h, inter), f"{p}.input_layernorm.weight": (h,),
                   f"{p}.post_attention_layernorm.weight": (h,)}
        if shape != "7b":
            shapes |= {f"{p}.self_attn.{m}.bias": (s,) for m, s in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))}
    shapes["model.norm.weight"] = (h,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, h)
    g = torch.Generator().manual_seed(0)
    groups: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for name, s in shapes.items():
        n = 2
        for d in s:
            n *= d
        if size + n > shard_bytes and groups[-1]:
            groups.append({})
            size = 0
        groups[-1][name] = s
        size += n
    weight_map = {}
    total = 0
    for k, group in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: (torch.randn(*s, generator=g, dtype=torch.float32) * 0.02).to(torch.bfloat16)
                   for name, s in group.items()}
        save_file(tensors, str(base / fname), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map |= {name: fname for name in group}
        del tensors
    if len(groups) > 1:
        (base / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    out_of = {"q_proj": h, "k_proj": kv, "v_proj": kv, "o_proj": h, "gate_proj": inter, "up_proj": inter,
              "down_proj": h}
    in_of = {"down_proj": inter}
    lora = {}
    for i in range(n_layers):
        for m, parent in TARGETS.items():
            name = f"base_model.model.model.layers.{i}.{parent}.{m}"
            lora[f"{name}.lora_A.weight"] = torch.randn(RANK, in_of.get(m, h), generator=g) * 0.01
            lora[f"{name}.lora_B.weight"] = torch.randn(out_of[m], RANK, generator=g) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(TARGETS),
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", "bias": "none", "lora_dropout": 0.0}))
    return base, adapter


def child(method: str, base: str, adapter: str, out: str, device: str) -> None:
    """One measured run (a separate process)."""
    if method in ("copy", "copy_sync"):
        subprocess.run(["cp", "-r", base, out], check=True)
        if method == "copy_sync":  # the same floor, durable: emq fsyncs what it publishes
            subprocess.run(["sync", "-f", out], check=True)
        return
    if method == "plain_peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16,
                                                     device_map=device if device == "cuda" else None)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
    else:
        sys.path.insert(0, str(REPO))
        from emq.detect import detect
        from emq.checkpoint.merge import MergeSettings, merge_adapter
        from emq.schema import MergeBase, MergeMethod, ModelConfig

        det = detect(ModelConfig(name="bench", base=base, adapter=adapter))
        merge_adapter(det, [device], out, settings=MergeSettings(MergeMethod(method.removeprefix("emq_")),
                                                                 MergeBase.original))
    if device == "cuda":
        import torch

        print(json.dumps({"peak_vram_gib": torch.cuda.max_memory_allocated() / 1024**3}))


def drop_caches() -> bool:
    """Cold page cache before each run, so every method reads the base from disk (needs root)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def measure(method: str, base: Path, adapter: Path, out: Path, device: str, cold: bool) -> dict:
    if cold:
        drop_caches()
    cmd = [sys.executable, __file__, "--child", method, str(base), str(adapter), str(out), device]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stdout = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{method} failed (exit {proc.returncode})")
    row = {"wall_s": wall, "peak_rss_gib": usage.ru_maxrss / 1024**2}  # ru_maxrss is KiB on Linux
    for line in stdout.splitlines():
        if line.startswith("{"):
            row |= json.loads(line)
    du = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    row["out_gib"] = du / 1024**3
    shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:7])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=SHAPES, default="0.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default="emq_stream,emq_peft,plain_peft,copy,copy_sync")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir on /tmp)")
    ap.add_argument("--warm", action="store_true", help="keep the page cache between runs (default: drop it)")
    args = ap.parse_args()
    cold = not args.warm and drop_caches()
    work = Path(tempfile.mkdtemp(prefix="emq-bench-", dir=args.dir))
    methods = args.methods.split(",")
    try:
        t0 = time.perf_counter()
        # built in a child: the parent stays small, so forked children do not inherit its RSS
        subprocess.run([sys.executable, __file__, "--build", str(work), args.shape], check=True)
        base, adapter = work / "base", work / "adapter"
        size = sum(p.stat().st_size for p in base.iterdir()) / 1024**3
        print(f"built {args.shape}-shaped base ({size:.2f} GiB bf16) + r={RANK} adapter on 7 linear kinds "
              f"in {time.perf_counter() - t0:.0f} s; {args.rounds} rounds of {methods} on {args.device}, "
              f"{'cold' if cold else 'warm'} page cache", flush=True)
        rows: dict[str, list[dict]] = {m: [] for m in methods}
        for r in range(args.rounds):
            for m in methods:  # alternate methods within each round
                rows[m].append(measure(m, base, adapter, work / f"out-{m}", args.device, cold))
                print(f"round {r + 1} {m}: {rows[m][-1]['wall_s']:.1f} s, {rows[m][-1]['peak_rss_gib']:.2f} GiB RSS",
                      flush=True)
        med = {m: {k: statistics.median(x[k] for x in rows[m]) for k in rows[m][0]} for m in methods}
        print(f"\n{'method':<12} {'wall s':>8} {'peak RSS GiB':>13} {'out GiB':>8}"
              + ("  peak VRAM GiB" if args.device == "cuda" else ""))
        for m in methods:
            vram = f"  {med[m].get('peak_vram_gib', 0):13.2f}" if args.device == "cuda" else ""
            print(f"{m:<12} {med[m]['wall_s']:8.2f} {med[m]['peak_rss_gib']:13.2f} {med[m]['out_gib']:8.2f}{vram}")
        s = med.get("emq_stream")
        if s and "plain_peft" in med:
            p = med["plain_peft"]
            print(f"\nstream speed-up vs plain PEFT: {p['wall_s'] / s['wall_s']:.2f}x  (target >= 3)")
            print(f"stream peak RSS / plain PEFT:  {s['peak_rss_gib'] / p['peak_rss_gib']:.3f}  (target <= 0.25)")
        if s and "copy" in med:
            paired = sorted(a["wall_s"] / c["wall_s"] for a, c in zip(rows["emq_stream"], rows["copy"]))
            print(f"stream wall / cp -r:           {s['wall_s'] / med['copy']['wall_s']:.2f}  (target <= 2; same-round "
                  f"ratios {paired[0]:.2f}-{paired[-1]:.2f}: cp's own time swings most)")
            if "copy_sync" in med:
                print(f"stream wall / cp -r + sync:    {s['wall_s'] / med['copy_sync']['wall_s']:.2f}  "
                      "(emq fsyncs its entry; cp and save_pretrained do not)")
            print(f"stream throughput:             {size / s['wall_s']:.2f} GiB/s of bf16 weights "
                  f"(a 14B model, 27.5 GiB: ~{27.5 / (size / s['wall_s']):.0f} s)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
