"""The `stream` merge kernel: walk the base's safetensors shards tensor by tensor; for each targeted weight
add scale·(B·A) computed in fp32 (numpy on the CPU, torch on the GPU when the device is cuda) and round once
to the output dtype; hash and write each output shard as it goes (emq.checkpoint.safetensors_io). Peak
memory ≈ a few tensors per parallel part + the adapter, whatever the model size
(emq.checkpoint.costs.stream_peak_ram).

With `settings["w4a16"]` the same pass also quantizes (round to nearest, per group) every decoder Linear
as it is merged and writes it in compressed-tensors pack-quantized form: the served W4A16 checkpoint in
one pass, no bf16 merged copy written. RTN of the rounded merged weight, exactly what quantizing the
merged checkpoint afterwards would give. Without an adapter it quantizes the base alone.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from emq.checkpoint import safetensors_io as sio
from emq.checkpoint.costs import stream_workers
from emq.checkpoint.nf4 import dequant_eligible, nf4_roundtrip
from emq.detect import DetectResult
from emq.errors import EmqError

_ADAPTER = "base_model.model."
_EMBED_NAMES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")


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
        """As held by `sio.np_dtype` (BF16 as its bits)."""
        return self.reader.array(self.name)

    def f32(self) -> np.ndarray:
        return sio.to_f32(self.load(), self.code)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: a key matches a module name that ends with it after a dot."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def check_supported(adapter) -> None:
    """Refuse what emq does not merge (DoRA) before anything is loaded, for either method."""
    if adapter.use_dora:
        raise EmqError(f"{adapter.path}: DoRA adapters are not supported by emq's merge (the magnitude vector needs "
                       "the merged weight norm, which emq does not reproduce yet)",
                       "merge it with PEFT yourself, or train a plain LoRA")


def load_adapter(det: DetectResult) -> tuple[dict[str, _Lora], dict[str, Any], dict[str, _Ref], Any]:
    """(LoRA deltas by base weight name, bias deltas (fp32) by base bias name, replacement tensors by
    name, the open adapter reader — close it when done)."""
    a = det.adapter
    check_supported(a)
    if a.weight_file != "adapter_model.safetensors":
        raise EmqError(f"{a.path} has weights as {a.weight_file}; the stream merge reads safetensors",
                       "re-save the adapter with safe_serialization=True, or use memory.merge_method=peft")
    reader = sio.Reader(Path(a.path) / a.weight_file)
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
    out = np.empty(x.shape, sio.np_dtype(out_code))
    sio.from_f32(x, out_code, out)
    return out


def _convert(a: np.ndarray, code: str, out_code: str) -> np.ndarray:
    if code == out_code or code not in sio.FLOAT_CODES:
        return a
    return _rounded(sio.to_f32(a, code), out_code)


_BLOCK = 1 << 18  # CPU: fp32 elements per block of rows (1 MiB), so the temporaries stay in cache


class _Scratch:
    """Per-worker fp32 / uint32 block buffers, reused for every tensor (see sio.BufferPool)."""

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
    of a 0.5B model). The caller limits BLAS to one thread per worker (see `stream_merge`).
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
        blk += sio.to_f32(w[r0:r0 + n], code, out=bits.view(np.float32) if code == "BF16" else None)
        if not scratch.finite(blk):
            return False
        sio.from_f32(blk, out_code, out[r0:r0 + n], scratch=bits)
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
    x = sio.to_f32(w, code) + delta
    return _rounded(x, out_code) if np.isfinite(x).all() else None


def _dequant_np(w: np.ndarray, code: str, device: str, nf4: dict[str, Any]) -> np.ndarray:
    """dequant(NF4(w)) in place (bitsandbytes, through torch)."""
    _into_numpy(nf4_roundtrip(_to_torch(w, code), device, nf4), code, w)
    return w



def _output_parts(base_dir: Path, shards: list[str], workers: int) -> list[tuple[str, str, list[str]]]:
    """(input shard, output file, tensor names) per output file. With at least `workers` input
    shards the layout is kept; otherwise each input is split into contiguous parts of equal bytes
    so that reading, merging, hashing and writing run on every core (the index maps the names).
    Bytes, not merged bytes: with hashing and direct writes, an untouched tensor costs about as
    much per byte as a merged one (measured: weighting merged bytes 2x made the 0.5B CPU merge
    ~15 % slower)."""
    headers = {s: sio.safetensors_header(base_dir / s) for s in shards}
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


def stream_merge(det: DetectResult, inputs: dict, device: str, out: Path) -> dict[str, str]:
    """Tensor by tensor: untouched tensors pass through as bytes; targeted ones get W + s·B·A in
    fp32 (and, with `inputs["settings"]["w4a16"]`, decoder Linears are quantized and packed). Returns
    the sha256 of every shard written (computed while writing)."""
    from threadpoolctl import threadpool_limits

    if det.adapter is None:  # quantizing a base alone
        deltas, bias_deltas, replace, adapter_reader = {}, {}, {}, None
    else:
        deltas, bias_deltas, replace, adapter_reader = load_adapter(det)
    # One BLAS thread per worker: the workers already fill the cores, and OpenBLAS threads that
    # spin-wait beside them doubled the CPU time of a 2-core merge (measured).
    limits = threadpool_limits(limits=1, user_api="blas")
    try:
        return _stream_merge_with(det, inputs, device, out, deltas, bias_deltas, replace)
    finally:
        limits.restore_original_limits()
        if adapter_reader is not None:
            adapter_reader.close()


_OUT_CODES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class _StreamJob:
    """What every part of one stream merge needs; shared read-only by the worker threads."""

    base_dir: Path
    out: Path  # the directory the merged checkpoint is written to
    out_code: str  # safetensors dtype of the merged floats
    nf4: dict[str, Any] | None  # NF4 round-trip settings (merge base `dequantized`), else None
    device: str
    deltas: dict[str, _Lora]
    bias_deltas: dict[str, np.ndarray]
    replace: dict[str, _Ref]
    lm_head: np.ndarray | None  # set exactly when the embeddings are untied: written into the last part
    fan_in_fan_out: bool
    adapter_path: str  # for messages
    bar: Any  # tqdm progress bar, in bytes of the base
    quant: Any = None  # w4a16.QuantSpec: quantize decoder Linears as they are written (None: plain merge)
    ignore: tuple[str, ...] = ()  # Linear modules kept in 16 bits (names, matched as suffixes)

    def out_code_of(self, code: str) -> str:
        """The output dtype of a tensor stored as `code`: floats become `out_code`, the rest stay."""
        return self.out_code if code in sio.FLOAT_CODES else code

    def quantizes(self, info: dict[str, dict[str, Any]], name: str) -> bool:
        """Whether base tensor `name` is a decoder Linear's weight that w4a16 packs."""
        if self.quant is None or not name.endswith(".weight") or info[name]["dtype"] not in sio.FLOAT_CODES:
            return False
        module = name[: -len(".weight")]
        return len(info[name]["shape"]) == 2 and dequant_eligible(name, tuple(info[name]["shape"])) and not any(
            module == i or module.endswith("." + i) for i in self.ignore)

    def entries(self, info: dict[str, dict[str, Any]], name: str) -> list[tuple[str, str, list[int]]]:
        """The output tensors (name, dtype, shape) that base tensor `name` becomes."""
        if not self.quantizes(info, name):
            return [(name, self.out_code_of(info[name]["dtype"]), info[name]["shape"])]
        out_f, in_f = info[name]["shape"]
        module, g = name[: -len(".weight")], self.quant.group_size
        packed = [(f"{module}.weight_packed", "I32", [out_f, -(-in_f // 8)]),
                  (f"{module}.weight_scale", self.out_code, [out_f, in_f // g])]
        if not self.quant.symmetric:
            packed.append((f"{module}.weight_zero_point", "I32", [-(-out_f // 8), in_f // g]))
        return packed + [(f"{module}.weight_shape", "I64", [2])]

    def dequantizes(self, info: dict[str, dict[str, Any]], name: str) -> bool:
        """Whether base tensor `name` (of a shard with header `info`) goes through the NF4 round trip."""
        return self.nf4 is not None and info[name]["dtype"] in sio.FLOAT_CODES and \
            dequant_eligible(name, tuple(info[name]["shape"]))


def _stream_merge_with(det: DetectResult, inputs: dict, device: str, out: Path, deltas: dict[str, _Lora],
                       bias_deltas: dict[str, np.ndarray], replace: dict[str, _Ref]) -> dict[str, str]:
    """`stream_merge` once the adapter is loaded: the parts in parallel, then the index and config."""
    from tqdm import tqdm

    base_dir = Path(det.base.path)
    settings = inputs["settings"]
    out_code = _OUT_CODES[settings["out_dtype"]]
    nf4 = settings.get("nf4")
    quant, ignore = _quant_spec(settings.get("w4a16"))
    cfg = json.loads((base_dir / "config.json").read_text())
    lm_head = _untied_lm_head(det, cfg, deltas, replace, out_code)
    untie = lm_head is not None
    todo = (set(deltas) | set(bias_deltas) | set(replace)) - ({"lm_head.weight"} if untie else set())
    shards = sio.shard_names(base_dir)
    bar = tqdm(total=sum((base_dir / s).stat().st_size for s in shards), desc="stream merge", unit="B",
               unit_scale=True)
    _import_before_threads(device, nf4, quant is not None)
    workers = stream_workers(os.cpu_count() or 1)
    parts = _output_parts(base_dir, shards, workers)
    job = _StreamJob(base_dir=base_dir, out=out, out_code=out_code, nf4=nf4, device=device, deltas=deltas,
                     bias_deltas=bias_deltas, replace=replace, lm_head=lm_head,
                     fan_in_fan_out=bool(det.adapter and det.adapter.fan_in_fan_out),
                     adapter_path=det.adapter.path if det.adapter else "", bar=bar, quant=quant, ignore=ignore)
    last = [untie and part is parts[-1] for part in parts]

    # Shards are independent: merge several at once (I/O, hashing and torch kernels release the GIL).
    weight_map: dict[str, str] = {}
    hashes: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=min(workers, len(parts)), thread_name_prefix="emq-shard") as executor:
        for shard, names, found, digest in executor.map(_merge_part, repeat(job), parts, last):
            weight_map.update({n: shard for n in names})
            todo -= found
            hashes[shard] = digest
            bar.set_postfix_str(f"{len(hashes)}/{len(parts)} shards written")
    bar.close()
    if todo:
        raise EmqError(f"adapter tensors target weights the base does not have: {sorted(todo)[:3]}",
                       "this adapter was trained on another base; set model.base to it")
    _write_index_and_config(out, cfg, weight_map, settings["out_dtype"], untie, quant, ignore)
    return hashes


def _quant_spec(w4a16: dict[str, Any] | None) -> tuple[Any, tuple[str, ...]]:
    """(the QuantSpec, the ignore list) of the merge settings' "w4a16" entry, or (None, ())."""
    if not w4a16:
        return None, ()
    from emq.checkpoint.w4a16 import QuantSpec  # torch: only when quantizing

    return (QuantSpec(group_size=int(w4a16["group_size"]), symmetric=bool(w4a16["symmetric"]),
                      scale_search=w4a16.get("scale_search", "minmax")), tuple(w4a16["ignore"]))


def _untied_lm_head(det: DetectResult, cfg: dict[str, Any], deltas: dict[str, _Lora], replace: dict[str, _Ref],
                    out_code: str) -> np.ndarray | None:
    """The lm_head tensor to write when the merge must untie the embeddings (in `out_code`); None
    when it keeps the base's tying as it is."""
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied and "lm_head.weight" in deltas:
        raise EmqError(f"{det.adapter.path}: LoRA on lm_head with tied embeddings is ambiguous (PEFT merges it into "
                       "the shared embedding as well)", "untie the embeddings before training, or use modules_to_save")
    # With tied embeddings, PEFT serves lm_head from the *original* shared weight unless lm_head
    # itself is in modules_to_save; a merge that changes the embedding (or lm_head) must untie them
    # to keep serving what the adapter computes (PEFT's own merge_and_unload changes both).
    embed_changed = any(n.endswith(_EMBED_NAMES) for n in set(deltas) | set(replace))
    if not (tied and ("lm_head.weight" in replace or embed_changed)):
        return None
    if "lm_head.weight" in replace:
        return _convert(replace["lm_head.weight"].load(), replace["lm_head.weight"].code, out_code)
    return _shared_embedding(Path(det.base.path), out_code)


def _shared_embedding(base_dir: Path, out_code: str) -> np.ndarray:
    """The base's input embedding, in `out_code`: the original shared weight, read before any shard
    changes it."""
    shards = sio.shard_names(base_dir)
    emb_shard = next((s for s in shards if any(n.endswith(_EMBED_NAMES) for n in sio.safetensors_header(base_dir / s))),
                     None)
    if emb_shard is None:
        raise EmqError(f"{base_dir} ties lm_head to an input embedding emq cannot find",
                       "use memory.merge_method=peft for this model")
    r = sio.Reader(base_dir / emb_shard)
    emb = next(n for n in r.names if n.endswith(_EMBED_NAMES))
    lm_head = _convert(r.array(emb), r.header[emb]["dtype"], out_code)
    r.close()
    return lm_head


def _import_before_threads(device: str, nf4: dict[str, Any] | None, quantize: bool = False) -> None:
    """Import what the merge of any part will need from torch and bitsandbytes (nothing on a plain CPU merge)."""
    if device != "cpu" or nf4 is not None or quantize:
        # torch (GPU math) and bitsandbytes (NF4 round trip) are imported here, once, before the
        # workers start: importing them from two threads at once can hand one thread a
        # half-initialised module (bitsandbytes' CPU ops were then missing).
        import torch  # noqa: F401

        if nf4 is not None:
            import bitsandbytes.functional  # noqa: F401


def _merge_part(job: _StreamJob, part: tuple[str, str, list[str]], last: bool) -> tuple[str, list[str], set[str], str]:
    """Merge one output part (input shard, output file, tensor names); `last`: the part lm_head is
    added to. Returns (output file, tensor names written, targets found, sha256)."""
    in_shard, shard, names = part
    reader = sio.Reader(job.base_dir / in_shard)
    info = reader.header
    # decoded: read whole and worked on; the rest (untouched, same dtype) pass through as bytes
    decoded = {n: n in job.deltas or n in job.bias_deltas or job.dequantizes(info, n) or job.quantizes(info, n)
               or info[n]["dtype"] != job.out_code_of(info[n]["dtype"]) for n in names}
    plan = [(n, decoded[n]) for n in names if n not in job.replace]  # replaced tensors come from the adapter
    biggest = max((reader.span(n)[1] for n, whole in plan if whole), default=0)
    pool = sio.BufferPool(max(64 << 20, 3 * biggest))  # read ahead, merge, write: three in flight
    pieces = reader.stream(plan, pool)
    scratch = _Scratch()
    entries = [e for n in names for e in job.entries(info, n)]
    if last:  # lm_head becomes a tensor of its own, in a shard loaders read
        entries.append(("lm_head.weight", job.out_code, list(job.lm_head.shape)))
    writer = sio.Writer(job.out / shard, entries)
    found: set[str] = set()
    try:
        for name in names:
            length = reader.span(name)[1]
            if name not in job.replace and not decoded[name]:  # untouched: bytes in, bytes out
                _pass_through(job, name, length, pieces, pool, writer)
                continue
            w, code, buf = _load_tensor(job, name, info, pieces)
            job.bar.update(length)
            w = _work_tensor(job, name, w, code, in_shard, scratch)
            found.add(name)
            release = None if buf is None else lambda b=buf: pool.give(b)
            if job.quantizes(info, name):
                packed = _quantize_np(job, name, w)
                for out_name, _, _ in job.entries(info, name):  # the writer's order
                    writer.write(out_name, packed[out_name])
                if release is not None:
                    release()
            else:
                writer.write(name, w, release=release)
        if last:
            writer.write("lm_head.weight", job.lm_head)
        digest = writer.close()
    except BaseException:
        writer.abort()  # the temp dir is removed by merge_adapter; the original error stands
        raise
    finally:
        pieces.close()
        reader.close()
    return shard, [e[0] for e in entries], found, digest


def _pass_through(job: _StreamJob, name: str, length: int, pieces: Iterator[tuple[str, np.ndarray, mmap.mmap]],
                  pool: sio.BufferPool, writer: sio.Writer) -> None:
    """Copy an untouched tensor of `length` bytes from the read-ahead `pieces` to `writer`, piece by piece."""
    left = length
    while left:
        got, raw, buf = next(pieces)
        assert got == name, (got, name)
        writer.write(name, raw, release=lambda b=buf: pool.give(b))
        left -= raw.nbytes
        job.bar.update(raw.nbytes)
    if not length:
        writer.write(name, b"")


def _load_tensor(job: _StreamJob, name: str, info: dict[str, dict[str, Any]],
                 pieces: Iterator[tuple[str, np.ndarray, mmap.mmap]]) -> tuple[np.ndarray, str, mmap.mmap | None]:
    """(the tensor to work on, its dtype, the pool buffer holding it or None): the adapter's
    replacement, else the base's from `pieces`, NF4 round-tripped when the merge base asks for it."""
    if name in job.replace:  # modules_to_save: the adapter's tensor, not the base's
        return job.replace[name].load(), job.replace[name].code, None
    got, w, buf = next(pieces)
    assert got == name, (got, name)
    code = info[name]["dtype"]
    if job.dequantizes(info, name):
        w = _dequant_np(w, code, job.device, job.nf4)
    return w, code, buf


def _work_tensor(job: _StreamJob, name: str, w: np.ndarray, code: str, in_shard: str, scratch: _Scratch) -> np.ndarray:
    """The output tensor for `name`: W + s·B·A, b + s·lora_B.bias, or `w` converted to its output
    dtype. A merged weight whose dtype is already the output's is written over `w` in place."""
    if name in job.deltas:
        if code not in sio.FLOAT_CODES:
            raise EmqError(f"{name} in {in_shard} is {code}, not a float weight a LoRA can merge into",
                           "use a 16-bit base (not a pre-quantized checkpoint) as model.base")
        out_code = job.out_code
        merged = w if code == out_code else np.empty(w.shape, sio.np_dtype(out_code))
        lora = job.deltas[name]
        transposed = lora.embedding or job.fan_in_fan_out
        ok = _merge_weight_cpu(w, code, lora, merged, out_code, transposed=transposed, scratch=scratch) \
            if job.device == "cpu" else \
            _merge_weight_torch(w, code, lora, merged, out_code, transposed=transposed, device=job.device)
        result = merged if ok else None
    elif name in job.bias_deltas:
        result = _add_bias(w, code, job.bias_deltas[name], job.out_code)
    else:
        result = _convert(w, code, job.out_code_of(code))
    if result is None:
        raise EmqError(f"merged {name.rsplit('.', 1)[0]} has NaN/inf (safe merge refused it)",
                       f"check the adapter tensors for that module in {job.adapter_path}")
    return result


def _quantize_np(job: _StreamJob, name: str, w: np.ndarray) -> dict[str, np.ndarray]:
    """RTN-quantize one merged weight (held in the output dtype) and pack it: {tensor name: array}."""
    import torch

    from emq.checkpoint.w4a16 import pack, quantize_rtn

    scale_dtype = _torch_dtype(job.out_code) if job.out_code != "F32" else torch.bfloat16
    x = _to_torch(w, job.out_code).to(device=job.device, dtype=torch.float32)
    packed = pack(quantize_rtn(x, job.quant, scale_dtype))
    module = name[: -len(".weight")]
    out = {}
    for suffix, t in packed.items():
        t = t.cpu()
        out[f"{module}.{suffix}"] = t.view(torch.int16).numpy().view(np.uint16) if t.dtype in (
            torch.bfloat16, torch.float16) else t.numpy()
    return out


def _write_index_and_config(out: Path, cfg: dict[str, Any], weight_map: dict[str, str], out_dtype: str,
                            untie: bool, quant: Any = None, ignore: tuple[str, ...] = ()) -> None:
    """The safetensors index of the parts written and the base's config.json for the merged (and, with
    `quant`, packed) model."""
    if untie:
        cfg["tie_word_embeddings"] = False
    total = sum((out / s).stat().st_size for s in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg.pop("quantization_config", None)
    cfg["torch_dtype"] = cfg["dtype"] = out_dtype
    if quant is not None:
        from emq.checkpoint.w4a16 import quantization_config

        cfg["quantization_config"] = quantization_config(quant, list(ignore))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
