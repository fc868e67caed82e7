"""`python -m emq judge RUN_DIR [judge overrides]`: judge a finished run again without regenerating.
`python -m emq judge --validate [judge overrides]`: how well a judge scores emq's labelled validation set.

Composes the run's own config (.hydra/overrides.yaml) with the overrides on top (a new `judge=…` drops the
run's old `judge.*` overrides), judges what scores.jsonl lacks for that judge, and rewrites metrics.json and
judged.jsonl. E.g. `python -m emq judge RUN_DIR judge=openai judge.model=gpt-4o judge.api_key_env=OPENAI_API_KEY`.
`RUN_DIR --validate` also validates the run's judge (judge.validate=true: judge.json, metrics.json).
`RUN_DIR judge.panel=[local,local_nf4]` judges it with each judge of a panel in turn (each adds its own; the first is
the headline); judge.batch=true asks an OpenAI-compatible endpoint through its Batch API (emq.judge.batch).

Without RUN_DIR, `--validate` composes emq's default config with the overrides, scores the validation set
(emq's own, or judge.validation.path) with that judge and prints per metric: AUROC (good vs bad), Spearman
with the labels, mean score per label, unscored rate, REFUSAL precision / recall. Scores are kept per judge
under paths.data_dir/judge_validation/ (a second call judges nothing), next to a record per set and each item
with its judgement (validation-*.json / .jsonl).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from emq import judge
from emq.demo import ensure_demo
from emq.errors import EmqError
from emq.prompts import build_prompts
from emq.machine import snapshot
from emq.records import GENERATIONS, METRICS, PLAN, read_json
from emq.report.tables import judged_rows, render, summary_table

log = logging.getLogger(__name__)


def rejudge(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Judge a finished run again with the judge `overrides` compose to (what is missing from scores.jsonl), then
    rewrite its metrics.json and judged.jsonl."""
    from emq.config import compose_from_run  # Hydra: only the config layer and the tools import it

    run_dir = Path(run_dir)
    if not (run_dir / GENERATIONS).is_file():
        raise EmqError(f"{run_dir} has no generations.jsonl", "pass the run dir of a run that reached evaluate")
    cfg = compose_from_run(run_dir, overrides)
    if any(j.demo for j in cfg.panel()):
        ensure_demo(cfg.paths.data_dir)
    plans = [_judge_plan(run_dir, cfg, j) for j in cfg.panel()]  # every judge checked before any is asked
    prompts = build_prompts(cfg.eval)
    judge.check_prompts(prompts)
    headline = judge.judge_label(plans[0]) if cfg.judges else None
    metrics = read_json(run_dir / METRICS)
    for i, (j, plan) in enumerate(zip(cfg.panel(), plans)):  # a panel: each judge adds its own
        metrics = judge.judge_and_summarize(run_dir, prompts, j, cfg.eval, plan, metrics, data_dir=cfg.paths.data_dir,
                                            headline=headline)
    log.info("\n%s", summary_table(judged_rows(metrics), f"emq judge: {run_dir}"))
    return metrics


def judge_deferred(run_dirs: list[Path]) -> list[Path]:
    """Judge every run that deferred its judging to the sweep (judge.scope=sweep): one judge server per distinct
    judge, started once, each run judged through it as `python -m emq judge RUN_DIR` would. Returns the runs judged.
    A run that fails to judge is logged and left deferred (judge it later with `python -m emq judge RUN_DIR`)."""
    from emq.config import compose_from_run

    waiting = [Path(d) for d in run_dirs
               if ((read_json(Path(d) / METRICS) or {}).get("judge") or {}).get("deferred_to_sweep")]
    groups: dict[str, tuple[judge.JudgePlan, list[tuple]]] = {}  # a panel's judges in order, each with its runs
    for d in waiting:
        try:
            cfg = compose_from_run(d, ["judge.scope=run"])
            plans = [_judge_plan(d, cfg, j) for j in cfg.panel()]
            headline = judge.judge_label(plans[0]) if cfg.judges else None
            prompts = build_prompts(cfg.eval)
            for j, plan in zip(cfg.panel(), plans):
                groups.setdefault(plan.identity, (plan, []))[1].append((d, prompts, j, cfg, headline))
        except EmqError as e:
            log.error("judge: %s stays unjudged: %s (python -m emq judge %s)", d, e, d)
            continue
    done: dict[Path, None] = {}
    for server, (identity, (plan, members)) in enumerate(groups.items()):
        # each run's metrics.json read now: a panel's earlier judge has added its own to it
        runs = [judge.ToJudge(d, prompts, j, cfg.eval, read_json(d / METRICS), cfg.paths.data_dir, headline=h)
                for d, prompts, j, cfg, h in members]
        if runs[0].cfg.demo:
            ensure_demo(runs[0].data_dir)
        log.info("judge: one %s judge for the sweep's %d run(s): %s", plan.kind, len(runs), identity)

        def shared(started: float | None, borrowed: int, n: int = len(runs), server: int = server) -> dict[str, Any]:
            return {"sweep": {"runs": n, "server": server, "server_start_seconds": started,
                              "borrowed_from_other_runs": borrowed}}  # the same answer in another variant

        judged = judge.judge_run_dirs(runs, plan, runs[0].run_dir.parent / f"judge_server-{server}.log",
                                      shared=shared, keep_going=True)
        done.update((r.run_dir, None) for r, _, _ in judged)
    return list(done)


def _judge_plan(run_dir: Path, cfg, judge_cfg) -> judge.JudgePlan:
    """The plan of `judge_cfg` (one judge of cfg's panel) for re-judging a run, on this machine, with the memory
    share its plan recorded."""
    machine = snapshot(cfg.paths.cache_dir)
    plan = read_json(run_dir / PLAN).get("plan", {})
    engine = plan.get("engine", {})
    platform = plan.get("platform", machine.vllm.platform)
    return judge.prepare(judge_cfg, platform=platform, dtype=judge.judge_dtype(platform, machine.cpu_bf16),
                         memory_utilization=engine.get("memory_utilization", cfg.memory.cpu_memory_utilization))


def validate_only(overrides: list[str]) -> dict[str, Any]:
    """Validate the judge that emq's default config with `overrides` names; log the table; return the record."""
    from hydra import compose, initialize_config_dir

    from emq.config import CONF_DIR, to_run_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=overrides), overrides)
    if cfg.judge.demo:
        ensure_demo(cfg.paths.data_dir)
    machine = snapshot(cfg.paths.cache_dir)
    platform = machine.vllm.platform
    util = cfg.memory.cpu_memory_utilization if platform == "cpu" else cfg.memory.gpu_memory_utilization
    plan = judge.prepare(cfg.judge, platform=platform, dtype=judge.judge_dtype(platform, machine.cpu_bf16),
                         memory_utilization=util)
    record = judge.validate_judge(cfg.judge, plan, cfg.paths.data_dir)
    log.info("\n%s", validation_table(record))
    return record


def _num(v: float | None, nd: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


def validation_table(record: dict[str, Any]) -> str:
    """One row per metric: AUROC, Spearman, mean score per label, unscored, category precision / recall."""
    from rich.table import Table

    s, j = record["set"], record["judge"]
    t = Table(title=f"judge validation: {j['kind']} {j['model']} (scoring: {record['scoring']}) on {s['source']}, "
                    f"{s['items']} items", show_header=True, header_style="bold")
    for c in ("metric", "items", "AUROC", "Spearman", "mean score by label (n)", "unscored", "categories P / R",
              "verdict"):
        t.add_column(c, overflow="fold")
    for m, r in record["metrics"].items():
        means = ", ".join(f"{lab} {_num(b['mean'], 1)} ({b['n']})" for lab, b in r["by_label"].items())
        cats = ", ".join(f"{c} {_num(x['precision'])} / {_num(x['recall'])}" for c, x in r["categories"].items())
        verdict = ("cannot tell these apart" if r["cannot_tell_apart"] else
                   "ok" if r.get("testable") else "not tested (no good or no bad items)")
        t.add_row(m, str(r["items"]), f"{_num(r['auroc'])} ({r['auroc_of']}, {r['auroc_n'][0]} vs {r['auroc_n'][1]})",
                  _num(r["spearman"]), means, f"{100 * (r['unscored_rate'] or 0):.0f}%", cats or "-", verdict)
    return (render(t, width=160) + f"judge.min_auroc={record['min_auroc']:g}; {record['judged_now']} judged now, "
            f"{record['reused']} reused, {record['requests']} requests in {record['seconds']:.1f} s; scoring: "
            f"{record['scoring_reason']}\nper item: {record['cache']}/validation-{s['sha256'][:12]}.jsonl\n")


def split_args(args: list[str], validate: bool) -> tuple[Path | None, list[str]]:
    """(RUN_DIR, overrides): with --validate the run dir is optional (an override always has '=')."""
    if args and "=" not in args[0]:
        return Path(args[0]), args[1:]
    if not validate:
        raise EmqError("no RUN_DIR given", "python -m emq judge RUN_DIR [judge overrides], or --validate "
                       "[judge overrides] to validate a judge alone")
    return None, args


def main(argv: list[str] | None = None) -> int:
    """Re-judge an existing run dir with the judge given by overrides, then rewrite its metrics; or validate a
    judge (--validate)."""
    parser = argparse.ArgumentParser(prog="python -m emq judge", description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", metavar="[RUN_DIR] OVERRIDE",
                        help="a run dir, then Hydra overrides, e.g. judge=openai judge.model=gpt-4o")
    parser.add_argument("--validate", action="store_true",
                        help="score emq's labelled validation set with the judge (alone, or with RUN_DIR into its "
                             "judge.json)")
    args = parser.parse_intermixed_args(argv)
    try:
        run_dir, overrides = split_args(args.args, args.validate)
        if run_dir is None:
            validate_only(overrides)
        else:
            rejudge(run_dir, overrides + (["judge.validate=true"] if args.validate else []))
    except EmqError as e:
        log.error("%s", e)
        return 2
    return 0
