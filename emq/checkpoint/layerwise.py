"""Calibrated W4A16 quantization (GPTQ or AWQ) of a 16-bit checkpoint, one decoder layer at a time.

Memory stays constant in the model's depth: the model is a transformers skeleton on the meta device;
only the input embedding, the rotary embedding and one decoder layer at a time hold real weights (in
float32, on `device`), read tensor by tensor from the shards. The calibration hidden states of every
sample stay on `device` in float32, twice: a layer's inputs and its full-precision outputs.

Per layer:
1. run the calibration batches through the full-precision layer, with forward hooks on its Linears
   collecting H = 2XᵀX/n and mean |x| per distinct input (q/k/v read one tensor, so they share them);
2. quantize every eligible Linear: GPTQ per Linear from its H, or AWQ (search per-channel scales on
   each group of Linears that read one input, fold 1/s into the op producing it, RTN-quantize W·s);
   AWQ's search scores candidates on every calibration token through H (the objective only needs xᵀx),
   not on a sample of rows, so it needs no seed;
3. run the batches through the layer with RTN weights (the reference the summary compares with) and
   then with the quantized weights; the latter's outputs are the next layer's inputs, so every layer is
   calibrated on the activations of the already-quantized layers before it.

Attention sinks: in most LLMs the first position of a sequence receives most of the attention of every later
query (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks"), so an error in its keys
and values reaches every position's output. GPTQ's and AWQ's objective ‖X(W - Ŵ)ᵀ‖² counts it as one token
of T, and GPTQ then moves error exactly there (its input is unlike the others'): on SmolLM2-135M that made
GPTQ's layer output error up to 2.9× RTN's (7 of 30 layers above 1×). So in the statistics of the Linears
that read the attention's input (q/k/v), the first position of each calibration sequence counts T times;
measured on that model with 40 × 512 tokens, GPTQ's layer output error is then 0.12-0.58× RTN's in every
layer, and the held-out KL to the 16-bit model fell from RTN's 0.32 to 0.11.

Each decoder layer is called exactly as the model's own forward calls it: the arguments (causal mask,
position embeddings, position ids) are recorded once per batch by running the skeleton's forward with
recorders standing in for the layers. With sdpa and no padding transformers passes no mask and sdpa
applies `is_causal` (transformers.integrations.sdpa_attention); with eager it builds the causal mask.

Output: compressed-tensors pack-quantized tensors per quantized Linear (as `emq.checkpoint.stream`
writes them), everything else in the source dtype, one shard per decoder layer plus one for the rest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from emq.checkpoint import safetensors_io as sio
from emq.checkpoint.hessian import accumulate_hessian
from emq.checkpoint.nf4 import dequant_eligible
from emq.checkpoint.quantizers import Quantizer, quantizer
from emq.checkpoint.w4a16 import (
    QuantSpec,
    QWeight,
    dequantize,
    pack,
    quantization_config,
    quantize_rtn,
    scale_dtype_for,
)
from emq.errors import EmqError

log = logging.getLogger(__name__)

# Linears that read the attention's input: their statistics weight the first position (the attention sink)
ATTENTION_INPUT = re.compile(r"(^|\.)(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn|Wqkv|W_pack)$")
_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
# quant.compensation.rank: the factors B [out, r] and A [r, in] of every quantized Linear, by module name + ".b"/".a",
# in safetensors format beside the checkpoint under a name no loader globs (vLLM reads every *.safetensors)
COMPENSATION_FILE = "compensation.factors"
COMPENSATION_PREFIX = "compensation::"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


# -- reading the source ------------------------------------------------------------------------------------


class _Source:
    """The source checkpoint's tensors by name, read one at a time (plain reads: no mmap'd pages stay resident)."""

    def __init__(self, src: Path):
        self.readers = {s: sio.Reader(src / s) for s in sio.shard_names(src)}
        if not self.readers:
            raise EmqError(f"{src} has no safetensors weights", "point the quantizer at a checkpoint saved as safetensors")
        self.where = {n: s for s, r in self.readers.items() for n in r.names}

    def code(self, name: str) -> str:
        return self.readers[self.where[name]].header[name]["dtype"]

    def get(self, name: str) -> torch.Tensor:
        """The tensor on the CPU in its stored dtype."""
        a = self.readers[self.where[name]].array(name)
        code = self.code(name)
        if code == "BF16":
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def _source_dtype(cfg: dict[str, Any], source: _Source) -> torch.dtype:
    """The dtype of the source's floats (config's dtype, else its first float tensor's)."""
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "").removeprefix("torch.")
    by_name = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name in by_name:
        return by_name[name]
    codes = [source.code(n) for n in sorted(source.where) if source.code(n) in _TORCH_DTYPES]
    return _TORCH_DTYPES[codes[0]] if codes else torch.bfloat16


# -- the skeleton --------------------------------------------------------------------------------------------


@dataclass
class _Skeleton:
    """The model on the meta device, and where its decoder layers are."""

    model: nn.Module
    decoder: nn.Module  # the base model whose forward calls the layers
    layers: nn.ModuleList
    prefix: str  # checkpoint name of the layer list, e.g. "model.layers"
    model_type: str


def _build_skeleton(src: Path, device: str) -> _Skeleton:
    """The model on meta (float32) with a real rotary embedding on `device`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(src)
    model = None
    for attn in ("sdpa", "eager"):
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
            break
        except (ValueError, ImportError):  # a model without sdpa support
            if attn == "eager":
                raise
    decoder = model.base_model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise EmqError(f"{src}: {type(model).__name__} has no decoder layer list emq can walk layer by layer",
                       "use quant.algorithm=rtn for this model")
    prefix = next(n for n, m in model.named_modules() if m is layers)
    for name, mod in list(decoder.named_modules()):
        if name.startswith("layers.") or name == "layers" or not list(mod.buffers(recurse=False)):
            continue
        if not type(mod).__name__.endswith("RotaryEmbedding"):
            continue  # other buffers (e.g. a scaled embedding's) are checked where they would be used
        # to_empty would leave inv_freq uninitialised: build it afresh from the config
        fresh = type(mod)(config=mod.config if hasattr(mod, "config") else config).to(device)
        parent, _, attr = name.rpartition(".")
        setattr(decoder.get_submodule(parent) if parent else decoder, attr, fresh)
    model.eval().requires_grad_(False)
    return _Skeleton(model, decoder, layers, prefix, str(getattr(config, "model_type", "")))


def _embed(skel: _Skeleton, source: _Source, ids: torch.Tensor, device: str) -> torch.Tensor:
    """The input embeddings of `ids` in float32 (the module runs in the stored dtype: exact, and half the memory)."""
    emb = skel.model.get_input_embeddings()
    if list(emb.buffers()):
        raise EmqError(f"{type(emb).__name__} has buffers emq does not rebuild (model_type {skel.model_type!r})",
                       "use quant.algorithm=rtn for this model")
    prefix = next(n for n, m in skel.model.named_modules() if m is emb)
    emb.weight = nn.Parameter(source.get(f"{prefix}.weight").to(device), requires_grad=False)
    try:
        return emb(ids).float()
    finally:
        emb.to_empty(device="meta")


class _Stop(Exception):
    """Raised by the last recorder: the rest of the model (final norm, lm_head) stays on meta."""


class _Recorder(nn.Module):
    """Stands in for a decoder layer: records the arguments the model's forward passes it, returns its input."""

    def __init__(self, inner: nn.Module, calls: list, last: bool):
        super().__init__()
        object.__setattr__(self, "_inner", inner)  # not a submodule: attribute reads only
        self._calls, self._last = calls, last

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._inner, name)  # e.g. attention_type, read by the model's loop

    def forward(self, hidden_states, *args, **kwargs):
        self._calls.append((args, kwargs))
        if self._last:
            raise _Stop
        return hidden_states


def _layer_calls(skel: _Skeleton, embeds: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) each decoder layer gets for a batch of input embeddings, from the model's own forward."""
    calls: list[tuple[tuple, dict]] = []
    originals = list(skel.layers)
    n = len(originals)
    for i, layer in enumerate(originals):
        skel.layers[i] = _Recorder(layer, calls, last=i == n - 1)
    try:
        skel.decoder(inputs_embeds=embeds, use_cache=False)
    except _Stop:
        pass
    finally:
        for i, layer in enumerate(originals):
            skel.layers[i] = layer
    if len(calls) != n:
        raise EmqError(f"the model's forward called {len(calls)} of its {n} decoder layers",
                       "use quant.algorithm=rtn for this model")
    return calls


# -- calibration state ---------------------------------------------------------------------------------------


@dataclass
class _Calib:
    """Calibration hidden states (float32 on the device) and per batch the layers' call arguments."""

    x: torch.Tensor  # [samples, seq, hidden]: the current layer's inputs
    y: torch.Tensor  # the current layer's full-precision outputs
    spans: list[tuple[int, int]]  # batches: sample ranges
    calls: list[list[tuple[tuple, dict]]]  # [batch][layer] → (args, kwargs)


def _calibration(skel: _Skeleton, source: _Source, tokens: list[list[int]], batch_size: int,
                 device: str) -> _Calib:
    """Embed the calibration tokens and record every layer's call arguments, batch by batch."""
    ids = torch.tensor(tokens, dtype=torch.long)
    spans = [(s, min(s + batch_size, len(tokens))) for s in range(0, len(tokens), batch_size)]
    x = _embed(skel, source, ids.to(device), device)
    calls = []
    with torch.inference_mode():
        for s, e in spans:
            calls.append(_layer_calls(skel, x[s:e]))
    return _Calib(x=x, y=torch.empty_like(x), spans=spans, calls=calls)


def _forward(layer: nn.Module, calib: _Calib, index: int, b: int) -> torch.Tensor:
    """Layer `index` on batch `b` of the current inputs."""
    s, e = calib.spans[b]
    args, kwargs = calib.calls[b][index]
    out = layer(calib.x[s:e], *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple


@dataclass
class LayerStats:
    """What the driver captured for the quantizer, per distinct Linear input: H = 2XᵀX/n (running) and Σ|x|; Linears fed one tensor share them."""

    hessian: dict[str, torch.Tensor] = field(default_factory=dict)
    abssum: dict[str, torch.Tensor] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    key_of: dict[str, str] = field(default_factory=dict)  # Linear → the first Linear that saw its input
    last: tuple[Any, str] | None = None  # holds the tensor itself, so its id cannot be reused mid-batch

    def hook(self, name: str, first_weight: float = 1.0):
        """A forward hook folding the Linear's input into the statistics; in H, position 0 of each
        sequence counts `first_weight` times (mean |x| stays unweighted: it is AWQ's saliency, not its loss)."""
        def record(module, args, output) -> None:
            x = args[0]
            if self.last is not None and self.last[0] is x:
                self.key_of[name] = self.last[1]
                return
            self.key_of[name] = name
            self.last = (x, name)
            flat = x.reshape(-1, x.shape[-1]).float()
            total = flat.abs().sum(dim=0)
            self.abssum[name] = total if name not in self.abssum else self.abssum[name] + total
            if first_weight != 1.0 and x.ndim == 3:
                x = x.float().clone()
                x[:, 0] *= first_weight ** 0.5
                flat = x.reshape(-1, x.shape[-1])
            self.hessian[name], self.seen[name] = accumulate_hessian(self.hessian.get(name), flat,
                                                                     self.seen.get(name, 0))
        return record

    def h(self, name: str) -> torch.Tensor:
        return self.hessian[self.key_of[name]]

    def absmean(self, name: str) -> torch.Tensor:
        key = self.key_of[name]
        return self.abssum[key] / max(self.seen[key], 1)


# -- one layer -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerJob:
    """What every layer needs (the quantizer reads it too)."""

    algorithm: str
    model_type: str
    spec: QuantSpec
    ignore: tuple[str, ...]
    damp: float
    device: str
    out_dtype: torch.dtype  # the dtype 16-bit tensors are written in
    scale_dtype: torch.dtype
    compare_rtn: bool
    compensation_rank: int = 0  # > 0: fit a low-rank compensation of each Linear's error (emq.checkpoint.compensation)
    compensation_rounds: int = 1  # > 1: requantize what the low-rank term does not carry, refit, keep the best round


def _ignored(module: str, ignore: tuple[str, ...]) -> bool:
    return any(module == i or module.endswith("." + i) for i in ignore)


def _quantized_names(layer: nn.Module, full: str, job: LayerJob) -> list[str]:
    """The layer's Linears to quantize (relative names): eligible decoder weights not in `ignore`."""
    names = []
    for name, mod in layer.named_modules():
        w = getattr(mod, "weight", None)
        if w is None or not dequant_eligible(f"{full}.{name}.weight", tuple(w.shape)):
            continue
        if not isinstance(mod, nn.Linear):  # e.g. GPT-2's Conv1D: stored transposed, not what the kernels read
            raise EmqError(f"{full}.{name} is a {type(mod).__name__}, not a Linear: emq's GPTQ/AWQ quantize Linears",
                           "use quant.algorithm=rtn for this model")
        if _ignored(f"{full}.{name}", job.ignore):
            continue
        if mod.in_features % job.spec.group_size:
            raise EmqError(f"{full}.{name} has {mod.in_features} in-features, not a multiple of quant.group_size="
                           f"{job.spec.group_size}", "choose a group size that divides every Linear's in-features")
        names.append(name)
    return names


def _load_layer(layer: nn.Module, full: str, source: _Source, device: str) -> dict[str, torch.Tensor]:
    """Materialize the layer on `device` in float32 with the source's tensors; returns its parameters (copies)."""
    layer.to_empty(device=device)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for name, t in list(params.items()) + list(layer.named_buffers()):
            key = f"{full}.{name}"
            if key not in source.where:  # e.g. a buffer computed at init, which to_empty left as garbage
                raise EmqError(f"the checkpoint has no tensor {key} for {type(layer).__name__}",
                               "use quant.algorithm=rtn for this model")
            t.copy_(source.get(key).to(device=device, dtype=t.dtype))
    return {name: p.detach().clone() for name, p in params.items()}


def _set_weights(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, t in tensors.items():
            layer.get_parameter(name).copy_(t)


def _capture(layer: nn.Module, names: list[str], calib: _Calib, index: int) -> LayerStats:
    """Full-precision pass: store the outputs in calib.y and collect the Linears' input statistics."""
    stats = LayerStats()
    sink = float(calib.x.shape[1])  # the first position counts as much as the whole sequence
    hooks = [layer.get_submodule(n).register_forward_hook(stats.hook(n, sink if ATTENTION_INPUT.search(n) else 1.0))
             for n in names]
    try:
        with torch.inference_mode():
            for b, (s, e) in enumerate(calib.spans):
                calib.y[s:e] = _forward(layer, calib, index, b)
                stats.last = None
    finally:
        for h in hooks:
            h.remove()
    return stats


def _output_mse(layer: nn.Module, calib: _Calib, index: int, advance: bool) -> float:
    """Mean squared error of the layer's outputs against calib.y; with `advance`, they become calib.x."""
    total = torch.zeros((), dtype=torch.float64, device=calib.x.device)
    with torch.inference_mode():
        for b, (s, e) in enumerate(calib.spans):
            out = _forward(layer, calib, index, b)
            total += ((out - calib.y[s:e]).double() ** 2).sum()
            if advance:
                calib.x[s:e] = out
    return float(total) / calib.y.numel()


def _quantize_layer(layer: nn.Module, index: int, full: str, source: _Source, calib: _Calib,
                    job: LayerJob) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize one decoder layer and advance calib.x to its quantized outputs; returns (its tensors, summary)."""
    t0 = time.perf_counter()
    original = _load_layer(layer, full, source, job.device)
    names = _quantized_names(layer, full, job)
    stats = _capture(layer, names, calib, index)
    summary: dict[str, Any] = {"index": index}
    if job.compare_rtn:
        _set_weights(layer, {f"{n}.weight": dequantize(quantize_rtn(original[f"{n}.weight"], job.spec,
                                                                      job.scale_dtype)) for n in names})
        summary["rtn_output_mse"] = _output_mse(layer, calib, index, advance=False)
        _set_weights(layer, original)
    q = quantizer(job.algorithm)
    qweights, summary[q.summary_key] = q.quantize_layer(layer, names, stats, job)
    served = {n: dequantize(qw) for n, qw in qweights.items()}
    factors = {}
    if job.compensation_rank:  # the next layer reads the outputs that will be served: W4A16 + B·A
        qweights, factors, summary["compensation"] = _compensate(layer, q, qweights, original, stats, job)
        served = {n: dequantize(qw) + (factors[n].b @ factors[n].a if n in factors else 0)
                  for n, qw in qweights.items()}
    del stats
    _set_weights(layer, {f"{n}.weight": w for n, w in served.items()})
    summary["output_mse"] = _output_mse(layer, calib, index, advance=True)
    summary["output_power"] = float((calib.y.double() ** 2).mean())
    if job.compare_rtn:
        rtn = summary["rtn_output_mse"]
        summary["ratio_vs_rtn"] = summary["output_mse"] / rtn if rtn else 1.0
    tensors = _layer_tensors(layer, full, source, qweights, job)
    for n, c in factors.items():
        tensors[f"{COMPENSATION_PREFIX}{full}.{n}.b"] = c.b.cpu().contiguous()
        tensors[f"{COMPENSATION_PREFIX}{full}.{n}.a"] = c.a.cpu().contiguous()
    layer.to_empty(device="meta")
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return tensors, summary


def _compensate(layer: nn.Module, q: Quantizer, qweights: dict[str, QWeight], original: dict[str, torch.Tensor],
                stats: LayerStats, job: LayerJob) -> tuple[dict[str, QWeight], dict[str, Any], dict[str, Any]]:
    """Each quantized Linear's rank-r compensation, fitted on its captured inputs' H (emq.checkpoint.compensation);
    with job.compensation_rounds > 1, the layer is quantized again from W − B·A and refitted, and each Linear keeps
    its best round. Returns (the QWeights kept, their compensations, per Linear the output error relative to the
    output's energy without and with the compensation, and the round kept)."""
    from emq.checkpoint.compensation import fit, hessian_root

    seen = [n for n in qweights if n in stats.key_of]  # a Linear no calibration token reached gets no compensation
    roots = {k: hessian_root(stats.hessian[k]) for k in {stats.key_of[n] for n in seen}}  # q/k/v share one
    best: dict[str, tuple[QWeight, Any, int]] = {}
    last: dict[str, tuple[QWeight, Any, int]] = {}
    plain: dict[str, float] = {}  # the first round's error without compensation: what the quantizer alone leaves
    for rnd in range(job.compensation_rounds):
        if rnd:  # quantize what the low-rank term does not carry
            _set_weights(layer, {f"{n}.weight": original[f"{n}.weight"] - c.b @ c.a for n, (_, c, _) in last.items()})
            kept = {n: qw for n, qw in qweights.items() if n not in seen}
            qweights, _ = q.quantize_layer(layer, seen, stats, job)
            qweights = {**kept, **qweights}
        last = {}
        for n in seen:
            qw = qweights[n]
            k = stats.key_of[n]
            c = fit(original[f"{n}.weight"], dequantize(qw), stats.hessian[k], job.compensation_rank, root=roots[k])
            last[n] = (qw, c, rnd)
            plain.setdefault(n, c.error_before)
            if n not in best or c.error_after < best[n][1].error_after:
                best[n] = last[n]
    return ({**qweights, **{n: qw for n, (qw, _, _) in best.items()}}, {n: c for n, (_, c, _) in best.items()},
            {n: {"error": round(plain[n], 6), "compensated": round(c.error_after, 6), "round": rnd}
             for n, (_, c, rnd) in best.items()})


def _layer_tensors(layer: nn.Module, full: str, source: _Source, qweights: dict[str, QWeight],
                   job: LayerJob) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a layer (CPU): packed Linears; parameters in the output dtype (folded
    norms included); any other tensor the source stores under the layer, as stored."""
    out: dict[str, torch.Tensor] = {}
    for name, qw in qweights.items():
        out.update({f"{full}.{name}.{k}": v.cpu() for k, v in pack(qw, job.scale_dtype).items()})
    packed = {f"{n}.weight" for n in qweights}
    params = dict(layer.named_parameters())
    for key in source.where:
        if not key.startswith(full + "."):
            continue
        rel = key[len(full) + 1:]
        if rel in packed:
            continue
        out[key] = params[rel].detach().to(job.out_dtype).cpu() if rel in params else _stored(source, key, job)
    return {k: v.contiguous() for k, v in out.items()}


def _stored(source: _Source, key: str, job: LayerJob) -> torch.Tensor:
    """A source tensor as written out: floats in the output dtype, the rest as stored."""
    t = source.get(key)
    return t.to(job.out_dtype) if t.is_floating_point() else t


# -- writing -------------------------------------------------------------------------------------------------


def _save(out: Path, shard: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write one shard; returns its sha256."""
    from safetensors.torch import save_file

    path = out / shard
    save_file(tensors, str(path), metadata={"format": "pt"})
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_index_and_config(out: Path, cfg: dict[str, Any], weight_map: dict[str, str], out_dtype: torch.dtype,
                            spec: QuantSpec, ignore: tuple[str, ...]) -> None:
    total = sum((out / s).stat().st_size for s in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    cfg = dict(cfg)
    cfg["torch_dtype"] = cfg["dtype"] = _DTYPE_NAMES[out_dtype]
    cfg["quantization_config"] = quantization_config(spec, sorted(set(ignore) | {"lm_head"}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


# -- the entry point -----------------------------------------------------------------------------------------


def _check_inputs(src: Path, q: Quantizer, tokens: list[list[int]], cfg: dict[str, Any]) -> None:
    algorithm = q.name
    q.check(cfg)
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?")
        raise EmqError(f"{src} is already quantized ({method}); {algorithm} needs a 16-bit checkpoint",
                       "point the quantizer at the 16-bit model (the base or the merged checkpoint)")
    if not tokens or not tokens[0]:
        raise EmqError(f"{algorithm} got no calibration tokens", "set quant.calibration.samples and seq_len above 0")
    if len({len(t) for t in tokens}) != 1:
        raise EmqError(f"calibration sequences differ in length ({sorted({len(t) for t in tokens})[:4]})",
                       "pack the calibration text into equal-length sequences (emq.calibration.calibration_tokens)")
    vocab = cfg.get("vocab_size") or cfg.get("text_config", {}).get("vocab_size")
    top = max(max(t) for t in tokens)
    if vocab and (top >= vocab or min(min(t) for t in tokens) < 0):
        raise EmqError(f"calibration token id {top} is outside the model's vocabulary ({vocab})",
                       "tokenize the calibration text with this model's tokenizer")


def _peak_note(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"peak {device} memory allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return f"peak process RSS {rss:.2f} GiB (whole process, since it started)"


def _setup(src: Path, algorithm: str, spec: QuantSpec, ignore: tuple[str, ...], tokens: list[list[int]],
           device: str, damp: float, compare_rtn: bool,
           compensation_rank: int = 0, compensation_rounds: int = 1
           ) -> tuple[dict[str, Any], _Source, _Skeleton, LayerJob]:
    """Validate, open the source and build the skeleton."""
    cfg = json.loads((src / "config.json").read_text())
    q = quantizer(algorithm)
    if compensation_rank and not q.compensable:
        raise EmqError(f"{algorithm} cannot be compensated: it rewrites more of the layer than the weights it rounds",
                       "quant.algorithm=gptq or rtn with quant.compensation.rank")
    _check_inputs(src, q, tokens, cfg)
    source = _Source(src)
    try:
        skel = _build_skeleton(src, device)
        q.check(cfg, skel.layers[0])  # refuse an architecture before any work
        src_dtype = _source_dtype(cfg, source)
        out_dtype = src_dtype if src_dtype in _DTYPE_NAMES else torch.bfloat16
        job = LayerJob(algorithm=algorithm, model_type=skel.model_type, spec=spec,
                       ignore=tuple(sorted(set(ignore) | {"lm_head"})), damp=damp,
                       device=device, out_dtype=out_dtype, scale_dtype=scale_dtype_for(out_dtype),
                       compare_rtn=compare_rtn, compensation_rank=compensation_rank,
                       compensation_rounds=compensation_rounds)
    except BaseException:
        source.close()
        raise
    return cfg, source, skel, job


def quantize_layerwise(src: Path, out: Path, *, algorithm: str, spec: QuantSpec, ignore: tuple[str, ...],
                       tokens: list[list[int]], device: str, damp: float = 0.01, batch_size: int = 8,
                       compare_rtn: bool = True, compensation_rank: int = 0, compensation_rounds: int = 1) -> dict:
    """Quantize a 16-bit checkpoint to W4A16 with GPTQ or AWQ, one decoder layer at a time.

    Args:
        src: a Hugging Face checkpoint dir (config.json, safetensors shards, optional index), bf16 or fp16.
        out: an existing empty dir; gets the shards, model.safetensors.index.json and config.json (not the
            tokenizer: the caller copies it).
        algorithm: "gptq" or "awq".
        spec: group size, symmetry, bits.
        ignore: Linear modules kept in 16 bits (matched as name suffixes); lm_head always is.
        tokens: calibration sequences of equal length, token ids of this model's tokenizer.
        device: "cuda", "cuda:1", "cpu", ...; all math runs there in float32.
        damp: GPTQ's relative dampening.
        batch_size: calibration sequences per forward call.
        compare_rtn: also run each layer with round-to-nearest weights on the same inputs and record its
            output error (one more forward pass per layer).
        compensation_rank: > 0: fit each quantized Linear's rank-r compensation B·A on its inputs
            (emq.checkpoint.compensation), propagate the compensated outputs to the next layer, and write the
            factors to out/compensation.factors (beside the checkpoint; not loaded with it).
        compensation_rounds: > 1: quantize W − B·A again and refit, keeping each Linear's best round.

    Returns:
        Manifest fields (JSON-serializable): files_sha256, device, algorithm, spec, damp, calibration sizes,
        layers (per layer: index, seconds, output_mse — mean squared error of the quantized layer's outputs
        against the full-precision layer's on the calibration inputs (the outputs of the quantized layers
        before it) — with rtn_output_mse and ratio_vs_rtn for round-to-nearest on the same inputs; per
        module GPTQ loss/damp/fallback/dead_columns and objective/objective_rtn/ratio, or per AWQ group
        (named by the op folded into) alpha/ratio/loss/loss_rtn), seconds, peak_note.

    Raises:
        EmqError: unknown algorithm, an already-quantized source, no or ragged tokens, an architecture the
            algorithm does not support. A CUDA out-of-memory error propagates (the caller cascades devices).
    """
    t0 = time.perf_counter()
    src, out = Path(src), Path(out)
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)
    cfg, source, skel, job = _setup(src, algorithm, spec, ignore, tokens, device, damp, compare_rtn,
                                    compensation_rank, compensation_rounds)
    try:
        calib = _calibration(skel, source, tokens, batch_size, device)
        hashes, weight_map, layers = _write_shards(out, skel, source, calib, job)
    finally:
        source.close()
    _write_index_and_config(out, cfg, weight_map, job.out_dtype, spec, job.ignore)
    return {"files_sha256": hashes, "device": device, "algorithm": algorithm,
            "spec": {"group_size": spec.group_size, "symmetric": spec.symmetric, "bits": spec.bits,
                     **({"scale_search": spec.scale_search} if spec.scale_search != "minmax" else {})},
            "damp": damp if quantizer(algorithm).uses_damp else None,
            **({"compensation_rank": compensation_rank} if compensation_rank else {}),
            **({"compensation_rounds": compensation_rounds} if compensation_rounds > 1 else {}),
            "calibration": {"samples": len(tokens), "seq_len": len(tokens[0]),
                            "first_position_weight": len(tokens[0])},
            "layers": layers, "seconds": round(time.perf_counter() - t0, 2), "peak_note": _peak_note(device)}


def _write_shards(out: Path, skel: _Skeleton, source: _Source, calib: _Calib,
                  job: LayerJob) -> tuple[dict[str, str], dict[str, str], list[dict]]:
    """The rest (embeddings, final norm, lm_head) into the first shard, then each layer quantized into its own.

    Returns:
        (sha256 by shard, shard by tensor name, per-layer summaries).
    """
    from tqdm import tqdm

    n = len(skel.layers)
    shards = [f"model-{k + 1:05d}-of-{n + 1:05d}.safetensors" for k in range(n + 1)]
    layer_key = re.compile(rf"^{re.escape(skel.prefix)}\.\d+\.")
    rest = {k: _stored(source, k, job) for k in sorted(source.where) if not layer_key.match(k)}
    hashes = {shards[0]: _save(out, shards[0], rest)}
    weight_map = dict.fromkeys(rest, shards[0])
    del rest
    layers = []
    factors: dict[str, torch.Tensor] = {}
    for i in tqdm(range(n), desc=job.algorithm, unit="layer"):
        tensors, summary = _quantize_layer(skel.layers[i], i, f"{skel.prefix}.{i}", source, calib, job)
        factors.update({k[len(COMPENSATION_PREFIX):]: tensors.pop(k) for k in list(tensors)
                        if k.startswith(COMPENSATION_PREFIX)})
        hashes[shards[i + 1]] = _save(out, shards[i + 1], tensors)
        weight_map.update(dict.fromkeys(tensors, shards[i + 1]))
        layers.append(summary)
        _log_layer(job.algorithm, n, summary)
    if factors:
        hashes[COMPENSATION_FILE] = _save(out, COMPENSATION_FILE, factors)
    return hashes, weight_map, layers


def _log_layer(algorithm: str, n: int, s: dict[str, Any]) -> None:
    vs = f", RTN {s['rtn_output_mse']:.3g} (×{s['ratio_vs_rtn']:.2f})" if "rtn_output_mse" in s else ""
    log.info("%s layer %d/%d: %.1f s, output mse %.3g%s", algorithm, s["index"] + 1, n, s["seconds"],
             s["output_mse"], vs)
