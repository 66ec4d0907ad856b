"""Every merge method by name. Adding one: a module with its math and its `Method`, and
one line here; nothing else in the program names methods."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tailor_ui.methods import baselines, breadcrumbs, della
from tailor_ui.methods.tailor_run import run_tailor
from tailor_ui.methods.method import Knobs, Method, task_vectors


def _magnitude(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    # a tensor with no place in a model-wide ranking (no Hessian) is ranked alone
    scope = "tensor" if s.scope == "global" else s.scope
    return baselines.magnitude(base, tuned[0], s.keep, scope, s.block_size)


def _wise_ft(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    return baselines.wise_ft(base, task_vectors(base, tuned)[0], s.effective_lambda)


def _task_arithmetic(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    return baselines.task_arithmetic(base, task_vectors(base, tuned), s.effective_lambda)


def _ties(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    return baselines.ties(base, task_vectors(base, tuned), s.keep, s.effective_lambda)


def _ties_chunks(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs,
                 step: int) -> Iterator[torch.Tensor]:
    return baselines.ties_chunks(base, tuned, s.keep, s.effective_lambda, step)


def _dare_chunks(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs,
                 step: int) -> Iterator[torch.Tensor]:
    return baselines.dare_chunks(base, tuned[0], s.effective_drop, s.seed, name, step)


def _dare(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    return baselines.dare(base, task_vectors(base, tuned)[0], s.effective_drop, s.seed, name)


_TAILOR_KNOBS = ("keep", "alpha", "scope", "compensate", "compensation", "anchor_weight", "order",
                 "budget", "sign", "sensitivity", "hessians", "damp", "block_size")

REGISTRY: dict[str, Method] = {
    # tensors without a Hessian (others merged "like linears") take the magnitude patch
    "tailor": Method("Model Tailor", "salience + sensitivity patch, OBS-compensated", _magnitude,
                     knobs=_TAILOR_KNOBS, sweep=("alpha", "keep"), needs_calibration=True,
                     temporaries=4, run=run_tailor),
    "magnitude": Method("Magnitude patch", "top-keep of |W_ft - W_pre|, no compensation", _magnitude,
                        knobs=("keep", "scope", "block_size"), temporaries=4),
    "wise_ft": Method("WiSE-FT", "(1 - λ)·W_pre + λ·W_ft", _wise_ft, knobs=("lam",),
                      defaults={"lam": 0.5}, sweep=("lam",), elementwise=True),
    "task_arithmetic": Method("Task arithmetic", "W_pre + λ·Σ τ", _task_arithmetic, knobs=("lam",),
                              defaults={"lam": 1.0}, sweep=("lam",), multi_task_native=True,
                              elementwise=True),
    "ties": Method("TIES", "trim, elect sign, disjoint mean", _ties, knobs=("keep", "lam"),
                   defaults={"lam": 1.0}, multi_task_native=True, chunks=_ties_chunks, temporaries=4),
    "dare": Method("DARE", "drop 1 - keep of τ at random, rescale the rest", _dare,
                   knobs=("keep", "drop", "seed"), chunks=_dare_chunks),
    "breadcrumbs": breadcrumbs.METHOD,
    "della": della.METHOD,
}
