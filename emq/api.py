"""emq's typed Python API: the same detect / plan / merge / cache code the CLI runs, callable from a
researcher's own script. The original tool's scripts use `emq.quant_utils` / `emq.memory_config` instead (the
same names and signatures as theirs, thin adapters over this module).

    import emq
    from vllm import LLM
    prep = emq.prepare_model_for_vllm("path/or/hub-id-of-adapter", use_quantization=True)
    for k, v in prep.env.items():                                    # before vLLM starts (e.g. W4A16 on a CPU)
        os.environ.setdefault(k, v)
    llm = LLM(model=prep.model, **prep.engine_kwargs)
    outputs = llm.chat(messages, lora_request=prep.lora_request())

    emq.quantize("path/to/16-bit-model", algorithm="gptq")            # → a cached W4A16 checkpoint
    emq.get_or_create_quantized_model(None, "org/adapter")            # merge + quantize, cached
    emq.quantize_to_awq(model_path, awq_path)                        # the original tool's names
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emq import hub
from emq.checkpoint.cache import default_root
from emq.checkpoint.merge import MergeSettings, merge_adapter
from emq.detect import DetectResult, detect, read_json
from emq.errors import EmqError
from emq.machine import snapshot
from emq.plan import Plan, Route, make_plan
from emq.checkpoint.quantize import merge_in_cache, quantize_for_plan, rtn_settings
from emq.schema import (
    CalibrationConfig,
    MemoryConfig,
    MergeBase,
    MergeMethod,
    ModelConfig,
    QuantAlgorithm,
    QuantConfig,
    QuantMethod,
    RoutePolicy,
)

log = logging.getLogger(__name__)


def _devices(device: str) -> list[str]:
    import torch

    return (["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]) if device == "auto" else [device]


def _model_config(lora: str | None, base: str | None, trained_in_4bit: bool | None = None,
                  training_config: str | None = None, keys: tuple[str, str] = ("lora", "base")) -> ModelConfig:
    if lora is None and base is None:
        raise EmqError("give a base model or an adapter", "e.g. prepare_model_for_vllm('org/adapter')")
    if lora is not None:
        adir = hub.resolve(lora, revision=None, what="adapter", key=keys[0])
        if not (adir / "adapter_config.json").is_file():
            raise EmqError(f"{keys[0]}={lora!r} is not a LoRA adapter: {adir} has no adapter_config.json",
                           f"pass the adapter's directory or hub id as {keys[0]}; a full model needs no merge")
    if base is None:
        base = read_json(adir / "adapter_config.json").get("base_model_name_or_path")
        if not base:
            raise EmqError(f"{adir}/adapter_config.json names no base_model_name_or_path", f"pass {keys[1]}= explicitly")
    return ModelConfig(name=Path(lora or base).name, base=base, adapter=lora, trained_in_4bit=trained_in_4bit,
                       training_config=training_config)


def is_adapter(ref: str, *, key: str = "lora") -> bool:
    """Whether `ref` (a local directory or hub id) is a LoRA adapter (has adapter_config.json) rather than a model.

    Raises:
        EmqError: `ref` does not exist locally and is not on the hub or in its cache; the message names `key`.
    """
    return (hub.resolve(ref, revision=None, what="model or adapter", key=key) / "adapter_config.json").is_file()


def was_trained_in_4bit(lora: str | None, base: str | None = None, *, training_config: str | None = None,
                        keys: tuple[str, str] = ("lora", "base")) -> bool | None:
    """Whether the adapter was trained on a 4-bit base: True, False or None (unknown).

    Args:
        lora: adapter path or hub id (None: judge the model `base` alone, from its config's quantization_config).
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        training_config: the adapter's training config file, read as the strongest evidence.
        keys: the caller's names for `lora` and `base`, for error messages.

    The evidence behind the answer is in `emq.detect.detect(...)`'s record.
    """
    return detect(_model_config(lora, base, training_config=training_config, keys=keys)).trained_in_4bit


def get_or_create_merged_model(base: str | None, lora: str, *, method: str = "stream", merge_base: str = "auto",
                               out_dtype: str = "bfloat16", device: str = "auto", cache_dir: str | Path | None = None,
                               force_recreate: bool = False) -> Path:
    """The merged checkpoint for base + lora, from the cache or built once (thread- and process-safe).

    Args:
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        lora: adapter path or hub id.
        method: "stream" (shard by shard, lean) or "peft" (merge_and_unload).
        merge_base: "auto", "original" or "dequantized" (see emq.checkpoint.merge).
        out_dtype: dtype of the merged weights.
        device: "auto" (cuda if available, then cpu), "cuda" or "cpu".
        cache_dir: cache root (default: EMQ_CACHE or ~/.cache/emq/merged).
        force_recreate: rebuild even if cached.
    """
    det = detect(_model_config(lora, base), fetch_weights=True)
    result = merge_adapter(det, _devices(device), cache_dir or default_root(),
                           settings=MergeSettings(MergeMethod(method), MergeBase(merge_base), out_dtype),
                           force_recreate=force_recreate)
    return Path(result.path)


def script_env(plan: Plan) -> dict[str, str]:
    """The plan's engine environment, plus, on vLLM's CPU build, the KV cache size the plan budgets
    (VLLM_CPU_KVCACHE_SPACE, GiB): a script's own `gpu_memory_utilization=0.9` would otherwise make vLLM's CPU
    build reserve 90 % of the NUMA node's memory (measured: 20 GiB of a 24 GiB machine for the 135M demo)."""
    env = dict(plan.engine.env)
    if plan.platform == "cpu" and plan.estimates_gib.get("kv_headroom", 0) > 0:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(plan.estimates_gib["kv_headroom"])))
    return env


@dataclass(frozen=True)
class ScriptSetup:
    """What a script that builds its own `vllm.LLM(...)` needs from emq's plan: the environment (set before the
    engine starts), and the engine settings no environment variable carries, as advice for the caller."""

    env: dict[str, str]
    advice: list[str]


def script_setup(plan: Plan) -> ScriptSetup:
    """`script_env(plan)`, and a line for each engine setting the caller must pass itself."""
    advice = []
    if plan.platform == "cpu" and plan.engine.enforce_eager:
        advice.append("pass enforce_eager=True to LLM(...) on vLLM's CPU build, as emq does: its torch.compile path "
                      "adds ~60-120 s at start (measured on the demo, 2 cores) and produced wrong tokens on the demo "
                      "model once; no environment variable can set it for you")
    return ScriptSetup(script_env(plan), advice)


@dataclass(frozen=True)
class VllmModel:
    """What to hand to vllm.LLM: `LLM(model=m.model, **m.engine_kwargs)` and, when the route serves
    the adapter, `lora_request=m.lora_request()` on every generate/chat call; `m.env` into os.environ first."""

    model: str
    engine_kwargs: dict[str, Any]
    lora_path: str | None
    plan: Plan
    detect: DetectResult
    merged: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """Environment variables the plan sets before vLLM starts (which kernels serve the checkpoint, vLLM's
        compile cache, the CPU build's KV cache size); a script sets them before `LLM(...)`."""
        return script_env(self.plan)

    def lora_request(self):
        """A vllm LoRARequest for the adapter, or None when the model is merged or has no adapter."""
        if self.lora_path is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("adapter", 1, self.lora_path)


def prepare_model_for_vllm(lora: str | None = None, *, base: str | None = None, use_quantization: bool = True,
                           quant: str = "auto", memory: MemoryConfig | None = None,
                           cache_dir: str | Path | None = None, trained_in_4bit: bool | None = None,
                           algorithm: str = "rtn", **memory_overrides: Any) -> VllmModel:
    """Detect, plan and (if the plan says so) merge; return what vllm.LLM needs.

    Args:
        lora: adapter path or hub id (None: serve `base`).
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        use_quantization: quantize (the memory policy's knob).
        quant: "auto", "none", "w4a16" (offline int4, made and cached here; RTN unless `algorithm`), "bnb",
            "int8" or "fp8".
        memory: a memory policy; `memory_overrides` replace its fields (e.g. max_model_len=4096).
        cache_dir: merge cache root.
        trained_in_4bit: override detection.
        algorithm: for w4a16: "rtn", "gptq" or "awq".

    Raises:
        EmqError: the plan stops (with the reason) or a choice cannot run here.
    """
    model = _model_config(lora, base, trained_in_4bit)
    memory = dataclasses.replace(memory or MemoryConfig(), use_quantization=use_quantization,
                                 **memory_overrides)
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_root()
    det = detect(model)
    plan = make_plan(det, memory, QuantConfig(method=QuantMethod(quant), algorithm=QuantAlgorithm(algorithm)),
                     snapshot(cache_root), merge_cached=merge_in_cache(det, memory, cache_root))
    if plan.route is Route.stop:
        raise EmqError(f"plan stopped: {plan.stop_reason}", "see the plan's reasons (emq.plan.make_plan)")
    model_path, lora_path, merged, result = det.base.ref, None, False, None
    if plan.route is Route.merge_then_serve or plan.quantize is not None:
        det = detect(model, fetch_weights=True)
    if plan.route is Route.merge_then_serve:
        result = merge_adapter(det, plan.merge_devices, cache_root,
                               settings=MergeSettings(memory.merge_method, memory.merge_base,
                                                      rtn=rtn_settings(plan.quantize)),
                               force_recreate=memory.force_recreate)
        model_path, merged = result.path, True
    elif plan.route is Route.serve_lora:
        lora_path = str(hub.resolve(lora, revision=None, what="adapter", key="lora", full=True))
    quantized = quantize_for_plan(det, plan.quantize, result, cache_root, force_recreate=memory.force_recreate)
    if quantized is not None:
        model_path = quantized.path
    from emq.engine import engine_kwargs

    kwargs = engine_kwargs(model_path, plan.engine, lora=lora_path is not None, seed=0)
    kwargs.pop("model")
    return VllmModel(model_path, kwargs, lora_path, plan, det, merged, list(plan.reasons))


def _w4a16_plan(model: ModelConfig, *, algorithm: str, group_size: int | None, symmetric: bool, ignore: tuple[str, ...],
                calibration: str, samples: int, seq_len: int, device: str, cache_root: Path):
    """Detect `model` and plan its w4a16 checkpoint (merged first when it has an adapter)."""
    quant = QuantConfig(method=QuantMethod.w4a16, algorithm=QuantAlgorithm(algorithm), group_size=group_size,
                        symmetric=symmetric, ignore=list(ignore), device="auto" if device == "auto" else device,
                        calibration=CalibrationConfig(corpus=calibration, samples=samples, seq_len=seq_len))
    memory = MemoryConfig(route=RoutePolicy.merge if model.adapter else RoutePolicy.auto)
    det = detect(model, fetch_weights=True)
    machine = snapshot(cache_root)
    if QuantMethod.w4a16 not in machine.vllm.quant:
        # Making the checkpoint is torch alone and runs anywhere; only serving it needs vLLM's int4 kernel.
        log.warning("this machine's vLLM cannot serve W4A16 (%s); the checkpoint is made anyway, to serve elsewhere",
                    machine.vllm.unsupported.get(QuantMethod.w4a16, "not supported"))
        vllm = dataclasses.replace(machine.vllm, quant={**machine.vllm.quant, QuantMethod.w4a16: "compressed-tensors"})
        machine = dataclasses.replace(machine, vllm=vllm)
    plan = make_plan(det, memory, quant, machine, merge_cached=merge_in_cache(det, memory, cache_root))
    if plan.route is Route.stop:
        raise EmqError(f"plan stopped: {plan.stop_reason}", "see the plan's reasons (emq.plan.make_plan)")
    return det, plan, memory


def get_or_create_quantized_model(base: str | None, lora: str | None, *, algorithm: str = "rtn",
                                  group_size: int | None = None, symmetric: bool = False,
                                  ignore: tuple[str, ...] = ("lm_head",), calibration: str = "default",
                                  samples: int = 40, seq_len: int = 512, device: str = "auto",
                                  cache_dir: str | Path | None = None, force_recreate: bool = False) -> Path:
    """A W4A16 checkpoint (compressed-tensors pack-quantized: every vLLM loads it with no quantization=
    argument) of base + lora merged, or of the base alone when `lora` is None; cached, built once.

    Args:
        base: base model path or hub id (None: the adapter's base_model_name_or_path).
        lora: adapter path or hub id, or None.
        algorithm: "rtn" (fused into the merge, seconds), "gptq" or "awq" (calibrated, layer by layer).
        group_size: 128, 64 or 32; None: the largest that divides every quantized in-feature.
        symmetric: symmetric int4 (no zero points); asymmetric is more accurate at the same size.
        ignore: Linear modules kept in 16 bits (lm_head always).
        calibration: "default" (emq's chats) or a JSONL of chats, e.g. the fine-tuning set.
        samples: calibration sequences.
        seq_len: tokens per calibration sequence.
        device: "auto", "cuda" or "cpu".
        cache_dir: cache root (default: EMQ_CACHE or ~/.cache/emq/merged).
        force_recreate: rebuild even if cached.
    """
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_root()
    det, plan, memory = _w4a16_plan(_model_config(lora, base), algorithm=algorithm, group_size=group_size,
                                    symmetric=symmetric, ignore=ignore, calibration=calibration, samples=samples,
                                    seq_len=seq_len, device=device, cache_root=cache_root)
    merged = None
    if plan.route is Route.merge_then_serve:
        merged = merge_adapter(det, plan.merge_devices, cache_root, force_recreate=force_recreate,
                               settings=MergeSettings(rtn=rtn_settings(plan.quantize)))
    quantized = quantize_for_plan(det, plan.quantize, merged, cache_root, force_recreate=force_recreate)
    return Path((quantized or merged).path)


def quantize(model_path: str | Path, out: str | Path | None = None, *, algorithm: str = "rtn",
             group_size: int | None = None, symmetric: bool = False, ignore: tuple[str, ...] = ("lm_head",),
             calibration: str = "default", samples: int = 40, seq_len: int = 512, device: str = "auto",
             cache_dir: str | Path | None = None, force_recreate: bool = False) -> Path:
    """Quantize a 16-bit checkpoint to W4A16 (compressed-tensors pack-quantized). Returns the cached checkpoint's
    path, or `out` when given (a copy of it there). Arguments as `get_or_create_quantized_model`."""
    path = get_or_create_quantized_model(str(model_path), None, algorithm=algorithm, group_size=group_size,
                                         symmetric=symmetric, ignore=ignore, calibration=calibration, samples=samples,
                                         seq_len=seq_len, device=device, cache_dir=cache_dir,
                                         force_recreate=force_recreate)
    return path if out is None else export_checkpoint(path, out)


def quantize_to_awq(model_path: str | Path, awq_path: str | Path, bits: int = 4, group_size: int = 128,
                    **kwargs: Any) -> Path:
    """The original tool's `quantize_to_awq`: AWQ 4-bit of `model_path` into `awq_path`. emq runs its own AWQ and
    writes compressed-tensors pack-quantized (not AutoAWQ's format): vLLM loads it natively on every version, CPU
    build included. A group size the model cannot take fails with the sizes that work."""
    if bits != 4:
        raise EmqError(f"bits={bits}: emq writes 4-bit weights only (W4A16)", "bits=4")
    return quantize(model_path, awq_path, algorithm="awq", group_size=group_size, **kwargs)


def get_or_create_awq_model(base_model: str | None, lora_model: str | None, **kwargs: Any) -> Path:
    """The original tool's `get_or_create_awq_model`: merge the LoRA, then AWQ 4-bit, cached (compressed-tensors
    pack-quantized, not AutoAWQ's format; see `quantize_to_awq`)."""
    return get_or_create_quantized_model(base_model, lora_model, algorithm="awq", **kwargs)


def export_checkpoint(entry: str | Path, out: str | Path, *, key: str = "out") -> Path:
    """Put a cached checkpoint at `out` as well (hard links where the filesystem allows, else a copy), atomically.

    Calling it again with the same entry is a no-op; `out` holding anything else is an error (nothing is
    overwritten).

    Raises:
        EmqError: `out` exists and holds something else; the message names `key`.
    """
    import os
    import shutil

    entry, out = Path(entry), Path(out).expanduser()
    if out.exists():
        mine = read_json(entry / "manifest.json").get("key")
        if (out / "manifest.json").is_file() and read_json(out / "manifest.json").get("key") == mine:
            log.info("%s already holds this checkpoint (%s)", out, mine)
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise EmqError(f"{key}={str(out)!r} already exists and holds something else",
                           f"pass a new directory as {key}, or remove {out}")
        out.rmdir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(entry, tmp, ignore=shutil.ignore_patterns(".last_used"),
                        copy_function=_link_or_copy)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    import os
    import shutil

    try:
        os.link(src, dst)  # same filesystem: no second copy of the weights (cache entries are never modified)
    except OSError:
        shutil.copy2(src, dst)


def auto_group_size(model: str, *, lora: str | None = None, key: str = "model_path") -> int:
    """The W4A16 group size emq picks for `model` (or an adapter's base) when none is given: the largest that divides
    every quantized in-feature (`emq.checkpoint.layout.choose_group_size`, as the plan does)."""
    from emq.checkpoint.layout import choose_group_size

    det = detect(_model_config(lora, None if lora else model, keys=(key, key)))
    return choose_group_size([i for _, i in det.base.linear_shapes], [o for o, _ in det.base.linear_shapes], None)[0]


def serving_setup(model_path: str | Path | None, lora: str | None = None,
                  cache_dir: str | Path | None = None) -> ScriptSetup:
    """What a script needs to serve the checkpoint at `model_path` as it is (which int4 kernels, the CPU build's
    core reservation and KV cache), or the LoRA `lora` on its base: `script_setup` of emq's plan for it."""
    cache_root = Path(cache_dir).expanduser() if cache_dir else default_root()
    det = detect(_model_config(lora, None if model_path is None else str(model_path),
                               keys=("model_path", "model_path")))
    memory = MemoryConfig(route=RoutePolicy.lora if lora else RoutePolicy.auto)
    plan = make_plan(det, memory, QuantConfig(method=QuantMethod.none), snapshot(cache_root),
                     merge_cached=merge_in_cache(det, memory, cache_root))
    return script_setup(plan)


_ENV_SET: set[tuple[str, str]] = set()


def set_env(env: dict[str, str]) -> dict[str, str]:
    """os.environ.setdefault for each variable (a value the caller set wins), logged once per variable and value.

    Returns:
        The variables whose value is now the one given.
    """
    import os

    done = {}
    for k, v in env.items():
        os.environ.setdefault(k, v)
        if os.environ[k] == v:
            done[k] = v
            if (k, v) not in _ENV_SET:
                log.info("emq set %s=%s for vLLM (a value you set yourself wins)", k, v)
        elif (k, v) not in _ENV_SET:
            log.info("%s=%s is yours; emq's plan would set %s", k, os.environ[k], v)
        _ENV_SET.add((k, v))
    return done


@dataclass(frozen=True)
class CacheCleanup:
    """What `clear_cache` did: entries removed, and entries kept because a build or another process uses them."""

    removed: list[tuple[str, int]]  # (key, bytes)
    kept: list[str]

    @property
    def freed_bytes(self) -> int:
        return sum(b for _, b in self.removed)


def clear_cache(cache_dir: str | Path | None = None) -> CacheCleanup:
    """Remove every entry of the checkpoint cache, as `python -m emq cache rm --all` does, with its locks: an entry
    being built, or used by another live process, is kept. This process's own use marks are dropped first."""
    from emq.checkpoint.cache import entries, release, remove_entry

    root = Path(cache_dir).expanduser() if cache_dir else default_root()
    release()
    removed, kept = [], []
    for e in entries(root):
        if remove_entry(root, e.key):
            removed.append((e.key, e.bytes))
        else:
            kept.append(e.key)
    return CacheCleanup(removed, kept)
