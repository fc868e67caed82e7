"""`python -m emq report DIR [DIR …] [--out DIR] [--progress]`: the sweep report from run dirs alone.

Writes summary.csv, summary.md, report.html and the PNG plots into the sweep dir (the first DIR), or with
--progress prints where each run of a (running) sweep is and writes nothing. See emq.report.sweep.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emq.report.sweep import build, find_runs, progress_table

log = logging.getLogger(__name__)

try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra is a dependency; the report itself does not need it
    _Callback = object


class SweepCallback(_Callback):
    """Hydra callback, after a multirun: judge the runs that deferred judging to the sweep (one judge server for
    all of them, emq.cli.judge.judge_deferred), then write the report into the sweep dir and print summary.md."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from emq.cli.judge import judge_deferred

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            judge_deferred(find_runs([sweep_dir]))
        except Exception as e:  # noqa: BLE001 - the answers stay; `python -m emq judge RUN_DIR` judges them later
            log.error("emq judge: judging the sweep's runs failed: %s (judge each: python -m emq judge RUN_DIR)", e)
        try:
            report = build([sweep_dir])
        except Exception as e:  # noqa: BLE001 - the runs' own records stay; the report can be rebuilt
            log.error("emq report: could not build the report for %s: %s (rebuild: python -m emq report %s)",
                      sweep_dir, e, sweep_dir)
            return
        log.info("\n%s\nreport: %s", (sweep_dir / "summary.md").read_text(), report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emq report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="a sweep dir, a run dir, or several run dirs")
    parser.add_argument("--out", type=Path, help="where to write (default: the first dir)")
    parser.add_argument("--progress", action="store_true", help="print where each run is, write nothing")
    args = parser.parse_args(argv)
    try:
        if args.progress:
            print(progress_table(args.dirs))
            return 0
        report = build(args.dirs, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((report.parent / "summary.md").read_text())
    print(f"report: {report}")
    return 0

