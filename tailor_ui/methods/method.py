"""What the rest of the program knows about a merge method: one `Method` per method.

A method is its label, its knobs (the `Settings` fields it reads) and their per-method
defaults, whether it needs calibration data, how it combines several fine-tuned models,
its per-tensor merge function, whether that function is element-wise, and its memory
temporaries. The engine, the streaming merge, the settings, the sweep, the CLI and the
dashboard read these facts instead of naming methods.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


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

    def problems(self, settings: Knobs) -> list[str]:
        return self.check(settings) if self.check is not None else []


def task_vectors(base: torch.Tensor, tuned: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """τ_t = W_ft,t − W_pre in float32."""
    return [t.float() - base.float() for t in tuned]
