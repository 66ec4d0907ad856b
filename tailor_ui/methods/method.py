"""What the rest of the program knows about a merge method: one `Method` per method.

A method is its label, its knobs (the `Settings` fields it reads) and their per-method
defaults, whether it needs calibration data, how it combines several fine-tuned models,
its per-tensor merge function, whether that function is element-wise, and its memory
temporaries. The engine, the streaming merge, the settings, the sweep, the CLI and the
dashboard read these facts instead of naming methods.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from tailor_ui.control import Cancelled, Progress, StopCheck

Batch = dict[str, torch.Tensor]  # model inputs, as tailor_ui.prompts makes them


class Knobs(Protocol):
    """The settings a per-tensor merge may read (`tailor_ui.settings.Settings` has them all)."""

    method: str
    keep: float
    scope: str
    block_size: int
    seed: int
    gamma: float
    epsilon: float

    @property
    def effective_lambda(self) -> float: ...

    @property
    def effective_drop(self) -> float: ...


# (base, fine-tuned values of the models merged together, parameter name, settings) → float32
MergeFn = Callable[[torch.Tensor, Sequence[torch.Tensor], str, Knobs], torch.Tensor]
# the same over flat values, `step` entries at a time: the float32 merged chunks in order
ChunkFn = Callable[[torch.Tensor, Sequence[torch.Tensor], str, Knobs, int], Iterator[torch.Tensor]]


@dataclass
class MethodRun:
    """What one run of a method carries: its settings and callbacks, the original-task
    batches (anchored compensation), whether per-tensor scores may stay in the pair's cache
    (a slider re-thresholds them; a one-shot run keeps none), the layer-by-layer pipeline
    (off: the whole model per block, today's reference), and what it measured and reports."""

    settings: Any  # tailor_ui.settings.Settings (which imports this module)
    progress: Progress
    should_stop: StopCheck
    anchor: Sequence[Batch] = ()
    keep_scores: bool = True
    layerwise: bool = True
    # where a finished tensor's patch may go as soon as nothing reads it (a patch file
    # written as it goes); what goes there is not returned
    sink: Callable[[str, Any], None] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # what the method adds to the run's report

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def check(self) -> None:
        if self.should_stop():
            raise Cancelled


# (pair, index of the fine-tuned model, its calibration batches, the selected linears, the
# patch already made of the other tensors, the run) → the selected linears' patches (less
# those handed to `run.sink`)
RunFn = Callable[[Any, int, Sequence[Batch], Sequence[str], dict, MethodRun], dict]


@dataclass(frozen=True)
class Method:
    """One merge method.

    knobs: the `Settings` fields it reads besides those every method reads (declared in
      `tailor_ui.settings`); the CLI refuses the others, the dashboard greys them out and
      its sweep rows name only these.
    defaults: per-method defaults of knobs that `Settings` leaves as None (e.g. λ).
    sweep: the knobs a forgetting sweep varies for it, from the grid's value lists.
    multi_task_native: combines several fine-tuned models itself; the others run once per
      model and their patches are combined by `patch.union`.
    elementwise: each merged entry depends on that entry alone, so it can run on chunks.
    chunks: for a method that is not element-wise, its merge run chunk by chunk (whatever
      it needs of the whole tensor found by walking it first), bit for bit `merge`'s values.
    temporaries: float32 temporaries per entry and per model beyond the common working set
      (scores, masks, top-k indices), for `stream.memory_bound_bytes`.
    check: extra validation of settings that only this method has (problems, in words).
    run: a method that computes on the models (calibration forwards) rather than tensor by
      tensor: it makes the selected linears' patches of one fine-tuned model itself
      (`RunFn`); `merge` still serves the other tensors its policy merges.
    """

    label: str
    summary: str
    merge: MergeFn
    knobs: tuple[str, ...] = ()
    defaults: Mapping[str, float] = field(default_factory=dict)
    sweep: tuple[str, ...] = ("keep",)
    needs_calibration: bool = False
    multi_task_native: bool = False
    elementwise: bool = False
    chunks: ChunkFn | None = None
    temporaries: int = 0
    check: Callable[[Knobs], list[str]] | None = None
    run: RunFn | None = None

    def problems(self, settings: Knobs) -> list[str]:
        return self.check(settings) if self.check is not None else []


def task_vectors(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τ_t = W_ft,t − W_pre in float32."""
    return [t.float() - base.float() for t in tuned]
