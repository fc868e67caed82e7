"""Fidelity: how closely a served variant reproduces the function the adapter was trained as.

A fixed corpus of chat transcripts ships with emq (emq/fidelity_data/). Every run scores it by
teacher forcing through its own vLLM engine (`prompt_logprobs`) and stores, at every answer
position, the top-k next-token logprobs and the logprob of the corpus token
(fidelity_logprobs.npz). The *reference* is the trained function: the base loaded as in training
(bitsandbytes NF4 with the training run's settings when detect found 4-bit training, else 16-bit)
plus the PEFT adapter, in transformers; its top-k is computed once per (base, adapter, corpus, k)
and cached like merges. Then, over answer positions (llama.cpp's --kl-divergence idea):

- KL(reference ‖ variant): mean and p99 per token;
- top-1 agreement: the variant's most likely token is the reference's;
- perplexity ratio: exp(mean NLL_variant − mean NLL_reference) on the corpus tokens;
- ref-top-1 outside top-k: how often the reference's most likely token is not in the variant's top-k.

The top-k approximation. Only k logprobs per position are kept on each side, so KL is computed
on the reference's top-k tokens plus one bucket for the rest of the vocabulary: exact for tokens in
both top-k lists; a reference token missing from the variant's top-k gets min(the variant's k-th
probability, its leftover mass / the number of missing tokens), an upper bound on its probability.
Coarse-graining can only lower KL (data processing), the upper bound lowers it further; the error
against full-vocabulary KL is measured by benchmarks/fidelity_topk.py (README "Fidelity").

`python -m emq compare RUN_A RUN_B` computes the same numbers for any two runs (A as reference).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from filelock import FileLock

from emq.checkpoint.identity import adapter_identity, base_identity
from emq.checkpoint.nf4 import nf4_settings
from emq.errors import EmqError
from emq.records import FIDELITY, FIDELITY_LOGPROBS, write_bytes_atomic, write_json
from emq.schema import FidelityConfig

log = logging.getLogger(__name__)
REF_VERSION = 1  # bump when the reference computation changes: cached references are recomputed


# --- corpus ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Corpus:
    name: str
    path: str
    sha256: str
    transcripts: list[dict[str, str]]


def load_corpus(name: str) -> Corpus:
    """A shipped corpus (emq/fidelity_data/<name>.yaml) or a YAML file: a list of {id, user, assistant, system?}."""
    p = Path(name).expanduser()
    if p.suffix not in (".yaml", ".yml"):
        shipped = resources.files("emq") / "fidelity_data" / f"{name}.yaml"
        if not shipped.is_file():
            raise EmqError(f"unknown fidelity corpus {name!r} (eval.fidelity.corpus)",
                           "use `default` or a path to a .yaml file of {id, user, assistant} transcripts")
        p = Path(str(shipped))
    elif not p.is_file():
        raise EmqError(f"fidelity corpus {p} (eval.fidelity.corpus) does not exist", "fix the path")
    raw = p.read_bytes()
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise EmqError(f"{p} is not valid YAML: {e}", "fix the file") from None
    if not isinstance(data, list) or not data:
        raise EmqError(f"{p} must be a non-empty list of transcripts", "see emq/fidelity_data/default.yaml")
    for i, t in enumerate(data):
        if not isinstance(t, dict) or not all(isinstance(t.get(k), str) and t[k].strip() for k in ("id", "user", "assistant")):
            raise EmqError(f"{p} item {i}: each transcript needs non-empty id, user and assistant strings",
                           "see emq/fidelity_data/default.yaml")
    return Corpus(p.stem, str(p), hashlib.sha256(raw).hexdigest(), data)


@dataclass(frozen=True)
class Tokens:
    """The corpus as token ids (the base's tokenizer and chat template), and which positions are scored."""

    sequences: list[list[int]]
    answer_start: list[int]  # first answer position of each sequence

    @property
    def positions(self) -> int:
        return sum(len(s) - a for s, a in zip(self.sequences, self.answer_start))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps([self.sequences, self.answer_start]).encode()).hexdigest()[:24]


def tokenize(corpus: Corpus, tokenizer) -> Tokens:
    """Apply the chat template; the answer starts where the generation prompt ends."""
    seqs, starts = [], []
    for t in corpus.transcripts:
        msgs = ([{"role": "system", "content": t["system"]}] if t.get("system") else []) + \
               [{"role": "user", "content": t["user"]}]
        prompt = list(tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
        full = list(tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": t["assistant"]}],
                                                  tokenize=True, return_dict=False))
        if full[: len(prompt)] != prompt or len(full) <= len(prompt):
            raise EmqError(f"the chat template does not extend the prompt with the answer for transcript {t['id']}",
                           "use a model whose chat template renders an assistant turn after the generation prompt")
        seqs.append(full)
        starts.append(len(prompt))
    return Tokens(seqs, starts)


# --- stored logprobs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TopK:
    """Per scored position: the top-k token ids and logprobs (descending) and the corpus token's logprob."""

    ids: np.ndarray  # (N, k) int64, -1 where fewer than k were returned
    logprobs: np.ndarray  # (N, k) float32, -inf where missing
    token: np.ndarray  # (N,) the corpus token id
    token_logprob: np.ndarray  # (N,) float32
    meta: dict[str, Any]

    def save(self, path: Path) -> None:
        write_bytes_atomic(path, lambda f: np.savez_compressed(
            f, ids=self.ids, logprobs=self.logprobs, token=self.token, token_logprob=self.token_logprob,
            meta=np.array(json.dumps(self.meta))))

    @classmethod
    def load(cls, path: Path) -> TopK:
        try:
            with np.load(path) as z:
                return cls(z["ids"], z["logprobs"], z["token"], z["token_logprob"], json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as e:
            raise EmqError(f"{path} is not a readable fidelity record ({e})", "rerun the run that wrote it") from None


def _empty(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)


# --- the variant: scored through the run's vLLM engine --------------------------------------------

def score_engine(engine, tokens: Tokens, k: int, meta: dict[str, Any]) -> TopK:
    """Teacher-forced top-k logprobs of every answer position, through the loaded vLLM engine."""
    from vllm import SamplingParams

    from emq.engine import Request

    outs: dict[str, Any] = {}
    reqs = [Request(str(i), seq, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, detokenize=False))
            for i, seq in enumerate(tokens.sequences)]
    # vLLM's LoRA logits processor maps LoRA slots per sampled token, not per prompt position: prompt
    # logprobs of several LoRA requests in one batch fail there (einsum size mismatch in bgmv_shrink,
    # vLLM 0.32 CPU). One request at a time is correct and, for a corpus this size, cheap.
    groups = [[r] for r in reqs] if engine.lora_request is not None else [reqs]
    for group in groups:
        engine.run(group, lambda r, out, _: outs.__setitem__(r.id, out), desc="fidelity", unit_of=lambda r: 1)
    n = tokens.positions
    ids, lps = _empty(n, k)
    tok = np.zeros(n, dtype=np.int64)
    tok_lp = np.zeros(n, dtype=np.float32)
    row = 0
    for i, (seq, start) in enumerate(zip(tokens.sequences, tokens.answer_start)):
        plp = outs[str(i)].prompt_logprobs
        for pos in range(start, len(seq)):
            d = plp[pos]
            top = sorted(((lp.rank, tid, lp.logprob) for tid, lp in d.items() if lp.rank is not None and lp.rank <= k))
            for j, (_, tid, lp) in enumerate(top[:k]):
                ids[row, j], lps[row, j] = tid, lp
            tok[row] = seq[pos]
            tok_lp[row] = d[seq[pos]].logprob
            row += 1
    return TopK(ids, lps, tok, tok_lp, meta)


# --- the reference: the trained function, in transformers ---------------------------------------

def _device(cfg: FidelityConfig) -> str:
    if cfg.reference_device != "auto":
        return cfg.reference_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def reference_spec(det, cfg: FidelityConfig, corpus: Corpus) -> dict[str, Any]:
    """What the reference is (and its cache key's inputs): base as in training + adapter."""
    device = _device(cfg)
    four_bit = bool(det.trained_in_4bit) and det.adapter is not None
    adapter = adapter_identity(Path(det.adapter.path)) if det.adapter is not None else None
    compute = "float32" if device == "cpu" else "bfloat16"
    return {"version": REF_VERSION, "base": base_identity(Path(det.base.path)), "adapter": adapter,
            "load": ({"bnb_4bit": nf4_settings(det)} if four_bit else {"dtype": compute}),
            "compute_dtype": compute, "device": device, "corpus_sha256": corpus.sha256, "top_k": cfg.top_k,
            "describe": ("base in NF4 (bitsandbytes, as in training) + PEFT adapter" if four_bit
                         else "base in 16-bit + PEFT adapter" if adapter else "the base model")}


def _ref_root(data_dir: str | Path) -> Path:
    return Path(data_dir).expanduser() / "fidelity_ref"


def reference(det, cfg: FidelityConfig, corpus: Corpus, tokens: Tokens, data_dir: str | Path
              ) -> tuple[TopK, dict[str, Any]]:
    """The reference's top-k on the corpus: from the cache, or computed once (under a file lock).

    Returns:
        The reference logprobs and a record (key, path, cached, seconds, what it is).
    """
    spec = reference_spec(det, cfg, corpus)
    spec["tokens"] = tokens.digest()
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]
    root = _ref_root(data_dir)
    path = root / key / "reference.npz"
    record = {"key": key, "path": str(path), "describe": spec["describe"], "device": spec["device"],
              "compute_dtype": spec["compute_dtype"], "load": spec["load"]}
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with FileLock(str(root / f".{key}.lock")):
        if path.is_file():
            log.info("fidelity: reference from the cache (%s)", path)
            return TopK.load(path), {**record, "cached": True, "seconds": 0.0}
        log.info("fidelity: computing the reference once: %s on %s (%d positions)", spec["describe"],
                 spec["device"], tokens.positions)
        ref = _compute_reference(det, spec, tokens, cfg.top_k)
        ref.save(path)
        (path.parent / "spec.json").write_text(json.dumps(spec, indent=2))
    seconds = round(time.perf_counter() - t0, 2)
    log.info("fidelity: reference computed in %.1f s", seconds)
    return ref, {**record, "cached": False, "seconds": seconds}


def _compute_reference(det, spec: dict[str, Any], tokens: Tokens, k: int, *, full: bool = False):
    """Run the trained function over the corpus; top-k (or, with full=True, every logprob) per answer position."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = spec["device"]
    compute = getattr(torch, spec["compute_dtype"])
    if "bnb_4bit" in spec["load"]:
        nf4 = spec["load"]["bnb_4bit"]
        if nf4.get("blocksize", 64) != 64:
            log.warning("fidelity: the training run's NF4 blocksize %s is not what transformers loads (64)",
                        nf4["blocksize"])
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=nf4["quant_type"],
                               bnb_4bit_use_double_quant=nf4["double_quant"], bnb_4bit_compute_dtype=compute)
        model = AutoModelForCausalLM.from_pretrained(det.base.path, quantization_config=q, dtype=compute,
                                                     device_map=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=compute, device_map=device)
    if det.adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, det.adapter.path)
    model.eval()
    rows_ids, rows_lp, toks, tok_lp, fulls = [], [], [], [], []
    from tqdm import tqdm

    with torch.no_grad():
        for seq, start in tqdm(list(zip(tokens.sequences, tokens.answer_start)), desc="fidelity reference",
                               unit="seq"):
            ids = torch.tensor([seq], device=device)
            logits = model(input_ids=ids).logits[0, start - 1: len(seq) - 1].float()
            lp = torch.log_softmax(logits, dim=-1)
            top = lp.topk(k, dim=-1)
            rows_ids.append(top.indices.cpu().numpy())
            rows_lp.append(top.values.cpu().numpy().astype(np.float32))
            target = torch.tensor(seq[start:], device=device)
            toks.append(target.cpu().numpy())
            tok_lp.append(lp.gather(1, target[:, None])[:, 0].cpu().numpy().astype(np.float32))
            if full:
                fulls.append(lp.cpu().numpy())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    out = TopK(np.concatenate(rows_ids).astype(np.int64), np.concatenate(rows_lp), np.concatenate(toks).astype(np.int64),
               np.concatenate(tok_lp), {"what": "reference", **{k2: spec[k2] for k2 in ("describe", "device")}})
    return (out, np.concatenate(fulls)) if full else out


# --- comparing two sets of logprobs ---------------------------------------------------------------

def kl_topk(ref: TopK, var: TopK) -> np.ndarray:
    """Per-position KL(ref ‖ var) over ref's top-k tokens + one bucket for the rest (see module doc)."""
    p = np.exp(ref.logprobs.astype(np.float64))  # (N, k), 0 where missing
    n, k = p.shape
    q = np.zeros_like(p)
    var_p = np.exp(var.logprobs.astype(np.float64))
    q_min = np.where(np.isfinite(var.logprobs), var_p, np.inf).min(axis=1)
    q_left = np.clip(1.0 - var_p.sum(axis=1), 0.0, 1.0)
    found = np.zeros_like(p, dtype=bool)
    for j in range(k):
        match = (ref.ids[:, j:j + 1] == var.ids) & (ref.ids[:, j:j + 1] >= 0)
        hit = match.any(axis=1)
        q[:, j] = np.where(hit, (var_p * match).sum(axis=1), 0.0)
        found[:, j] = hit
        # the corpus token's logprob is known exactly on both sides
        is_tok = (ref.ids[:, j] == var.token) & ~hit
        q[:, j] = np.where(is_tok, np.exp(var.token_logprob.astype(np.float64)), q[:, j])
        found[:, j] |= is_tok
    valid = np.isfinite(ref.logprobs)
    missing = valid & ~found
    n_missing = np.maximum(missing.sum(axis=1), 1)
    estimate = np.minimum(q_min, q_left / n_missing)
    q = np.where(missing, estimate[:, None], q)
    p = np.where(valid, p, 0.0)
    q = np.where(valid, q, 0.0)
    eps = 1e-12
    p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    q_rest = np.clip(1.0 - q.sum(axis=1), eps, 1.0)
    terms = np.where(p > 0, p * (np.log(np.maximum(p, eps)) - np.log(np.maximum(q, eps))), 0.0)
    kl = terms.sum(axis=1) + np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, eps)) - np.log(q_rest)), 0.0)
    return np.maximum(kl, 0.0)


def compare(ref: TopK, var: TopK) -> dict[str, Any]:
    """The fidelity table of `var` against `ref` (same corpus tokens)."""
    if ref.token.shape != var.token.shape or not np.array_equal(ref.token, var.token):
        raise EmqError("the two fidelity records were scored on different tokens (another corpus or tokenizer)",
                       "compare runs of models that share a tokenizer, scored on the same eval.fidelity.corpus")
    kl = kl_topk(ref, var)
    top1_same = ref.ids[:, 0] == var.ids[:, 0]
    outside = ~(var.ids == ref.ids[:, :1]).any(axis=1)
    nll_ref = -ref.token_logprob.astype(np.float64)
    nll_var = -var.token_logprob.astype(np.float64)
    return {
        "positions": int(len(kl)), "top_k": int(min(ref.ids.shape[1], var.ids.shape[1])),
        "kl_mean": round(float(kl.mean()), 6), "kl_median": round(float(np.median(kl)), 6),
        "kl_p99": round(float(np.quantile(kl, 0.99)), 6), "kl_max": round(float(kl.max()), 6),
        "top1_agreement": round(float(top1_same.mean()), 4),
        "ppl_ratio": round(float(np.exp(nll_var.mean() - nll_ref.mean())), 5),
        "ppl_reference": round(float(np.exp(nll_ref.mean())), 4), "ppl_variant": round(float(np.exp(nll_var.mean())), 4),
        "ref_top1_outside_topk": round(float(outside.mean()), 4),
    }


def full_kl(ref_full: np.ndarray, var_full: np.ndarray) -> np.ndarray:
    """Exact per-position KL from full-vocabulary logprobs (for measuring the top-k approximation)."""
    p = np.exp(ref_full.astype(np.float64))
    return (p * (ref_full.astype(np.float64) - var_full.astype(np.float64))).sum(axis=1)


def topk_of(full: np.ndarray, tokens: np.ndarray, k: int, meta: dict[str, Any] | None = None) -> TopK:
    """Cut full logprobs to a TopK record (what a run stores)."""
    idx = np.argsort(-full, axis=1)[:, :k]
    return TopK(idx.astype(np.int64), np.take_along_axis(full, idx, axis=1).astype(np.float32),
                tokens.astype(np.int64), full[np.arange(len(tokens)), tokens].astype(np.float32), meta or {})


# --- the stage ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Prepared:
    """The corpus as tokens, the reference (None when eval.fidelity.reference=false) and, for an adapter, the base
    without it (how far the fine-tune moved the model: the scale of "retained")."""

    corpus: Corpus
    tokens: Tokens
    reference: TopK | None
    record: dict[str, Any] | None
    base: TopK | None = None
    base_record: dict[str, Any] | None = None


def retained(vs_reference: dict[str, Any], base_vs_reference: dict[str, Any] | None,
             min_retained: float) -> dict[str, Any] | None:
    """How much of the fine-tune a variant keeps: 1 - KL(trained‖variant) / KL(trained‖base), clipped to [0, 1],
    and the same with top-1 agreement ((agree_variant - agree_base) / (1 - agree_base)); flagged below
    `min_retained`. None without a base to measure against."""
    if not base_vs_reference or not base_vs_reference.get("kl_mean"):
        return None
    kl_base, t_base = base_vs_reference["kl_mean"], base_vs_reference["top1_agreement"]
    share = min(1.0, max(0.0, 1 - vs_reference["kl_mean"] / kl_base))
    top1 = min(1.0, max(0.0, (vs_reference["top1_agreement"] - t_base) / (1 - t_base))) if t_base < 1 else None
    out = {"retained": round(share, 4), "retained_top1": None if top1 is None else round(top1, 4),
           "kl_trained_vs_base": kl_base, "top1_trained_vs_base": t_base, "min_retained": min_retained,
           "mostly_base": share < min_retained}
    if out["mostly_base"]:
        log.warning("fidelity: this variant serves mostly the base model: it keeps %.0f%% of the fine-tune "
                    "(KL to the trained function %.3f vs the base's %.3f; eval.fidelity.min_retained=%g)",
                    100 * share, vs_reference["kl_mean"], kl_base, min_retained)
    return out


def prepare(det, cfg: FidelityConfig, data_dir: str | Path) -> Prepared | None:
    """Tokenize the corpus with the base's tokenizer and get the trained function's logprobs on it."""
    if not cfg.enabled:
        return None
    from transformers import AutoTokenizer

    corpus = load_corpus(cfg.corpus)
    tokens = tokenize(corpus, AutoTokenizer.from_pretrained(det.base.path))
    if not cfg.reference:
        return Prepared(corpus, tokens, None, None)
    ref, record = reference(det, cfg, corpus, tokens, data_dir)
    if det.adapter is None:
        return Prepared(corpus, tokens, ref, record)
    import dataclasses

    # the base without the adapter, computed once per base and cached like the reference
    base, base_record = reference(dataclasses.replace(det, adapter=None, trained_in_4bit=None), cfg, corpus, tokens,
                                  data_dir)
    return Prepared(corpus, tokens, ref, record, base, base_record)


def score_run(engine, prep: Prepared, cfg: FidelityConfig, run_dir: Path) -> dict[str, Any]:
    """Score the corpus through the run's engine, store its logprobs, compare with the reference.

    Writes run_dir/fidelity_logprobs.npz and run_dir/fidelity.json; returns the latter's content.
    """
    t0 = time.perf_counter()
    meta = {"what": "run", "corpus": prep.corpus.name, "corpus_sha256": prep.corpus.sha256,
            "tokens": prep.tokens.digest(), "top_k": cfg.top_k}
    run = score_engine(engine, prep.tokens, cfg.top_k, meta)
    run.save(Path(run_dir) / FIDELITY_LOGPROBS)
    out: dict[str, Any] = {"corpus": prep.corpus.name, "corpus_sha256": prep.corpus.sha256,
                           "positions": prep.tokens.positions, "top_k": cfg.top_k,
                           "seconds": round(time.perf_counter() - t0, 2),
                           "ppl": round(float(np.exp(-run.token_logprob.astype(np.float64).mean())), 4),
                           "reference": prep.record, "vs_reference": None}
    if prep.reference is not None:
        out["vs_reference"] = compare(prep.reference, run)
        if prep.base is not None:
            out["base_vs_reference"] = compare(prep.reference, prep.base)
            out["retained"] = retained(out["vs_reference"], out["base_vs_reference"], cfg.min_retained)
    write_json(Path(run_dir) / FIDELITY, out)
    return out
