"""The interface every fine-tuning method implements, and `full`, the method that adds nothing.

A method is a class: `options` names the keyword options it owns (with their defaults),
`option_help` says what they mean, `problems` checks them, `label` and `about` name and describe it for menus, and an
instance made with the options hooks into one run — `prepare` before the loop, the
`LoopHooks` inside it, `finish` after it — and says what it did (`settings`,
`trainable_entries`, `extra`). `finetune` does everything else: it picks the trained
tensors, seeds, runs the one loop and writes the report. Registering a method is one line
in `tailor_ui.training.registry`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tailor_ui.control import Progress, StopCheck
from tailor_ui.training.loop import LoopHooks


@dataclass
class RunSetup:
    """What a method may look at while it prepares a run (before any step)."""

    model: torch.nn.Module
    processor: Any
    names: list[str]  # the parameters that train, in model order
    seed: int
    progress: Progress
    should_stop: StopCheck | None


class TrainingMethod(LoopHooks):
    """Full fine-tuning: every entry of the chosen tensors trains. Subclasses add to it."""

    label: ClassVar[str] = "Full fine-tuning"  # what a menu calls it
    short: ClassVar[str] = "full-ft"  # its rows' method in a forgetting table
    about: ClassVar[str] = "every entry of the trained layers moves."  # one line for the user
    options: ClassVar[dict[str, Any]] = {}  # the keyword options this method owns → defaults
    # what each option means, for the CLI's flags (an option without one has no flag)
    option_help: ClassVar[dict[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        self.values = {**self.options, **{k: v for k, v in options.items() if k in self.options}}

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        """What is wrong with the given options (only those this method owns are given)."""
        return []

    def settings(self) -> dict[str, Any]:
        """What the training report records about this method's options."""
        return {}

    def prepare(self, setup: RunSetup) -> None:
        """Runs once before training (model weights still untouched)."""

    def finish(self) -> None:
        """Runs after the last step of a run that was not cancelled."""

    def trainable_entries(self, name: str, param: torch.nn.Parameter) -> int:
        """How many entries of a trained tensor are allowed to change."""
        return param.numel()

    def extra(self) -> dict[str, Any]:
        """Method-specific numbers for the report's `extra`."""
        return {}
