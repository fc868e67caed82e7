"""emq's command-line tools: `python -m emq <tool> …` (or the `emq` console script).

`python -m emq [overrides…]` is the run itself (Hydra); a first argument that names a tool runs the tool
instead. Each tool is a module here with `main(argv) -> int`; the modules import what they need only when
called, so `python -m emq --help` stays fast.
"""
from __future__ import annotations

import importlib
import logging

TOOLS = {
    "cache": "the checkpoint cache: ls, du, rm, verify",
    "check": "can this installation run this config? (torch, vLLM + quant, bitsandbytes, model refs)",
    "compare": "fidelity of runs against a reference run, from their stored logprobs",
    "judge": "judge a finished run again (another judge, or what is missing) and rewrite its metrics",
    "report": "the sweep report (summary.csv/md, report.html, plots) from run dirs; --progress",
    "rerun": "run a run again from its directory alone, into a new dir",
    "resources": "this machine's GPUs, RAM, disk, what vLLM/bitsandbytes can do, the memory preset to use",
}


def usage() -> str:
    width = max(map(len, TOOLS))
    return ("usage: python -m emq [overrides…]          run (Hydra: model=… memory=… quant=… eval=… judge=…)\n"
            "       python -m emq <tool> [args…]        a tool:\n"
            + "".join(f"         {name:<{width}}  {what}\n" for name, what in TOOLS.items()))


def main(tool: str, argv: list[str]) -> int:
    """Run `tool` with `argv` (what follows the tool's name)."""
    if tool not in TOOLS:
        raise SystemExit(f"unknown tool {tool!r}\n{usage()}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    return importlib.import_module(f"emq.cli.{tool}").main(argv)
