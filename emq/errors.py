"""The one error type users see: it names the file or key at fault and says the fix."""
from __future__ import annotations


class EmqError(Exception):
    """A problem with the user's input or machine, explained; never a bug in emq.

    Args:
        message: what is wrong, naming the file or config key.
        fix: what to do about it.
    """

    def __init__(self, message: str, fix: str | None = None):
        self.message = message
        self.fix = fix
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)


class PlanStop(EmqError):
    """The plan decided no route can run on this machine under this policy."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what `kill`, `timeout` and SLURM's time limit send), raised like Ctrl-C's KeyboardInterrupt so the
    run's one try/finally stops the engine and writes status.json "interrupted"."""
