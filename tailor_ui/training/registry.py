"""Every fine-tuning method by name: `finetune`, the CLI's `finetune --method` and the
dashboard read this one table. A new method is a `TrainingMethod` subclass in its own
module plus one line here.
"""

from __future__ import annotations

from typing import Any

from tailor_ui.training.dowser import DowserTraining
from tailor_ui.training.llaca import EMATraining, LLaCATraining
from tailor_ui.training.method import TrainingMethod
from tailor_ui.training.random_mask import RandomMaskTraining

TRAINING_METHODS: dict[str, type[TrainingMethod]] = {
    "full": TrainingMethod,
    "dowser": DowserTraining,
    "random_mask": RandomMaskTraining,
    "llaca": LLaCATraining,
    "ema": EMATraining,
}
METHODS = TRAINING_METHODS.keys()  # a live view: a method registered later shows up here too


def accepted_options() -> dict[str, Any]:
    """Every registered method's options with their defaults (what `finetune` accepts)."""
    return {k: v for cls in TRAINING_METHODS.values() for k, v in cls.options.items()}


def unread_options(method: str, options: dict[str, Any]) -> list[str]:
    """The given options that `method` does not own (another method's)."""
    return [name for name in options if name not in TRAINING_METHODS[method].options]


def option_problems(options: dict[str, Any]) -> list[str]:
    """Each method checks the given options it owns; a problem is listed once."""
    problems = [problem for cls in TRAINING_METHODS.values()
                for problem in cls.problems({k: v for k, v in options.items() if k in cls.options})]
    return list(dict.fromkeys(problems))
