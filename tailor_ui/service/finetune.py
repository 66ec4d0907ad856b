"""Fine-tuning in the dashboard: a private copy of the demo pair's base trained on the
shapes world's spatial questions (the default demo story's target skill), optionally
tailored after."""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

from tailor_ui.control import Progress, StopCheck
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.session import PairHandle, TrainedModel

# drawn from the story's task's training stream (the evaluation and calibration sets are
# streams 1 and 2 of demo/build.py)
FINETUNE_STREAM = 0
MAX_FINETUNE_EXAMPLES = 2000
_LOSS = re.compile(r"loss ([-+0-9.eEinfa]+)$")  # the training loop's stage: "epoch 1/2: loss 1.234"


@dataclass
class FinetuneRequest:
    """A checked fine-tuning request (`checked_request` builds it)."""

    method: str
    n: int
    lr: float
    epochs: int
    layers: Any  # parsed layer spec (None: the last half)
    rho: float
    batch_size: int
    seed: int
    task: str  # the demo world's task it trains on: the demo story's target
    settings: dict[str, Any] = field(default_factory=dict)  # as the session shows them

    @property
    def label(self) -> str:
        from tailor_ui.training.registry import TRAINING_METHODS

        return (f"{TRAINING_METHODS[self.method].label} lr={self.lr:g} epochs={self.epochs} n={self.n}"
                + (f" rho={self.rho:g}" if self.method == "dowser" else ""))


def checked_request(method: str, examples: int, lr: float, epochs: int, layers: str | int | None,
                    rho: float, batch_size: int, seed: int, task: str) -> FinetuneRequest:
    from tailor_ui.training.finetune import METHODS, check_options, parse_layers

    if method not in METHODS:
        raise UserError(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
    n, epochs, batch_size = int(examples), int(epochs), int(batch_size)
    if not 1 <= n <= MAX_FINETUNE_EXAMPLES:
        raise UserError(f"use between 1 and {MAX_FINETUNE_EXAMPLES} training examples")
    check_options(method, float(lr), epochs, batch_size, rho=float(rho))
    layer_spec = parse_layers(str(layers).strip()) if layers not in (None, "") else None
    settings = {"method": method, "task": task, "examples": n, "lr": float(lr), "epochs": epochs,
                "layers": layers or "last half", "batch_size": batch_size, "seed": int(seed),
                **({"rho": float(rho)} if method == "dowser" else {})}
    return FinetuneRequest(method, n, float(lr), epochs, layer_spec, float(rho), batch_size,
                           int(seed), task, settings)


def finetune_run(handle: PairHandle, request: FinetuneRequest, live: list[float], tailor_after,
                 progress: Progress, should_stop: StopCheck) -> TrainedModel:
    """Train a copy of the base; `live` gathers the losses as they come. `tailor_after`
    (or None) makes Model Tailor's merge of the trained model."""
    from tailor_ui.demo import world
    from tailor_ui.training.finetune import finetune

    start = time.perf_counter()
    progress(f"drawing {request.n} {request.task} examples", 0, 1)
    # the training stream, with a seed offset so the draw is not the demo's own
    # fine-tuning set (built from seed 0) either
    samples = world.generate(request.task, request.n, request.seed + 1000, FINETUNE_STREAM)
    with handle.lock:  # the shared base is only ever patched under its lock
        model = copy.deepcopy(handle.pair.base)

    def report(stage: str, done: int, total: int) -> None:
        match = _LOSS.search(stage)
        if match:
            live.append(float(match.group(1)))
        progress(stage, done, total)

    result = finetune(model, handle.pair.processor, samples, method=request.method,
                      layers=request.layers, lr=request.lr, epochs=request.epochs,
                      batch_size=request.batch_size, seed=request.seed, rho=request.rho,
                      progress=report, should_stop=should_stop)
    live[:] = result.losses
    label = request.label
    models = [(label, model)]
    if tailor_after is not None:
        models.append((f"Model Tailor on {label}", tailor_after(model, label)))
    return TrainedModel(job_id="", label=label, method=request.method, settings=request.settings,
                        report=result.to_dict(), models=models, handle=handle,
                        seconds=time.perf_counter() - start)


def tailor_trained(handle: PairHandle, model, label: str, examples: list[Example],
                   batch_size: int, progress: Progress, should_stop: StopCheck):
    """Model Tailor's merge (dashboard defaults) of a model fine-tuned here into the base,
    as a new copy."""
    from tailor_ui.engine import run_method
    from tailor_ui.pair import Pair
    from tailor_ui.patch import apply_patch
    from tailor_ui.service.config import default_settings
    from tailor_ui.service.tailor import batches

    with handle.lock:
        progress("Model Tailor on the fine-tuned model: calibration data", 0, 1)
        calibration = batches(handle, examples, "builtin", batch_size)
        pair = Pair(base=handle.pair.base, finetuned=[model], processor=handle.pair.processor,
                    base_id=handle.pair.base_id, finetuned_ids=[label])
        result = run_method(pair, default_settings(), [calibration], progress=progress,
                            should_stop=should_stop)
        tailored = copy.deepcopy(handle.pair.base)
    apply_patch(tailored, result.patch)
    return tailored
