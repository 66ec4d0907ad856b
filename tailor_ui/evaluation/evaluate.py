"""Score a model on a captioning or VQA set: generate, then apply the task's metrics.

`score_predictions` is separate from `evaluate` so that saved predictions can be rescored
(and tested) without a model.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from tailor_ui.control import Cancelled, StopCheck, never_stop
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.evaluation.generate import generate_answers
from tailor_ui.evaluation.metrics import bleu4, cider_d_per_example, vqa_accuracy
from tailor_ui.io import atomic_path

Task = Literal["caption", "vqa"]
TASKS: tuple[Task, ...] = ("caption", "vqa")
PRIMARY_METRIC: dict[Task, str] = {"caption": "cider_d", "vqa": "vqa_accuracy"}


@dataclass(frozen=True)
class EvalSet:
    """A named evaluation set and how to score it (a counting set is scored as "vqa")."""

    name: str
    task: Task
    examples: Sequence[Example]
    max_new_tokens: int = 32


def task_of(examples: Sequence[Example]) -> Task:
    """How a set without a stated task is scored: no question means captioning (as in the
    data format), else VQA."""
    return "caption" if all(not ex.question for ex in examples) else "vqa"


@dataclass(frozen=True)
class EvalResult:
    """One model on one data set.

    `score` is the task's primary metric (`metric` names it): CIDEr-D on coco-caption's
    scale (about 1 for a good captioner) or VQA accuracy as a fraction. `per_example` holds
    that metric for each example, in order, so the worst answers can be shown.
    """

    task: Task
    metric: str
    score: float
    metrics: dict[str, float]
    n: int
    predictions: list[str]
    per_example: list[float]
    seconds: float


def _references(examples: Sequence[Example], task: Task) -> list[list[str]]:
    """Reference answers per example, refusing a set that cannot be scored."""
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if not examples:
        raise UserError("the evaluation set is empty")
    for i, ex in enumerate(examples):
        if not ex.answers:
            raise UserError(f"evaluation example {i + 1} ({ex.image.name}) has no reference "
                            "answers; every evaluation example needs at least one")
    return [list(ex.answers) for ex in examples]


def score_predictions(predictions: Sequence[str], examples: Sequence[Example], task: Task
                      ) -> tuple[dict[str, float], list[float]]:
    """The task's metrics for these predictions, and the primary metric per example."""
    references = _references(examples, task)
    if task == "caption":
        per_example = cider_d_per_example(predictions, references)
        metrics = {"cider_d": sum(per_example) / len(per_example),
                   "bleu4": bleu4(predictions, references)}
    else:
        per_example = [vqa_accuracy(p, refs)
                       for p, refs in zip(predictions, references, strict=True)]
        metrics = {"vqa_accuracy": sum(per_example) / len(per_example)}
    return metrics, per_example


@dataclass(frozen=True)
class MajorityBaseline:
    """What a model that always gives one answer scores: the set's most common reference
    answer, the fraction of examples that accept it, and the score of always answering it."""

    answer: str
    share: float
    score: float


def majority_baseline(examples: Sequence[Example], task: Task) -> MajorityBaseline:
    """The floor a skill must beat: always answering the set's most common answer.

    Each example counts once per distinct reference answer; ties go to the answer seen first.
    """
    _references(examples, task)
    counts = Counter(answer for ex in examples for answer in dict.fromkeys(ex.answers))
    answer, n = counts.most_common(1)[0]
    metrics, _ = score_predictions([answer] * len(examples), examples, task)
    return MajorityBaseline(answer=answer, share=n / len(examples),
                            score=metrics[PRIMARY_METRIC[task]])


def evaluate(model, processor, examples: Sequence[Example], task: Task, *,
             batch_size: int = 16, max_new_tokens: int = 32, progress: bool = False
             ) -> EvalResult:
    """Greedy-generate an answer for every example and score them for `task`."""
    _references(examples, task)  # refuse an unscorable set before the expensive part
    start = time.perf_counter()
    predictions = generate_answers(model, processor, examples, batch_size=batch_size,
                                   max_new_tokens=max_new_tokens, progress=progress)
    metrics, per_example = score_predictions(predictions, examples, task)
    primary = PRIMARY_METRIC[task]
    return EvalResult(task=task, metric=primary, score=metrics[primary], metrics=metrics,
                      n=len(examples), predictions=predictions, per_example=per_example,
                      seconds=time.perf_counter() - start)


def evaluate_all(model, processor, sets: Sequence[EvalSet], *, batch_size: int = 16,
                 before_each: Callable[[EvalSet], None] | None = None,
                 should_stop: StopCheck | None = None) -> dict[str, EvalResult]:
    """The model on every set, by set name; `before_each` hears of each set as it starts
    (progress), and a stop request is honoured between sets."""
    stop = should_stop or never_stop
    results = {}
    for s in sets:
        if stop():
            raise Cancelled
        if before_each is not None:
            before_each(s)
        results[s.name] = evaluate(model, processor, s.examples, s.task, batch_size=batch_size,
                                   max_new_tokens=s.max_new_tokens)
    return results


def save_result(result: EvalResult, path: str | Path) -> None:
    """Write the result as JSON, renamed into place only once complete."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=2), encoding="utf-8")
