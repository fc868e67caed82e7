"""`python -m emq compare RUN_A RUN_B [RUN_C ...]`: fidelity of B (and C, ...) with run A as the reference.

Every run stores its teacher-forced top-k logprobs on the fidelity corpus (fidelity_logprobs.npz),
so any two runs of models sharing a tokenizer compare after the fact, without loading a model.
`--reference` compares each run against the trained function it was scored against instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from rich.table import Table

from emq.errors import EmqError
from emq.fidelity import TopK, compare
from emq.records import FIDELITY, FIDELITY_LOGPROBS, METRICS, read_json
from emq.report.tables import render

log = logging.getLogger(__name__)
COLUMNS = [("kl_mean", "KL mean"), ("kl_p99", "KL p99"), ("top1_agreement", "top-1 agree"),
           ("ppl_ratio", "PPL ratio"), ("ref_top1_outside_topk", "ref top-1 ∉ top-k"), ("positions", "positions")]


def _load(run: Path) -> TopK:
    path = run / FIDELITY_LOGPROBS if run.is_dir() else run
    if not path.is_file():
        raise EmqError(f"{path} does not exist: that run stored no fidelity logprobs",
                       "pass run dirs made with eval.fidelity.enabled=true (the default)")
    return TopK.load(path)


def _name(run: Path) -> str:
    m = read_json(run / METRICS)
    if m:
        return f"{m.get('model')} {m.get('route')} quant={m.get('quant')}  ({run.name})"
    return str(run)


def table(rows: list[tuple[str, dict]], title: str) -> str:
    t = Table(title=title)
    t.add_column("variant", overflow="fold")
    for _, head in COLUMNS:
        t.add_column(head, justify="right")
    for name, r in rows:
        t.add_row(name, *(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k, _ in COLUMNS))
    return render(t)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emq compare", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run dirs (or fidelity_logprobs.npz files)")
    parser.add_argument("--reference", action="store_true",
                        help="compare each run with the cached trained-function reference it was scored against")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.reference:
            rows = []
            for run in args.runs:
                rec = read_json(run / FIDELITY)
                ref_path = (rec.get("reference") or {}).get("path")
                if not ref_path or not Path(ref_path).is_file():
                    raise EmqError(f"{run}: no cached reference recorded in fidelity.json",
                                   "rerun with eval.fidelity.reference=true")
                rows.append((_name(run), compare(TopK.load(Path(ref_path)), _load(run))))
            title = "fidelity vs the trained function"
        else:
            if len(args.runs) < 2:
                raise EmqError("give at least two runs: the reference first", "python -m emq compare RUN_A RUN_B")
            ref = _load(args.runs[0])
            rows = [(_name(r), compare(ref, _load(r))) for r in args.runs[1:]]
            title = f"fidelity vs {_name(args.runs[0])}"
    except EmqError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({name: r for name, r in rows}, indent=2))
    else:
        print(table(rows, title))
    return 0
