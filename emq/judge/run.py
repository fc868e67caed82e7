"""Judging runs: every answer of a run dir scored per metric (what scores.jsonl lacks), metrics.json and judged.jsonl
rewritten, and `judge_run_dirs`, the one loop the runner (model.adapters) and `emq judge` (a sweep's deferred runs)
share: open the judge once, borrow the scores other runs already have, judge, summarize."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emq.errors import EmqError
from emq.judge.agreement import pairwise
from emq.judge.backends import backend
from emq.judge.cache import JudgeCache, open_cache
from emq.judge.client import judge_into, read_scores, score_key
from emq.judge.estimate import cost_of
from emq.judge.plan import JudgePlan, fingerprint
from emq.judge.prompts import fill, judge_template, metric_specs, prompts_record
from emq.judge.validation import validate, validation_scored
from emq.metrics import answer_table, summarize
from emq.records import JUDGE, JUDGE_SERVER_LOG, JUDGED, METRICS, SCORES, PromptKey, SampleKey, read_generations, \
    read_json, to_jsonable, write_json, write_text_atomic
from emq.schema import EvalConfig, JudgeConfig, JudgeScope

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JudgeResult:
    judged_now: int  # judgements asked of the judge by this call
    reused: int  # found in scores.jsonl already
    items: int  # distinct (metric, prompt, answer) this judge has to score
    answers: int  # generation rows
    seconds: float
    judged_per_second: float
    requests: int
    retries: int
    scoring: str | None
    errors: int
    cached: int = 0  # taken from the judge cache (emq.judge.cache) by this call, without a request
    prompt_tokens: int = 0  # of this call's requests, as the endpoint counted them
    completion_tokens: int = 0
    cost: float | None = None  # judge.price × the tokens (None: no price set)
    batches: int = 0  # judge.batch: batches submitted by this call
    batch_resumed: int = 0  # judge.batch: answers taken from a batch a killed run had submitted

    @property
    def cache_hit_rate(self) -> float | None:
        """The share of what this call had to score that came from the judge cache."""
        asked = self.cached + self.judged_now
        return round(self.cached / asked, 4) if asked else None


def judge_items(rows: list[dict[str, Any]], prompts: list[dict[str, Any]], identity: str
                ) -> tuple[dict[str, dict[str, Any]], dict[tuple, dict[str, str]]]:
    """What to judge: {key: item} (deduplicated) and, per generation row, {metric: key}."""
    specs = metric_specs()
    by_prompt = {PromptKey.of(p): p for p in prompts}
    items: dict[str, dict[str, Any]] = {}
    keys_of: dict[tuple, dict[str, str]] = {}
    for r in rows:
        p = by_prompt.get(PromptKey.of(r))
        if p is None:
            continue  # a row of a question no longer in the config
        keys = {}
        for m in p["metrics"]:
            template, _ = judge_template(p, m)
            text = fill(template, r["prompt"], r["answer"], p.get("fields"))
            k = score_key(identity, m, text)
            items.setdefault(k, {"key": k, "metric": m, "text": text, "categories": specs[m].categories})
            keys[m] = k
        keys_of[SampleKey.of(r)] = keys
    return items, keys_of


def borrow_scores(run_dir: Path, prompts: list[dict[str, Any]], plan: JudgePlan, donors: list[Path]) -> int:
    """Copy into run_dir's scores.jsonl the judgements that `donors` (other runs of a sweep, same judge) already
    made of the same (judge, prompt, answer): dedupe across a sweep. Returns how many were copied."""
    items, _ = judge_items(read_generations(run_dir), prompts, plan.identity)
    want = set(items) - set(read_scores(run_dir))
    found = []
    for d in donors:
        for k, row in read_scores(d).items():
            if k in want:
                found.append(row)
                want.discard(k)
    if found:
        with open(Path(run_dir) / SCORES, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in found))
    return len(found)


def judge_run(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan, base_url: str | None,
              *, model_name: str | None = None, progress=None, cache: JudgeCache | None = None) -> JudgeResult:
    """Judge every generation of `run_dir` not yet scored by this judge; append to scores.jsonl. With `cache`,
    what it already holds is copied in without a request (base_url may then be None if nothing is left to ask),
    and every judgement of this run is stored in it."""
    rows = read_generations(run_dir)
    items, _ = judge_items(rows, prompts, plan.identity)
    done = read_scores(run_dir)
    todo = [it for k, it in items.items() if k not in done]
    judge = fingerprint(cfg, plan)
    hits = cache.get(judge, (it["key"] for it in todo)) if cache is not None and todo else {}
    if hits:
        with open(Path(run_dir) / SCORES, "a") as f:
            f.write("".join(json.dumps({**hits[it["key"]], "cached": True}) + "\n"
                            for it in todo if it["key"] in hits))
        todo = [it for it in todo if it["key"] not in hits]
    log.info("judge: %d answers, %d distinct judgements, %d to do (%d already in %s, %d from the judge cache); "
             "scoring=%s (%s)", len(rows), len(items), len(todo), len(items) - len(todo) - len(hits), SCORES,
             len(hits), plan.scoring, plan.scoring_reason)
    if todo and base_url is None:
        raise EmqError(f"{len(todo)} judgements of {run_dir} are neither in scores.jsonl nor in the judge cache, and no "
                       "judge is open", "run `python -m emq judge RUN_DIR` to judge them")
    t0 = time.perf_counter()
    if progress is not None:
        progress.update(force=True, judged=len(items) - len(todo), to_judge=len(items))
    on_judged = None if progress is None else (lambda n: progress.update(judged=len(items) - len(todo) + n))
    calls = judge_into(Path(run_dir) / SCORES, todo, cfg, plan, base_url, model_name=model_name, on_judged=on_judged)
    if progress is not None:
        progress.update(force=True, judged=len(items))  # the last count, whatever the throttle skipped
    seconds = time.perf_counter() - t0
    if cache is not None:
        scored = read_scores(run_dir)
        cache.put(judge, (scored[k] for k in items if k in scored and not scored[k].get("cached")))
    return JudgeResult(len(todo), len(items) - len(todo) - len(hits), len(items), len(rows), round(seconds, 2),
                       round(len(todo) / seconds, 2) if todo and seconds else 0.0, calls.requests, calls.retries,
                       plan.scoring, calls.errors, cached=len(hits), prompt_tokens=calls.prompt_tokens,
                       completion_tokens=calls.completion_tokens,
                       cost=cost_of(cfg, calls.prompt_tokens, calls.completion_tokens), batches=calls.batches,
                       batch_resumed=calls.resumed)


def left_to_judge(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan,
                  cache: JudgeCache | None) -> int:
    """How many judgements of `run_dir` neither its scores.jsonl nor the judge cache holds."""
    items, _ = judge_items(read_generations(run_dir), prompts, plan.identity)
    want = set(items) - set(read_scores(run_dir))
    return len(want - set(cache.get(fingerprint(cfg, plan), want))) if cache is not None and want else len(want)


def needs_judge(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan,
                cache: JudgeCache | None, root: Path | str) -> bool:
    """Whether judging `run_dir` (and validating, with judge.validate) asks the judge anything: if not, no local
    server is started and no endpoint is reached."""
    return (left_to_judge(run_dir, prompts, cfg, plan, cache) > 0
            or (cfg.validate and not validation_scored(cfg, plan, root)))


def endpoint(cfg: JudgeConfig, plan: JudgePlan, server_log: Path):
    """(base URL, served model name) of the planned judge while the `with` lasts: an endpoint as it is, or a local
    server started here and stopped on the way out (its backend's `endpoint`)."""
    return backend(plan.kind).endpoint(cfg, plan, server_log)


def run_judge(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, plan: JudgePlan,
              server_log: Path, progress=None) -> JudgeResult | None:
    """Judge with the planned judge: an endpoint as it is, or a local server started and stopped here."""
    if not plan.judges:
        return None
    with endpoint(cfg, plan, server_log) as (url, name):
        return judge_run(run_dir, prompts, cfg, plan, url, model_name=name, progress=progress)


def judged_by_sweep(cfg: JudgeConfig, plan: JudgePlan) -> bool:
    """Whether this run's answers wait for the sweep's one judge: judge.scope=sweep with a local judge server (an
    endpoint judges each run as it finishes)."""
    return cfg.scope is JudgeScope.sweep and backend(plan.kind).shared_by_sweep


def defer_to_sweep(run_dir: Path, plan: JudgePlan, metrics: dict[str, Any]) -> dict[str, Any]:
    """judge.scope=sweep: record that this run's answers wait for the sweep's one judge (judge.json, metrics.json);
    `python -m emq judge RUN_DIR` judges such a run alone at any time."""
    log.info("judge: deferred to the end of the sweep, where one %s judge serves every variant", plan.kind)
    metrics = {**metrics, "judge": {"kind": plan.kind, "model": plan.model, "scoring": plan.scoring,
                                    "deferred_to_sweep": True}, "metrics": {}, "em": None}
    write_json(run_dir / JUDGE, {"plan": plan, "result": None, "deferred_to_sweep": True})
    write_json(run_dir / METRICS, metrics)
    return metrics


@contextmanager
def _opened(at: tuple[str, str | None] | None, cfg: JudgeConfig, plan: JudgePlan,
            server_log: Path) -> Iterator[tuple[str, str | None]]:
    if at is not None:  # an endpoint the caller holds open (the sweep's one judge)
        yield at
        return
    with endpoint(cfg, plan, server_log) as opened:
        yield opened


def judge_and_summarize(run_dir: Path, prompts: list[dict[str, Any]], cfg: JudgeConfig, eval_cfg: EvalConfig,
                        plan: JudgePlan, metrics: dict[str, Any], progress=None, *,
                        data_dir: Path | str | None = None, at: tuple[str, str | None] | None = None,
                        headline: str | None = None) -> dict[str, Any]:
    """Judge the run's answers (what is missing), then rewrite metrics.json with the judged metrics, and
    judged.jsonl (each answer with its judgements: what the sweep report pairs across variants). With
    judge.validate, also validate the judge in the same server session (its scores kept under `data_dir`,
    default the run dir), recorded in judge.json and metrics.json. `at`: (URL, served name) of a judge already
    running (the sweep's); else the planned judge is reached, or started and stopped, here. `headline`: a panel's
    first judge (`judge_label`), whose figures stay metrics.json's top level and judged.jsonl's `judged` whichever
    judge of the panel judged last (None: this judge's)."""
    result = checked = started = None
    if plan.judges:
        cache = open_cache(data_dir, cfg.cache)
        try:
            t0 = time.perf_counter()
            needed = at is not None or needs_judge(run_dir, prompts, cfg, plan, cache, data_dir or run_dir)
            with _opened(at, cfg, plan, run_dir / JUDGE_SERVER_LOG) if needed else nullcontext((None, None)) \
                    as (url, name):
                started = round(time.perf_counter() - t0, 2) if needed else None  # a local server's start
                result = judge_run(run_dir, prompts, cfg, plan, url, model_name=name, progress=progress, cache=cache)
                if cfg.validate:
                    checked = validate(cfg, plan, url, root=data_dir or run_dir, model_name=name, run_dir=run_dir)
        finally:
            if cache is not None:
                cache.close()
    rows = read_generations(run_dir)
    metrics = dict(metrics)
    metrics["judge"] = {"kind": plan.kind, "model": plan.model, "scoring": plan.scoring,
                        "scoring_reason": plan.scoring_reason, **(asdict(result) if result else {}),
                        "validation": checked, "start_seconds": started}
    if result is not None:
        _, keys_of = judge_items(rows, prompts, plan.identity)
        scores = read_scores(run_dir)
        table = answer_table(rows, keys_of, scores)
        metrics.update(summarize(table, eval_cfg))
        panel, tables = with_other_judges(metrics, plan, rows, prompts, scores, eval_cfg)
        metrics.update(panel)
        if headline in tables and headline != judge_label(plan):  # the panel's first judge stays the headline
            first = panel["judges"][headline]
            metrics.update({k: first.get(k) for k in ("judge", "metrics", "em")})
            table = tables[headline]
        keep = ("score", "category", "valid_mass")

        def judged(t: dict[str, Any]) -> dict[str, Any]:
            return {m: ({k: j.get(k) for k in keep} if j else None) for m, j in t["judged"].items()}

        # each answer with its judgements; with several judges, every judge's under its name (the report pairs
        # variants under each judge: does a difference hold under all of them?)
        write_text_atomic(run_dir / JUDGED, "".join(
            json.dumps({**SampleKey.of(r).fields(), "judged": judged(t),
                        **({"by_judge": {label: judged(tables[label][i]) for label in tables}}
                           if len(tables) > 1 else {})}) + "\n"
            for i, (r, t) in enumerate(zip(rows, table))))
    else:
        metrics.update({"metrics": {}, "em": None})
    write_json(run_dir / JUDGE, judge_record(run_dir, plan, result, checked, prompts, headline))
    write_json(run_dir / METRICS, metrics)
    return metrics


def judge_record(run_dir: Path, plan: JudgePlan, result: JudgeResult | None, checked: dict[str, Any] | None,
                 prompts: list[dict[str, Any]], headline: str | None) -> dict[str, Any]:
    """judge.json: this judge's plan, result (requests, tokens, cache hits, cost) and validation; with several
    judges, every judge's under `judges` by its name (a second judge adds, it never replaces), and the top level
    the headline's (a panel's first judge; else the judge that judged last)."""
    mine = {"plan": plan, "result": result, "validation": checked}
    old = read_json(run_dir / JUDGE)
    judges = {**(old.get("judges") or {}), judge_label(plan): to_jsonable(mine)}
    if not old.get("judges") and old.get("result") is not None and label_of(old["plan"]) != judge_label(plan):
        judges = {label_of(old["plan"]): {k: old.get(k) for k in mine}, **judges}  # from before judges were kept
    top = judges.get(headline, judges[judge_label(plan)]) if headline else judges[judge_label(plan)]
    return {**top, "prompts": prompts_record(prompts) if result is not None else None,
            **({"judges": judges} if len(judges) > 1 else {})}


def label_of(plan: dict[str, Any]) -> str:
    """A judge's name from its plan (or judge record) as JSON: kind:model (scoring) [server args]."""
    extra = (plan.get("server") or {}).get("server_args")  # a local judge served otherwise is another judge
    return f"{plan.get('kind')}:{plan.get('model')} ({plan.get('scoring')})" + (f" [{' '.join(extra)}]" if extra else "")


def judge_label(plan: JudgePlan) -> str:
    """A judge's name in metrics.json `judges`, judge.json and the tables: kind, model, scoring."""
    return label_of({"kind": plan.kind, "model": plan.model, "scoring": plan.scoring, "server": plan.server})


def with_other_judges(metrics: dict[str, Any], plan: JudgePlan, rows: list[dict[str, Any]],
                      prompts: list[dict[str, Any]], scores: dict[str, dict[str, Any]], eval_cfg: EvalConfig
                      ) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """metrics.json's `judges` (every judge that scored this run, each under its own name: a second judge adds, it
    never replaces) and `agreement` (emq.judge.agreement, between every pair of them on these answers), and each
    judge's answer table. The top-level metrics stay the judge that judged last."""
    judges = dict(metrics.get("judges") or {})
    judges[judge_label(plan)] = {"identity": plan.identity, "judge": metrics.get("judge"),
                                 "metrics": metrics.get("metrics"), "em": metrics.get("em")}
    tables = {}
    for label, j in judges.items():
        _, keys_of = judge_items(rows, prompts, j["identity"])
        tables[label] = answer_table(rows, keys_of, scores)
    return {"judges": judges,
            "agreement": pairwise(tables, eval_cfg.misaligned_below, eval_cfg.coherent_above) if len(judges) > 1
            else []}, tables


@dataclass(frozen=True)
class ToJudge:
    """One run dir to judge: its prompts, judge and eval config, and the metrics to add the judgements to."""

    run_dir: Path
    prompts: list[dict[str, Any]]
    cfg: JudgeConfig
    eval_cfg: EvalConfig
    metrics: dict[str, Any]
    data_dir: Path | str | None = None
    progress: Any = None  # an emq.records.Progress the judged counts go to (optional)
    headline: str | None = None  # a panel's first judge (judge_and_summarize)


def _needs_judge(run: ToJudge, plan: JudgePlan) -> bool:
    cache = open_cache(run.data_dir, run.cfg.cache)
    try:
        return needs_judge(run.run_dir, run.prompts, run.cfg, plan, cache, run.data_dir or run.run_dir)
    finally:
        if cache is not None:
            cache.close()


def judge_run_dirs(runs: list[ToJudge], plan: JudgePlan, server_log: Path, *,
                   shared: Callable[[float | None, int], dict[str, Any]], keep_going: bool = False
                   ) -> list[tuple[ToJudge, dict[str, Any], float]]:
    """Judge every run of `runs` through one opening of the judge `plan` (one local server for all of them): the
    judgements an earlier run of the list made of the same answers are borrowed, the rest asked for, and each run's
    metrics.json / judged.jsonl rewritten (`judge_and_summarize`) with `shared(start seconds, borrowed)` added to
    its judge record. judge=none still summarizes each run (nothing is scored).

    Args:
        keep_going: log a run that fails to judge and go on (it stays unjudged); else the error propagates.

    Returns:
        (run, its metrics, its seconds of judging) of every run judged.
    """
    t0 = time.perf_counter()
    needed = plan.judges and any(_needs_judge(r, plan) for r in runs)
    opened = endpoint(runs[0].cfg, plan, server_log) if needed else nullcontext(None)
    out: list[tuple[ToJudge, dict[str, Any], float]] = []
    with opened as at:
        started = round(time.perf_counter() - t0, 2) if at is not None else None
        for r in runs:
            s0 = time.perf_counter()
            try:
                borrowed = borrow_scores(r.run_dir, r.prompts, plan, [o[0].run_dir for o in out]) if at else 0
                metrics = judge_and_summarize(r.run_dir, r.prompts, r.cfg, r.eval_cfg, plan, r.metrics, r.progress,
                                              data_dir=r.data_dir, at=at, headline=r.headline)
                if at is not None:
                    extra = shared(started, borrowed)
                    own = (metrics.get("judges") or {}).get(judge_label(plan))
                    if own and own.get("judge") is not None:  # this judge's own record (a panel keeps each)
                        own["judge"].update(extra)
                    if r.headline in (None, judge_label(plan)):
                        metrics["judge"].update(extra)
                    write_json(r.run_dir / METRICS, metrics)
            except EmqError as e:
                if not keep_going:
                    raise
                log.error("judge: %s stays unjudged: %s (python -m emq judge %s)", r.run_dir, e, r.run_dir)
                continue
            out.append((r, metrics, round(time.perf_counter() - s0, 2)))
    return out
