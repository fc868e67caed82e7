"""The map of emq: detect → plan → merge → load → evaluate, each stage's record in the run dir.

One try/finally per run: the engine is always shut down and status.json always written.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emq.demo import ensure_demo
from emq.detect import detect
from emq.engine import Engine, load
from emq.errors import EmqError, PlanStop
from emq.evaluate import build_prompts, evaluate
from emq.machine import GIB, snapshot
from emq.merge import MergeFailed, MergeResult, MergeSettings, merge_adapter
from emq.monitor import PeakMemory
from emq.plan import Route, make_plan
from emq.records import write_json, versions
from emq.report import plan_table, summary_table
from emq.schema import RunConfig, Stage

log = logging.getLogger(__name__)


@dataclass
class RunStatus:
    """status.json: written whatever happens."""

    status: str = "failed"  # ok | failed
    stage: str = "start"  # the stage reached (where it failed, if it failed)
    error: str | None = None
    route: str | None = None
    merge_attempts: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_gib: float = 0.0
    run_dir: str = ""


def run(cfg: RunConfig, run_dir: Path) -> RunStatus:
    """Run every stage of `cfg` (or stop after plan when `cfg.stage` is plan).

    Args:
        cfg: the composed, typed run config.
        run_dir: where the records go (Hydra's output dir).

    Returns:
        The final status (also written to run_dir/status.json).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    status = RunStatus(run_dir=str(run_dir))
    engine: Engine | None = None
    merged: MergeResult | None = None
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        try:
            write_json(run_dir / "versions.json", {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed})

            status.stage = "detect"
            if cfg.model.demo:
                ensure_demo(cfg.paths.data_dir)
                mem.reset()  # a first-run demo build is not part of this model's footprint
            det = detect(cfg.model)
            write_json(run_dir / "detect.json", det)

            status.stage = "plan"
            build_prompts(cfg.eval)  # a bad question set fails now, before any weights load
            machine = snapshot(cfg.paths.cache_dir)
            plan = make_plan(det, cfg.memory, cfg.quant, machine)
            write_json(run_dir / "plan.json", {"plan": plan, "machine": machine})
            log.info("plan:\n%s", plan_table(det, plan))
            route = plan.route
            status.route = route.value
            if route is Route.stop:
                raise PlanStop(f"plan stopped: {plan.stop_reason}", "see plan.json for the estimates and reasons")
            if cfg.stage is Stage.plan:
                status.status = "ok"
                return status

            status.stage = "merge"
            merge_lacks = route is Route.merge_then_serve and not (det.base.weights_local and det.adapter.weight_file)
            lora_lacks = route is Route.serve_lora and det.adapter.weight_file is None
            if merge_lacks or lora_lacks:
                det = detect(cfg.model, fetch_weights=True)  # hub ids: detect read metadata only
                write_json(run_dir / "detect.json", det)
            model_path, lora_path = det.base.ref, None
            if route is Route.merge_then_serve:
                try:
                    merged = merge_adapter(det, plan.merge_devices, cfg.paths.cache_dir,
                                           settings=MergeSettings(cfg.memory.merge_method, cfg.memory.merge_base),
                                           force_recreate=cfg.memory.force_recreate)
                    status.merge_attempts = merged.attempts
                    write_json(run_dir / "merge.json", merged)
                    model_path = merged.path
                except MergeFailed as e:
                    status.merge_attempts = e.attempts
                    if plan.fallback is not Route.serve_lora:
                        raise _merge_diagnostic(e, plan, machine) from None
                    log.warning("merge failed on every device; serving the LoRA instead (memory.stop_on_failure=false)")
                    route = Route.serve_lora
                    status.route = route.value
            if route is Route.serve_lora:
                lora_path = det.adapter.path

            status.stage = "load"
            engine = load(model_path, plan.engine, lora_path=lora_path, seed=cfg.seed)
            write_json(run_dir / "load.json", engine.record)

            status.stage = "evaluate"
            result = evaluate(engine, cfg.eval, run_dir)
            metrics = {
                "model": cfg.model.name, "route": route.value, "quant": plan.quant.value,
                "vllm_quantization": plan.engine.quantization, "count": result.samples,
                "prompts": result.prompts, "generated_now": result.generated_now,
                "mean_output_tokens": result.mean_output_tokens, "output_tokens_now": result.output_tokens,
                "generation_seconds": result.generation_seconds, "tokens_per_second": result.tokens_per_second,
                "load_seconds": engine.record.load_seconds,
                "merge_seconds": round(merged.seconds, 2) if merged else None,
                "merge_cached": merged.cached if merged else None,
                "peak_rss_gib": round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3),
            }
            write_json(run_dir / "metrics.json", metrics)
            status.status = "ok"
        except EmqError as e:
            status.error = str(e)
            log.error("emq stopped at %s: %s", status.stage, e)
        except BaseException as e:
            status.error = f"{type(e).__name__}: {e}"
            raise
        finally:
            if engine is not None:
                engine.shutdown()
            if merged is not None and cfg.memory.cleanup_after_eval:
                shutil.rmtree(merged.path, ignore_errors=True)
                log.info("cleanup_after_eval: removed %s", merged.path)
            status.seconds = round(time.perf_counter() - t0, 2)
            status.peak_rss_gib = round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3)
            write_json(run_dir / "status.json", status)
            log.info("\n%s", summary_table(_summary_rows(status, metrics), f"emq run: {status.status}"))
    return status


def _merge_diagnostic(e: MergeFailed, plan, machine) -> EmqError:
    """What was needed, what was found, and the options that would work."""
    tried = "; ".join(f"{a['device']}: {a.get('error', 'ok')}" for a in e.attempts) or "no device allowed"
    est = plan.estimates_gib
    gpu_free = max((g.free_bytes for g in machine.gpus), default=0) / GIB
    options = ["memory.stop_on_failure=false (serve the LoRA through vLLM instead)",
               f"a machine with ≥ {est['merge_peak_cpu_ram']:.0f} GiB free RAM or "
               f"≥ {est['merge_peak_gpu_vram']:.0f} GiB free VRAM", "free memory held by other processes"]
    return EmqError(f"merge failed on every device ({tried}); GPU merge needs ~{est['merge_peak_gpu_vram']:.1f} GiB "
                    f"VRAM ({gpu_free:.1f} free at plan time), CPU merge ~{est['merge_peak_cpu_ram']:.1f} GiB RAM "
                    f"({machine.ram_available_bytes / GIB:.1f} available)", "; or ".join(options))


def _summary_rows(status: RunStatus, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("status", status.status), ("stage", status.stage), ("route", str(status.route))]
    if status.error:
        rows.append(("error", status.error))
    for k in ("quant", "count", "mean_output_tokens", "tokens_per_second", "load_seconds", "merge_seconds"):
        if k in metrics:
            rows.append((k, str(metrics[k])))
    rows += [("peak RSS (tree)", f"{status.peak_rss_gib:.2f} GiB"), ("wall", f"{status.seconds:.1f} s"),
             ("run dir", status.run_dir)]
    return rows
