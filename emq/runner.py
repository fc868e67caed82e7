"""The map of emq: detect → plan → merge → reference → load → evaluate → judge, each stage's record in the run dir.

One try/finally per run: the engine is always shut down and status.json always written.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from emq import fidelity, judge
from emq.calibration import load_chats
from emq.checkpoint.identity import inputs_record
from emq.checkpoint.merge import MergeResult, MergeSettings, merge_or_fall_back
from emq.checkpoint.quantize import quantize_for_plan, rtn_settings
from emq.demo import demo_built, ensure_demo
from emq.detect import detect
from emq.engine import Engine, check_engine_extra, load
from emq.errors import EmqError, PlanStop
from emq.evaluate import build_prompts, evaluate, questions_record
from emq.machine import GIB, snapshot
from emq.metrics import run_metrics
from emq.monitor import PeakMemory
from emq.plan import Route, TokenBudget, make_plan, weights_missing
from emq.records import (DETECT, INPUTS, LOAD, MERGE, METRICS, PLAN, QUANTIZE, RUN_CONFIG, STATUS, VERSIONS,
                         Progress, versions, write_json)
from emq.report.tables import plan_table, run_summary
from emq.schema import JudgeKind, JudgeScope, RunConfig, Stage

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
    # wall time of each stage entered, in order: detect, plan, merge, quantize, reference, load (the engine start),
    # generate, fidelity, judge start (a local judge server), judge; what no stage covers is `seconds` minus their sum
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_peak_rss_gib: dict[str, float] = field(default_factory=dict)  # each stage's own peak RSS (process tree)
    peak_rss_gib: float = 0.0
    run_dir: str = ""
    started_unix: float = 0.0  # when the run began and ended (epoch seconds): a sweep's wall from its runs
    finished_unix: float = 0.0

    @contextmanager
    def enter(self, stage: str, progress: Progress, mem: PeakMemory) -> Iterator[None]:
        """Mark `stage` as the one running (status and progress.json); time it and take its peak RSS."""
        self.stage = stage
        progress.update(force=True, stage=stage, stage_seconds=dict(self.stage_seconds))
        mem.open_window()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[stage] = round(self.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0, 2)
            self.stage_peak_rss_gib[stage] = mem.window_peak_gib()

    def split(self, stage: str, part: str, seconds: float | None) -> None:
        """Move `seconds` of `stage` into its own entry `part`, placed before it (e.g. the judge server's start)."""
        if not seconds or stage not in self.stage_seconds:
            return
        rest = round(max(0.0, self.stage_seconds.pop(stage) - seconds), 2)
        self.stage_seconds[part], self.stage_seconds[stage] = round(seconds, 2), rest


def run(cfg: RunConfig, run_dir: Path) -> RunStatus:
    """Run every stage of `cfg` (or stop after plan when `cfg.stage` is plan).

    Args:
        cfg: the composed, typed run config.
        run_dir: where the records go (Hydra's output dir).

    Returns:
        The final status (also written to run_dir/status.json).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    status, progress = RunStatus(run_dir=str(run_dir)), Progress(run_dir)
    engine: Engine | None = None
    merged: MergeResult | None = None
    quantized = None  # the w4a16 checkpoint, when a stage after the merge made it
    metrics: dict = {}
    t0, status.started_unix = time.perf_counter(), round(time.time(), 2)
    with PeakMemory() as mem:
        try:
            write_json(run_dir / VERSIONS, {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed})
            write_json(run_dir / RUN_CONFIG, cfg)  # the composed config, resolved (paths included)

            with status.enter("detect", progress, mem):
                if cfg.model.demo or (cfg.judge.demo and cfg.stage is Stage.all):
                    ensure_demo(cfg.paths.data_dir)
                    mem.reset()  # a first-run demo build is not part of this model's footprint
                det = detect(cfg.model)
                write_json(run_dir / DETECT, det)

            with status.enter("plan", progress, mem):
                prompts = build_prompts(cfg.eval)  # a bad question set fails now, before any weights load
                judge.check_prompts(prompts)
                machine = snapshot(cfg.paths.cache_dir)
                plan = make_plan(det, cfg.memory, cfg.quant, machine,
                                 compile_cache=str(Path(cfg.paths.data_dir) / "vllm_cache"),
                                 budget=TokenBudget.of(prompts, cfg.eval.max_tokens))  # graphs or eager
                if plan.route.needs_engine:
                    check_engine_extra(plan.engine.extra)
                if plan.quantize and plan.quantize.calibration:  # a bad calibration file fails now, before any merge
                    load_chats(plan.quantize.calibration["corpus"])
                judge_plan = judge.plan_judge(cfg.judge, platform=plan.platform, cpu_bf16=machine.cpu_bf16,
                                              memory_utilization=plan.engine.memory_utilization,
                                              demo_built=demo_built(cfg.paths.data_dir))
                write_json(run_dir / PLAN, {"plan": plan, "judge": judge_plan, "machine": machine,
                                            "questions": questions_record(cfg.eval, cfg.judge)})
                outlook = judge.validation_outlook(cfg.judge, judge_plan, cfg.paths.data_dir)
                log.info("plan:\n%s", plan_table(det, plan, judge_plan, outlook))
                route = plan.route
                status.route = route.value
                if route is Route.stop:
                    raise PlanStop(f"plan stopped: {plan.stop_reason}", "see plan.json for the estimates and reasons")
            if cfg.stage is Stage.plan:
                status.status = "ok"
                return status

            with status.enter("merge", progress, mem):
                if weights_missing(det, route, fidelity=cfg.eval.fidelity.enabled):
                    det = detect(cfg.model, fetch_weights=True)  # hub ids: detect read metadata only
                    write_json(run_dir / DETECT, det)
                if route is Route.merge_then_serve:
                    outcome = merge_or_fall_back(
                        det, plan.merge_devices, cfg.paths.cache_dir, force_recreate=cfg.memory.force_recreate,
                        settings=MergeSettings(cfg.memory.merge_method, cfg.memory.merge_base,
                                               rtn=rtn_settings(plan.quantize)),
                        may_fall_back=plan.fallback is Route.serve_lora, estimates_gib=plan.estimates_gib,
                        machine=machine)
                    merged, status.merge_attempts = outcome.merged, outcome.attempts
                    if merged is not None:
                        write_json(run_dir / MERGE, merged)
                    else:
                        route = Route.serve_lora
                        status.route = route.value

            with status.enter("quantize", progress, mem):  # w4a16 by GPTQ/AWQ, or the base alone (the merge did RTN)
                quantized = quantize_for_plan(det, plan.quantize, merged, cfg.paths.cache_dir,
                                              force_recreate=cfg.memory.force_recreate)
                if quantized is not None:
                    write_json(run_dir / QUANTIZE, quantized)
                served = quantized or merged
                model_path = served.path if served else det.base.ref
                lora_path = det.adapter.path if route is Route.serve_lora else None
                write_json(run_dir / INPUTS, inputs_record(det, served))

            with status.enter("reference", progress, mem):  # before vLLM takes the GPU: the trained function, once per model
                fid = fidelity.prepare(det, cfg.eval.fidelity, cfg.paths.data_dir)
                mem.reset()  # the reference (cached after its first run) is not the served variant's footprint

            with status.enter("load", progress, mem):
                engine = load(model_path, plan.engine, lora_path=lora_path, seed=cfg.seed,
                              max_logprobs=cfg.eval.fidelity.top_k)
                write_json(run_dir / LOAD, engine.record)

            with status.enter("generate", progress, mem):
                result = evaluate(engine, cfg.eval, run_dir, progress)

            with status.enter("fidelity", progress, mem):
                fid_out = fidelity.score_run(engine, fid, cfg.eval.fidelity, run_dir) if fid else None
                loaded = engine.record
                engine.shutdown()  # before a local judge starts: on one GPU they would not fit together
                engine = None
                metrics = run_metrics(model=cfg.model.name, route=route.value, plan=plan, result=result, loaded=loaded,
                                      merged=merged, quantized=quantized, footprint=mem.footprint(), fidelity=fid_out)
                mem.reset()
                write_json(run_dir / METRICS, metrics)

            with status.enter("judge", progress, mem):
                if cfg.judge.scope is JudgeScope.sweep and judge_plan.kind == JudgeKind.local.value:
                    metrics = judge.defer_to_sweep(run_dir, judge_plan, metrics)  # one judge server per sweep
                else:
                    metrics = judge.judge_and_summarize(run_dir, prompts, cfg.judge, cfg.eval, judge_plan, metrics,
                                                        progress, data_dir=cfg.paths.data_dir)
            status.split("judge", "judge start", (metrics.get("judge") or {}).get("start_seconds"))
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
            for made in (merged, quantized):
                if made is not None and cfg.memory.cleanup_after_eval:
                    shutil.rmtree(made.path, ignore_errors=True)
                    log.info("cleanup_after_eval: removed %s", made.path)
            progress.update(force=True, stage=status.stage, status=status.status)
            status.seconds, status.finished_unix = round(time.perf_counter() - t0, 2), round(time.time(), 2)
            status.peak_rss_gib = metrics.get("peak_rss_gib") or round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3)
            write_json(run_dir / STATUS, status)
            log.info("\n%s", run_summary(status, metrics))
    return status
