"""How a long computation reports progress and learns that it should stop.

The lowest layer: the engine, the streaming merge, training, evaluation and the job
runner all speak these types, so none of them needs another's module for them.
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int], None]  # (what is happening, step done, steps in all)
StopCheck = Callable[[], bool]  # true once the user asked the running job to stop


class Cancelled(Exception):
    """The user asked the running job to stop."""


def no_progress(_what: str, _done: int, _total: int) -> None:
    """The progress callback of a caller that does not listen."""


def never_stop() -> bool:
    return False
