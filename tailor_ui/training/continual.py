"""Continual instruction tuning: tasks one after another, accuracy on all of them after each.

`run_continual` trains a model on a sequence of tasks with plain sequential fine-tuning,
a fixed-β EMA, or LLaCA, and returns the accuracy table (docs/methods.md#metrics):

- one row per stage: stage 0 is the model before any training, stage t the model after
  task t; one `acc:<task>` column per task (the task's primary metric);
- `average` at stage t: the mean accuracy over the tasks learnt so far (1..t); after the
  last task this is the headline "average accuracy";
- `forgetting` at stage t (t ≥ 2): the mean over the tasks learnt before t of
  (best accuracy at an earlier training stage 1..t−1 − accuracy at t); after the last task
  this is the headline "forgetting". Stage 0 (before training) is not an "earlier stage":
  forgetting counts what the sequence itself taught and then lost.

`tailor_ui.demo.tasks.shapes_sequence` builds such a sequence from the demo's shapes world.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import pandas as pd
import torch

from tailor_ui.control import Progress, StopCheck, never_stop, no_progress
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.evaluation.evaluate import EvalSet, Task, evaluate_all
from tailor_ui.training.finetune import finetune

class ContinualMethod(StrEnum):
    """The fine-tuning methods a continual run trains with, by their fine-tuning names
    (sparse masks have no continual form here)."""

    FULL = "full"  # plain full fine-tuning of the chosen layers, task after task
    EMA = "ema"  # fixed-β EMA (`ema_beta`)
    LLACA = "llaca"  # LLaCA (`llaca_form`)

    @classmethod
    def of(cls, method: str) -> ContinualMethod:
        """The member named `method`; a `UserError` where there is none."""
        if method not in set(cls):
            raise UserError(f"a continual run trains with {', '.join(cls)}, not {method!r}")
        return cls(method)


# the stage table's EMA columns -> the key of the tracker's report they come from
EMA_COLUMNS = {"ema_live_weight": "mean_live_weight", "ema_adaptive_weight": "mean_adaptive_weight",
               "ema_fallback": "fallback_fraction", "ema_lag": "lag_ratio"}


@dataclass(frozen=True)
class ContinualTask:
    """One task of a sequence: what to train on and how to score it."""

    name: str
    train: Sequence[Any]  # Example-like: .image (path or PIL image), .question, .answers
    eval: Sequence[Example]
    metric: Task = "vqa"


def acc_column(name: str) -> str:
    return f"acc:{name}"


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
    sets = [EvalSet(t.name, t.metric, t.eval, max_new_tokens) for t in tasks]
    results = evaluate_all(model, processor, sets, batch_size=batch_size, should_stop=should_stop)
    return {acc_column(name): result.score for name, result in results.items()}


def run_continual(model: torch.nn.Module, processor: Any, tasks: Sequence[ContinualTask],
                  method: ContinualMethod | str = ContinualMethod.LLACA, *, eval_batch_size: int = 32, max_new_tokens: int = 8,
                  progress: Progress | None = None, should_stop: StopCheck | None = None,
                  **finetune_options: Any) -> pd.DataFrame:
    """Train `model` in place on `tasks` in order and score every task after each stage.

    `method`: a `ContinualMethod` (or its word). Other keywords go to
    `finetune` for every task (layers, lr, epochs, batch_size, seed, ...); task k uses
    seed + k so tasks do not share a shuffle. Columns: stage, after, method, acc:<task>…,
    average, forgetting, train_seconds, final_loss, and for the EMA methods the mean weight
    the live weights got per update (`ema_live_weight`), the mean of those that were not the
    fallback (`ema_adaptive_weight`), the share of updates that took the fallback
    (`ema_fallback`) and, at the end of the task, how far the EMA trailed the live weights
    (`ema_lag`: ‖θ − θ*‖ / ‖θ − θ₀‖, θ₀ the weights the task started from).
    """
    method = ContinualMethod.of(method)
    if not tasks:
        raise UserError("a continual run needs at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError("task names must be unique")
    for key in ("method", "progress", "should_stop"):
        finetune_options.pop(key, None)
    report = progress or no_progress
    stop = should_stop or never_stop
    seed = int(finetune_options.pop("seed", 0))
    total = len(tasks) + 1
    rows = [{"stage": 0, "after": "base", "method": str(method), "train_seconds": 0.0,
             "final_loss": math.nan, **{c: math.nan for c in EMA_COLUMNS}}]
    report("evaluating before training", 0, total)
    rows[0].update(_evaluate_all(model, processor, tasks, eval_batch_size, max_new_tokens, stop))
    for k, task in enumerate(tasks, start=1):
        def step(stage: str, done: int, steps: int, _k: int = k, _name: str = task.name) -> None:
            report(f"task {_k}/{len(tasks)} ({_name}): {stage}", _k, total)

        start = time.perf_counter()
        result = finetune(model, processor, task.train, method=str(method),
                          seed=seed + k - 1, progress=step, should_stop=stop, **finetune_options)
        seconds = time.perf_counter() - start
        report(f"evaluating after {task.name}", k, total)
        ema = result.extra.get("ema", {})
        row = {"stage": k, "after": task.name, "method": str(method), "train_seconds": seconds,
               "final_loss": result.epoch_losses[-1],
               **{c: ema.get(key, math.nan) for c, key in EMA_COLUMNS.items()}}
        row.update(_evaluate_all(model, processor, tasks, eval_batch_size, max_new_tokens, stop))
        rows.append(row)
    table = pd.DataFrame(rows)
    table["average"], table["forgetting"] = continual_metrics(table, names)
    order = ["stage", "after", "method", *[acc_column(n) for n in names], "average", "forgetting",
             "train_seconds", "final_loss", *EMA_COLUMNS]
    return table[order]
