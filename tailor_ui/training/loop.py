"""The one training loop: AdamW, linear warm-up then cosine decay to zero, gradient
clipping, and decoupled weight decay applied by the loop itself (AdamW's own arithmetic,
p ← p·(1 − lr·wd), but maskable entry by entry).

`finetune` runs it with a training method's hooks; the demo build runs it with none.
It draws no random numbers itself: the caller seeds torch (dropout) and its batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from tailor_ui.control import Cancelled, Progress, StopCheck, no_progress
from tailor_ui.weights import to_model

Batch = dict[str, torch.Tensor]
LossCallback = Callable[[float], None]  # called with each optimizer step's loss, in order


class LoopHooks:
    """What a training method adds to the plain loop; each default adds nothing."""

    def decay_mask(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        """Entries of `param` weight decay may touch (None: all of them)."""
        return None

    def after_backward(self) -> None:
        """Runs once the gradients exist, before clipping (e.g. to mask them)."""

    def after_step(self) -> None:
        """Runs after every optimizer step, before the gradients are cleared."""


@dataclass
class LoopResult:
    losses: list[float]  # one per optimizer step
    epoch_losses: list[float]
    steps: int


@contextmanager
def training_only(model: torch.nn.Module, names: Iterable[str]) -> Iterator[list[torch.nn.Parameter]]:
    """Only the named parameters require gradients inside; yields them in model order.
    Every flag is restored afterwards and the model is left in eval mode."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    chosen = set(names)
    params = []
    for n, p in model.named_parameters():
        p.requires_grad_(n in chosen)
        if n in chosen:
            params.append(p)
    try:
        yield params
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.eval()


def warmup_cosine(warmup_steps: int, total: int) -> Callable[[int], float]:
    """Learning-rate factor of each step: linear warm-up, then cosine decay to zero."""
    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))
    return schedule


def _decay(params: Sequence[torch.nn.Parameter], masks: dict[torch.nn.Parameter, torch.Tensor],
           factor: float) -> None:
    with torch.no_grad():
        for p in params:
            mask = masks.get(p)
            if mask is None:
                p.mul_(factor)
            else:
                p.copy_(torch.where(mask, p * factor, p))


def train_loop(model: torch.nn.Module, params: Sequence[torch.nn.Parameter],
               epoch_batches: Callable[[int], Iterable[Batch]], steps_per_epoch: int, *,
               lr: float, epochs: int, weight_decay: float = 0.0, warmup_steps: int = 0,
               max_grad_norm: float | None = 1.0, betas: tuple[float, float] = (0.9, 0.999),
               hooks: LoopHooks | None = None, progress: Progress | None = None,
               should_stop: StopCheck | None = None, on_loss: LossCallback | None = None) -> LoopResult:
    """Train `params` (already requiring gradients) on `epoch_batches(epoch)` per epoch;
    `on_loss` hears each step's loss as it comes (a live curve reads it, not the progress text)."""
    hooks = hooks or LoopHooks()
    report = progress or no_progress
    optimizer = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup_steps, total))
    masks = {p: m.to(p.device) for p in params if (m := hooks.decay_mask(p)) is not None}
    losses: list[float] = []
    epoch_losses: list[float] = []
    model.train()
    for epoch in range(epochs):
        epoch_start = len(losses)
        for batch in epoch_batches(epoch):
            if should_stop is not None and should_stop():
                raise Cancelled
            loss = model(**to_model(batch, model)).loss
            loss.backward()
            hooks.after_backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if weight_decay:
                _decay(params, masks, 1 - optimizer.param_groups[0]["lr"] * weight_decay)
            optimizer.step()
            scheduler.step()
            hooks.after_step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if on_loss is not None:
                on_loss(losses[-1])
            report(f"epoch {epoch + 1}/{epochs}: loss {losses[-1]:.3f}", len(losses), total)
        epoch_losses.append(float(np.mean(losses[epoch_start:])) if len(losses) > epoch_start
                            else math.nan)
    model.eval()
    return LoopResult(losses=losses, epoch_losses=epoch_losses, steps=len(losses))
