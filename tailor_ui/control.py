"""How a long computation reports progress and learns that it should stop.

The lowest layer: the engine, the streaming merge, training, evaluation and the job
runner all speak these types, so none of them needs another's module for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

Progress = Callable[[str, int, int], None]  # (what is happening, step done, steps in all)
StopCheck = Callable[[], bool]  # true once the user asked the running job to stop


class Cancelled(Exception):
    """The user asked the running job to stop."""


def no_progress(_what: str, _done: int, _total: int) -> None:
    """The progress callback of a caller that does not listen."""


def never_stop() -> bool:
    return False


SCALE = 1000  # the steps of an overall fraction (a per mille: finer than any bar shows)


def forward_only(progress: Progress) -> Progress:
    """`progress` that never moves back: a stage whose own count starts again (the quick
    check after a merge, the next setting of a sweep) keeps the fraction reached so far,
    as `SCALE` steps, and its text says what runs now."""
    reached = 0.0

    def report(what: str, done: int, total: int) -> None:
        nonlocal reached
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        if fraction >= reached:
            reached = fraction
            progress(what, done, total)
        else:
            progress(what, math.ceil(SCALE * reached), SCALE)

    return report


class Stages:
    """One overall fraction for a job made of stages: stage i's own (done, total) fills its
    share `shares[i]` of the bar, the overall never moves back, and the stage's own progress
    goes in the text."""

    def __init__(self, progress: Progress, shares: Sequence[float]) -> None:
        whole = float(sum(shares)) or 1.0
        self.starts = [sum(shares[:i]) / whole for i in range(len(shares) + 1)]
        self.progress = forward_only(progress)

    def stage(self, index: int, prefix: str = "") -> Progress:
        start, end = self.starts[index], self.starts[index + 1]

        def report(what: str, done: int, total: int) -> None:
            own = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
            text = f"{prefix}{what}" + (f" ({100 * own:.0f}% of this step)" if total > 1 else "")
            self.progress(text, round(SCALE * (start + (end - start) * own)), SCALE)

        return report
