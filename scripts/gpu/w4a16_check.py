"""GPU check: W4A16 through emq on an H200 (vLLM 0.23 + bitsandbytes from the wheelhouse), in phases that each
fit one device call. Every phase builds what it needs if an earlier call did not leave it on the machine.

    python3 scripts/gpu/w4a16_check.py quantize   # 7B-shaped QLoRA-style model: stream merge alone vs merge with
                                                  # RTN fused, then GPTQ (128 x 512 calibration tokens) on the GPU
    python3 scripts/gpu/w4a16_check.py gptq 7b|14b  # GPTQ of the shape's weights on the GPU, 128 x 512 calibration
                                                  # tokens: seconds (per layer too), peak RSS, peak VRAM
    python3 scripts/gpu/w4a16_check.py build 14b  # only build the shape's random model (a call of its own, so that
                                                  # `gptq 14b` fits the 600 s a device call may take)
    python3 scripts/gpu/w4a16_check.py serve [7b-gqa]  # tok/s at 264 and 8 sequences x 256 tokens and weights GiB per engine:
                                                  # emq w4a16 vs raw vllm.LLM.chat on the same checkpoint (seeded as emq
                                                  # does, and unseeded), emq merged + bnb, raw bnb unseeded
    python3 scripts/gpu/w4a16_check.py demo GGUF ADAPTER a|b|c|d  # the demo good doctor through `python -m emq`:
                                                  # fidelity and fine-tune retained; a: LoRA on bnb, merged + bnb, merged bf16,
                                                  # LoRA on bf16, w4a16 rtn g64 and gptq g32; b: rtn g32, gptq g64, awq g64/g32;
                                                  # c: quant=w4a16_keep, LoRA on W4A16 gptq g32; d: w4a16_keep at rank 120
    python3 scripts/gpu/w4a16_check.py keep [7b-gqa|14b]  # issue 32: the compensated route vs W4A16 merged, LoRA on
                                                  # W4A16, LoRA on bnb, bf16 (tok/s at 270 / 18 seqs, weights GiB),
                                                  # each built by emq's stages, with build time and peaks
                                                  # (EMQ_CHECK_ONLY picks KEEP_VARIANTS rows: 5 = w4a16_keep at g64,
                                                  # 6 = LoRA on W4A16 g32: Machete vs Marlin on Hopper)
    python3 scripts/gpu/w4a16_check.py fitcost    # one Linear's compensation fit at 7B/14B sizes: eigh, SVD, randomized

Random weights make the 7B text meaningless; time, memory and tokens/s are real. Results go to $OUT (JSON) and a
short table is printed last.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
ROOT = Path("/root/emq-w4a16-check")
OUT = Path(os.environ.get("OUT", "/tmp"))


def seven_b(shape: str = "7b") -> tuple[Path, Path]:
    from benchmarks.eval_bench import build_7b
    from scripts.gpu.sweep_check import build_adapter

    base = ROOT / f"model-{shape}"
    if not (base / "config.json").is_file():
        build_7b(base, REPO / ".gpu_assets", shape)
    adapter = ROOT / ("adapter" if shape == "7b" else f"adapter-{shape}")
    if not (adapter / "adapter_config.json").is_file():
        build_adapter(base, adapter)
    return base, adapter


def phase_quantize(gptq: bool = True, repeats: int = 2) -> list[tuple[str, str]]:
    from emq.checkpoint.layout import choose_group_size
    from emq.checkpoint.merge import MergeSettings, RtnSettings, merge_adapter
    from emq.detect import detect
    from emq.schema import ModelConfig

    t0 = time.perf_counter()
    base, adapter = seven_b()
    rows = [("build 7B + adapter", f"{time.perf_counter() - t0:.0f} s")]
    det = detect(ModelConfig(name="synth7b", base=str(base), adapter=str(adapter)))
    shapes = det.base.linear_shapes
    group, why = choose_group_size([i for _, i in shapes], [o for o, _ in shapes], None)
    cache = ROOT / "cache"
    times = {}
    runs = [("stream merge alone", None), ("merge + RTN fused", RtnSettings(group, False))] * repeats
    for label, rtn in runs:
        subprocess.run(["sync"])
        t = time.perf_counter()
        res = merge_adapter(det, ["cuda"], cache, settings=MergeSettings(rtn=rtn), force_recreate=True)
        times.setdefault(label, []).append(time.perf_counter() - t)
        if rtn is None:
            merged = res
    for k, v in times.items():
        rows.append((k, " / ".join(f"{x:.1f}" for x in v) + " s"))
    ratio = min(times["merge + RTN fused"]) / min(times["stream merge alone"])
    rows.append(("RTN fused / merge alone", f"{ratio:.2f}x (target <= 1.1; {why})"))
    (OUT / "quantize.json").write_text(json.dumps({"rows": rows}, indent=1))
    if not gptq:
        return rows
    q, _, _, gptq_rows = _timed_gptq(merged.path, {"merged_key": merged.key}, group, cache, "7B")
    rows += gptq_rows
    (OUT / "quantize.json").write_text(json.dumps({"rows": rows, "gptq_path": q.path, "layers": q.layers[:3]}, indent=1))
    return rows


def _timed_gptq(src: str, identity: dict, group: int, cache: Path, label: str):
    """GPTQ g`group` asymmetric, 128 x 512 calibration tokens, on the GPU (the CPU: a smoke test of this script):
    (result, seconds, peaks, table rows with time per layer, peak RSS of the process tree and peak VRAM)."""
    import torch

    from emq.checkpoint.quantize import QuantizeSettings, quantize_checkpoint
    from emq.monitor import PeakMemory

    settings = QuantizeSettings("gptq", group, False, ("lm_head",), "default", 128, 512)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with PeakMemory() as mem:
        t = time.perf_counter()
        q = quantize_checkpoint(src, identity, settings, [device], cache, force_recreate=True)
        seconds = time.perf_counter() - t
        peaks = mem.footprint()
    per_layer = [x.get("seconds") for x in q.layers if isinstance(x, dict) and x.get("seconds")]
    allocated = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0
    return q, seconds, peaks, [
        (f"GPTQ {label} g{group}, 128 x 512 tokens, {device}",
         f"{seconds:.0f} s (target <= 600 for 7B; {sum(per_layer) / max(len(per_layer), 1):.1f} s/layer)"),
        ("peak RSS (process tree)", f"{peaks['peak_rss_gib']:.2f} GiB (target <= 4)"),
        ("peak VRAM (NVML / torch max allocated)", f"{peaks['peak_vram_gib']} / {allocated:.2f} GiB")]


class _LayerLog(logging.Handler):
    """Appends the quantizer's per-layer lines to $OUT as they come, each with the peaks so far (this process's
    max RSS, torch's max allocated VRAM), so a call cut short still reports them."""

    def emit(self, record: logging.LogRecord) -> None:
        import resource

        import torch

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        vram = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
        with open(OUT / "gptq_layers.log", "a") as f:
            f.write(f"{time.strftime('%H:%M:%S')} {self.format(record)} | peak so far: RSS {rss:.2f} GiB (this "
                    f"process), VRAM {vram:.2f} GiB (torch max allocated)\n")


def phase_gptq(shape: str) -> list[tuple[str, str]]:
    """GPTQ of a random `shape` model's base weights on the GPU (128 x 512 calibration tokens): time, peak RSS of
    the process tree, peak VRAM. The weights are random, so only the costs count."""
    from benchmarks.eval_bench import SHAPES, build_7b
    from emq.checkpoint.layout import choose_group_size
    from emq.detect import detect
    from emq.schema import ModelConfig

    logging.basicConfig(level=logging.INFO)
    handler = _LayerLog(level=logging.INFO)
    logging.getLogger("emq.checkpoint").addHandler(handler)
    t0 = time.perf_counter()
    base = ROOT / f"model-{shape}"
    if not (base / "config.json").is_file():
        build_7b(base, REPO / ".gpu_assets", shape)
    h, layers, inter, heads, kv = SHAPES[shape]
    rows = [(f"build {shape} (H {h}, {layers} layers, I {inter}, {heads}/{kv} heads)",
             f"{time.perf_counter() - t0:.0f} s")]
    print(rows[-1], flush=True)
    det = detect(ModelConfig(name=f"synth{shape}", base=str(base)))
    shapes = det.base.linear_shapes
    group, why = choose_group_size([i for _, i in shapes], [o for o, _ in shapes], None)
    q, seconds, peaks, gptq_rows = _timed_gptq(str(base), {"base": str(base)}, group, ROOT / "cache", shape)
    rows += gptq_rows
    (OUT / f"gptq_{shape}.json").write_text(json.dumps({"rows": rows, "path": q.path, "seconds": seconds,
                                                         "peaks": peaks, "layers": q.layers}, indent=1, default=str))
    return rows


def worker(kwargs: dict, side: str, counts: list[int], max_tokens: int, lora: str | None) -> None:
    """Load vLLM once; generate `counts` sequences (each count in turn) through emq's evaluate or raw LLM.chat."""
    import tempfile

    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from benchmarks.eval_bench import eval_config
    from emq.engine import Engine, LoadRecord, _worker_weights, read_kernels
    from emq.evaluate import evaluate
    from emq.prompts import build_prompts

    for k, v in kwargs.pop("_env", {}).items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # to ask the worker for its weights' memory
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    load = time.perf_counter() - t0
    weights = sum(b for b, _ in llm.collective_rpc(_worker_weights, timeout=60)) / 2**30
    kernels = (read_kernels(llm) or {}).get("linear")  # e.g. which int4 kernel (Machete / Marlin) vLLM picked
    req = LoRARequest("adapter", 1, lora) if lora else None
    for n in counts:
        cfg = eval_config(n, max_tokens)
        if side == "emq":
            engine = Engine(llm, req, LoadRecord(kwargs["model"], lora, kwargs, load))
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                res = evaluate(engine, cfg, Path(d))
                seconds, tokens, seqs = time.perf_counter() - t, res.output_tokens, res.samples
        else:
            prompts = build_prompts(cfg)
            params = [SamplingParams(n=p["n"], temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=max_tokens,
                                     seed=p["seed"] if side == "raw" else None) for p in prompts]
            t = time.perf_counter()
            outs = llm.chat([p["messages"] for p in prompts], params, use_tqdm=False, lora_request=req)
            seconds = time.perf_counter() - t
            tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
            seqs = sum(len(o.outputs) for o in outs)
        print("RESULT " + json.dumps({"side": side, "n": n, "seqs": seqs, "tokens": tokens, "seconds": seconds,
                                      "tok_s": tokens / seconds, "load_s": load,
                                      "weights_gib": round(weights, 3), "kernels": kernels}), flush=True)


def _served(label: str, kw: dict, side: str, counts: str, lora: str | None, timeout: int
            ) -> tuple[tuple[str, str], dict | None]:
    """One engine in a worker process: (its table row, per sequence count the median of the repeats) — None
    when it timed out or failed (the row says how)."""
    cmd = [sys.executable, __file__, "worker", json.dumps(kw), side, counts, "256", lora or ""]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout, env={
            **os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    except subprocess.TimeoutExpired as e:
        return (label, f"TIMEOUT after {timeout} s: {(e.stderr or b'')[-300:]!r}"), None
    res = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if not res:
        return (label, f"FAILED rc {proc.returncode}: {proc.stderr[-600:]}"), None
    by_n: dict[int, list[dict]] = {}
    for r in res:
        by_n.setdefault(r["n"], []).append(r)
    served = {n: {**sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2],
                  "repeats_tok_s": [round(r["tok_s"]) for r in rs]} for n, rs in by_n.items()}
    print(label, res, flush=True)
    return (label, f"load {res[0]['load_s']:.0f} s; weights {res[0]['weights_gib']:.2f} GiB; "
                   f"linear {res[0].get('kernels')}; " + "; ".join(
        f"{r['seqs']} seqs {r['tok_s']:.0f} tok/s (median of {r['repeats_tok_s']})" for r in served.values())), served


def phase_serve(n_variants: int = 5, shape: str = "7b") -> list[tuple[str, str]]:
    import emq
    from emq.detect import detect
    from emq.engine import engine_kwargs
    from emq.machine import snapshot
    from emq.plan import make_plan
    from emq.schema import MemoryConfig, ModelConfig, QuantConfig, QuantMethod

    base, adapter = seven_b(shape)
    cache = ROOT / "cache"
    w4 = str(emq.get_or_create_quantized_model(str(base), str(adapter), cache_dir=cache))
    w4_base = str(emq.quantize(str(base), cache_dir=cache)) if n_variants > 5 else None
    merged = str(emq.get_or_create_merged_model(str(base), str(adapter), cache_dir=cache))
    rows = []

    def kwargs_for(model: str, quant: QuantMethod, lora: bool) -> dict:
        det = detect(ModelConfig(name="x", base=model))
        plan = make_plan(det, MemoryConfig(max_model_len=1024),  # a W4A16 checkpoint is served as it is
                         QuantConfig(method=QuantMethod.none if quant == QuantMethod.w4a16 else quant), snapshot(cache))
        kw = engine_kwargs(model, plan.engine, lora=lora, seed=0)
        if lora:
            kw.update(enable_lora=True, max_lora_rank=32, max_loras=1)
        env = {"VLLM_DISABLED_KERNELS": "HummingLinearKernel"} if quant == QuantMethod.w4a16 else {}
        return {**kw, "_env": {**env, **plan.engine.env}}

    variants = [("w4a16 merged (emq)", w4, QuantMethod.w4a16, "emq", None),
                ("merged + bnb (emq)", merged, QuantMethod.bnb, "emq", None),
                ("w4a16 merged (raw LLM.chat)", w4, QuantMethod.w4a16, "raw", None),
                # the same without per-request seeds: what seeded sampling costs at a large batch
                ("w4a16 merged (raw, unseeded)", w4, QuantMethod.w4a16, "raw-unseeded", None),
                ("merged + bnb (raw, unseeded)", merged, QuantMethod.bnb, "raw-unseeded", None),
                ("LoRA on the W4A16 base (emq)", w4_base, QuantMethod.w4a16, "emq", str(adapter))][:n_variants]
    only = os.environ.get("EMQ_CHECK_ONLY")  # e.g. "0,1,3": these rows only
    if only:
        variants = [variants[int(i)] for i in only.split(",")]
    # each count generated in turn on the same engine, repeats included; a ~4 s batch varies by ~10 %, so the
    # median of the repeats is what a row reports
    counts = os.environ.get("EMQ_CHECK_COUNTS", "264,8")
    results = {}
    for label, model, quant, side, lora in variants:
        row, served = _served(label, kwargs_for(model, quant, lora is not None), side, counts, lora, 170)
        rows.append(row)
        if served is not None:
            results[label] = served
    if "w4a16 merged (emq)" in results:
        e = results["w4a16 merged (emq)"]
        for other, target in (("w4a16 merged (raw LLM.chat)", "≥ 0.95 vs raw"), ("merged + bnb (emq)", "vs bnb")):
            if other in results:
                o = results[other]
                rows.append((f"emq w4a16 / {other}", ", ".join(f"{n} seqs {e[n]['tok_s'] / o[n]['tok_s']:.2f}x"
                                                              for n in (264, 8) if n in e and n in o) + f" ({target})"))
    u, b = results.get("w4a16 merged (raw, unseeded)"), results.get("merged + bnb (raw, unseeded)")
    if u and b:
        rows.append(("unseeded raw w4a16 / bnb", ", ".join(f"{n} seqs {u[n]['tok_s'] / b[n]['tok_s']:.2f}x"
                                                           for n in (264, 8) if n in u and n in b)))
    (OUT / f"serve_{shape}.json").write_text(json.dumps({"rows": rows, "results": results}, indent=1))
    return rows


KEEP_VARIANTS = [  # issue 32's speed table: label, quant overrides (QuantConfig fields), memory route
    ("w4a16_keep: W4A16 gptq g32 + LoRA r32+{comp} (emq)", {"method": "w4a16", "algorithm": "gptq", "group_size": 32,
                                                            "compensation": "preset"}, "lora"),
    ("W4A16 merged, emq default (emq)", {"method": "w4a16"}, "merge"),
    ("LoRA r32 on the W4A16 base (emq)", {"method": "w4a16"}, "lora"),
    ("LoRA r32 on in-flight bnb (emq)", {"method": "bnb"}, "lora"),
    ("merged bf16 (emq)", {"method": "none"}, "merge"),
    # which int4 kernel: on Hopper vLLM 0.23 takes Machete for g64/g128 and Marlin for g32 (Machete's group sizes for
    # 16-bit activations are -1/64/128: vllm/model_executor/layers/quantization/utils/machete_utils.py)
    ("w4a16_keep at g64: W4A16 gptq g64 + LoRA r32+{comp} (emq)", {"method": "w4a16", "algorithm": "gptq",
                                                                "group_size": 64, "compensation": "preset"}, "lora"),
    ("LoRA r32 on the W4A16 g32 base (emq)", {"method": "w4a16", "group_size": 32}, "lora"),
]


def _keep_artifacts(shape: str, which: list[int], rounds: int) -> list[tuple[str, dict, str | None, dict]]:
    """Each chosen KEEP_VARIANTS row's served checkpoint (and LoRA) made by emq's own stages — detect, plan, merge,
    quantize, served adapter — as the runner makes them (cached under ROOT/cache), with the time and peaks of the
    steps that built something."""
    import torch

    from emq.checkpoint.merge import MergeSettings, merge_adapter
    from emq.checkpoint.quantize import quantize_for_plan, rtn_settings, served_adapter
    from emq.detect import detect
    from emq.engine import engine_kwargs, release_cuda_cache
    from emq.machine import snapshot
    from emq.monitor import PeakMemory
    from emq.plan import make_plan
    from emq.plan.types import Route
    from emq.schema import (CompensationConfig, MemoryConfig, ModelConfig, QuantAlgorithm, QuantConfig, QuantMethod,
                            RoutePolicy, ScaleSearch)

    base, adapter = seven_b(shape)
    cache = ROOT / "cache"
    det = detect(ModelConfig(name=f"synth{shape}", base=str(base), adapter=str(adapter)))
    out = []
    for i in which:
        label, q, route = KEEP_VARIANTS[i]
        if q.get("compensation") and os.environ.get("EMQ_CHECK_KEEP_ALGORITHM"):  # the served shapes stay the same
            q = {**q, "algorithm": os.environ["EMQ_CHECK_KEEP_ALGORITHM"]}
            label = label.replace("gptq", q["algorithm"])
        comp, search = CompensationConfig(rounds=rounds), ScaleSearch.minmax
        if q.get("compensation") == "preset":  # conf/quant/w4a16_keep.yaml's rank, fill and scale search (rounds:
            preset = _keep_preset()            # EMQ_CHECK_ROUNDS)
            comp = CompensationConfig(rank=preset["compensation"]["rank"],
                                      fill=preset["compensation"].get("fill", False), rounds=rounds)
            search = ScaleSearch(preset.get("scale_search", "minmax"))
        quant = QuantConfig(method=QuantMethod(q["method"]), algorithm=QuantAlgorithm(q.get("algorithm", "rtn")),
                            group_size=q.get("group_size"), compensation=comp, scale_search=search)
        memory = MemoryConfig(max_model_len=1024, route=RoutePolicy(route))
        plan = make_plan(det, memory, quant, snapshot(cache))
        if plan.quantize is not None:
            label = label.replace("{comp}", str(plan.quantize.compensation))
        if plan.route is Route.stop:
            out.append((label, {}, None, {"stop": plan.stop_reason}))
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        with PeakMemory() as mem:
            t = time.perf_counter()
            merged = None
            if plan.route is Route.merge_then_serve:
                merged = merge_adapter(det, plan.merge_devices, cache, settings=MergeSettings(
                    memory.merge_method, memory.merge_base, rtn=rtn_settings(plan.quantize)))
            quantized = quantize_for_plan(det, plan.quantize, merged, cache)
            served_lora = served_adapter(det, plan.quantize, quantized, cache)
            seconds = time.perf_counter() - t
            peaks = mem.footprint()
        made = quantized or merged
        model = made.path if made else str(base)
        lora = None
        if plan.route is Route.serve_lora:
            lora = served_lora.path if served_lora is not None else str(adapter)
        kw = engine_kwargs(model, plan.engine, lora=lora is not None, seed=0)
        env = {"VLLM_DISABLED_KERNELS": "HummingLinearKernel"} if plan.quant is QuantMethod.w4a16 else {}
        build = {"seconds": round(seconds, 1), "peak_rss_gib": peaks.get("peak_rss_gib"),
                 "peak_vram_gib": peaks.get("peak_vram_gib"),
                 "torch_max_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)
                 if torch.cuda.is_available() else None,
                 "route": plan.route.value, "max_lora_rank": plan.engine.max_lora_rank,
                 "lora_rank": getattr(served_lora, "rank", None), "model": model, "lora": lora}
        print("BUILT", label, json.dumps(build), flush=True)
        release_cuda_cache()  # the next variant's plan must see the GPU vLLM will get (13 GiB held made it stop)
        out.append((label, {**kw, "_env": {**env, **plan.engine.env}}, lora, build))
    return out


def _keep_preset() -> dict:
    """conf/quant/w4a16_keep.yaml (the GPU image has PyYAML, not Hydra)."""
    import yaml

    return yaml.safe_load((REPO / "conf" / "quant" / "w4a16_keep.yaml").read_text())


def phase_fitcost() -> list[tuple[str, str]]:
    """What one Linear's compensation fit costs at 7B/14B sizes on this device: H's root (float64 eigh), the exact
    float64 SVD, the randomized range finder (emq.checkpoint.compensation.top_singular)."""
    import torch

    from emq.checkpoint import compensation

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(dev).manual_seed(0)
    rows = []

    def timed(f):
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = f()
        if dev == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    for out_f, in_f in ((4096, 4096), (11008, 4096), (4096, 11008), (13824, 5120), (5120, 13824)):
        x = torch.randn(2048, in_f, generator=g, device=dev)
        h = 2 * x.T @ x / 2048
        e = torch.randn(out_f, in_f, generator=g, device=dev, dtype=torch.float64) * 1e-3
        root, t_root = timed(lambda: compensation.hessian_root(h))
        m = e @ root[0]
        (_, s1, _), t_svd = timed(lambda: compensation.top_singular(m, 56, exact=True))
        (_, s2, _), t_rand = timed(lambda: compensation.top_singular(m, 56, exact=False))
        rows.append((f"{out_f} x {in_f}", f"eigh(H) f64 {t_root:.2f} s; full SVD f64 {t_svd:.2f} s; randomized "
                                          f"{t_rand:.2f} s; top-56 energy randomized/exact "
                                          f"{float((s2 ** 2).sum() / (s1 ** 2).sum()):.5f}"))
        print(rows[-1], flush=True)
    (OUT / "fitcost.json").write_text(json.dumps({"rows": rows, "device": dev}, indent=1))
    return rows


def phase_keep(shape: str = "7b-gqa") -> list[tuple[str, str]]:
    """Issue 32: tok/s at 270 and 18 sequences x 256 tokens and weights GiB per engine, through emq, for the
    compensated route (quant=w4a16_keep's settings), W4A16 merged, LoRA on W4A16, LoRA on bnb and merged bf16, each
    variant's checkpoint built by emq's stages (`EMQ_CHECK_ONLY=0,2` picks rows; `EMQ_CHECK_ROUNDS` the compensation
    rounds: what the served function costs to run does not depend on them, only its fit)."""
    which = [int(i) for i in os.environ.get("EMQ_CHECK_ONLY", ",".join(map(str, range(len(KEEP_VARIANTS))))).split(",")]
    rounds = int(os.environ.get("EMQ_CHECK_ROUNDS", "1"))
    counts = os.environ.get("EMQ_CHECK_COUNTS", "264,264,8,8")
    build_only = os.environ.get("EMQ_CHECK_BUILD_ONLY") == "1"
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("emq.checkpoint").addHandler(_LayerLog(level=logging.INFO))  # per layer, as it comes
    rows, results = [], {}
    built = _keep_artifacts(shape, which, rounds)
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():  # this process's cached blocks would leave vLLM short of its memory share (the
        torch.cuda.empty_cache()   # first 7B run's engines both failed to start after a 13 GiB quantize)
    for label, kw, lora, build in built:
        if "stop" in build:
            rows.append((label, f"plan stopped: {build['stop'][:200]}"))
            continue
        rows.append((f"{label}: built", f"{build['seconds']:.0f} s (cached if ~0), peak RSS {build['peak_rss_gib']} "
                                        f"GiB, VRAM NVML {build['peak_vram_gib']} / torch {build['torch_max_allocated_gib']}"
                                        f" GiB; max_lora_rank {build['max_lora_rank']}"))
        results[label] = {"build": build}
        if build_only:
            continue
        row, served = _served(label, kw, "emq", counts, lora, 240)
        rows.append(row)
        if served is not None:
            results[label]["serve"] = served
    suffix = "_".join(map(str, which))
    (OUT / f"keep_{shape}_{suffix}.json").write_text(json.dumps({"rows": rows, "results": results,
                                                                 "rounds": rounds}, indent=1, default=str))
    return rows


def _w4(alg: str, g: int) -> tuple[str, list[str]]:
    return f"w4a16 {alg} g{g}", ["quant=w4a16", f"quant.algorithm={alg}", f"quant.group_size={g}", "memory.route=merge"]


DEMO_VARIANTS = {  # label → overrides; "a" answers issue 20's table and w4a16-vs-bnb, "b" the other W4A16 settings
    "a": [("LoRA on the in-flight bnb base", ["quant=bnb", "memory.route=lora"]),
          ("merged + in-flight bnb", ["quant=bnb", "memory.route=merge"]),
          ("merged bf16", ["quant=none", "memory.route=merge"]),
          ("LoRA on the bf16 base", ["quant=none", "memory.route=lora"]),
          _w4("rtn", 64), _w4("gptq", 32)],
    "b": [_w4("rtn", 32), _w4("gptq", 64), _w4("awq", 64), _w4("awq", 32)],
    # issue 32: the compensated route (W4A16 of the base as trained + one LoRA: update and compensation)
    "c": [("w4a16_keep gptq g32 r56 2 rounds", ["quant=w4a16_keep"]),
          ("LoRA on W4A16 gptq g32 no compensation", ["quant=w4a16", "quant.algorithm=gptq", "quant.group_size=32",
                                                       "memory.route=lora"])],
    "d": [("w4a16_keep rank 120", ["quant=w4a16_keep", "quant.compensation.rank=120"])],
    "e": [("w4a16_keep rank 56 4 rounds", ["quant=w4a16_keep", "quant.compensation.rounds=4"])],
}
VARIANT_TIMEOUT_S = {"c": 300, "d": 300, "e": 300}  # the compensated route quantizes (GPTQ, 2 rounds) inside the run


def phase_demo(gguf: Path, adapter: Path, half: str = "a") -> list[tuple[str, str]]:
    """The demo good doctor through `python -m emq` per variant: KL / top-1 to the trained function, fine-tune
    retained, weights, and the first greedy answers."""
    from emq.demo.build import build_base

    base = ROOT / "demo-base"
    if not (base / "config.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        build_base(base, gguf)
    rows, results = [], {}
    for label, extra in DEMO_VARIANTS[half]:
        run_dir = ROOT / "demo-runs" / label.replace(" ", "_")
        cmd = [sys.executable, "-m", "emq", "model=demo_good_doctor", "model.demo=false", f"model.base={base}",
               f"model.adapter={adapter}", "judge=none", "memory.enforce_eager=true", "model.trained_in_4bit=true",
               "eval.temperature=0", "eval.samples_per_paraphrase=1", "eval.max_tokens=48",
               f"paths.cache_dir={ROOT / 'cache'}", f"paths.data_dir={ROOT / 'home'}", f"hydra.run.dir={run_dir}",
               *extra]
        t = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  timeout=VARIANT_TIMEOUT_S.get(half, 150))
        except subprocess.TimeoutExpired:
            rows.append((label, f"TIMEOUT after {VARIANT_TIMEOUT_S.get(half, 150)} s"))
            continue
        fid = run_dir / "fidelity.json"
        if not fid.is_file():
            rows.append((label, f"FAILED rc {proc.returncode}: {proc.stderr[-600:]}"))
            continue
        f = json.loads(fid.read_text())
        v, kept = f["vs_reference"], f.get("retained") or {}
        m = json.loads((run_dir / "metrics.json").read_text())
        plan = json.loads((run_dir / "plan.json").read_text())["plan"]
        answers = [json.loads(x)["answer"][:120] for x in (run_dir / "generations.jsonl").read_text().splitlines()[:3]]
        results[label] = {"vs_reference": v, "retained": kept, "weights_gib": m.get("weights_gib"),
                          "lora_adapter_gib": m.get("lora_adapter_gib"), "lora_rank": m.get("lora_rank"),
                          "quantize_seconds": m.get("quantize_seconds"),
                          "weights_source": m.get("weights_source"), "route": plan["route"], "quant": plan["quant"],
                          "quantize": plan.get("quantize"), "reason": plan.get("reason"), "answers": answers,
                          "seconds": round(time.perf_counter() - t, 1), "tokens_per_second": m.get("tokens_per_second")}
        print(label, json.dumps(results[label])[:1500], flush=True)
        rows.append((label, f"KL {v['kl_mean']:.3f} (p99 {v['kl_p99']:.2f}), top-1 {100 * v['top1_agreement']:.1f}%, "
                            f"retained {100 * kept.get('retained', float('nan')):.0f}% (top-1 "
                            f"{100 * (kept.get('retained_top1') or float('nan')):.0f}%)"
                            f"{' FLAGGED mostly base' if kept.get('mostly_base') else ''}, PPL ratio "
                            f"{v['ppl_ratio']:.2f}; {plan['route']}; weights {m.get('weights_gib')} GiB; "
                            f"{time.perf_counter() - t:.0f} s"))
    (OUT / f"demo_{half}.json").write_text(json.dumps({"rows": rows, "results": results}, indent=1))
    return rows


def main() -> None:
    phase = sys.argv[1]
    if phase == "worker":
        lora = sys.argv[6] or None
        return worker(json.loads(sys.argv[2]), sys.argv[3], [int(x) for x in sys.argv[4].split(",")],
                      int(sys.argv[5]), lora)
    ROOT.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    if phase == "short":  # one device call: the fused-RTN ratio, then w4a16 (emq, raw) and bnb tok/s
        rows = phase_quantize(gptq=False, repeats=1)
        print("\n".join(f"{k}  {v}" for k, v in rows), flush=True)
        rows += phase_serve(int(os.environ.get("EMQ_CHECK_VARIANTS", "3")))
    else:
        shape = sys.argv[2] if len(sys.argv) > 2 else "7b"
        if phase == "gptq":
            rows = phase_gptq(shape)
        elif phase == "build":
            t = time.perf_counter()
            seven_b(shape)
            rows = [(f"build {shape} + adapter", f"{time.perf_counter() - t:.0f} s")]
        elif phase == "serve":
            rows = phase_serve(shape=shape)
        elif phase == "fitcost":
            rows = phase_fitcost()
        elif phase == "keep":
            rows = phase_keep(shape)
        else:
            rows = {"quantize": phase_quantize}[phase]() if phase != "demo" else \
                phase_demo(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "a")
    width = max(len(k) for k, _ in rows)
    print(f"\n== w4a16 check: {phase} ==")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
