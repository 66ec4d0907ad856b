"""Every model of a pair answering the same prompts: the pre-trained and fine-tuned
models and merges written into the base one at a time (the CLI's `compare` and the
dashboard's Compare tab)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from functools import partial
from typing import TYPE_CHECKING, Any

from tailor_ui.control import Progress

if TYPE_CHECKING:
    from tailor_ui.pair import Pair
    from tailor_ui.patch import Patch


def model_answers(pair: Pair, merges: Sequence[tuple[str, Patch]], prompts: Sequence[tuple[Any, str]],
                  max_new_tokens: int, progress: Progress, *, lock: Any = None) -> list[list[tuple[str, str]]]:
    """For each (image, question) prompt, (model label, answer) of the base, each fine-tuned
    model and each merge (written into the base in place, one at a time, under `lock`).
    Model by model, so each merge is written once for all prompts."""
    from tailor_ui.evaluation.generate import answer_one
    from tailor_ui.patch import applied

    # each model as a context to answer in: a fine-tuned model read lazily is the base
    # holding its values, a merge the base with its patch written in
    models = [("Pre-trained", partial(nullcontext, pair.base))]
    models += [("Fine-tuned" if len(pair.finetuned) == 1 else f"Fine-tuned {pair.finetuned_ids[k]}",
                partial(pair.finetuned_model, k)) for k in range(len(pair.finetuned))]
    models += [(label, partial(applied, pair.base, patch)) for label, patch in merges]
    total = len(models)
    out: list[list[tuple[str, str]]] = [[] for _ in prompts]

    def answer_all(name: str, model) -> None:
        for row, (image, question) in zip(out, prompts):
            row.append((name, answer_one(model, pair.processor, image, question, max_new_tokens)))

    with lock if lock is not None else nullcontext():  # merges are written into the shared base
        for i, (name, model) in enumerate(models):
            progress(f"answering with {'the pre-trained model' if i == 0 else name}", i, total)
            with model() as answering:
                answer_all(name, answering)
    return out
