"""`python -m emq report DIR [DIR …] [--out DIR] [--progress]`: the sweep report from run dirs alone.

Writes summary.csv, summary.md, report.html and the PNG plots into the sweep dir (the first DIR), or with
--progress prints where each run of a (running) sweep is and writes nothing. See emq.report.sweep.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emq.report.sweep import build, progress_table


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

