"""load: the one wrapper around vllm.LLM. Starts an engine, serves a LoRA if asked, runs requests, shuts down.

Requests go straight into vLLM's engine loop (the loop `LLM.generate` runs), all at once, so the
scheduler keeps its batch full and each finished request is handed back the moment it finishes —
generations stream to disk without chunk boundaries that drain the batch.
"""
from __future__ import annotations

import dataclasses
import gc
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


@dataclass(frozen=True)
class Request:
    """One prompt for the engine: token ids (chat template applied) and its sampling params."""

    id: str
    prompt_token_ids: list[int]
    params: Any  # vllm.SamplingParams


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

    def __init__(self, llm: Any, lora_request: Any, record: LoadRecord):
        self.llm = llm
        self.lora_request = lora_request
        self.record = record
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.llm.get_tokenizer()

    def chat_ids(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the model's chat template (what LLM.chat would send)."""
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=True, return_dict=False)
        return list(ids)

    def run(self, requests: Iterable[Request], on_done: Callable[[Request, Any, float], None], *,
            desc: str = "generate", unit_of: Callable[[Request], int] = lambda r: r.params.n) -> None:
        """Add every request, then step the engine; `on_done(request, output, latency_s)` as each finishes.

        Args:
            requests: the requests (ids must be unique within the call).
            on_done: called in the engine loop with the finished RequestOutput and the seconds from
                submission to completion.
            desc: progress bar label.
            unit_of: how much one request counts on the progress bar (default: its samples).
        """
        from tqdm import tqdm
        from vllm.sampling_params import RequestOutputKind

        engine = self.llm.llm_engine
        pending: dict[str, tuple[Request, float]] = {}
        total = 0
        try:
            for r in requests:
                r.params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = f"emq-{next(self._ids)}"
                pending[rid] = (r, time.perf_counter())
                engine.add_request(rid, {"prompt_token_ids": r.prompt_token_ids}, r.params,
                                   lora_request=self.lora_request)
                total += unit_of(r)
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
        kwargs.update(enable_lora=True, max_lora_rank=settings.max_lora_rank, max_loras=1)
    kwargs.update(settings.extra)
    return kwargs


def load(model_path: str, settings: EngineSettings, *, lora_path: str | None, seed: int,
         max_logprobs: int = 20) -> Engine:
    """Start vLLM on `model_path` with the plan's settings.

    Args:
        model_path: merged checkpoint or base model directory (or hub id).
        settings: the plan's engine settings.
        lora_path: adapter to serve through vLLM's LoRA path, or None.
        seed: engine seed.
        max_logprobs: the most logprobs a request will ask for (fidelity's top-k).
    """
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    kwargs = engine_kwargs(model_path, settings, lora=lora_path is not None, seed=seed, max_logprobs=max_logprobs)
    log.info("load: starting vLLM on %s (quantization=%s, dtype=%s%s)", model_path, settings.quantization,
             settings.dtype, f", LoRA {lora_path}" if lora_path else "")
    # emq asks each worker for its weights' memory with a function (collective_rpc), which vLLM
    # only sends to its own worker processes when this is set; the workers inherit it.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    for k, v in settings.env.items():  # the plan's (recorded in plan.json); a value the user set wins
        os.environ.setdefault(k, v)
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
    lora = LoRARequest("adapter", 1, lora_path) if lora_path else None
    return Engine(llm, lora, LoadRecord(model_path, lora_path, kwargs, round(seconds, 2), weights, source))
