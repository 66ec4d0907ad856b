"""Run calibration data through a model and collect each linear layer's Hessian.

For a linear layer with inputs X (rows = tokens, padding excluded) the Hessian of its
squared output error is H = 2·XᵀX / n. Layers that read the same input tensor (q/k/v,
gate/up) share one accumulator. A forward pass stops as soon as every watched layer has
seen its input, so collecting the early layers of a deep model costs only those layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tailor_ui.control import Cancelled, StopCheck
from tailor_ui.data import Example, load_image
from tailor_ui.names import component
from tailor_ui.prompts import Batch, encode_with_answers
from tailor_ui.weights import to_model


class _ForwardDone(Exception):
    """Raised inside a hook to end a forward pass whose remaining layers are not needed."""


def calibration_batches(processor: Any, examples: Sequence[Example], batch_size: int = 8) -> list[Batch]:
    """Prompt + answer inputs of the target task, as the layers saw them during fine-tuning."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        answers = [ex.answers[0] if ex.answers else "" for ex in chunk]
        batch = encode_with_answers(processor, [load_image(ex.image) for ex in chunk],
                                    [ex.question for ex in chunk], answers)
        batch.pop("labels")
        batches.append(batch)
    return batches


def collect_hessians(model: torch.nn.Module, module_names: Sequence[str], batches: Sequence[Batch],
                     *, stop_early: bool = True, should_stop: StopCheck | None = None
                     ) -> dict[str, torch.Tensor]:
    """Hessians (float32, on each layer's device) of the named nn.Linear modules."""
    modules = dict(model.named_modules())
    watched = {name: modules[name] for name in module_names}
    for name, module in watched.items():
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name} is not a linear layer")
    sums = _InputSums(list(watched), stop_early)
    handles = [m.register_forward_pre_hook(sums.hook(n)) for n, m in watched.items()]
    try:
        with torch.inference_mode():
            for batch in batches:
                if should_stop is not None and should_stop():
                    raise Cancelled
                inputs = to_model(batch, model)
                sums.new_pass(inputs.get("attention_mask"))
                try:
                    model(**inputs)
                except _ForwardDone:
                    pass
    finally:
        for h in handles:
            h.remove()
        sums.new_pass(None)  # drop the last pass's inputs, also when a pass failed
    return sums.hessians()


class _InputSums:
    """XᵀX and row counts per accumulator while batches pass; one accumulator per input."""

    def __init__(self, watched: list[str], stop_early: bool) -> None:
        self.watched = watched
        self.stop_early = stop_early
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # layer → the layer whose accumulator it shares
        self.new_pass(None)

    def new_pass(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) → (input, first reader)
        self.fired: set[str] = set()

    def hook(self, name: str) -> Callable:
        def pre_hook(_module: torch.nn.Module, args: tuple) -> None:
            self.add(name, args[0])
            if self.stop_early and len(self.fired) == len(self.watched):
                raise _ForwardDone
        return pre_hook

    def add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            # the tensor stays referenced in `seen` so its id cannot be reused within this pass
            twin = self.seen.get(id(x))
            self.owner[name] = twin[1] if twin is not None and twin[0] is x else name
        self.seen.setdefault(id(x), (x, name))
        self.fired.add(name)
        if self.owner[name] != name:
            return
        # the attention mask describes the text sequence only: a vision or bridge layer
        # whose input happens to have the same shape must not be masked by it
        rows = _token_rows(x, self.mask if component(name) == "language" else None)
        acc = self.sums.get(name)
        xtx = rows.T @ rows
        self.sums[name] = xtx if acc is None else acc + xtx
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        """2·XᵀX/n per watched layer; layers sharing an input share one tensor."""
        missing = [n for n in self.watched if self.owner.get(n) not in self.sums]
        if missing:
            raise ValueError(f"calibration never reached: {', '.join(missing[:3])}")
        # in place: the sums are the only copy
        with torch.inference_mode():  # they were made in it
            for name, total in self.sums.items():
                total.mul_(2.0).div_(self.counts[name])
        return {n: self.sums[self.owner[n]] for n in self.watched}


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Input rows as float32, without the padding positions when the layer sees the text."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).float()
