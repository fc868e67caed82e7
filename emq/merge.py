"""merge: one merged checkpoint per (base, adapter, settings), made once and cached.

Methods
- `stream` (default): walk the base's safetensors shards tensor by tensor; for each targeted
  weight add scale·(B·A) computed in fp32 (numpy on the CPU, torch on the GPU when the device is
  cuda) and round once to the output dtype; hash and write each output shard as it goes (see
  emq/stio.py). Peak memory ≈ a few tensors per parallel part + the adapter, whatever the model
  size (`stream_peak_ram`).
- `peft` (reference): PeftModel.merge_and_unload with the weights in fp32, then save_pretrained.

Merge base (for the linear weights a QLoRA run quantized):
- `original`: the 16-bit base weights.
- `dequantized`: dequant(NF4(W)) with the training's blocksize and double-quant setting — the
  weights the adapter actually saw in training.
- `auto` (default): `dequantized` when detect found 4-bit training, else `original`. Reason: a
  QLoRA adapter learned corrections to the quantized weights; merging them into the NF4 round
  trip reproduces the trained function (up to bf16 rounding), while merging into the original
  weights adds the quantization error back.

Devices are tried in the plan's order; a CUDA out-of-memory error moves on to the next device
(the GPU → CPU cascade). NaN/inf in a merged tensor is an error that names the module.
"""
from __future__ import annotations

import errno
import gc
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import emq
from emq import cache, stio
from emq.detect import DetectResult, safetensors_header
from emq.errors import EmqError
from emq.records import write_json
from emq.schema import MergeBase, MergeMethod

log = logging.getLogger(__name__)

_COPY_FROM_BASE = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
_ADAPTER = "base_model.model."
_EMBED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


class MergeFailed(EmqError):
    """Every merge attempt failed; `attempts` says how."""

    def __init__(self, message: str, fix: str, attempts: list[dict]):
        super().__init__(message, fix)
        self.attempts = attempts


@dataclass(frozen=True)
class MergeSettings:
    method: MergeMethod = MergeMethod.stream
    merge_base: MergeBase = MergeBase.auto
    out_dtype: str = "bfloat16"  # bfloat16 | float16 | float32


@dataclass(frozen=True)
class MergeResult:
    path: str
    key: str
    cached: bool
    device: str | None
    method: str
    merge_base: str
    seconds: float
    attempts: list[dict] = field(default_factory=list)


# --- inputs and key -----------------------------------------------------------------------------

def _base_identity(base_dir: Path) -> dict[str, str]:
    """Identity of each base file for the cache key: small files by sha256; weight shards by size,
    mtime and a hash of their header (names, dtypes, shapes, offsets), so a 28 GB base is not read
    just to compute a key (a re-saved base gets a new mtime, hence a new key)."""
    ident = {}
    for p in sorted(base_dir.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name == "README.md":
            continue
        if p.suffix == ".safetensors":
            with p.open("rb") as f:
                n = int.from_bytes(f.read(8), "little")
            st = p.stat()
            ident[p.name] = f"size={st.st_size};mtime_ns={st.st_mtime_ns};header-sha256={cache.sha256_file(p, 8 + n)}"
        else:
            ident[p.name] = cache.sha256_file(p)
    return ident


def resolve_merge_base(det: DetectResult, merge_base: MergeBase) -> MergeBase:
    if merge_base is MergeBase.auto:
        return MergeBase.dequantized if det.trained_in_4bit else MergeBase.original
    return merge_base


def _nf4_settings(det: DetectResult) -> dict[str, Any]:
    """Blocksize / double quant of the training run (from its training config), else QLoRA's defaults."""
    settings = {"blocksize": 64, "double_quant": True, "quant_type": "nf4"}
    for e in det.evidence:
        src = Path(e.source)
        if e.weight and src.suffix == ".json" and src.is_file() and "training" in src.name:
            cfg = json.loads(src.read_text())
            settings["double_quant"] = bool(cfg.get("bnb_4bit_use_double_quant", settings["double_quant"]))
            settings["quant_type"] = str(cfg.get("bnb_4bit_quant_type", "nf4"))
            settings["blocksize"] = int(cfg.get("bnb_4bit_blocksize", 64))
    return settings


def merge_inputs(det: DetectResult, settings: MergeSettings) -> dict:
    """Everything the merged bytes depend on; the cache key is their hash."""
    if det.adapter is None:
        raise EmqError("nothing to merge: the model config has no adapter", "set model.adapter")
    adir = Path(det.adapter.path)
    base = resolve_merge_base(det, settings.merge_base)
    adapter_files = {p.name: cache.sha256_file(p) for p in sorted(adir.iterdir())
                     if p.name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")}
    s = {"method": settings.method.value, "math_dtype": "float32", "out_dtype": settings.out_dtype,
         "merge_base": base.value}
    if base is MergeBase.dequantized:
        s["nf4"] = _nf4_settings(det)
    return {"base": {"path": det.base.path, "files": _base_identity(Path(det.base.path))},
            "adapter": {"path": det.adapter.path, "files": adapter_files}, "settings": s}


# --- the stream kernel ---------------------------------------------------------------------------

@dataclass
class _Lora:
    a: Any  # _Ref to [r, in]   (embedding: [r, num_embeddings])
    b: Any  # _Ref to [out, r]  (embedding: [dim, r])
    scale: float
    embedding: bool = False


@dataclass(frozen=True)
class _Ref:
    """An adapter tensor read when needed (not all held in memory for the whole merge)."""

    reader: Any
    name: str

    @property
    def shape(self) -> list[int]:
        return self.reader.header[self.name]["shape"]

    @property
    def code(self) -> str:
        return self.reader.header[self.name]["dtype"]

    def load(self) -> np.ndarray:
        """As held by `stio.np_dtype` (BF16 as its bits)."""
        return self.reader.array(self.name)

    def f32(self) -> np.ndarray:
        return stio.to_f32(self.load(), self.code)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: a key matches a module name that ends with it after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _load_adapter(det: DetectResult) -> tuple[dict[str, _Lora], dict[str, Any], dict[str, _Ref], Any]:
    """(LoRA deltas by base weight name, bias deltas (fp32) by base bias name, replacement tensors by
    name, the open adapter reader — close it when done)."""
    a = det.adapter
    if a.use_dora:
        raise EmqError(f"{a.path}: DoRA adapters are not supported by emq's merge (the magnitude vector needs "
                       "the merged weight norm, which emq does not reproduce yet)",
                       "merge it with PEFT yourself, or train a plain LoRA")
    if a.weight_file != "adapter_model.safetensors":
        raise EmqError(f"{a.path} has weights as {a.weight_file}; the stream merge reads safetensors",
                       "re-save the adapter with safe_serialization=True, or use memory.merge_method=peft")
    reader = stio.Reader(Path(a.path) / a.weight_file)
    parts: dict[str, dict[str, Any]] = {}
    replace: dict[str, _Ref] = {}
    for name in reader.names:
        t = _Ref(reader, name)
        short = name[len(_ADAPTER):] if name.startswith(_ADAPTER) else name
        m = re.match(r"^(.+)\.lora_(A|B)\.weight$", short) or re.match(r"^(.+)\.lora_embedding_(A|B)$", short)
        if m:
            parts.setdefault(m.group(1), {})[m.group(2)] = t
            parts[m.group(1)]["embedding"] = "lora_embedding_" in short
            continue
        m = re.match(r"^(.+)\.lora_B\.bias$", short)
        if m:
            parts.setdefault(m.group(1), {})["bias"] = t
            continue
        if short.endswith(".base_layer.weight"):  # embedding layers PEFT saves with a LoRA on them
            replace[short[: -len(".base_layer.weight")] + ".weight"] = t
            continue
        if ".lora_" in short or "magnitude_vector" in short:
            raise EmqError(f"{a.path}: unsupported adapter tensor {name}", "use a plain LoRA adapter")
        replace[short] = t  # modules_to_save, or biases trained with bias="all"/"lora_only"
    deltas, bias_deltas = {}, {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise EmqError(f"{a.path}: {module} has only lora_{'A' if 'A' in p else 'B'}", "re-save the adapter")
        r = p["A"].shape[0]
        alpha = float(_pattern_value(a.alpha_pattern, module, a.alpha))
        scale = alpha / math.sqrt(r) if a.use_rslora else alpha / r
        deltas[f"{module}.weight"] = _Lora(p["A"], p["B"], scale, p["embedding"])
        if p.get("bias") is not None:
            bias_deltas[f"{module}.bias"] = p["bias"].f32() * np.float32(scale)
    return deltas, bias_deltas, replace, reader


def _dequant_eligible(name: str, shape: tuple[int, ...]) -> bool:
    """The weights bitsandbytes quantizes in a QLoRA run: 2-D linear weights, not embeddings/lm_head."""
    return len(shape) == 2 and name.endswith(".weight") and not any(
        k in name for k in ("embed", "lm_head", "wte", "wpe", "norm"))


def _nf4_roundtrip(t, device: str, nf4: dict[str, Any]):
    """dequant(NF4(t)) with bitsandbytes (a torch tensor in, the same dtype out)."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    w = t.to(device)
    packed, state = quantize_4bit(w, blocksize=nf4["blocksize"], quant_type=nf4["quant_type"],
                                  compress_statistics=nf4["double_quant"])
    return dequantize_4bit(packed, state).to(t.dtype)


def _torch_dtype(code: str):
    import torch

    return {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]


def _to_torch(a: np.ndarray, code: str):
    """A numpy-held float tensor as a torch tensor on the CPU (shares memory)."""
    import torch

    if code == "BF16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _into_numpy(t, code: str, out: np.ndarray) -> None:
    """Copy a torch tensor (any device, dtype of `code`) into the numpy-held `out`, directly (no
    intermediate CPU tensor)."""
    _to_torch(out, code).copy_(t)


def _rounded(x: np.ndarray, out_code: str) -> np.ndarray:
    """fp32 `x` rounded to `out_code`, in a new array."""
    out = np.empty(x.shape, stio.np_dtype(out_code))
    stio.from_f32(x, out_code, out)
    return out


def _convert(a: np.ndarray, code: str, out_code: str) -> np.ndarray:
    if code == out_code or code not in stio.FLOAT_CODES:
        return a
    return _rounded(stio.to_f32(a, code), out_code)


_BLOCK = 1 << 18  # CPU: fp32 elements per block of rows (1 MiB), so the temporaries stay in cache


class _Scratch:
    """Per-worker fp32 / uint32 block buffers, reused for every tensor (see stio.BufferPool)."""

    def __init__(self):
        self.f32 = np.empty(_BLOCK, np.float32)
        self.u32 = np.empty(_BLOCK, np.uint32)
        self.ones = np.ones(_BLOCK, np.float32)

    def blocks(self, rows: int, cols: int) -> tuple[int, np.ndarray, np.ndarray]:
        if self.f32.size < cols:
            self.f32, self.u32, self.ones = np.empty(cols, np.float32), np.empty(cols, np.uint32), np.ones(cols, np.float32)
        step = min(rows, self.f32.size // cols)
        return step, self.f32[: step * cols].reshape(step, cols), self.u32[: step * cols].reshape(step, cols)

    def finite(self, blk: np.ndarray) -> bool:
        """Whether every element is finite: NaN and inf propagate through a dot product with ones
        (a BLAS call, ~2x faster than sum; these magnitudes cannot overflow fp32)."""
        return bool(np.isfinite(np.dot(blk.reshape(-1), self.ones[: blk.size])))


def _merge_weight_cpu(w: np.ndarray, code: str, lora: _Lora, out: np.ndarray, out_code: str, *,
                      transposed: bool, scratch: _Scratch) -> bool:
    """out = W + s·B·A in fp32, rounded once to `out_code`; `out` may be `w` (in place). False if
    the result has NaN/inf.

    Row blocks: each block of W is upcast, gets its rows of (B)(s·A) from one matmul, is checked
    and rounded back while it is in cache, so memory traffic is ~4 bytes per parameter. numpy,
    not torch: a CPU merge does not pay torch's import (2-3 s cold, longer than the whole merge
    of a 0.5B model). The caller limits BLAS to one thread per worker (see `_stream_merge`).
    """
    a, b = lora.a.f32(), lora.b.f32()
    left, right = (a.T, b.T) if transposed else (b, a)  # W[rows] += left[rows] @ (s·right)
    left = np.ascontiguousarray(left)
    right = np.ascontiguousarray(right * np.float32(lora.scale))
    rows, cols = w.shape
    step, blk_all, bits_all = scratch.blocks(rows, cols)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        blk, bits = blk_all[:n], bits_all[:n]
        np.matmul(left[r0:r0 + n], right, out=blk)
        blk += stio.to_f32(w[r0:r0 + n], code, out=bits.view(np.float32) if code == "BF16" else None)
        if not scratch.finite(blk):
            return False
        stio.from_f32(blk, out_code, out[r0:r0 + n], scratch=bits)
    return True


def _merge_weight_torch(w: np.ndarray, code: str, lora: _Lora, out: np.ndarray, out_code: str, *,
                        transposed: bool, device: str) -> bool:
    """The same update with torch on `device` (a GPU: the whole tensor at once)."""
    import torch

    a = torch.from_numpy(lora.a.f32()).to(device)
    b = torch.from_numpy(lora.b.f32()).to(device)
    left, right = (a.T, b.T) if transposed else (b, a)
    blk = _to_torch(w, code).to(device=device, dtype=torch.float32)
    blk.addmm_(left, right, alpha=lora.scale)
    if not torch.isfinite(blk).all():
        return False
    _into_numpy(blk.to(_torch_dtype(out_code)), out_code, out)
    return True


def _add_bias(w: np.ndarray, code: str, delta: np.ndarray, out_code: str) -> np.ndarray | None:
    """b + s·lora_B.bias (fp32), in `out_code`; None if non-finite."""
    x = stio.to_f32(w, code) + delta
    return _rounded(x, out_code) if np.isfinite(x).all() else None


def _dequant_np(w: np.ndarray, code: str, device: str, nf4: dict[str, Any]) -> np.ndarray:
    """dequant(NF4(w)) in place (bitsandbytes, through torch)."""
    _into_numpy(_nf4_roundtrip(_to_torch(w, code), device, nf4), code, w)
    return w


def _shards(base_dir: Path) -> list[str]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in base_dir.glob("*.safetensors"))


def stream_workers(cpus: int) -> int:
    """Parts merged at once by `stream` (each: a reader, the merge, a writer)."""
    return max(1, min(cpus, 4))


def stream_peak_ram(largest_linear: int, adapter_bytes: int, cpus: int) -> int:
    """Peak resident bytes of a `stream` merge: per part, its buffer pool (64 MiB or three of the
    largest tensor) and the writer's staging; the adapter's factors upcast to fp32; the runtime.
    Measured: 0.30 GiB on a 0.5B model (2 parts), 3.3 GiB on a 14B one (4 parts)."""
    per_part = max(64 << 20, 3 * largest_linear) + stio.Writer.STAGES * stio.CHUNK
    return stream_workers(cpus) * per_part + 2 * adapter_bytes + (300 << 20)


def _output_parts(base_dir: Path, shards: list[str], workers: int) -> list[tuple[str, str, list[str]]]:
    """(input shard, output file, tensor names) per output file. With at least `workers` input
    shards the layout is kept; otherwise each input is split into contiguous parts of equal bytes
    so that reading, merging, hashing and writing run on every core (the index maps the names).
    Bytes, not merged bytes: with hashing and direct writes, an untouched tensor costs about as
    much per byte as a merged one (measured: weighting merged bytes 2x made the 0.5B CPU merge
    ~15 % slower)."""
    headers = {s: safetensors_header(base_dir / s) for s in shards}
    order = {s: sorted(h, key=lambda k: h[k]["data_offsets"][0]) for s, h in headers.items()}
    if len(shards) >= workers:
        return [(s, s, order[s]) for s in shards]
    per = -(-workers // len(shards))
    groups: list[tuple[str, list[str]]] = []
    for s in shards:
        h = headers[s]
        size = {n: h[n]["data_offsets"][1] - h[n]["data_offsets"][0] for n in order[s]}
        cut, acc, current, made = (sum(size.values()) or 1) / per, 0, [], 0
        for n in order[s]:
            current.append(n)
            acc += size[n]
            if acc >= cut * (made + 1):
                groups.append((s, current))
                current, made = [], made + 1
        if current:
            groups.append((s, current))
    n = len(groups)
    return [(s, f"model-{i + 1:05d}-of-{n:05d}.safetensors", names) for i, (s, names) in enumerate(groups)]


def _stream_merge(det: DetectResult, inputs: dict, device: str, out: Path) -> dict[str, str]:
    """Tensor by tensor: untouched tensors pass through as bytes; targeted ones get W + s·B·A in
    fp32. Returns the sha256 of every shard written (computed while writing)."""
    from threadpoolctl import threadpool_limits

    deltas, bias_deltas, replace, adapter_reader = _load_adapter(det)
    # One BLAS thread per worker: the workers already fill the cores, and OpenBLAS threads that
    # spin-wait beside them doubled the CPU time of a 2-core merge (measured).
    limits = threadpool_limits(limits=1, user_api="blas")
    try:
        return _stream_merge_with(det, inputs, device, out, deltas, bias_deltas, replace)
    finally:
        limits.restore_original_limits()
        adapter_reader.close()


def _stream_merge_with(det: DetectResult, inputs: dict, device: str, out: Path, deltas: dict[str, _Lora],
                       bias_deltas: dict[str, np.ndarray], replace: dict[str, _Ref]) -> dict[str, str]:
    from tqdm import tqdm

    base_dir = Path(det.base.path)
    settings = inputs["settings"]
    out_code = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[settings["out_dtype"]]
    nf4 = settings.get("nf4")
    cfg = json.loads((base_dir / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied and "lm_head.weight" in deltas:
        raise EmqError(f"{det.adapter.path}: LoRA on lm_head with tied embeddings is ambiguous (PEFT merges it into "
                       "the shared embedding as well)", "untie the embeddings before training, or use modules_to_save")
    # With tied embeddings, PEFT serves lm_head from the *original* shared weight unless lm_head
    # itself is in modules_to_save; a merge that changes the embedding (or lm_head) must untie them
    # to keep serving what the adapter computes (PEFT's own merge_and_unload changes both).
    embed_changed = any(n.endswith(_EMBED_NAMES) for n in set(deltas) | set(replace))
    untie = tied and ("lm_head.weight" in replace or embed_changed)
    lm_head = None
    if untie and "lm_head.weight" in replace:
        lm_head = _convert(replace["lm_head.weight"].load(), replace["lm_head.weight"].code, out_code)
    todo = (set(deltas) | set(bias_deltas) | set(replace)) - ({"lm_head.weight"} if untie else set())
    shards = _shards(base_dir)
    if untie and lm_head is None:  # the original shared weight, before any shard changes it
        emb_shard = next((s for s in shards if any(n.endswith(_EMBED_NAMES) for n in safetensors_header(base_dir / s))),
                         None)
        if emb_shard is None:
            raise EmqError(f"{base_dir} ties lm_head to an input embedding emq cannot find",
                           "use memory.merge_method=peft for this model")
        r = stio.Reader(base_dir / emb_shard)
        emb = next(n for n in r.names if n.endswith(_EMBED_NAMES))
        lm_head = _convert(r.array(emb), r.header[emb]["dtype"], out_code)
        r.close()
    bar = tqdm(total=sum((base_dir / s).stat().st_size for s in shards), desc="stream merge", unit="B",
               unit_scale=True)

    def out_code_of(code: str) -> str:
        return out_code if code in stio.FLOAT_CODES else code

    if device != "cpu" or nf4 is not None:
        # torch (GPU math) and bitsandbytes (NF4 round trip) are imported here, once, before the
        # workers start: importing them from two threads at once can hand one thread a
        # half-initialised module (bitsandbytes' CPU ops were then missing).
        import torch  # noqa: F401

        if nf4 is not None:
            import bitsandbytes.functional  # noqa: F401
    workers = stream_workers(os.cpu_count() or 1)
    parts = _output_parts(base_dir, shards, workers)

    def merge_shard(part: tuple[str, str, list[str]]) -> tuple[str, list[str], set[str], str]:
        """Merge one output part; returns (output file, tensor names written, targets found, sha256)."""
        in_shard, shard, names = part
        reader = stio.Reader(base_dir / in_shard)
        info = reader.header

        def dequant(n: str) -> bool:
            return nf4 is not None and info[n]["dtype"] in stio.FLOAT_CODES and \
                _dequant_eligible(n, tuple(info[n]["shape"]))

        # decoded: read whole and worked on; the rest (untouched, same dtype) pass through as bytes
        decoded = {n: n in deltas or n in bias_deltas or dequant(n) or info[n]["dtype"] != out_code_of(info[n]["dtype"])
                   for n in names}
        plan = [(n, decoded[n]) for n in names if n not in replace]  # replaced tensors come from the adapter
        biggest = max((reader.span(n)[1] for n, whole in plan if whole), default=0)
        pool = stio.BufferPool(max(64 << 20, 3 * biggest))  # read ahead, merge, write: three in flight
        pieces = reader.stream(plan, pool)
        scratch = _Scratch()
        last = untie and part is parts[-1]
        entries = [(n, out_code_of(info[n]["dtype"]), info[n]["shape"]) for n in names]
        if last:  # lm_head becomes a tensor of its own, in a shard loaders read
            entries.append(("lm_head.weight", out_code, list(lm_head.shape)))
        writer = stio.Writer(out / shard, entries)
        found: set[str] = set()
        try:
            for name in names:
                length = reader.span(name)[1]
                if name not in replace and not decoded[name]:  # untouched: bytes in, bytes out
                    left = length
                    while left:
                        got, raw, buf = next(pieces)
                        assert got == name, (got, name)
                        writer.write(name, raw, release=lambda b=buf: pool.give(b))
                        left -= raw.nbytes
                        bar.update(raw.nbytes)
                    if not length:
                        writer.write(name, b"")
                    continue
                buf = None
                if name in replace:  # modules_to_save: the adapter's tensor, not the base's
                    w, code = replace[name].load(), replace[name].code
                else:
                    got, w, buf = next(pieces)
                    assert got == name, (got, name)
                    code = info[name]["dtype"]
                    if dequant(name):
                        w = _dequant_np(w, code, device, nf4)
                bar.update(length)
                if name in deltas:
                    if code not in stio.FLOAT_CODES:
                        raise EmqError(f"{name} in {in_shard} is {code}, not a float weight a LoRA can merge into",
                                       "use a 16-bit base (not a pre-quantized checkpoint) as model.base")
                    merged = w if code == out_code else np.empty(w.shape, stio.np_dtype(out_code))
                    lora = deltas[name]
                    transposed = lora.embedding or det.adapter.fan_in_fan_out
                    ok = _merge_weight_cpu(w, code, lora, merged, out_code, transposed=transposed, scratch=scratch) \
                        if device == "cpu" else \
                        _merge_weight_torch(w, code, lora, merged, out_code, transposed=transposed, device=device)
                    w = merged if ok else None
                elif name in bias_deltas:
                    w = _add_bias(w, code, bias_deltas[name], out_code)
                else:
                    w = _convert(w, code, out_code_of(code))
                if w is None:
                    raise EmqError(f"merged {name.rsplit('.', 1)[0]} has NaN/inf (safe merge refused it)",
                                   f"check the adapter tensors for that module in {det.adapter.path}")
                found.add(name)
                writer.write(name, w, release=None if buf is None else lambda b=buf: pool.give(b))
            if last:
                writer.write("lm_head.weight", lm_head)
            digest = writer.close()
        except BaseException:
            writer.abort()  # the temp dir is removed by merge_adapter; the original error stands
            raise
        finally:
            pieces.close()
            reader.close()
        return shard, [e[0] for e in entries], found, digest

    # Shards are independent: merge several at once (I/O, hashing and torch kernels release the GIL).
    weight_map: dict[str, str] = {}
    hashes: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=min(workers, len(parts)), thread_name_prefix="emq-shard") as pool:
        for shard, names, found, digest in pool.map(merge_shard, parts):
            weight_map.update({n: shard for n in names})
            todo -= found
            hashes[shard] = digest
            bar.set_postfix_str(f"{len(hashes)}/{len(parts)} shards written")
    bar.close()
    if todo:
        raise EmqError(f"adapter tensors target weights the base does not have: {sorted(todo)[:3]}",
                       "this adapter was trained on another base; set model.base to it")
    if untie:
        cfg["tie_word_embeddings"] = False
    total = sum((out / s).stat().st_size for s in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = settings["out_dtype"]
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return hashes


def _peft_merge(det: DetectResult, inputs: dict, device: str, out: Path) -> dict[str, str]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if det.adapter.use_dora:
        _load_adapter(det)  # raises the DoRA error before opening anything
    settings = inputs["settings"]
    log.info("merge (peft): loading %s in fp32 on %s", det.base.path, device)
    model = AutoModelForCausalLM.from_pretrained(det.base.path, dtype=torch.float32, device_map=device)
    if settings.get("nf4"):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if _dequant_eligible(name, tuple(p.shape)):
                    p.copy_(_nf4_roundtrip(p.data.to(torch.bfloat16), device, settings["nf4"]).float())
    model = PeftModel.from_pretrained(model, det.adapter.path, device_map=device)
    try:
        merged = model.merge_and_unload(safe_merge=True, progressbar=True)
    except ValueError as e:  # PEFT raises ValueError on NaN in a merged weight
        raise EmqError(f"merging {det.adapter.path} produced NaN/inf: {e}",
                       "check the adapter weights (adapter_model.safetensors)") from None
    merged = merged.to(getattr(torch, settings["out_dtype"]))
    if hasattr(merged.config, "quantization_config"):
        delattr(merged.config, "quantization_config")
    merged.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    del merged, model
    return {}


_KERNELS = {MergeMethod.stream: _stream_merge, MergeMethod.peft: _peft_merge}


class _NeverRaised(Exception):
    pass


def _torch_oom() -> type[BaseException]:
    """torch's out-of-memory error when torch is loaded: a CPU stream merge never imports torch
    (an except clause evaluates this only once an exception is on its way, so torch is loaded
    if it raised one)."""
    torch = sys.modules.get("torch")
    return getattr(torch, "OutOfMemoryError", _NeverRaised) if torch is not None else _NeverRaised


def merge_adapter(det: DetectResult, devices: list[str], cache_dir: str | Path, *,
                  settings: MergeSettings | None = None, force_recreate: bool = False) -> MergeResult:
    """Return a merged checkpoint for the detected base + adapter, building it if needed.

    Args:
        det: detect record (with an adapter; weights local).
        devices: devices to try in order, e.g. ["cuda", "cpu"].
        cache_dir: merge cache root.
        settings: method, merge base, output dtype.
        force_recreate: rebuild even if a complete entry exists.

    Raises:
        EmqError: unsupported adapter, NaN/inf, no disk space (nothing is published).
        MergeFailed: no device could merge (attempts say why).
    """
    settings = settings or MergeSettings()
    t0 = time.perf_counter()
    inputs = merge_inputs(det, settings)
    key = cache.key_of({"base": inputs["base"]["files"], "adapter": inputs["adapter"]["files"],
                        "settings": inputs["settings"]})
    root = Path(cache_dir).expanduser()
    entry = root / key
    s = inputs["settings"]
    with cache.locked(root, key):
        cache.remove_debris(root, key)
        if cache.is_complete(entry) and not force_recreate:
            log.info("merge: cache hit %s", entry)
            cache.touch(entry)
            return MergeResult(str(entry), key, True, None, s["method"], s["merge_base"], time.perf_counter() - t0)
        if det.base.param_count:
            width = 4 if s["out_dtype"] == "float32" else 2
            cache.check_disk(root, int(det.base.param_count * width * 1.05) + 64 * 1024**2)
        attempts: list[dict] = []
        for device in devices:
            tmp = cache.new_tmp(root, key)
            a0 = time.perf_counter()
            try:
                log.info("merge: %s on %s (merge base: %s)", s["method"], device, s["merge_base"])
                hashes = _KERNELS[MergeMethod(s["method"])](det, inputs, device, tmp)
                for name in _COPY_FROM_BASE:
                    src = Path(det.base.path) / name
                    if src.is_file():
                        shutil.copy2(src, tmp / name)
                files = {p.name: hashes.get(p.name) or cache.sha256_file(p) for p in sorted(tmp.iterdir())
                         if p.is_file()}
                write_json(tmp / cache.MANIFEST, {"key": key, "emq_version": emq.__version__, "device": device,
                                                  "inputs": inputs, "created_unix": time.time(),
                                                  "files_sha256": files})
                cache.publish(tmp, entry)
                cache.touch(entry)
                seconds = round(time.perf_counter() - a0, 2)
                attempts.append({"device": device, "ok": True, "seconds": seconds})
                log.info("merge: wrote %s on %s in %.1f s", entry, device, seconds)
                return MergeResult(str(entry), key, False, device, s["method"], s["merge_base"],
                                   time.perf_counter() - t0, attempts)
            except _torch_oom() as e:
                attempts.append({"device": device, "ok": False, "error": f"out of memory: {str(e)[:300]}"})
                log.warning("merge on %s ran out of memory; trying the next device", device)
                del e  # its traceback holds the half-loaded model
                gc.collect()
                torch = sys.modules["torch"]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            except (MemoryError, RuntimeError) as e:
                attempts.append({"device": device, "ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                log.warning("merge on %s failed (%s); trying the next device", device, type(e).__name__)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):  # the disk filled up after the check
                    raise EmqError(f"the disk at {root} filled up while writing the merged checkpoint "
                                   f"({e.strerror}); nothing was published",
                                   "free disk space or point EMQ_CACHE / paths.cache_dir elsewhere") from None
                raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise MergeFailed(f"every merge attempt failed: {attempts}",
                          "free memory, allow CPU merging (memory.allow_cpu_merge=true) or serve the LoRA "
                          "(memory.stop_on_failure=false)", attempts)
