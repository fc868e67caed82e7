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
from typing import Any

import yaml

from emq import fidelity, judge, watchdog
from emq.calibration import check_corpus_size, corpus_for, load_chats
from emq.checkpoint.cache import remove_entry
from emq.checkpoint.identity import inputs_record
from emq.checkpoint.merge import MergeResult, MergeSettings, merge_or_fall_back
from emq.checkpoint.quantize import merge_in_cache, quantize_for_plan, rtn_settings, served_adapter
from emq.checkpoint.quantizers import quantizer
from emq.demo import demo_built, ensure_demo
from emq.detect import check_ignore, detect
from emq.engine import Engine, check_engine_extra, load, release_cuda_cache
from emq.errors import EmqError, PlanStop
from emq.evaluate import Target, evaluate_many
from emq.machine import GIB, snapshot
from emq.metrics import run_metrics
from emq.monitor import PeakMemory
from emq.plan import Route, TokenBudget, plan_run, weights_missing
from emq.prompts import build_prompts, check_prompt_lengths, questions_record
from emq.records import (
    ADAPTERS,
    ADAPTERS_DIR,
    COMPENSATION,
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
from emq.schema import RunConfig, Stage

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


def _calibrates(cfg: RunConfig) -> bool:
    """Whether a w4a16 checkpoint would be made from calibration activations (GPTQ/AWQ, or a compensation)."""
    return quantizer(cfg.quant.algorithm.value).calibrated or cfg.quant.compensation.rank > 0


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
    if _calibrates(cfg):
        cal = cfg.quant.calibration
        check_corpus_size(load_chats(corpus_for(cal.corpus, det)), tokenizer, cal.samples, cal.seq_len)
    return check_prompt_lengths(prompts, tokenizer, cfg.memory.max_model_len, cfg.eval.max_tokens,
                                list(cfg.eval.question_sets))


def _demo_build(cfg: RunConfig, status: RunStatus, progress: Progress, mem: PeakMemory) -> None:
    """The embedded demo, built once (minutes) as a stage of its own, so that "where the time went" says so."""
    if not (cfg.model.demo or (any(j.demo for j in cfg.panel()) and cfg.stage is Stage.all)):
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


def _made(r: Run) -> list[str]:
    """What memory.cleanup_after_eval drops: the cache entries this run served or built them from — the merge, the
    W4A16 checkpoint, the dequantized base a compensated W4A16 was made from, the compensated LoRA. Never a path
    outside paths.cache_dir (a base model GPTQ read in place is the user's)."""
    cache = Path(r.cfg.paths.cache_dir).expanduser().resolve()
    paths = [x.path for x in (r.merged, r.quantized, r.adapter) if x is not None]
    if r.quantized is not None and getattr(r.quantized, "source", None):
        paths.append(r.quantized.source)
    return [p for p in dict.fromkeys(paths) if Path(p).expanduser().resolve().parent == cache]


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
    removed (`made`), progress.json and status.json written; what merge/quantize/reference left in this process's
    CUDA cache handed back (a run stopped before `load` would leave the next sweep job's plan seeing a GPU short of
    vLLM's share: the 7B check's second plan stopped so, with 13 GiB held after a quantize)."""
    if engine is not None:
        engine.shutdown()
    release_cuda_cache()
    for path in made:
        _clean_up(path)
    progress.update(force=True, stage=status.stage, status=status.status)
    status.seconds, status.finished_unix = round(time.perf_counter() - t0, 2), round(time.time(), 2)
    status.peak_rss_gib = peak_gib or round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3)
    write_json(run_dir / STATUS, status)


def _begin(run_dir: Path) -> None:
    """Make the run dir; stop what a killed earlier run of it left running; have the watchdog follow this one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    watchdog.stop_leftovers(run_dir)
    watchdog.start(run_dir)


@dataclass
class Served:
    """One model a run evaluates, with its record dir: the run itself, or one adapter of model.adapters."""

    name: str
    cfg: RunConfig  # the run's config, with model set to this one alone (model.adapters)
    dir: Path
    own: dict[str, float] = field(default_factory=dict)  # seconds of the stages that are its own (model.adapters)
    det: Any = None  # DetectResult
    reference: Any = None  # fidelity.prepare's: the trained function's reference
    result: Any = None  # EvalResult
    fidelity: Any = None
    metrics: dict = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        """Count the seconds inside toward this model's own share of `stage`."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.own[stage] = round(self.own.get(stage, 0.0) + time.perf_counter() - t0, 2)


@dataclass
class Run:
    """What the stages of one run share: the config, the records, and what each stage hands the next."""

    cfg: RunConfig
    dir: Path
    models: list[Served]
    one_engine: bool  # model.adapters: every model an adapter of one base, served by one engine
    status: RunStatus
    progress: Progress
    mem: PeakMemory | None = None
    prompts: list[dict] = field(default_factory=list)
    machine: Any = None
    plan: Any = None
    judge_plan: Any = None  # the headline judge's (judge_plans[0])
    judge_plans: list = field(default_factory=list)  # every judge of the panel (emq.schema.RunConfig.panel)
    route: Route | None = None
    merged: MergeResult | None = None
    quantized: Any = None  # the W4A16 checkpoint, when the quantize stage made one
    adapter: Any = None  # quant.compensation.rank: the LoRA served instead of the model's (adapter + compensation)
    model_path: str = ""
    engine: Engine | None = None

    @property
    def dirs(self) -> list[Path]:
        """Every dir a shared record goes to: the run dir and, for model.adapters, each adapter's."""
        return [self.dir] + ([m.dir for m in self.models] if self.one_engine else [])

    def each(self, stage: str) -> Iterator[Served]:
        """The models in order, each one's time in the loop body counted as its own share of `stage`."""
        for m in self.models:
            with m.timed(stage):
                yield m


def _records(r: Run) -> None:
    """versions.json and the composed config (paths resolved) in the run dir; for model.adapters, each adapter's
    own dir with its overrides (what it ran as: `python -m emq judge|rerun` and the sweep report read them)."""
    cfg = r.cfg
    write_json(r.dir / VERSIONS, {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed})
    write_json(r.dir / RUN_CONFIG, cfg)
    if not r.one_engine:
        return
    named = cfg.model.adapter_map()
    write_json(r.dir / ADAPTERS, {"names": list(named), "adapters": named, "dir": ADAPTERS_DIR})
    for m in r.models:
        (m.dir / ".hydra").mkdir(parents=True, exist_ok=True)
        write_text_atomic(m.dir / HYDRA_OVERRIDES, yaml.safe_dump(_adapter_overrides(r.dir, m.name, named[m.name])))
        write_json(m.dir / VERSIONS, {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed,
                                      "one_engine_with": list(named)})
        write_json(m.dir / RUN_CONFIG, m.cfg)


def _detect(r: Run) -> None:
    for m in r.each("detect"):
        m.det = detect(m.cfg.model)
        write_json(m.dir / DETECT, m.det)


def _plan(r: Run) -> None:
    """Everything that can fail without weights fails here: question sets, judge prompts, the calibration corpus,
    prompt lengths, quant.ignore, engine extras, the judge (key, endpoint, model), then the plan itself."""
    cfg, first = r.cfg, r.models[0].det
    r.prompts = build_prompts(cfg.eval)  # a bad question set fails now, before any weights load
    judge.check_prompts(r.prompts)
    if _calibrates(cfg):  # a bad calibration file: before the machine's say
        load_chats(corpus_for(cfg.quant.calibration.corpus, first))
    limit = tokenizer_checks(first, cfg, r.prompts)  # prompt lengths, calibration size, quant.ignore
    if limit:
        log.warning("plan: %s", limit)
    r.machine = snapshot(cfg.paths.cache_dir)
    r.plan = plan_run({m.name: m.det for m in r.models}, cfg.memory, cfg.quant, r.machine,
                      one_engine=r.one_engine, compile_cache=str(Path(cfg.paths.data_dir) / "vllm_cache"),
                      budget=TokenBudget.of(r.prompts, cfg.eval.max_tokens),  # graphs or eager
                      merge_cached=None if r.one_engine else merge_in_cache(first, cfg.memory, cfg.paths.cache_dir),
                      notes=[f"eval: {limit}"] if limit else [])
    if r.plan.route.needs_engine:
        check_engine_extra(r.plan.engine.extra)
    r.judge_plans = [judge.plan_judge(j, platform=r.plan.platform, cpu_bf16=r.machine.cpu_bf16,
                                      memory_utilization=r.plan.engine.memory_utilization,
                                      demo_built=demo_built(cfg.paths.data_dir)) for j in cfg.panel()]
    r.judge_plan = r.judge_plans[0]
    names = [judge.judge_label(p) for p in r.judge_plans]
    for i, name in enumerate(names):
        if name in names[:i]:  # each judge's figures are kept under its name
            raise EmqError(f"judge.panel[{i}] is {name}, as an earlier member: the panel would not tell them apart",
                           "give each member of judge.panel another model or scoring")
    # each judge's requests and tokens before anything is asked, and what is known of its validation
    judges = [(p, judge.validation_outlook(j, p, cfg.paths.data_dir), judge.estimate(r.prompts, cfg.eval.max_tokens, j, p))
              for j, p in zip(cfg.panel(), r.judge_plans)]
    record = {"plan": r.plan, "judge": r.judge_plan, "judge_estimate": judges[0][2], "machine": r.machine,
              "questions": questions_record(cfg.eval, cfg.judge),
              **({"panel": [{"judge": p, "judge_estimate": c} for p, _, c in judges]} if cfg.judges else {})}
    for d in r.dirs:
        write_json(d / PLAN, record)
    log.info("plan:\n%s", plan_table(first, r.plan, *judges[0], more_judges=judges[1:]))
    r.route = r.plan.route
    r.status.route = r.route.value
    if r.route is Route.stop:
        raise PlanStop(f"plan stopped: {r.plan.stop_reason}", "see plan.json for the estimates and reasons")


def _merge(r: Run) -> None:
    """The weights a hub id's detect only read the metadata of; the merge when the route merges (falling back to
    the LoRA when the plan allows)."""
    cfg = r.cfg
    for m in r.models:
        if weights_missing(m.det, r.route, fidelity=cfg.eval.fidelity.enabled):
            m.det = detect(m.cfg.model, fetch_weights=True)
            write_json(m.dir / DETECT, m.det)
    if r.route is not Route.merge_then_serve:
        return
    plan = r.plan
    outcome = merge_or_fall_back(
        r.models[0].det, plan.merge_devices, cfg.paths.cache_dir, force_recreate=cfg.memory.force_recreate,
        settings=MergeSettings(cfg.memory.merge_method, cfg.memory.merge_base, rtn=rtn_settings(plan.quantize)),
        may_fall_back=plan.fallback is Route.serve_lora, estimates_gib=plan.estimates_gib, machine=r.machine)
    r.merged, r.status.merge_attempts = outcome.merged, outcome.attempts
    if r.merged is not None:
        write_json(r.dir / MERGE, r.merged)
    else:
        r.route = Route.serve_lora
        r.status.route = r.route.value


def _quantize(r: Run) -> None:
    """W4A16 by GPTQ/AWQ of the merge, or of the base alone (the LoRA route; the merge did RTN itself)."""
    first = r.models[0].det
    r.quantized = quantize_for_plan(first, r.plan.quantize, r.merged, r.cfg.paths.cache_dir,
                                    force_recreate=r.cfg.memory.force_recreate)
    r.adapter = served_adapter(first, r.plan.quantize, r.quantized, r.cfg.paths.cache_dir,
                               force_recreate=r.cfg.memory.force_recreate)
    served = r.quantized or r.merged
    r.model_path = served.path if served else first.base.ref
    for m in r.models:
        if r.quantized is not None:
            write_json(m.dir / QUANTIZE, r.quantized)
        if r.adapter is not None:
            write_json(m.dir / COMPENSATION, r.adapter)
        write_json(m.dir / INPUTS, inputs_record(m.det, served))


def _reference(r: Run) -> None:
    """Before vLLM takes the GPU: each model's trained function, once per model (cached)."""
    for m in r.each("reference"):
        m.reference = fidelity.prepare(m.det, r.cfg.eval.fidelity, r.cfg.paths.data_dir)
    r.mem.reset()  # the reference (cached after its first run) is not the served variant's footprint


def _load(r: Run) -> None:
    cfg, lora = r.cfg, r.route is Route.serve_lora
    own = r.models[0].det.adapter.path if lora and not r.one_engine else None
    r.engine = load(r.model_path, r.plan.engine, seed=cfg.seed, max_logprobs=cfg.eval.fidelity.top_k,
                    lora_path=r.adapter.path if r.adapter is not None else own,
                    loras={m.name: m.det.adapter.path for m in r.models} if r.one_engine else None)
    for d in r.dirs:
        write_json(d / LOAD, r.engine.record)


def _generate(r: Run) -> None:
    """Every model's requests through the one engine, group by group (model.adapters: interleaved in each batch)."""
    if r.one_engine:
        targets = [Target(m.dir, r.engine.lora_requests[m.name], m.name, Progress(m.dir)) for m in r.models]
    else:
        targets = [Target(r.dir, progress=r.progress)]
    for m, result in zip(r.models, evaluate_many(r.engine, r.cfg.eval, targets)):
        m.result = result


def _fidelity(r: Run) -> None:
    for m in r.each("fidelity"):
        engine = r.engine.for_adapter(m.name) if r.one_engine else r.engine
        m.fidelity = fidelity.score_run(engine, m.reference, r.cfg.eval.fidelity, m.dir) if m.reference else None


def _stop_engine(r: Run) -> None:
    """Stop the engine before a local judge starts (on one GPU they would not fit together); each model's
    metrics.json (seconds of their own: vLLM takes 3-6 s to stop)."""
    loaded = r.engine.record
    r.engine.shutdown()
    r.engine = None
    for m in r.models:
        m.metrics = run_metrics(model=m.name, route=r.route.value, plan=r.plan, result=m.result, loaded=loaded,
                                merged=r.merged, quantized=r.quantized, footprint=r.mem.footprint(),
                                fidelity=m.fidelity, adapter=r.adapter)
        if r.one_engine:
            m.metrics["one_engine"] = {"adapters": [x.name for x in r.models], "generation_seconds_shared": True}
        write_json(m.dir / METRICS, m.metrics)
    r.mem.reset()


def _judge(r: Run) -> None:
    """Every model's answers through one judge: deferred to the sweep's (judge.scope=sweep), or opened here once
    for all of them (identical answers judged once across models)."""
    cfg = r.cfg
    if _by_sweep(r):  # one judge server per judge per sweep
        for m in r.models:
            m.metrics = judge.defer_to_sweep(m.dir, r.judge_plan, m.metrics)
        return
    names = [m.name for m in r.models]

    def shared(started: float | None, borrowed: int) -> dict:
        if not r.one_engine:
            return {"start_seconds": started}
        return {"start_seconds": started, "one_engine": {"adapters": names, "borrowed_from_other_adapters": borrowed}}

    headline = judge.judge_label(r.judge_plan) if cfg.judges else None
    for i, (j, plan) in enumerate(zip(cfg.panel(), r.judge_plans)):  # a panel: each judge in turn, adding its own
        runs = [judge.ToJudge(m.dir, r.prompts, j, cfg.eval, m.metrics, cfg.paths.data_dir,
                              None if r.one_engine else r.progress, headline) for m in r.models]
        log_name = JUDGE_SERVER_LOG if i == 0 else JUDGE_SERVER_LOG.replace(".log", f"-{i}.log")
        judged = judge.judge_run_dirs(runs, plan, r.dir / log_name, shared=shared)
        for m, (_, metrics, seconds) in zip(r.models, judged):
            m.metrics, m.own["judge"] = metrics, m.own.get("judge", 0) + seconds


def _by_sweep(r: Run) -> bool:
    """Whether the run's answers wait for the sweep's judges (judge.scope=sweep with a local judge in the panel)."""
    return any(judge.judged_by_sweep(j, p) for j, p in zip(r.cfg.panel(), r.judge_plans))


# The stages in order; each is entered (timed, its peak RSS taken, named in status.json) whether or not it has work.
STAGES = (("detect", _detect), ("plan", _plan), ("merge", _merge), ("quantize", _quantize), ("reference", _reference),
          ("load", _load), ("generate", _generate), ("fidelity", _fidelity), ("engine stop", _stop_engine),
          ("judge", _judge))


def _start(cfg: RunConfig, run_dir: Path) -> Run:
    """The run's models: the one model, or each adapter of model.adapters with its own dir under run_dir."""
    if not cfg.model.adapters:
        models = [Served(cfg.model.name, cfg, run_dir)]
    else:
        models = [Served(n, replace(cfg, model=replace(cfg.model, name=n, adapter=a, adapters=None)),
                         run_dir / ADAPTERS_DIR / n) for n, a in cfg.model.adapter_map().items()]
    return Run(cfg, run_dir, models, bool(cfg.model.adapters), RunStatus(run_dir=str(run_dir)), Progress(run_dir))


def run(cfg: RunConfig, run_dir: Path) -> RunStatus:
    """Run every stage of `cfg` (or stop after plan when `cfg.stage` is plan), for one model or model.adapters
    (every adapter of one base served by one vLLM engine, each with its own record in run_dir/adapters/<name>/, a
    run dir the sweep report reads as one variant; their status.json split the shared stages' seconds evenly).

    Args:
        cfg: the composed, typed run config.
        run_dir: where the records go (Hydra's output dir).

    Returns:
        The final status (also written to run_dir/status.json).
    """
    _begin(run_dir)
    r = _start(cfg, run_dir)
    status = r.status
    t0, status.started_unix = time.perf_counter(), round(time.time(), 2)
    with PeakMemory() as r.mem:
        try:
            _records(r)
            check_dirs(cfg.paths)
            _demo_build(cfg, status, r.progress, r.mem)
            for name, stage in STAGES:
                with status.enter(name, r.progress, r.mem):
                    stage(r)
                if name == "plan" and cfg.stage is Stage.plan:
                    break
            starts = [(m.metrics.get("judge") or {}).get("start_seconds") for m in r.models]
            status.split("judge", "judge start", next((x for x in starts if x), None))  # a local server's start
            status.status = "ok"
        except BaseException as e:  # recorded in status.json; raised again unless it is emq's own, explained stop
            if not _stopped(status, e):
                raise
        finally:
            _close(status, r.engine, _made(r) if cfg.memory.cleanup_after_eval else [], r.progress,
                   r.mem, t0, run_dir, peak_gib=None if r.one_engine else r.models[0].metrics.get("peak_rss_gib"))
            _summaries(r)
    if r.one_engine and status.status == "ok" and cfg.stage is Stage.all \
            and not _by_sweep(r):
        _report(run_dir)  # in a sweep the sweep's report (after its one judge) covers these adapters
    return status


def _summaries(r: Run) -> None:
    """Each model's summary in the log; for model.adapters, each adapter's status.json and progress.json."""
    if not r.one_engine:
        log.info("\n%s", run_summary(r.status, r.models[0].metrics))
        return
    for m in r.models:
        status = _adapter_status(r.status, m.own, len(r.models), m.dir)
        if m.dir.is_dir():
            write_json(m.dir / STATUS, status)
            Progress(m.dir).update(force=True, stage=r.status.stage, status=r.status.status)
        if m.metrics:
            log.info("\n%s", run_summary(status, m.metrics))


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



def _report(run_dir: Path) -> None:
    """The adapters compared as a sweep's variants: summary.md / report.html in the run dir."""
    from emq.report.sweep import build

    try:
        log.info("report: %s\n%s", build([run_dir]), (run_dir / "summary.md").read_text())
    except Exception as e:  # noqa: BLE001 - the adapters' own records stay; the report can be rebuilt
        log.error("emq report: could not build the adapters' report: %s (rebuild: python -m emq report %s)", e,
                  run_dir)


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
