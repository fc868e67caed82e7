"""The map of emq: detect → plan → merge → reference → load → evaluate → judge, each stage's record in the run dir.

One try/finally per run: the engine is always shut down and status.json always written.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emq import fidelity, judge
from emq.demo import demo_built, ensure_demo
from emq.detect import detect
from emq.engine import Engine, LoadRecord, check_engine_extra, load
from emq.errors import EmqError, PlanStop
from emq.evaluate import build_prompts, evaluate, read_generations
from emq.judge import check_prompts
from emq.metrics import answer_table, summarize
from emq.machine import GIB, snapshot
from emq.merge import MergeFailed, MergeResult, MergeSettings, merge_adapter
from emq.monitor import PeakMemory
from emq.plan import Route, make_plan
from emq.records import Progress, write_json, write_text_atomic, versions
from emq.tables import plan_table, summary_table
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
    progress = Progress(run_dir)
    engine: Engine | None = None
    merged: MergeResult | None = None
    metrics: dict[str, Any] = {}
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        try:
            write_json(run_dir / "versions.json", {**versions(), "seed": cfg.seed, "eval_seed": cfg.eval.seed})
            write_json(run_dir / "run_config.json", cfg)  # the composed config, resolved (paths included)

            status.stage = "detect"
            progress.update(force=True, stage=status.stage)
            if cfg.model.demo or (cfg.judge.demo and cfg.stage is Stage.all):
                ensure_demo(cfg.paths.data_dir)
                mem.reset()  # a first-run demo build is not part of this model's footprint
            det = detect(cfg.model)
            write_json(run_dir / "detect.json", det)

            status.stage = "plan"
            progress.update(force=True, stage=status.stage)
            prompts = build_prompts(cfg.eval)  # a bad question set fails now, before any weights load
            check_prompts(prompts)
            machine = snapshot(cfg.paths.cache_dir)
            plan = make_plan(det, cfg.memory, cfg.quant, machine)
            if route_needs_engine(plan.route):
                check_engine_extra(plan.engine.extra)
            if cfg.judge.demo and not demo_built(cfg.paths.data_dir):  # a dry run does not build the demo
                judge_plan = judge.JudgePlan(cfg.judge.kind.value, cfg.judge.model, None, None,
                                             "the demo judge is built on the first full run", None)
            else:
                judge_plan = judge.prepare(cfg.judge, platform=plan.platform,
                                           dtype=judge_dtype(plan.platform, machine),
                                           memory_utilization=plan.engine.memory_utilization)
            write_json(run_dir / "plan.json", {"plan": plan, "judge": judge_plan, "machine": machine})
            log.info("plan:\n%s", plan_table(det, plan, judge_plan))
            route = plan.route
            status.route = route.value
            if route is Route.stop:
                raise PlanStop(f"plan stopped: {plan.stop_reason}", "see plan.json for the estimates and reasons")
            if cfg.stage is Stage.plan:
                status.status = "ok"
                return status

            status.stage = "merge"
            progress.update(force=True, stage=status.stage)
            merge_lacks = route is Route.merge_then_serve and not (det.base.weights_local and det.adapter.weight_file)
            lora_lacks = route is Route.serve_lora and det.adapter.weight_file is None
            reference_lacks = cfg.eval.fidelity.enabled and not det.base.weights_local
            if merge_lacks or lora_lacks or reference_lacks:
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
            write_json(run_dir / "inputs.json", inputs_record(det, merged))

            status.stage = "reference"  # before vLLM takes the GPU: the trained function, once per model
            progress.update(force=True, stage=status.stage)
            fid = fidelity.prepare(det, cfg.eval.fidelity, cfg.paths.data_dir)
            mem.reset()  # the reference (cached after its first run) is not the served variant's footprint

            status.stage = "load"
            progress.update(force=True, stage=status.stage)
            engine = load(model_path, plan.engine, lora_path=lora_path, seed=cfg.seed,
                          max_logprobs=cfg.eval.fidelity.top_k)
            write_json(run_dir / "load.json", engine.record)

            status.stage = "evaluate"
            progress.update(force=True, stage=status.stage)
            result = evaluate(engine, cfg.eval, run_dir, progress)
            fid_out = fidelity.score_run(engine, fid, cfg.eval.fidelity, run_dir) if fid else None
            loaded = engine.record
            engine.shutdown()  # before a local judge starts: on one GPU they would not fit together
            engine = None
            served = _peaks(mem)
            mem.reset()
            metrics = {
                "model": cfg.model.name, "route": route.value, "quant": plan.quant.value,
                "vllm_quantization": plan.engine.quantization, "dtype": plan.engine.dtype,
                "count": result.samples, "prompts": result.prompts, "generated_now": result.generated_now,
                "mean_output_tokens": result.mean_output_tokens, "output_tokens_now": result.output_tokens,
                "generation_seconds": result.generation_seconds, "tokens_per_second": result.tokens_per_second,
                "latency_p50_s": result.latency_p50_s, "latency_p95_s": result.latency_p95_s,
                "load_seconds": loaded.load_seconds, **_weights(loaded, plan),
                "merge_seconds": round(merged.seconds, 2) if merged else None,
                "merge_cached": merged.cached if merged else None,
                **served,
                "fidelity": (fid_out or {}).get("vs_reference"),
                "fidelity_reference": (fid_out or {}).get("reference"),
            }
            write_json(run_dir / "metrics.json", metrics)

            status.stage = "judge"
            progress.update(force=True, stage=status.stage)
            metrics = judge_and_summarize(run_dir, prompts, cfg, judge_plan, metrics, progress)
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
            progress.update(force=True, stage=status.stage, status=status.status)
            status.seconds = round(time.perf_counter() - t0, 2)
            status.peak_rss_gib = metrics.get("peak_rss_gib") or round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3)
            write_json(run_dir / "status.json", status)
            log.info("\n%s", summary_table(_summary_rows(status, metrics), f"emq run: {status.status}"))
    return status


def inputs_record(det, merged: MergeResult | None) -> dict[str, Any]:
    """What the run's numbers depend on, by content: base files (small files by sha256, weight shards by
    size + mtime + header sha256, as the merge cache keys them), adapter files by sha256, and the merged
    checkpoint's cache key and file hashes (its manifest)."""
    from emq.cache import MANIFEST, sha256_file
    from emq.merge import _base_identity

    base_dir = Path(det.base.path)
    rec: dict[str, Any] = {"base": {"ref": det.base.ref, "files": _base_identity(base_dir) if base_dir.is_dir() else None}}
    if det.adapter is not None:
        adir = Path(det.adapter.path)
        rec["adapter"] = {"path": str(adir), "files_sha256": {p.name: sha256_file(p) for p in sorted(adir.iterdir())
                                                               if p.is_file() and p.suffix in (".json", ".safetensors", ".bin")}}
    if merged is not None:
        manifest = json.loads((Path(merged.path) / MANIFEST).read_text())
        rec["merged"] = {"path": merged.path, "key": merged.key, "files_sha256": manifest.get("files_sha256")}
    return rec


def judge_dtype(platform: str, machine) -> str:
    """A local judge serves unquantized: float32 on a CPU without native bf16 (6x faster there)."""
    return "float32" if platform == "cpu" and not machine.cpu_bf16 else "bfloat16"


def route_needs_engine(route: Route) -> bool:
    return route in (Route.serve_base, Route.serve_lora, Route.merge_then_serve)


def _weights(rec: LoadRecord, plan) -> dict[str, Any]:
    """The weights' memory as measured in the engine, or the plan's estimate where vLLM hides it (CPU build)."""
    if rec.weights_gib is not None:
        return {"weights_gib": rec.weights_gib, "weights_source": rec.weights_source}
    est = plan.estimates_gib.get("serve_weights")
    return {"weights_gib": est, "weights_source": f"plan estimate (checkpoint parameters at the serving dtype/quant); "
                                                  f"engine: {rec.weights_source}"}


def _peaks(mem: PeakMemory) -> dict[str, Any]:
    """The served variant's footprint: peak RSS of the process tree, peak GPU memory (NVML)."""
    gpu = mem.peak_gpu()
    return {"peak_rss_gib": round(max(mem.peak_rss_bytes, mem.sample()) / GIB, 3),
            "peak_vram_gib": round(gpu / GIB, 3) if gpu is not None else None,
            "peak_vram_method": mem.gpu_method}


def judge_and_summarize(run_dir: Path, prompts: list[dict[str, Any]], cfg: RunConfig, judge_plan,
                        metrics: dict[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Judge the run's answers (what is missing), then rewrite metrics.json with the judged metrics
    and judged.jsonl (each answer with its judgements, what the sweep report pairs across variants)."""
    result = judge.run_judge(run_dir, prompts, cfg.judge, judge_plan, run_dir / "judge_server.log", progress)
    rows = read_generations(run_dir)
    metrics = dict(metrics)
    metrics["judge"] = {"kind": judge_plan.kind, "model": judge_plan.model, "scoring": judge_plan.scoring,
                        "scoring_reason": judge_plan.scoring_reason, **(asdict(result) if result else {})}
    if result is not None:
        _, keys_of = judge.judge_items(rows, prompts, judge_plan.identity)
        table = answer_table(rows, keys_of, judge.read_scores(run_dir))
        metrics.update(summarize(table, cfg.eval))
        keep = ("score", "category", "valid_mass")
        write_text_atomic(run_dir / "judged.jsonl", "".join(
            json.dumps({**{k: r[k] for k in ("set", "question_id", "paraphrase_index", "sample_index")},
                        "judged": {m: ({k: j.get(k) for k in keep} if j else None) for m, j in t["judged"].items()}})
            + "\n" for r, t in zip(rows, table)))
    else:
        metrics.update({"metrics": {}, "em": None})
    write_json(run_dir / "judge.json", {"plan": judge_plan, "result": result})
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def rejudge(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """`python -m emq.judge RUN_DIR [overrides]`: judge a finished run again, rewrite its metrics."""
    from emq.config import compose_from_run

    run_dir = Path(run_dir)
    if not (run_dir / "generations.jsonl").is_file():
        raise EmqError(f"{run_dir} has no generations.jsonl", "pass the run dir of a run that reached evaluate")
    cfg = compose_from_run(run_dir, overrides)
    if cfg.judge.demo:
        ensure_demo(cfg.paths.data_dir)
    machine = snapshot(cfg.paths.cache_dir)
    plan = json.loads((run_dir / "plan.json").read_text())["plan"] if (run_dir / "plan.json").is_file() else {}
    engine = plan.get("engine", {})
    platform = plan.get("platform", machine.vllm.platform)
    judge_plan = judge.prepare(cfg.judge, platform=platform, dtype=judge_dtype(platform, machine),
                               memory_utilization=engine.get("memory_utilization", cfg.memory.cpu_memory_utilization))
    prompts = build_prompts(cfg.eval)
    check_prompts(prompts)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    metrics = judge_and_summarize(run_dir, prompts, cfg, judge_plan, metrics)
    log.info("\n%s", summary_table(_judged_rows(metrics), f"emq judge: {run_dir}"))
    return metrics


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


def _ci(s: dict[str, Any] | None, pct: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "n/a (nothing scored)"
    f = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.1f}")
    ci = f" [{f(s['ci95'][0])}, {f(s['ci95'][1])}]" if s.get("ci95") else ""
    return f"{f(s['mean'])}{ci}  (n={s['n']}, {s['questions']} questions)"


def _judged_rows(metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    j = metrics.get("judge") or {}
    if j.get("kind") and j["kind"] != "none":
        rows.append(("judge", f"{j['kind']} {j.get('model')} (scoring: {j.get('scoring')}; "
                              f"{j.get('judged_per_second', 0)} judgements/s)"))
    for m, s in (metrics.get("metrics") or {}).items():
        rows.append((f"{m} (mean, 95% CI)", _ci(s) + (f", unscored {100 * s['unscored_rate']:.0f}%"
                                                      if s.get("unscored_rate") else "")))
    em = metrics.get("em") or {}
    if em:
        rows.append(("misaligned rate", _ci(em.get("misaligned_rate"), pct=True)))
        rows.append(("coherent rate", _ci(em.get("coherent_rate"), pct=True)))
        rows.append(("refusal rate", _ci(em.get("refusal_rate"), pct=True)))
        if em.get("unscored_rate") is not None:
            rows.append(("unscored judgements", f"{100 * em['unscored_rate']:.1f}%"))
    return rows


def _summary_rows(status: RunStatus, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("status", status.status), ("stage", status.stage), ("route", str(status.route))]
    if status.error:
        rows.append(("error", status.error))
    for k in ("quant", "dtype", "count", "mean_output_tokens", "tokens_per_second", "latency_p95_s", "load_seconds",
              "weights_gib", "merge_seconds"):
        if metrics.get(k) is not None:
            rows.append((k, str(metrics[k])))
    rows += _judged_rows(metrics)
    fid = metrics.get("fidelity")
    if fid:
        ref = metrics.get("fidelity_reference") or {}
        rows.append(("fidelity vs trained", f"KL mean {fid['kl_mean']:.4f}, p99 {fid['kl_p99']:.4f}, top-1 agree "
                                            f"{100 * fid['top1_agreement']:.1f}%, PPL ratio {fid['ppl_ratio']:.4f} "
                                            f"({fid['positions']} tokens; reference: {ref.get('describe')})"))
    if metrics.get("peak_vram_gib") is not None:
        rows.append(("peak VRAM (tree)", f"{metrics['peak_vram_gib']:.2f} GiB"))
    rows += [("peak RSS (tree)", f"{status.peak_rss_gib:.2f} GiB"), ("wall", f"{status.seconds:.1f} s"),
             ("run dir", status.run_dir)]
    return rows
