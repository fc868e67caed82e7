"""The map of emq: detect → plan → merge → reference → load → evaluate → judge, each stage's record in the run dir.

One try/finally per run: the engine is always shut down and status.json always written.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from emq import fidelity, judge, watchdog
from emq.calibration import check_corpus_size, load_chats
from emq.checkpoint.cache import remove_entry
from emq.checkpoint.identity import inputs_record
from emq.checkpoint.merge import MergeResult, MergeSettings, merge_or_fall_back
from emq.checkpoint.quantize import quantize_for_plan, rtn_settings
from emq.checkpoint.quantizers import quantizer
from emq.demo import demo_built, ensure_demo
from emq.detect import check_ignore, detect
from emq.engine import Engine, check_engine_extra, load
from emq.errors import EmqError, PlanStop
from emq.evaluate import (
    Target,
    build_prompts,
    check_prompt_lengths,
    evaluate,
    evaluate_many,
    questions_record,
)
from emq.machine import GIB, snapshot
from emq.metrics import run_metrics
from emq.monitor import PeakMemory
from emq.plan import Route, TokenBudget, make_plan, plan_adapters, weights_missing
from emq.records import (
    ADAPTERS,
    ADAPTERS_DIR,
    DETECT,
    HYDRA_OVERRIDES,
    INPUTS,
    JUDGE_SERVER_LOG,
    LOAD,
    MERGE,
    METRICS,
    PLAN,
    QUANTIZE,
    RUN_CONFIG,
    STATUS,
    VERSIONS,
    Progress,
    unwritable,
    versions,
    write_json,
    write_text_atomic,
)
from emq.report.tables import plan_table, run_summary
from emq.schema import JudgeKind, RunConfig, Stage

log = logging.getLogger(__name__)


@dataclass
class RunStatus:
    """status.json: written whatever happens."""

    status: str = "failed"  # ok | failed | interrupted (SIGINT / SIGTERM)
    stage: str = "start"  # the stage reached (where it failed, if it failed)
    error: str | None = None
    route: str | None = None
    merge_attempts: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    # wall time of each stage entered, in order: detect, plan, merge, quantize, reference, load (the engine start),
    # generate, fidelity, engine stop, judge start (a local judge server), judge; what no stage covers is `seconds`
    # minus their sum
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_peak_rss_gib: dict[str, float] = field(default_factory=dict)  # each stage's own peak RSS (process tree)
    peak_rss_gib: float = 0.0
    run_dir: str = ""
    started_unix: float = 0.0  # when the run began and ended (epoch seconds): a sweep's wall from its runs
    finished_unix: float = 0.0
    # model.adapters, an adapter's status: the stages its adapters shared, whose seconds are split evenly between them
    shared_stages: dict | None = None

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


def check_dirs(paths) -> None:
    """The cache and data dirs must be directories emq can write (EMQ_CACHE / EMQ_HOME at a file, say)."""
    for key, env, value in (("paths.cache_dir", "EMQ_CACHE", paths.cache_dir), ("paths.data_dir", "EMQ_HOME",
                                                                                paths.data_dir)):
        why = unwritable(Path(value))
        if why:
            raise EmqError(f"{key}={value} (env {env}): {why}", f"point {key} (or {env}) at a writable directory")


def tokenizer_checks(det, cfg: RunConfig, prompts: list[dict]) -> str | None:
    """What needs the base's files but no weights, before the plan: quant.ignore names modules the base has; a
    calibration corpus big enough not to be cycled over and over; every prompt fits memory.max_model_len.

    Returns:
        What eval.max_tokens really allows, when the context cannot give it (a statement for the plan's reasons).
    """
    if not det.base.weights_local:
        return None
    check_ignore(cfg.quant.ignore, det)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(det.base.path)
    if quantizer(cfg.quant.algorithm.value).calibrated:
        cal = cfg.quant.calibration
        check_corpus_size(load_chats(cal.corpus), tokenizer, cal.samples, cal.seq_len)
    return check_prompt_lengths(prompts, tokenizer, cfg.memory.max_model_len, cfg.eval.max_tokens,
                                list(cfg.eval.question_sets))


def _demo_build(cfg: RunConfig, status: RunStatus, progress: Progress, mem: PeakMemory) -> None:
    """The embedded demo, built once (minutes) as a stage of its own, so that "where the time went" says so."""
    if not (cfg.model.demo or (cfg.judge.demo and cfg.stage is Stage.all)):
        return
    if demo_built(cfg.paths.data_dir):
        ensure_demo(cfg.paths.data_dir)  # built: only its paths (and a wait, if another process is building it)
        return
    with status.enter("demo build", progress, mem):
        ensure_demo(cfg.paths.data_dir)
        mem.reset()  # a first-run demo build is not part of this model's footprint


def _clean_up(entry: str | Path) -> None:
    """memory.cleanup_after_eval: remove the checkpoint this run made, unless another process is using it."""
    entry = Path(entry)
    if remove_entry(entry.parent, entry.name):
        log.info("cleanup_after_eval: removed %s", entry)
    else:
        log.warning("cleanup_after_eval: kept %s: another run is using it (remove it later: python -m emq cache rm %s)",
                    entry, entry.name)


def _stopped(status: RunStatus, e: BaseException) -> bool:
    """Record how a run ended in `status`. True for emq's own errors (explained: the run stops, status.json says
    why); False for what must propagate: Ctrl-C, SIGTERM (the entry point raises Interrupted for it), a bug."""
    if isinstance(e, EmqError):
        status.error = str(e)
        log.error("emq stopped at %s: %s", status.stage, e)
        return True
    if isinstance(e, KeyboardInterrupt):
        status.status, status.error = "interrupted", f"interrupted by {e.args[0] if e.args else 'SIGINT'}"
        log.error("emq interrupted at %s (%s): stopping the engine, writing status.json", status.stage, status.error)
    else:
        status.error = f"{type(e).__name__}: {e}"
    return False


def _close(status: RunStatus, engine: Engine | None, made: list, progress: Progress, mem: PeakMemory, t0: float,
           run_dir: Path, peak_gib: float | None = None) -> None:
    """The end of every run, whatever happened: the engine stopped, the checkpoints memory.cleanup_after_eval drops
    removed (`made`), progress.json and status.json written."""
    if engine is not None:
        engine.shutdown()
    for m in made:
        if m is not None:
            _clean_up(m.path)
    progress.update(force=True, stage=status.stage, status=status.status)
    status.seconds, status.finished_unix = round(time.perf_counter() - t0, 2), round(time.time(), 2)
    status.peak_rss_gib = peak_gib or round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3)
    write_json(run_dir / STATUS, status)


def _begin(run_dir: Path) -> None:
    """Make the run dir; stop what a killed earlier run of it left running; have the watchdog follow this one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    watchdog.stop_leftovers(run_dir)
    watchdog.start(run_dir)


def run(cfg: RunConfig, run_dir: Path) -> RunStatus:
    """Run every stage of `cfg` (or stop after plan when `cfg.stage` is plan).

    Args:
        cfg: the composed, typed run config.
        run_dir: where the records go (Hydra's output dir).

    Returns:
        The final status (also written to run_dir/status.json).
    """
    if cfg.model.adapters:
        return run_adapters(cfg, run_dir)
    _begin(run_dir)
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

            check_dirs(cfg.paths)
            _demo_build(cfg, status, progress, mem)
            with status.enter("detect", progress, mem):
                det = detect(cfg.model)
                write_json(run_dir / DETECT, det)

            with status.enter("plan", progress, mem):
                prompts = build_prompts(cfg.eval)  # a bad question set fails now, before any weights load
                judge.check_prompts(prompts)
                if quantizer(cfg.quant.algorithm.value).calibrated:  # a bad calibration file: before the machine's say
                    load_chats(cfg.quant.calibration.corpus)
                limit = tokenizer_checks(det, cfg, prompts)  # prompt lengths, calibration size, quant.ignore
                machine = snapshot(cfg.paths.cache_dir)
                plan = make_plan(det, cfg.memory, cfg.quant, machine,
                                 compile_cache=str(Path(cfg.paths.data_dir) / "vllm_cache"),
                                 budget=TokenBudget.of(prompts, cfg.eval.max_tokens),  # graphs or eager
                                 cache_dir=cfg.paths.cache_dir)  # a merge already cached needs no disk
                if plan.route.needs_engine:
                    check_engine_extra(plan.engine.extra)
                if limit:
                    plan.reasons.append(f"eval: {limit}")
                    log.warning("plan: %s", limit)
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

            with status.enter("engine stop", progress, mem):  # seconds of their own (vLLM takes 3-6 s to stop)
                loaded = engine.record
                engine.shutdown()  # before a local judge starts: on one GPU they would not fit together
                engine = None
                metrics = run_metrics(model=cfg.model.name, route=route.value, plan=plan, result=result, loaded=loaded,
                                      merged=merged, quantized=quantized, footprint=mem.footprint(), fidelity=fid_out)
                mem.reset()
                write_json(run_dir / METRICS, metrics)

            with status.enter("judge", progress, mem):
                if judge.judged_by_sweep(cfg.judge, judge_plan):
                    metrics = judge.defer_to_sweep(run_dir, judge_plan, metrics)  # one judge server per sweep
                else:
                    metrics = judge.judge_and_summarize(run_dir, prompts, cfg.judge, cfg.eval, judge_plan, metrics,
                                                        progress, data_dir=cfg.paths.data_dir)
            status.split("judge", "judge start", (metrics.get("judge") or {}).get("start_seconds"))
            status.status = "ok"
        except BaseException as e:  # recorded in status.json; raised again unless it is emq's own, explained stop
            if not _stopped(status, e):
                raise
        finally:
            _close(status, engine, [merged, quantized] if cfg.memory.cleanup_after_eval else [], progress, mem, t0,
                   run_dir, peak_gib=metrics.get("peak_rss_gib"))
            log.info("\n%s", run_summary(status, metrics))
    return status


# --- model.adapters: many adapters of one base, one engine --------------------------------------------------

def _adapter_overrides(run_dir: Path, name: str, path: str) -> list[str]:
    """An adapter's own .hydra/overrides.yaml: the run's overrides, with the model set to that adapter alone on the
    LoRA route — what it ran as, and what `python -m emq judge|rerun` and the sweep report compose and label."""
    import re

    saved = run_dir / HYDRA_OVERRIDES
    old = list(yaml.safe_load(saved.read_text()) or []) if saved.is_file() else []
    mine = ("model.name", "model.adapter", "model.adapters", "memory.route")
    kept = [o for o in old if not any(o.lstrip("+~").startswith(k + "=") or o.lstrip("+~").startswith(k + ".")
                                      for k in mine)]
    path = str(Path(path).expanduser()) if path.startswith("~") else path
    quoted = path if re.fullmatch(r"[\w./:+-]+", path) else "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return kept + [f"model.name={name}", f"model.adapter={quoted}", "model.adapters=null", "memory.route=lora"]


def run_adapters(cfg: RunConfig, run_dir: Path) -> RunStatus:
    """model.adapters: every adapter of the one base served by one vLLM engine (multi-LoRA), each with its own
    record in run_dir/adapters/<name>/ (a run dir the sweep report reads as one variant).

    The same stages as `run`, in the same order: detect (each adapter), plan (one engine: `plan_adapters`; an
    impossible one fails here), quantize (the shared base, for w4a16), reference (each adapter's trained function),
    load (one engine), generate (every adapter's requests interleaved in each batch: `evaluate_many`), fidelity (each
    adapter vs its own trained function), judge (one judge for all adapters, or deferred to the sweep's). The
    adapters' status.json split the shared stages' seconds evenly between them (`shared_stages` says so).
    """
    _begin(run_dir)
    status, progress = RunStatus(run_dir=str(run_dir)), Progress(run_dir)
    named = cfg.model.adapter_map()
    dirs = {n: run_dir / ADAPTERS_DIR / n for n in named}
    cfgs = {n: replace(cfg, model=replace(cfg.model, name=n, adapter=a, adapters=None)) for n, a in named.items()}
    own: dict[str, dict[str, float]] = {n: {} for n in named}  # each adapter's own stages (the rest are shared)
    engine: Engine | None = None
    quantized = None
    metrics: dict[str, dict] = {}
    t0, status.started_unix = time.perf_counter(), round(time.time(), 2)

    def timed(name: str, stage: str, since: float) -> None:
        own[name][stage] = round(own[name].get(stage, 0.0) + time.perf_counter() - since, 2)

    with PeakMemory() as mem:
        try:
            write_json(run_dir / VERSIONS, {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed})
            write_json(run_dir / RUN_CONFIG, cfg)
            write_json(run_dir / ADAPTERS, {"names": list(named), "adapters": named, "dir": ADAPTERS_DIR})
            for n, d in dirs.items():
                (d / ".hydra").mkdir(parents=True, exist_ok=True)
                write_text_atomic(d / HYDRA_OVERRIDES, yaml.safe_dump(_adapter_overrides(run_dir, n, named[n])))
                write_json(d / VERSIONS, {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed,
                                          "one_engine_with": list(named)})
                write_json(d / RUN_CONFIG, cfgs[n])

            check_dirs(cfg.paths)
            _demo_build(cfg, status, progress, mem)
            with status.enter("detect", progress, mem):
                dets = {}
                for n in named:
                    s0 = time.perf_counter()
                    dets[n] = detect(cfgs[n].model)
                    write_json(dirs[n] / DETECT, dets[n])
                    timed(n, "detect", s0)

            with status.enter("plan", progress, mem):
                prompts = build_prompts(cfg.eval)
                judge.check_prompts(prompts)
                machine = snapshot(cfg.paths.cache_dir)
                plan = plan_adapters(dets, cfg.memory, cfg.quant, machine,
                                     compile_cache=str(Path(cfg.paths.data_dir) / "vllm_cache"),
                                     budget=TokenBudget.of(prompts, cfg.eval.max_tokens))
                if plan.route.needs_engine:
                    check_engine_extra(plan.engine.extra)
                if plan.quantize and plan.quantize.calibration:
                    load_chats(plan.quantize.calibration["corpus"])
                judge_plan = judge.plan_judge(cfg.judge, platform=plan.platform, cpu_bf16=machine.cpu_bf16,
                                              memory_utilization=plan.engine.memory_utilization,
                                              demo_built=demo_built(cfg.paths.data_dir))
                record = {"plan": plan, "judge": judge_plan, "machine": machine,
                          "questions": questions_record(cfg.eval, cfg.judge)}
                for d in [run_dir, *dirs.values()]:
                    write_json(d / PLAN, record)
                first = next(iter(dets.values()))
                outlook = judge.validation_outlook(cfg.judge, judge_plan, cfg.paths.data_dir)
                log.info("plan:\n%s", plan_table(first, plan, judge_plan, outlook))
                status.route = plan.route.value
                if plan.route is Route.stop:
                    raise PlanStop(f"plan stopped: {plan.stop_reason}", "see plan.json for the estimates and reasons")
            if cfg.stage is Stage.plan:
                status.status = "ok"
                return status

            with status.enter("quantize", progress, mem):  # w4a16: the shared base, once
                for n, det in dets.items():
                    if weights_missing(det, plan.route, fidelity=cfg.eval.fidelity.enabled):
                        dets[n] = detect(cfgs[n].model, fetch_weights=True)
                        write_json(dirs[n] / DETECT, dets[n])
                first = next(iter(dets.values()))
                quantized = quantize_for_plan(first, plan.quantize, None, cfg.paths.cache_dir,
                                              force_recreate=cfg.memory.force_recreate)
                model_path = quantized.path if quantized else first.base.ref
                for n, det in dets.items():
                    if quantized is not None:
                        write_json(dirs[n] / QUANTIZE, quantized)
                    write_json(dirs[n] / INPUTS, inputs_record(det, quantized))

            with status.enter("reference", progress, mem):  # each adapter's trained function, cached
                fids = {}
                for n, det in dets.items():
                    s0 = time.perf_counter()
                    fids[n] = fidelity.prepare(det, cfg.eval.fidelity, cfg.paths.data_dir)
                    timed(n, "reference", s0)
                mem.reset()

            with status.enter("load", progress, mem):
                engine = load(model_path, plan.engine, lora_path=None, seed=cfg.seed,
                              max_logprobs=cfg.eval.fidelity.top_k,
                              loras={n: det.adapter.path for n, det in dets.items()})
                for d in [run_dir, *dirs.values()]:
                    write_json(d / LOAD, engine.record)

            with status.enter("generate", progress, mem):
                targets = [Target(dirs[n], engine.lora_requests[n], n, Progress(dirs[n])) for n in named]
                results = dict(zip(named, evaluate_many(engine, cfg.eval, targets)))

            with status.enter("fidelity", progress, mem):
                fid_out = {}
                for n in named:
                    s0 = time.perf_counter()
                    fid_out[n] = (fidelity.score_run(engine.for_adapter(n), fids[n], cfg.eval.fidelity, dirs[n])
                                  if fids[n] else None)
                    timed(n, "fidelity", s0)

            with status.enter("engine stop", progress, mem):  # seconds of their own (vLLM takes 3-6 s to stop)
                loaded = engine.record
                engine.shutdown()
                engine = None
                for n in named:
                    metrics[n] = run_metrics(model=n, route=plan.route.value, plan=plan, result=results[n],
                                             loaded=loaded, merged=None, quantized=quantized,
                                             footprint=mem.footprint(), fidelity=fid_out[n])
                    metrics[n]["one_engine"] = {"adapters": list(named), "generation_seconds_shared": True}
                    write_json(dirs[n] / METRICS, metrics[n])
                mem.reset()

            with status.enter("judge", progress, mem):
                metrics = _judge_adapters(cfg, judge_plan, prompts, dirs, metrics, run_dir, own)
            starts = [(m.get("judge") or {}).get("start_seconds") for m in metrics.values()]
            status.split("judge", "judge start", next((x for x in starts if x), None))
            status.status = "ok"
        except BaseException as e:  # recorded in status.json; raised again unless it is emq's own, explained stop
            if not _stopped(status, e):
                raise
        finally:
            _close(status, engine, [quantized] if cfg.memory.cleanup_after_eval else [], progress, mem, t0, run_dir)
            for n, d in dirs.items():
                if d.is_dir():
                    write_json(d / STATUS, _adapter_status(status, own[n], len(named), d))
                    Progress(d).update(force=True, stage=status.stage, status=status.status)
            for n, m in metrics.items():
                log.info("\n%s", run_summary(_adapter_status(status, own[n], len(named), dirs[n]), m))
    if status.status == "ok" and cfg.stage is Stage.all and not judge.judged_by_sweep(cfg.judge, judge_plan):
        _report(run_dir)  # in a sweep the sweep's report (after its one judge) covers these adapters
    return status


def _report(run_dir: Path) -> None:
    """The adapters compared as a sweep's variants: summary.md / report.html in the run dir."""
    from emq.report.sweep import build

    try:
        log.info("report: %s\n%s", build([run_dir]), (run_dir / "summary.md").read_text())
    except Exception as e:  # noqa: BLE001 - the adapters' own records stay; the report can be rebuilt
        log.error("emq report: could not build the adapters' report: %s (rebuild: python -m emq report %s)", e,
                  run_dir)


def _judge_adapters(cfg: RunConfig, judge_plan, prompts: list[dict], dirs: dict[str, Path],
                    metrics: dict[str, dict], run_dir: Path, own: dict[str, dict[str, float]]) -> dict[str, dict]:
    """Every adapter's answers through one judge: deferred to the sweep's (judge.scope=sweep), or one server started
    here for all of them (identical answers judged once across adapters)."""
    from contextlib import nullcontext

    if judge.judged_by_sweep(cfg.judge, judge_plan):
        return {n: judge.defer_to_sweep(dirs[n], judge_plan, m) for n, m in metrics.items()}
    t0 = time.perf_counter()
    opened = (judge.endpoint(cfg.judge, judge_plan, run_dir / JUDGE_SERVER_LOG)
              if judge_plan.kind != JudgeKind.none.value else nullcontext(None))
    out, done = {}, []
    with opened as at:
        started = round(time.perf_counter() - t0, 2) if at is not None else None
        for n, m in metrics.items():
            s0 = time.perf_counter()
            borrowed = judge.borrow_scores(dirs[n], prompts, judge_plan, done) if at is not None else 0
            out[n] = judge.judge_and_summarize(dirs[n], prompts, cfg.judge, cfg.eval, judge_plan, m,
                                               data_dir=cfg.paths.data_dir, at=at)
            if at is not None:
                out[n]["judge"].update(start_seconds=started, one_engine={"adapters": list(dirs),
                                                                          "borrowed_from_other_adapters": borrowed})
                write_json(dirs[n] / METRICS, out[n])
            done.append(dirs[n])
            own[n]["judge"] = round(time.perf_counter() - s0, 2)
    return out


def _adapter_status(status: RunStatus, own: dict[str, float], adapters: int, run_dir: Path) -> RunStatus:
    """An adapter's status.json: the run's outcome, its own stages' seconds, and the shared stages' (plan, quantize,
    load, generate, judge start) split evenly between the adapters, so a report's sum over variants is the run's."""
    seconds = {}
    for stage, total in status.stage_seconds.items():
        seconds[stage] = own[stage] if stage in own else round(total / adapters, 2)
    return replace(status, stage_seconds=seconds, run_dir=str(run_dir), seconds=round(status.seconds / adapters, 2),
                   stage_peak_rss_gib=dict(status.stage_peak_rss_gib),
                   shared_stages={"adapters": adapters, "split": "evenly",
                                  "stages": [s for s in seconds if s not in own]})
