"""Tasks of the shapes world as continual-learning tasks: colour, counting, spatial,
shape and size questions, each with its own training samples and a scored evaluation set.

`shapes_sequence` builds a sequence for `tailor_ui.training.continual.run_continual`:
by default colour questions → counting → spatial questions (which shape / colour is on the
left, right or in the middle).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tailor_ui.data import Example, write_examples
from tailor_ui.demo import world
from tailor_ui.errors import UserError
from tailor_ui.training.continual import ContinualTask

SHAPES_TASKS = ("colour", "count", "spatial", "shape", "size")
DEFAULT_SEQUENCE = ("colour", "count", "spatial")
TRAIN_STREAM, EVAL_STREAM = 10, 11  # away from the demo build's streams 0-2


def _question_pairs(task: str, scene: world.Scene) -> list[tuple[str, str]]:
    if task == "count":
        return world.count_pairs(scene)
    if task == "spatial":
        return world.spatial_pairs(scene)
    prefix = {"colour": "what colour", "shape": "what shape", "size": "what size"}[task]
    return [(q, a) for q, a in world.vqa_pairs(scene) if q.startswith(prefix)]


def shapes_samples(task: str, n: int, seed: int, stream: int) -> list[world.Sample]:
    """`n` question/answer samples of one continual task, drawn like `world.generate`."""
    if task not in SHAPES_TASKS:
        raise UserError(f"unknown shapes task {task!r}; expected one of {', '.join(SHAPES_TASKS)}")
    rng = np.random.default_rng([seed, stream, SHAPES_TASKS.index(task)])
    return [world.question_sample(rng, lambda scene: _question_pairs(task, scene))
            for _ in range(n)]


def _write_eval(folder: Path, name: str, samples: Sequence[world.Sample]) -> list[Example]:
    image_dir = folder / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(samples):
        path = image_dir / f"{i:04d}.png"
        sample.image.save(path)
        rows.append({"image": path.relative_to(folder).as_posix(), "question": sample.question,
                     "answers": list(sample.answers)})
    write_examples(folder / f"{name}_eval.jsonl", rows)
    return [Example(image=(folder / r["image"]).resolve(), question=r["question"],
                    answers=tuple(r["answers"])) for r in rows]


def shapes_sequence(folder: str | Path, tasks: Sequence[str] = DEFAULT_SEQUENCE, *,
                    n_train: int = 1000, n_eval: int = 100, seed: int = 0) -> list[ContinualTask]:
    """A continual sequence over the shapes world; evaluation sets are written to `folder`
    (JSONL + PNG, so `evaluate` and the CLI can read them), training samples stay in memory."""
    if len(set(tasks)) != len(tasks):
        raise UserError("a task may appear only once in a sequence")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [ContinualTask(name=t, train=shapes_samples(t, n_train, seed, TRAIN_STREAM),
                          eval=_write_eval(folder, t, shapes_samples(t, n_eval, seed, EVAL_STREAM)))
            for t in tasks]
