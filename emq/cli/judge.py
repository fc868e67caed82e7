"""`python -m emq judge RUN_DIR [judge overrides]`: judge a finished run again without regenerating.

Composes the run's own config (.hydra/overrides.yaml) with the overrides on top (a new `judge=…` drops the
run's old `judge.*` overrides), judges what scores.jsonl lacks for that judge, and rewrites metrics.json and
judged.jsonl. E.g. `python -m emq judge RUN_DIR judge=openai judge.model=gpt-4o judge.api_key_env=OPENAI_API_KEY`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from emq import judge
from emq.demo import ensure_demo
from emq.errors import EmqError
from emq.evaluate import build_prompts
from emq.machine import snapshot
from emq.records import GENERATIONS, METRICS, PLAN, read_json
from emq.report.tables import judged_rows, summary_table

log = logging.getLogger(__name__)


def rejudge(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """Judge a finished run again with the judge `overrides` compose to (what is missing from scores.jsonl), then
    rewrite its metrics.json and judged.jsonl."""
    from emq.config import compose_from_run  # Hydra: only the config layer and the tools import it

    run_dir = Path(run_dir)
    if not (run_dir / GENERATIONS).is_file():
        raise EmqError(f"{run_dir} has no generations.jsonl", "pass the run dir of a run that reached evaluate")
    cfg = compose_from_run(run_dir, overrides)
    if cfg.judge.demo:
        ensure_demo(cfg.paths.data_dir)
    machine = snapshot(cfg.paths.cache_dir)
    plan = read_json(run_dir / PLAN).get("plan", {})
    engine = plan.get("engine", {})
    platform = plan.get("platform", machine.vllm.platform)
    judge_plan = judge.prepare(cfg.judge, platform=platform, dtype=judge.judge_dtype(platform, machine.cpu_bf16),
                               memory_utilization=engine.get("memory_utilization", cfg.memory.cpu_memory_utilization))
    prompts = build_prompts(cfg.eval)
    judge.check_prompts(prompts)
    metrics = judge.judge_and_summarize(run_dir, prompts, cfg.judge, cfg.eval, judge_plan,
                                        read_json(run_dir / METRICS))
    log.info("\n%s", summary_table(judged_rows(metrics), f"emq judge: {run_dir}"))
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Re-judge an existing run dir with the judge given by overrides, then rewrite its metrics."""
    parser = argparse.ArgumentParser(prog="python -m emq judge", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. judge=openai judge.model=gpt-4o")
    args = parser.parse_args(argv)
    try:
        rejudge(args.run_dir, args.overrides)
    except EmqError as e:
        log.error("%s", e)
        return 2
    return 0
