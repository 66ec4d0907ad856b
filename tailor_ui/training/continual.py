"""Continual instruction tuning: tasks one after another, accuracy on all of them after each.

`run_continual` trains a model on a sequence of tasks with plain sequential fine-tuning,
a fixed-β EMA, or LLaCA, and returns the accuracy table (METHODS.md §5):

- one row per stage: stage 0 is the model before any training, stage t the model after
  task t; one `acc:<task>` column per task (the task's primary metric);
- `average` at stage t: the mean accuracy over the tasks learnt so far (1..t); after the
  last task this is the headline "average accuracy";
- `forgetting` at stage t (t ≥ 2): the mean over the tasks learnt before t of
  (best accuracy at an earlier training stage 1..t−1 − accuracy at t); after the last task
  this is the headline "forgetting". Stage 0 (before training) is not an "earlier stage":
  forgetting counts what the sequence itself taught and then lost.

`shapes_sequence` builds a sequence from the demo's shapes world: colour questions →
counting → spatial questions (which shape / colour is on the left, right or in the middle),
each with its own training samples and a scored evaluation set written to disk.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from tailor_ui.calibration import Cancelled, StopCheck
from tailor_ui.data import Example, write_examples
from tailor_ui.demo import world
from tailor_ui.errors import UserError
from tailor_ui.evaluation.evaluate import Task, evaluate
from tailor_ui.training.finetune import finetune

Progress = Callable[[str, int, int], None]
CONTINUAL_METHODS = ("sequential", "ema", "llaca")
_FINETUNE_METHOD = {"sequential": "full", "ema": "ema", "llaca": "llaca"}


@dataclass(frozen=True)
class ContinualTask:
    """One task of a sequence: what to train on and how to score it."""

    name: str
    train: Sequence[Any]  # Example-like: .image (path or PIL image), .question, .answers
    eval: Sequence[Example]
    metric: Task = "vqa"


def acc_column(name: str) -> str:
    return f"acc:{name}"


# ------------------------------------------------------------------ shapes world

SHAPES_TASKS = ("colour", "count", "spatial", "shape", "size")
DEFAULT_SEQUENCE = ("colour", "count", "spatial")
TRAIN_STREAM, EVAL_STREAM = 10, 11  # away from the demo build's streams 0-2


def _positions(scene: world.Scene) -> list[tuple[str, world.Shape]]:
    shapes = scene.shapes
    if len(shapes) == 2:
        return [("on the left", shapes[0]), ("on the right", shapes[1])]
    return [("on the left", shapes[0]), ("in the middle", shapes[1]), ("on the right", shapes[2])]


def spatial_pairs(scene: world.Scene) -> list[tuple[str, str]]:
    """Which shape, or which colour, is on the left / in the middle / on the right (scenes of
    two or three shapes; the world places each shape in its own horizontal slot)."""
    if len(scene.shapes) < 2:
        return []
    pairs = []
    for where, s in _positions(scene):
        pairs.append((f"what shape is {where}?", s.kind))
        pairs.append((f"what colour is the shape {where}?", s.colour))
    return pairs


def _question_pairs(task: str, scene: world.Scene) -> list[tuple[str, str]]:
    if task == "count":
        return world.count_pairs(scene)
    if task == "spatial":
        return spatial_pairs(scene)
    prefix = {"colour": "what colour", "shape": "what shape", "size": "what size"}[task]
    return [(q, a) for q, a in world.vqa_pairs(scene) if q.startswith(prefix)]


def shapes_samples(task: str, n: int, seed: int, stream: int) -> list[world.Sample]:
    """`n` question/answer samples of one continual task, drawn like `world.generate`."""
    if task not in SHAPES_TASKS:
        raise UserError(f"unknown shapes task {task!r}; expected one of {', '.join(SHAPES_TASKS)}")
    rng = np.random.default_rng([seed, stream, SHAPES_TASKS.index(task)])
    out = []
    while len(out) < n:
        scene = world.make_scene(rng)
        pairs = _question_pairs(task, scene)
        if not pairs:
            continue  # e.g. spatial questions need two shapes or more
        image = world.render(scene, rng)
        question, answer = pairs[int(rng.integers(len(pairs)))]
        out.append(world.Sample(image, question, (answer,) * world.VQA_ANSWER_COPIES, scene))
    return out


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


# ------------------------------------------------------------------ the run

def continual_metrics(table: pd.DataFrame, tasks: Sequence[str]) -> tuple[list[float], list[float]]:
    """`average` and `forgetting` of every row of a stage table (see the module docstring)."""
    acc = table[[acc_column(t) for t in tasks]].to_numpy(dtype=float)
    stages = table["stage"].to_numpy()
    averages, forgetting = [], []
    for row, t in enumerate(stages):
        if t < 1:
            averages.append(math.nan)
            forgetting.append(math.nan)
            continue
        averages.append(float(acc[row, :t].mean()))
        if t < 2:
            forgetting.append(math.nan)
            continue
        earlier = [r for r, s in enumerate(stages) if 1 <= s < t]
        drops = [max(acc[r, j] for r in earlier) - acc[row, j] for j in range(t - 1)]
        forgetting.append(float(np.mean(drops)))
    return averages, forgetting


def summary(table: pd.DataFrame) -> dict[str, float]:
    """The headline numbers: average accuracy and forgetting after the last task."""
    last = table[table["stage"] == table["stage"].max()].iloc[0]
    return {"average": float(last["average"]), "forgetting": float(last["forgetting"])}


def _evaluate_all(model, processor, tasks: Sequence[ContinualTask], batch_size: int,
                  max_new_tokens: int, should_stop: StopCheck) -> dict[str, float]:
    out = {}
    for task in tasks:
        if should_stop():
            raise Cancelled
        result = evaluate(model, processor, task.eval, task.metric, batch_size=batch_size,
                          max_new_tokens=max_new_tokens)
        out[acc_column(task.name)] = result.score
    return out


def run_continual(model: torch.nn.Module, processor: Any, tasks: Sequence[ContinualTask],
                  method: str = "llaca", *, eval_batch_size: int = 32, max_new_tokens: int = 8,
                  progress: Progress | None = None, should_stop: StopCheck | None = None,
                  **finetune_options: Any) -> pd.DataFrame:
    """Train `model` in place on `tasks` in order and score every task after each stage.

    `method`: "sequential" (plain full fine-tuning of the chosen layers), "ema" (fixed-β
    EMA; `ema_beta`) or "llaca" (`llaca_form` "code" or "paper"). Other keywords go to
    `finetune` for every task (layers, lr, epochs, batch_size, seed, ...); task k uses
    seed + k so tasks do not share a shuffle. Columns: stage, after, method, acc:<task>…,
    average, forgetting, train_seconds, final_loss, and for the EMA methods the mean weight
    the live weights got per update (`ema_live_weight`) and the share of updates that took
    the fallback (`ema_fallback`).
    """
    if method not in CONTINUAL_METHODS:
        raise UserError(f"unknown continual method {method!r} (choose from {', '.join(CONTINUAL_METHODS)})")
    if not tasks:
        raise UserError("a continual run needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError("task names must be unique")
    for key in ("method", "progress", "should_stop"):
        finetune_options.pop(key, None)
    report = progress or (lambda *_: None)
    stop = should_stop or (lambda: False)
    seed = int(finetune_options.pop("seed", 0))
    total = len(tasks) + 1
    rows = [{"stage": 0, "after": "base", "method": method, "train_seconds": 0.0,
             "final_loss": math.nan, "ema_live_weight": math.nan, "ema_fallback": math.nan}]
    report("evaluating before training", 0, total)
    rows[0].update(_evaluate_all(model, processor, tasks, eval_batch_size, max_new_tokens, stop))
    for k, task in enumerate(tasks, start=1):
        def step(stage: str, done: int, steps: int, _k: int = k, _name: str = task.name) -> None:
            report(f"task {_k}/{len(tasks)} ({_name}): {stage}", _k, total)

        start = time.perf_counter()
        result = finetune(model, processor, task.train, method=_FINETUNE_METHOD[method],
                          seed=seed + k - 1, progress=step, should_stop=stop, **finetune_options)
        seconds = time.perf_counter() - start
        report(f"evaluating after {task.name}", k, total)
        ema = result.extra.get("ema", {})
        row = {"stage": k, "after": task.name, "method": method, "train_seconds": seconds,
               "final_loss": result.epoch_losses[-1],
               "ema_live_weight": ema.get("mean_live_weight", math.nan),
               "ema_fallback": ema.get("fallback_fraction", math.nan)}
        row.update(_evaluate_all(model, processor, tasks, eval_batch_size, max_new_tokens, stop))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["average"], table["forgetting"] = continual_metrics(table, names)
    order = ["stage", "after", "method", *[acc_column(n) for n in names], "average", "forgetting",
             "train_seconds", "final_loss", "ema_live_weight", "ema_fallback"]
    return table[order]
