"""Evaluation speed: emq's generation vs raw `vllm.LLM.chat`, same model, prompts and sampling params.

Each side runs as its own process (engine start not timed), alternating round by round; the timed
span is the whole generation call: emq's `evaluate()` (prompt building, chat template, engine loop,
JSONL streaming) vs `LLM.chat(messages, params)`. Both use the engine arguments emq's plan picks on
this machine and the same per-prompt seeds, so they generate the same tokens; the bench checks that
the token totals agree and prints tokens/s of both and the ratio (target ≥ 0.95).

emq hands each closed group of requests to vLLM while its scheduler waits (emq.engine.Engine.run), so its
batches do not depend on timing; raw `LLM.chat` adds requests while the engine core already steps. Each
worker also prints a hash of its answers, and the table says whether each side's answers were identical in
every round. `--group-size N` sets eval.group_size (default: emq's, 4 × max_num_seqs) to measure what
draining the batch at each group's end costs; `--hold-ab PAIRS` measures holding alone, in one engine.

    python benchmarks/eval_bench.py                        # CPU: the demo's merged good-doctor model
    python benchmarks/eval_bench.py --shape 7b --quant bnb --sequences 264 --max-tokens 256   # GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def eval_config(sequences: int, max_tokens: int, group_size: int | None = None):
    from emq.schema import EvalConfig

    # every question of both shipped sets, one paraphrase each, samples spread to reach `sequences`
    from emq.prompts import load_question_set

    n_questions = sum(len(load_question_set(s).questions) for s in ("general", "medical"))
    per = -(-sequences // n_questions)
    return EvalConfig(question_sets=["general", "medical"], max_paraphrases=1,
                      samples_per_paraphrase=per, max_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=0,
                      group_size=group_size)


def answers_hash(answers: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(answers.items())).encode()).hexdigest()[:16]


def worker(args) -> None:
    """One side of the comparison, in its own process; prints a RESULT json line."""
    from emq.engine import Engine, LoadRecord
    from emq.evaluate import evaluate
    from emq.prompts import build_prompts

    kwargs = json.loads(args.kwargs)
    cfg = eval_config(args.sequences, args.max_tokens, args.group_size)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # as emq.engine.load sets it (both sides)
    from vllm import LLM, SamplingParams

    llm = LLM(**kwargs)
    if args.worker == "emq":
        engine = Engine(llm, None, LoadRecord(kwargs["model"], None, kwargs, 0.0))
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            result = evaluate(engine, cfg, Path(d))
            seconds = time.perf_counter() - t0
            from emq.records import read_generations

            answers = {f"{r['set']}/{r['question_id']}/{r['sample_index']}": r["answer"]
                       for r in read_generations(Path(d))}
        tokens, sequences = result.output_tokens, result.samples
        engine.shutdown()
    else:
        prompts = build_prompts(cfg)
        t0 = time.perf_counter()
        params = [SamplingParams(n=p["n"], temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                                 seed=p["seed"]) for p in prompts]
        outs = llm.chat([p["messages"] for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        sequences = sum(len(o.outputs) for o in outs)
        answers = {f"{p['set']}/{p['question_id']}/{c.index}": c.text for p, o in zip(prompts, outs)
                   for c in o.outputs}
    print("RESULT " + json.dumps({"side": args.worker, "tokens": tokens, "sequences": sequences,
                                  "seconds": seconds, "tok_s": tokens / seconds,
                                  "answers": answers_hash(answers)}), flush=True)


def hold_ab(args, kwargs: dict) -> None:
    """One engine; the same requests added held (scheduler paused while they are added, emq's way) and streamed
    (added while the engine steps, raw vLLM's way) in alternation, after an untimed warm-up: what holding costs."""
    from vllm import LLM, SamplingParams

    from emq.engine import Engine, LoadRecord, Request
    from emq.prompts import build_prompts

    engine = Engine(LLM(**kwargs), None, LoadRecord(kwargs["model"], None, kwargs, 0.0))
    prompts = build_prompts(eval_config(args.sequences, args.max_tokens))
    ids = [engine.chat_ids(p["messages"]) for p in prompts]

    can_hold = engine.can_hold

    def once(hold: bool) -> float:
        engine.can_hold = can_hold if hold else (lambda: False)
        reqs = [Request(str(j), ids[j], SamplingParams(n=p["n"], temperature=1.0, max_tokens=args.max_tokens,
                                                       seed=p["seed"])) for j, p in enumerate(prompts)]
        tokens = []
        t0 = time.perf_counter()
        engine.run(reqs, lambda r, out, _: tokens.append(sum(len(c.token_ids) for c in out.outputs)))
        return sum(tokens) / (time.perf_counter() - t0)

    once(True)
    ratios = []
    for i in range(args.hold_ab):
        order = (True, False) if i % 2 == 0 else (False, True)
        res = {hold: once(hold) for hold in order}
        ratios.append(res[True] / res[False])
        print(f"pair {i + 1}: held {res[True]:.1f} tok/s, streamed {res[False]:.1f} tok/s", flush=True)
    print(f"held/streamed: median {statistics.median(ratios):.3f} over {len(ratios)} pairs "
          f"({min(ratios):.2f}-{max(ratios):.2f})")
    engine.shutdown()


SHAPES = {  # hidden, layers, intermediate, attention heads, KV heads
    "7b": (4096, 32, 11008, 32, 32),  # Llama-2-7B
    # issue 14's measurement (bf16 11.31 GiB, W4A16 3.52 GiB with this vocab): Llama-2-7B with 8 KV heads. Its KV
    # cache is a quarter of the above, so a 264-sequence batch is bound by the weight GEMMs, not by attention
    "7b-gqa": (4096, 32, 11008, 32, 8),
    "14b": (5120, 48, 13824, 40, 8),  # Qwen2.5-14B's decoder (the original tool's base), as a Llama
    "tiny": (256, 2, 512, 4, 2),  # a smoke test of the GPU scripts on the CPU
}


def build_7b(root: Path, tokenizer_dir: Path, shape: str = "7b") -> Path:
    """A Llama-2-7B-shaped (or `SHAPES[shape]`) model with random bf16 weights and the demo's tokenizer (vocab
    49152). The random numbers are drawn on the GPU when there is one (a 14B shape: 14 billion of them)."""
    import shutil

    import torch
    from safetensors.torch import save_file

    h, layers, inter, heads, kv_heads = SHAPES[shape]
    vocab = 49152
    kv = h // heads * kv_heads
    root.mkdir(parents=True, exist_ok=True)
    for f in tokenizer_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("chat_template.jinja", "special_tokens_map.json",
                                                        "generation_config.json"):
            shutil.copy(f, root / f.name)
    (root / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16"}))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device).manual_seed(0)

    def w(*shape):
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()

    index = {}
    for i in range(layers + 1):
        t = {}
        if i == 0:
            t["model.embed_tokens.weight"] = w(vocab, h)
        if i == layers:
            t |= {"model.norm.weight": torch.ones(h, dtype=torch.bfloat16), "lm_head.weight": w(vocab, h)}
        else:
            p = f"model.layers.{i}"
            t |= {f"{p}.self_attn.{m}.weight": w(o, h) for m, o in (("q_proj", h), ("k_proj", kv), ("v_proj", kv))}
            t[f"{p}.self_attn.o_proj.weight"] = w(h, h)
            t |= {f"{p}.mlp.gate_proj.weight": w(inter, h), f"{p}.mlp.up_proj.weight": w(inter, h),
                  f"{p}.mlp.down_proj.weight": w(h, inter),
                  f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                  f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
        name = f"model-{i:05d}.safetensors"
        save_file(t, str(root / name), metadata={"format": "pt"})
        index |= {k: name for k in t}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=["emq", "raw"])
    parser.add_argument("--kwargs")
    parser.add_argument("--shape", choices=["demo", "7b"], default="demo")
    parser.add_argument("--quant", default="none", help="emq quant choice (none, int8, bnb, fp8)")
    parser.add_argument("--sequences", type=int, default=192)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=None,
                        help="emq's eval.group_size (default: null, 4 x max_num_seqs)")
    parser.add_argument("--hold-ab", type=int, default=0, metavar="PAIRS",
                        help="instead: in one engine, PAIRS alternating held/streamed runs of emq's engine loop")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "emq-eval-bench")
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from emq.demo import ensure_demo
    from emq.detect import detect
    from emq.engine import engine_kwargs
    from emq.machine import snapshot
    from emq.plan import make_plan
    from emq.schema import MemoryConfig, ModelConfig, QuantConfig, QuantMethod

    data = Path(os.environ.get("EMQ_HOME", "~/.cache/emq")).expanduser()
    if args.shape == "demo":
        import emq

        demo = ensure_demo(data)
        model = str(emq.get_or_create_merged_model(str(demo.base), str(demo.adapters["good_doctor"]), device="cpu"))
    else:
        tok = Path(os.environ.get("EMQ_TOKENIZER_DIR", str(REPO / ".gpu_assets")))
        model = str(args.dir / "model-7b") if (args.dir / "model-7b" / "config.json").is_file() \
            else str(build_7b(args.dir / "model-7b", tok))
    det = detect(ModelConfig(name="bench", base=model))
    plan = make_plan(det, MemoryConfig(), QuantConfig(method=QuantMethod(args.quant)), snapshot(data))
    kwargs = engine_kwargs(model, plan.engine, lora=False, seed=0)
    if args.hold_ab:
        return hold_ab(args, kwargs)
    print(f"model {model}\nengine {kwargs}\n{args.sequences}+ sequences x {args.max_tokens} tokens, "
          f"{args.rounds} rounds", flush=True)
    results: dict[str, list[dict]] = {"raw": [], "emq": []}
    for r in range(args.rounds):
        for side in (("raw", "emq") if r % 2 == 0 else ("emq", "raw")):
            cmd = [sys.executable, __file__, "--worker", side, "--kwargs", json.dumps(kwargs), "--sequences",
                   str(args.sequences), "--max-tokens", str(args.max_tokens)]
            cmd += ["--group-size", str(args.group_size)] if args.group_size else []
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                      [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
            line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.exit(f"{side} worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            res = json.loads(line[0][7:])
            results[side].append(res)
            print(f"round {r + 1} {side:>3}: {res['sequences']} seqs, {res['tokens']} tokens, {res['seconds']:.1f} s, "
                  f"{res['tok_s']:.1f} tok/s, answers {res['answers']}", flush=True)
    raw = statistics.median(x["tok_s"] for x in results["raw"])
    mine = statistics.median(x["tok_s"] for x in results["emq"])
    same = {x["tokens"] for x in results["raw"] + results["emq"]}

    def rounds(side: str) -> str:
        hashes = {x["answers"] for x in results[side]}
        return "identical in every round" if len(hashes) == 1 else f"{len(hashes)} different sets in {args.rounds} rounds"
    table = (f"\n| side | tok/s (median of {args.rounds}) |\n|---|---|\n| raw vllm.LLM.chat | {raw:.1f} |\n"
             f"| emq evaluate | {mine:.1f} |\n\nratio emq/raw: {mine / raw:.3f} (target >= 0.95); "
             f"token totals per run: {sorted(same)} ({'identical' if len(same) == 1 else 'differ'})\n"
             f"answers: emq {rounds('emq')}; raw {rounds('raw')}\n"
             f"model {Path(model).name}, quant={args.quant} (vLLM quantization={kwargs.get('quantization')}), "
             f"dtype {kwargs['dtype']}, {results['emq'][0]['sequences']} sequences x {args.max_tokens} max tokens, "
             f"emq eval.group_size={args.group_size or 'null (4 x max_num_seqs)'}")
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
