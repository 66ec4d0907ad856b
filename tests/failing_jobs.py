"""Job functions that fail in the ways a job in another process can: shared by the tests
of our worker processes and of ZeroGPU's."""

from __future__ import annotations

from tailor_ui.errors import UserError


class TwoArgs(Exception):
    """An exception pickle cannot rebuild (its __init__ needs two arguments)."""

    def __init__(self, what, why):
        super().__init__(f"{what} because {why}")


def fail_user(progress, should_stop):
    raise UserError("this pair has no built-in calibration set")


def fail_bug(progress, should_stop):
    return 1 / 0


def fail_unpicklable_error(progress, should_stop):
    raise TwoArgs("stopped", "of a test")
