"""The named stages of a round, and the errors that stop one.

`checkpoint(stage)` marks each stage (`STAGES`, in order; "train" once per optimizer step). In
production nothing listens: tests add a hook to `CHECKPOINT_HOOKS` to stop a worker at a stage
and kill it (tests/align/pausing_worker.py), or to make a round fail mid-way.
"""

from __future__ import annotations

from typing import Callable

STAGES = ("claim", "reserve", "select_data", "stage", "train", "save", "evaluate", "commit", "register",
          "registering", "gate")
CHECKPOINT_HOOKS: list[Callable[[str], None]] = []


class RoundError(Exception):
    """A round cannot run or was stopped; the message says why and what to do."""


class RoundStopped(RoundError):
    """Training was stopped on purpose: cancelled by an admin, or the worker is shutting down."""

    def __init__(self, message: str, status: str = "failed"):
        super().__init__(message)
        self.status = status


def checkpoint(stage: str) -> None:
    """A named point of a round (`STAGES`, in order; "train" once per optimizer step). In
    production nothing listens. Tests add a hook to `CHECKPOINT_HOOKS` to stop a worker there
    and kill it (tests/align/pausing_worker.py), or to make a round fail mid-way: a test hook
    lives in the test, not in a round's configuration."""
    for hook in CHECKPOINT_HOOKS:
        hook(stage)
