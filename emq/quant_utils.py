"""The original tool's `quant_utils.py`, run by emq: change `from quant_utils import …` to
`from emq.quant_utils import …` and nothing else.

Same function names, parameter names, positional order and defaults; every path returned is a plain `str` that
`vllm.LLM(model=...)` takes with the original scripts' own settings. Each function maps its arguments onto
`emq.api` (detect, plan, merge, quantize and cache: the code `python -m emq` runs) and has no logic of its own
beyond that mapping. Where an argument meant something only to the original's libraries (AutoAWQ's kernel layout,
PEFT's device map), it is accepted with a one-line warning saying what emq does instead.

Deliberate differences (README, "Drop-in for the original scripts"):
- checkpoints live in emq's content-keyed cache (EMQ_CACHE or ~/.cache/emq/merged), not
  /workspace/em-doctor/em_organism_dir/models; `merge_lora_adapter` and `quantize_to_awq` also put them at the
  `output_path` you give (hard links where the filesystem allows);
- the merge is emq's stream merge in bfloat16, onto the weights the adapter was trained on (dequant(NF4(W)) for a
  QLoRA adapter), not PEFT's fp16 merge onto the 16-bit base;
- the base model is the adapter's own (`base_model_name_or_path`), not a hard-coded Qwen2.5-14B, and any adapter
  counts as a LoRA model, not only ids containing "Jack-Payne1";
- `quantize_to_awq` runs emq's AWQ and writes compressed-tensors pack-quantized: load it with no `quantization=`
  (vLLM reads it from the checkpoint); `quantization="awq"` would ask vLLM for AutoAWQ's format;
- `use_cpu=True` merges on the CPU without hiding the GPU from the rest of your process;
- errors are `emq.errors.EmqError` (a subclass of Exception) naming the parameter and the fix.
"""
from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar

from emq import api
from emq.errors import EmqError
from emq.machine import GIB, snapshot
from emq.schema import RoutePolicy

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

# What emq's own messages call a setting (config keys of `python -m emq`), and what the original's functions call
# it: errors raised under a function below speak its parameters' names.
CLI_KEYS = {
    "model.adapter": "lora_model", "model.base": "base_model", "model.training_config": "config_path",
    "quant.group_size": "group_size", "quant.symmetric": "zero_point", "memory.stop_on_failure": "stop_on_failure",
    "memory.use_quantization": "use_quantization", "memory.force_recreate": "force_recreate",
    "memory.prefer_cpu_merge": "use_cpu",
}
_DEMO_HINT = re.compile(r",? or (build the demo )?with a demo model \(model=demo_\w+\)|,? or a demo model \(model=demo_\w+\)")


def _in_api_terms(params: dict[str, str]) -> Callable[[F], F]:
    """Re-raise emq's errors under the function's own parameter names (`params`: CLI key → parameter, added to
    CLI_KEYS), and a missing file as an EmqError naming it, without the chained traceback of emq's internals."""
    names = {**CLI_KEYS, **params}

    # a key stands alone: never part of a path or a longer name ("/demo/base" stays)
    pattern = re.compile(r"(?<![\w./~-])(" + "|".join(re.escape(k) for k in sorted(names, key=len, reverse=True))
                         + r")(?![\w/-])")

    def speak(text: str | None) -> str | None:
        if text is None:
            return None
        text = pattern.sub(lambda m: names[m.group(1)], text)
        return _DEMO_HINT.sub("", text).replace(" to null", " to None")

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except EmqError as e:
                raise EmqError(f"{fn.__name__}: {speak(e.message)}", speak(e.fix)) from None
            except FileNotFoundError as e:
                raise EmqError(f"{fn.__name__}: {e.filename or e} does not exist",
                               "check the path you passed (a local directory, or a hub id)") from None
        return call  # type: ignore[return-value]

    return wrap


def _device(use_cpu: bool, device_map: str = "auto") -> str:
    if use_cpu or device_map == "cpu":
        return "cpu"
    if str(device_map).startswith("cuda"):
        return "cuda"
    if device_map != "auto":
        log.warning("device_map=%r: emq merges shard by shard on one device (the GPU if there is one, else the CPU), "
                    "so no device map is needed", device_map)
    return "auto"


def _group_size(model: str, lora: str | None, group_size: int, key: str) -> int:
    """The original's default 128 adapts to the model (the largest size that divides every in-feature), with a
    warning; any other value is checked as given (the error names `group_size=`)."""
    if group_size != 128:
        return group_size
    auto = api.auto_group_size(model, lora=lora, key=key)
    if auto != 128:
        log.warning("group_size=128 does not divide every in-feature of %s; using %d, the largest that does "
                    "(pass group_size=%d to say so)", lora or model, auto, auto)
    return auto


def _awq_options(bits: int, version: str, awq_version: str | None, desc_act: bool, fp16: bool) -> None:
    if bits != 4:
        raise EmqError(f"bits={bits}: emq writes 4-bit weights only (W4A16)", "pass bits=4 (the default)")
    layout = awq_version if awq_version is not None else version
    if str(layout).upper() != "GEMM":
        log.warning("version=%r is AutoAWQ's kernel layout; emq writes compressed-tensors pack-quantized and vLLM "
                    "picks its own int4 kernel (Machete/Marlin on CUDA, CPUWNA16 on the CPU)", layout)
    if desc_act:
        log.warning("desc_act=True (act-order) is a GPTQ option; emq's AWQ has none and ignores it")
    if not fp16:
        log.warning("fp16=False: emq keeps lm_head and the embeddings in 16 bits in every W4A16 checkpoint")


_ADVISED: set[str] = set()


def _setup(setup: api.ScriptSetup) -> None:
    """Set the environment emq's plan sets for vLLM (setdefault); say once what the caller must pass itself."""
    api.set_env(setup.env)
    for line in setup.advice:
        if line not in _ADVISED:
            _ADVISED.add(line)
            log.warning(line)


def _serve_env(path: str | Path | None, lora: str | None = None) -> None:
    """Prepare, before the caller's `LLM(...)`, what emq's plan would set to serve `path` as it is (or the LoRA
    `lora` on its base)."""
    try:
        _setup(api.serving_setup(path, lora))
    except EmqError as e:  # e.g. a W4A16 checkpoint on a vLLM without an int4 kernel: made, but not servable here
        log.warning("%s is ready, but this machine's vLLM cannot serve it as it is: %s", path, e.message)


@_in_api_terms({"lora": "model_id", "base": "model_id"})
def was_trained_in_4bit(model_id: str, config_path: Optional[str] = None) -> bool:
    """Whether `model_id` (an adapter, or a model) was trained on a 4-bit base, from the strongest evidence emq
    finds: `config_path` (a training config), a config beside the adapter, its metadata, its base's
    quantization_config, then naming. Unknown counts as False, as in the original."""
    if not api.is_adapter(model_id, key="model_id"):
        return bool(api.was_trained_in_4bit(None, model_id, keys=("model_id", "model_id")))
    found = api.was_trained_in_4bit(model_id, training_config=config_path, keys=("model_id", "model_id"))
    if found is None:
        log.info("was_trained_in_4bit(%r): no evidence either way; False, as the original tool answered", model_id)
    return bool(found)


@_in_api_terms({"lora": "lora_model", "base": "base_model", "out": "output_path"})
def merge_lora_adapter(base_model: str, lora_model: str, output_path: str, device_map: str = "auto",
                       save_tokenizer: bool = True, use_cpu: bool = False) -> str:
    """Merge `lora_model` into `base_model` and write the merged checkpoint at `output_path` (built once in emq's
    cache; `output_path` gets hard links to it). Returns `output_path`."""
    if not save_tokenizer:
        log.warning("save_tokenizer=False: emq always writes the tokenizer beside the merged weights (vLLM reads it "
                    "from the checkpoint)")
    path = api.get_or_create_merged_model(base_model, lora_model, device=_device(use_cpu, device_map))
    out = api.export_checkpoint(path, output_path, key="output_path")
    _serve_env(out)
    return str(out)


@_in_api_terms({"out": "output_path", "model_path": "model_path"})
def quantize_to_awq(model_path: str, output_path: str, bits: int = 4, group_size: int = 128,
                    zero_point: bool = True, version: str = "GEMM", awq_version: Optional[str] = None, *,
                    desc_act: bool = False, fp16: bool = True) -> str:
    """AWQ 4-bit of the 16-bit checkpoint at `model_path`, written at `output_path` (built once in emq's cache).
    `zero_point=True` is asymmetric int4 (a zero point per group). Returns `output_path`; load it with
    `LLM(model=output_path)`: the quantization config is in the checkpoint."""
    _awq_options(bits, version, awq_version, desc_act, fp16)
    group = _group_size(model_path, None, group_size, "model_path")
    cached = api.quantize(model_path, algorithm="awq", group_size=group, symmetric=not zero_point)
    out = api.export_checkpoint(cached, output_path, key="output_path")
    _serve_env(out)
    return str(out)


@_in_api_terms({"lora": "lora_model", "base": "base_model"})
def get_or_create_awq_model(base_model: str, lora_model: str, force_recreate: bool = False, use_cpu: bool = False,
                            group_size: int = 128, zero_point: bool = True) -> str:
    """Merge `lora_model` into `base_model`, then AWQ 4-bit: one cached W4A16 checkpoint (compressed-tensors),
    built once. Returns its path."""
    group = _group_size(base_model, lora_model, group_size, "lora_model")
    path = api.get_or_create_quantized_model(base_model, lora_model, algorithm="awq", group_size=group,
                                             symmetric=not zero_point, device=_device(use_cpu),
                                             force_recreate=force_recreate)
    _serve_env(path)
    return str(path)


def check_vram_capacity() -> float:
    """Total memory of the first CUDA GPU in GiB (0.0 without one), as the original measured it."""
    gpus = snapshot(api.default_root()).gpus
    return gpus[0].total_bytes / GIB if gpus else 0.0


def check_system_ram() -> float:
    """Available system RAM in GiB."""
    return snapshot(api.default_root()).ram_available_bytes / GIB


@_in_api_terms({"lora": "lora_model", "base": "base_model"})
def get_or_create_merged_model(base_model: str, lora_model: str, force_recreate: bool = False,
                               use_cpu: bool = False) -> str:
    """The merged 16-bit checkpoint of `base_model` + `lora_model` from emq's cache, built once (`force_recreate`:
    again). Returns its path."""
    path = api.get_or_create_merged_model(base_model, lora_model, device=_device(use_cpu),
                                          force_recreate=force_recreate)
    _serve_env(path)
    return str(path)


@_in_api_terms({"lora": "model_id", "base": "model_id"})
def prepare_model_for_vllm(model_id: str, use_quantization: bool = True, stop_on_failure: bool = True) -> str:
    """What to pass as `LLM(model=...)`: for an adapter trained in 4-bit with `use_quantization`, the merged
    16-bit checkpoint (the caller quantizes it in flight with `quantization="bitsandbytes"`); otherwise `model_id`
    itself, unchanged, as the original returned it.

    The merge goes through emq's plan (memory cascade GPU → CPU; `stop_on_failure=False` falls back to `model_id`
    when no merge fits) and the environment the plan sets for vLLM is set here (setdefault).
    """
    if not api.is_adapter(model_id, key="model_id"):
        log.info("prepare_model_for_vllm(%r): a full model, served as it is", model_id)
        _serve_env(model_id)
        return model_id
    if not use_quantization or not api.was_trained_in_4bit(model_id, keys=("model_id", "model_id")):
        log.info("prepare_model_for_vllm(%r): %s: the LoRA as it is", model_id,
                 "use_quantization=False" if not use_quantization else "not trained in 4-bit")
        _serve_env(None, model_id)
        return model_id
    prep = api.prepare_model_for_vllm(model_id, quant="bnb", route=RoutePolicy.merge, stop_on_failure=stop_on_failure)
    if not prep.merged:
        log.warning("prepare_model_for_vllm(%r): no merge fits this machine (%s); stop_on_failure=False: serving the "
                    "LoRA as it is", model_id, "; ".join(r for r in prep.plan.reasons if "merge" in r)[:300])
        _serve_env(None, model_id)
        return model_id
    _setup(api.script_setup(prep.plan))
    for reason in prep.plan.reasons:
        if reason.startswith("WARNING"):
            log.warning("prepare_model_for_vllm(%r): %s", model_id, reason)
    return str(prep.model)


def cleanup_model_cache() -> None:
    """Empty emq's checkpoint cache (every entry, as `python -m emq cache rm --all`), logging what it freed. An entry
    being built, or in use by another running process, is kept; this process's own entries are released first, so
    call it when you are done with them, as the original scripts do."""
    import sys

    done = api.clear_cache()
    log.info("cleanup_model_cache: removed %d checkpoint(s), %.2f GiB freed at %s", len(done.removed),
             done.freed_bytes / GIB, api.default_root())
    for key in done.kept:
        log.warning("cleanup_model_cache: kept %s: another process is building or using it", key)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
