"""load: the one wrapper around vllm.LLM. Starts an engine, serves a LoRA if asked, runs requests, shuts down.

Requests go straight into vLLM's engine loop (the loop `LLM.generate` runs) and each finished request is
handed back the moment it finishes, so generations stream to disk at the engine's own speed.

Batch composition does not depend on timing. vLLM's engine core runs in its own process and steps as soon
as a request arrives, so with requests added one by one (as `LLM.generate` adds them) the first steps see
however many had arrived by then; in bf16 a different batch rounds differently and flips near-ties. So
`Engine.run` pauses the scheduler, clears the prefix cache, adds every request of the call in the order
given, and only then lets the scheduler go: the batches are a function of the requests and the engine
settings alone (`Engine.conditions` lists those settings and the kernels the workers run).
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from emq.errors import EmqError
from emq.plan import EngineSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadRecord:
    model_path: str
    lora_path: str | None
    engine_kwargs: dict[str, Any]
    load_seconds: float
    weights_gib: float | None = None  # the model's memory in the engine, as vLLM's worker measured it
    weights_source: str | None = None  # how weights_gib was measured
    kernels: dict[str, Any] | None = None  # what the workers run: linear/attention kernels, threads, device
    loras: dict[str, str] | None = None  # model.adapters: name → adapter, every one served by this engine
    bnb: dict[str, Any] | None = None  # quantization="bitsandbytes": the provider that served it, with versions


@dataclass(frozen=True)
class Request:
    """One prompt for the engine: token ids (chat template applied) and its sampling params."""

    id: str
    prompt_token_ids: list[int]
    params: Any  # vllm.SamplingParams
    lora: Any = None  # a LoRARequest for this request alone (model.adapters); None: the engine's own


def _worker_weights(worker) -> tuple[int, str]:
    """Runs inside each vLLM worker (collective_rpc): the model's memory there."""
    runner = getattr(worker, "model_runner", None)
    measured = getattr(runner, "model_memory_usage", None)
    device = getattr(getattr(runner, "device", None), "type", "cpu")
    if measured and device == "cuda":  # on the CPU build it is a process-memory delta, not the weights
        return int(measured), "vLLM model_memory_usage (GPU memory taken by loading the weights)"
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    if any(getattr(m, "weight", None) is not None and m.weight.numel() == 0 for m in model.modules()):
        # the CPU build repacks linear weights into oneDNN handles outside torch (their Parameters
        # become empty): summing parameters would count the embeddings only (measured: 0.11 of 0.50 GiB)
        return -1, "not measurable on this vLLM build (linear weights repacked outside torch)"
    tensors = itertools.chain(model.parameters(), model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors), "bytes of the model's parameters and buffers"


# environment variables that change which kernels run or how requests are batched (recorded when set)
DETERMINISM_ENV = ("VLLM_BATCH_INVARIANT", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_DISABLED_KERNELS",
                   "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS",
                   "CUBLAS_WORKSPACE_CONFIG", "VLLM_ATTENTION_BACKEND", "VLLM_USE_V2_MODEL_RUNNER",
                   "VLLM_CPU_INT4_W4A8")


def _cpu_description() -> dict[str, Any]:
    """The CPU's model name and the flags that pick its bf16/int8 kernels (different flags: different kernels)."""
    try:
        text = open("/proc/cpuinfo").read()  # noqa: SIM115 - tiny, read once
    except OSError:
        return {}
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = next((set(ln.split(":", 1)[1].split()) for ln in text.splitlines() if ln.startswith("flags")), set())
    isa = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8",
                          "amx_tile"})
    return {"cpu": name, "cpu_flags": isa}


def _worker_kernels(worker) -> dict[str, Any]:
    """Runs inside each vLLM worker (collective_rpc): which kernels the loaded model runs, and on what.

    Read from the live modules (the quantization method, its scheme and kernel per linear layer; the attention
    backend and implementation per attention layer), not parsed from vLLM's log lines.
    """
    import collections

    import torch

    runner = getattr(worker, "model_runner", None)
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    linear: collections.Counter = collections.Counter()
    attention: collections.Counter = collections.Counter()
    for module in model.modules():
        impl = getattr(module, "impl", None)
        backend = getattr(module, "attn_backend", None)
        if impl is not None and backend is not None:
            name = backend.get_name() if hasattr(backend, "get_name") else str(backend)
            attention[f"{name} / {type(impl).__name__}"] += 1
            continue
        method = getattr(module, "quant_method", None)
        if method is not None or hasattr(module, "scheme"):
            parts = [type(method).__name__] if method is not None else []
            scheme = getattr(module, "scheme", None)
            if scheme is not None:
                parts.append(type(scheme).__name__)
            kernel = getattr(scheme, "kernel", None) or getattr(method, "kernel", None)
            if kernel is not None:
                parts.append(type(kernel).__name__)
            cpu_gemm = getattr(module, "cpu_linear", None)  # the CPU build's GEMM choice: a lambda around the op
            if cpu_gemm is not None:
                code = getattr(cpu_gemm, "__code__", None)
                parts.append(code.co_names[-1] if code is not None and code.co_names
                             else getattr(cpu_gemm, "__name__", type(cpu_gemm).__name__))
            if parts:
                linear[" / ".join(parts)] += 1
    device = getattr(getattr(runner, "device", None), "type", "cpu")
    out: dict[str, Any] = {"linear": dict(sorted(linear.items())), "attention": dict(sorted(attention.items())),
                           "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                           "device": device, "torch_threads": torch.get_num_threads(),
                           "env": {k: os.environ[k] for k in DETERMINISM_ENV if k in os.environ}}
    if device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    else:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
        out.update(_cpu_description())
    return out


def engine_arg_names() -> set[str]:
    """Names vllm.EngineArgs accepts (what memory.engine_extra may set)."""
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def check_engine_extra(extra: dict[str, Any]) -> None:
    """memory.engine_extra keys must be vLLM EngineArgs fields that emq does not set itself."""
    if not extra:
        return
    names = engine_arg_names()
    owned = {"model", "quantization", "enable_lora", "max_lora_rank", "max_loras", "seed"}
    unknown = sorted(set(extra) - names)
    if unknown:
        close = {k: sorted(n for n in names if k.split("_")[0] in n)[:5] for k in unknown}
        raise EmqError(f"memory.engine_extra has keys vLLM's EngineArgs does not know: {unknown}",
                       f"remove or fix them (similar EngineArgs fields: {close})")
    clash = sorted(set(extra) & owned)
    if clash:
        raise EmqError(f"memory.engine_extra sets {clash}, which emq sets from the plan",
                       "use the config keys instead (model, quant, memory.route, seed)")


class Engine:
    """A started vLLM engine plus the LoRARequest to send with every request (or None)."""

    def __init__(self, llm: Any, lora_request: Any, record: LoadRecord, lora_requests: dict[str, Any] | None = None):
        self.llm = llm
        self.lora_request = lora_request
        self.record = record
        self.lora_requests = lora_requests or {}  # model.adapters: name → its LoRARequest
        self._ids = itertools.count()

    def for_adapter(self, name: str) -> Engine:
        """This engine, with `name`'s LoRARequest sent with every request (model.adapters): for the stages that
        serve one adapter at a time (fidelity). Shares the started vLLM engine; shut the original down."""
        view = Engine(self.llm, self.lora_requests[name], self.record, self.lora_requests)
        view._ids = self._ids  # request ids stay unique in the one engine
        return view

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    @property
    def max_num_seqs(self) -> int:
        """Sequences the scheduler batches at once (the engine's resolved value, vLLM's default included)."""
        sched = getattr(getattr(self.llm.llm_engine, "vllm_config", None), "scheduler_config", None)
        return int(getattr(sched, "max_num_seqs", None) or self.record.engine_kwargs.get("max_num_seqs") or 256)

    def chat_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the model's chat template (what LLM.chat would send)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        return list(ids)

    def can_hold(self) -> bool:
        """Whether the installed vLLM can pause its scheduler while requests are added (LLMEngine.sleep(level=0,
        mode="keep") and wake_up(tags=["scheduling"]): in vLLM 0.26 and 0.32); without it batches depend on timing."""
        engine = self.llm.llm_engine
        try:
            return "mode" in inspect.signature(engine.sleep).parameters and hasattr(engine, "wake_up")
        except (AttributeError, TypeError, ValueError):
            return False

    def run(self, requests: Iterable[Request], on_done: Callable[[Request, Any, float], None], *,
            desc: str = "generate", unit_of: Callable[[Request], int] = lambda r: r.params.n) -> None:
        """Run `requests` as one closed batch: add them all, in order, while the scheduler is paused and the
        prefix cache is empty, then step the engine until they are done; `on_done(request, output, latency_s)`
        as each finishes.

        What the scheduler batches together is then a function of the requests, their order and the engine
        settings, never of how fast they were handed over: the same call gives the same batches, step by step.

        Args:
            requests: the requests (ids must be unique within the call), in the order to schedule them.
            on_done: called in the engine loop with the finished RequestOutput and the seconds from
                submission to completion.
            desc: progress bar label.
            unit_of: how much one request counts on the progress bar (default: its samples).
        """
        from tqdm import tqdm
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        requests = list(requests)
        hold = len(requests) > 1 and self.can_hold()  # one request has nothing to be batched with
        if len(requests) > 1 and not hold:
            log.warning("engine: vLLM %s cannot pause its scheduler while requests are added: batches depend on "
                        "timing, and bf16 answers may differ from run to run", _vllm_version())
        pending: dict[str, tuple[Request, float]] = {}
        total = 0
        try:
            if hasattr(engine, "reset_prefix_cache"):  # nothing an earlier call cached shapes this call's batches
                engine.reset_prefix_cache()
            if hold:
                engine.sleep(level=0, mode="keep")
            try:
                for r in requests:
                    r.params.output_kind = RequestOutputKind.FINAL_ONLY
                    rid = f"emq-{next(self._ids)}"
                    pending[rid] = (r, time.perf_counter())
                    engine.add_request(rid, {"prompt_token_ids": r.prompt_token_ids}, r.params,
                                       lora_request=r.lora if r.lora is not None else self.lora_request)
                    total += unit_of(r)
            finally:
                if hold:
                    engine.wake_up(tags=["scheduling"])
            with tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True) as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if not out.finished or out.request_id not in pending:
                            continue
                        req, t0 = pending.pop(out.request_id)
                        on_done(req, out, time.perf_counter() - t0)
                        bar.update(unit_of(req))
        except BaseException:
            if pending and self.llm is not None:
                try:
                    engine.abort_request(list(pending))
                except Exception:  # noqa: BLE001 - the engine may be dead already; the first error matters
                    pass
            raise

    def conditions(self) -> dict[str, Any]:
        """What makes this engine's answers what they are, besides the prompts and seeds: the served dtype and
        quantization, the batching limits, the kernels the workers run and on what device, the environment
        knobs that change them, and how requests are handed over (see the module docstring)."""
        cfg = getattr(self.llm.llm_engine, "vllm_config", None) if self.llm is not None else None
        model = getattr(cfg, "model_config", None)
        sched = getattr(cfg, "scheduler_config", None)
        cache = getattr(cfg, "cache_config", None)
        parallel = getattr(cfg, "parallel_config", None)
        kwargs = self.record.engine_kwargs
        kernels = self.record.kernels
        if kernels is None and self.llm is not None:
            kernels = read_kernels(self.llm)
        env = {k: os.environ[k] for k in DETERMINISM_ENV if k in os.environ}
        return {
            "dtype": str(getattr(model, "dtype", kwargs.get("dtype"))).removeprefix("torch."),
            "quantization": getattr(model, "quantization", kwargs.get("quantization")),
            "lora": self.lora_request is not None or bool(self.lora_requests),
            **({"loras": sorted(self.lora_requests), "max_loras": kwargs.get("max_loras")} if self.lora_requests else {}),
            "max_num_seqs": getattr(sched, "max_num_seqs", kwargs.get("max_num_seqs")),
            "max_num_batched_tokens": getattr(sched, "max_num_batched_tokens", None),
            "chunked_prefill": getattr(sched, "enable_chunked_prefill", kwargs.get("enable_chunked_prefill")),
            "async_scheduling": getattr(sched, "async_scheduling", None),
            "prefix_caching": getattr(cache, "enable_prefix_caching", None),
            "enforce_eager": getattr(model, "enforce_eager", kwargs.get("enforce_eager")),
            "tensor_parallel_size": getattr(parallel, "tensor_parallel_size", kwargs.get("tensor_parallel_size", 1)),
            "engine_seed": getattr(model, "seed", kwargs.get("seed")),
            "batch_invariant": env.get("VLLM_BATCH_INVARIANT", "0") not in ("", "0"),
            "submission": ("held: each closed batch added in order while the scheduler is paused, prefix cache "
                           "cleared, then released" if self.can_hold() else
                           "running: added while the engine steps (this vLLM cannot pause its scheduler), so "
                           "batches depend on timing"),
            "kernels": kernels,
            "env": env,
            "vllm": _vllm_version(),
        }

    def shutdown(self) -> None:
        """Stop the engine core and its workers; safe to call twice."""
        if self.llm is None:
            return
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        try:
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()
        finally:
            self.llm = None
            gc.collect()
            log.info("engine shut down")


def _vllm_version() -> str | None:
    from emq.machine import installed_vllm

    dist, version = installed_vllm()
    return f"{dist} {version}" if dist else None


def _bnb_record() -> dict[str, Any]:
    from emq.machine import installed_vllm, probe_bnb

    return probe_bnb(*installed_vllm()).record()


def read_kernels(llm: Any) -> dict[str, Any] | None:
    """The kernels each worker of a started vllm.LLM runs (`_worker_kernels`); None when the workers cannot be
    asked (vLLM only sends functions to its worker processes with VLLM_ALLOW_INSECURE_SERIALIZATION=1)."""
    try:
        found = llm.collective_rpc(_worker_kernels, timeout=60)
    except Exception as e:  # noqa: BLE001 - a record field, not worth failing a run over
        log.warning("engine: could not read the kernels from the workers (%s)", e)
        return None
    first = found[0]
    return first if all(f == first for f in found) else {"workers": found}


def engine_kwargs(model_path: str, settings: EngineSettings, *, lora: bool, seed: int,
                  max_logprobs: int = 20) -> dict[str, Any]:
    """vllm.LLM keyword arguments for the plan's engine settings (the record shows exactly these)."""
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": settings.dtype,
        "gpu_memory_utilization": settings.memory_utilization,
        "max_model_len": settings.max_model_len,
        "enforce_eager": settings.enforce_eager,
        "seed": seed,
        "max_logprobs": max(20, max_logprobs),
    }
    if settings.quantization:
        kwargs["quantization"] = settings.quantization
    if settings.max_num_seqs:
        kwargs["max_num_seqs"] = settings.max_num_seqs
    if settings.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = settings.tensor_parallel_size
    if settings.enable_chunked_prefill is not None:
        kwargs["enable_chunked_prefill"] = settings.enable_chunked_prefill
    if lora:
        kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=settings.max_loras)
    kwargs.update(settings.extra)
    return kwargs


def release_cuda_cache() -> int:
    """Hand back what this process's earlier steps (merge, quantize, the fidelity reference) left in torch's CUDA
    cache: vLLM's engine runs in another process and asks for its memory share of what is free (on an H100 a 7B
    quantize's 13 GiB of cache made both engines of a check fail to start). Returns the bytes released (0: torch
    not loaded, or CUDA never used here)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0
    gc.collect()
    before = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    freed = before - torch.cuda.memory_reserved()
    if freed:
        log.info("load: released %.2f GiB of this process's CUDA cache for the engine", freed / 2**30)
    return freed


def load(model_path: str, settings: EngineSettings, *, lora_path: str | None, seed: int,
         max_logprobs: int = 20, loras: dict[str, str] | None = None) -> Engine:
    """Start vLLM on `model_path` with the plan's settings.

    Args:
        model_path: merged checkpoint or base model directory (or hub id).
        settings: the plan's engine settings.
        lora_path: adapter to serve through vLLM's LoRA path, or None.
        seed: engine seed.
        max_logprobs: the most logprobs a request will ask for (fidelity's top-k).
        loras: model.adapters, name → adapter path: one LoRARequest each (`Engine.lora_requests`, sent per request);
            instead of `lora_path`.
    """
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    if loras and lora_path:
        raise ValueError("load: pass lora_path (one adapter) or loras (model.adapters), not both")
    kwargs = engine_kwargs(model_path, settings, lora=lora_path is not None or bool(loras), seed=seed,
                           max_logprobs=max_logprobs)
    log.info("load: starting vLLM on %s (quantization=%s, dtype=%s%s)", model_path, settings.quantization,
             settings.dtype, f", LoRA {lora_path}" if lora_path else "")
    # emq asks each worker for its weights' memory with a function (collective_rpc), which vLLM
    # only sends to its own worker processes when this is set; the workers inherit it.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    for k, v in settings.env.items():  # the plan's (recorded in plan.json); a value the user set wins
        os.environ.setdefault(k, v)
    release_cuda_cache()
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    seconds = time.perf_counter() - t0
    log.info("load: engine ready in %.1f s", seconds)
    weights, source = None, None
    try:
        found = llm.collective_rpc(_worker_weights, timeout=60)
        source = found[0][1]
        if all(b >= 0 for b, _ in found):
            weights = round(sum(b for b, _ in found) / 1024**3, 3)
    except Exception as e:  # noqa: BLE001 - a record field, not worth failing a run over
        log.warning("load: could not read the weights' memory from the workers (%s)", e)
    kernels = read_kernels(llm)
    if kernels:
        log.info("load: kernels %s", {k: kernels.get(k) for k in ("linear", "attention", "model_dtype")})
    lora = LoRARequest("adapter", 1, lora_path) if lora_path else None
    many = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate((loras or {}).items(), start=1)}
    record = LoadRecord(model_path, lora_path, kwargs, round(seconds, 2), weights, source, kernels, loras=loras or None,
                        bnb=_bnb_record() if settings.quantization == "bitsandbytes" else None)
    return Engine(llm, lora, record, many)
