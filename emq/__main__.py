"""`python -m emq [overrides]`: compose the config, hand the typed run object to the runner.
`python -m emq <tool> …`: one of the tools in emq/cli (cache, check, compare, judge, report, rerun, resources).
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path


def _on_sigterm(signum: int, _frame) -> None:
    from emq.errors import Interrupted

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Interrupted(signal.Signals(signum).name)


def check_output_dirs(args: list[str]) -> None:
    """hydra.run.dir / hydra.sweep.dir / EMQ_OUTPUTS must be makeable: one clear error here, not Hydra's traceback
    after it composed the config."""
    import os

    from emq.errors import EmqError
    from emq.records import unwritable

    wanted = [(a.split("=", 1)[0].lstrip("+"), a.split("=", 1)[1]) for a in args
              if a.lstrip("+").startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    if os.environ.get("EMQ_OUTPUTS"):
        wanted.append(("EMQ_OUTPUTS", os.environ["EMQ_OUTPUTS"]))
    for key, value in wanted:
        why = unwritable(Path(value.split("${")[0] or ".").expanduser().absolute())
        if why:
            raise EmqError(f"{key}={value}: {why}", f"point {key} at a writable directory")


def run_main() -> None:
    """The Hydra run: compose, convert to the typed run object, run, exit 2 when the run did not finish."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig

    from emq.config import CONF_DIR, resolve_judge_scope, to_run_config
    from emq.errors import EmqError

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def main(cfg: DictConfig) -> None:
        from emq.runner import run

        hc = HydraConfig.get()
        try:
            run_cfg = resolve_judge_scope(to_run_config(cfg, list(hc.overrides.task)), hc.mode == RunMode.MULTIRUN,
                                          str(hc.launcher.get("_target_", "")))
        except EmqError as e:  # a value no run can use: the same one message as any other bad input
            from emq.report.tables import summary_table

            rows = [("error", e.message)] + ([("fix", e.fix)] if e.fix else [])
            print(summary_table(rows, "emq: the config cannot run"), file=sys.stderr)
            sys.exit(2)
        signal.signal(signal.SIGTERM, _on_sigterm)
        try:
            status = run(run_cfg, Path(hc.runtime.output_dir))
        except KeyboardInterrupt as e:  # the runner stopped the engine and wrote status.json "interrupted"
            sys.exit(128 + (signal.SIGTERM if e.args and e.args[0] == "SIGTERM" else signal.SIGINT))
        if status.status != "ok" and hc.mode == RunMode.RUN:
            sys.exit(2)

    try:
        check_output_dirs(sys.argv[1:])
    except EmqError as e:
        from emq.report.tables import summary_table

        print(summary_table([("error", e.message), ("fix", e.fix or "")], "emq: the run dir cannot be made"),
              file=sys.stderr)
        sys.exit(2)
    main()


def entry() -> None:
    """`python -m emq …` and the `emq` console script."""
    from emq.cli import TOOLS, main, usage

    args = sys.argv[1:]
    if args and args[0] in TOOLS:
        sys.exit(main(args[0], args[1:]))
    if args and args[0] in ("-h", "--help"):
        print(usage())  # a CLI's output, not a log; Hydra's help (the config groups) follows
    run_main()


if __name__ == "__main__":  # vLLM spawns workers that re-import this module
    entry()
