"""Fine-tuning in the dashboard: a private copy of the demo pair's base trained on the
shapes world's spatial questions (the default demo story's target skill), optionally
tailored after; or trained on a continual sequence of the shapes world's tasks."""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor_ui.control import Progress, StopCheck
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.app.session import PairHandle, TrainedModel

# drawn from the story's task's training stream (the evaluation and calibration sets are
# streams 1 and 2 of demo/build.py)
FINETUNE_STREAM = 0
MAX_FINETUNE_EXAMPLES = 2000
# each method's starting settings in the Fine-tune tab, from the learning-rate sweep on the
# demo's spatial story (bench/training_sweep.py, docs/results.md#archive-training)
METHOD_DEFAULTS: dict[str, dict[str, float]] = {
    "full": {"lr": 1e-3}, "dowser": {"lr": 3e-3, "rho": 0.1},
    "random_mask": {"lr": 3e-3, "rho": 0.1}, "llaca": {"lr": 1e-3},
    "ema": {"lr": 1e-3, "ema_beta": 0.99}}
CONTINUAL_EVAL_EXAMPLES = 50


@dataclass
class FinetuneRequest:
    """A checked fine-tuning request (`checked_request` builds it)."""

    method: str
    n: int
    lr: float
    epochs: int
    layers: Any  # parsed layer spec (None: the last half)
    rho: float
    ema_beta: float
    batch_size: int
    seed: int
    task: str  # the demo world's task it trains on: the demo story's target
    settings: dict[str, Any] = field(default_factory=dict)  # as the session shows them

    @property
    def label(self) -> str:
        from tailor_ui.training.registry import TRAINING_METHODS

        options = TRAINING_METHODS[self.method].options
        return (f"{TRAINING_METHODS[self.method].label} lr={self.lr:g} epochs={self.epochs} n={self.n}"
                + (f" rho={self.rho:g}" if "rho" in options else "")
                + (f" beta={self.ema_beta:g}" if "ema_beta" in options else ""))


def checked_request(method: str, examples: int, lr: float, epochs: int, layers: str | int | None,
                    rho: float, batch_size: int, seed: int, task: str,
                    ema_beta: float = 0.99) -> FinetuneRequest:
    from tailor_ui.training.finetune import METHODS, check_options, parse_layers
    from tailor_ui.training.registry import TRAINING_METHODS

    if method not in METHODS:
        raise UserError(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
    n, epochs, batch_size = int(examples), int(epochs), int(batch_size)
    if not 1 <= n <= MAX_FINETUNE_EXAMPLES:
        raise UserError(f"use between 1 and {MAX_FINETUNE_EXAMPLES} training examples")
    check_options(method, float(lr), epochs, batch_size, rho=float(rho), ema_beta=float(ema_beta))
    layer_spec = parse_layers(str(layers).strip()) if layers not in (None, "") else None
    own = {"rho": float(rho), "ema_beta": float(ema_beta)}
    settings = {"method": method, "task": task, "examples": n, "lr": float(lr), "epochs": epochs,
                "layers": layers or "last half", "batch_size": batch_size, "seed": int(seed),
                **{k: v for k, v in own.items() if k in TRAINING_METHODS[method].options}}
    return FinetuneRequest(method, n, float(lr), epochs, layer_spec, float(rho), float(ema_beta),
                           batch_size, int(seed), task, settings)


def finetune_run(handle: PairHandle, request: FinetuneRequest, live: list[float], tailor_after,
                 folder: Path, progress: Progress, should_stop: StopCheck) -> TrainedModel:
    """Train a copy of the base; `live` gathers the losses as they come. `tailor_after`
    (or None) makes Model Tailor's merge of the trained model (its patch). Each model is
    kept as its patch over the base, saved in `folder` (made here)."""
    from tailor_ui.demo import world
    from tailor_ui.patch import model_patch, save_patch
    from tailor_ui.training.finetune import finetune

    start = time.perf_counter()
    progress(f"drawing {request.n} {request.task} examples", 0, 1)
    # the training stream, with a seed offset so the draw is not the demo's own
    # fine-tuning set (built from seed 0) either
    samples = world.generate(request.task, request.n, request.seed + 1000, FINETUNE_STREAM)
    with handle.lock:  # the shared base is only ever patched under its lock
        model = copy.deepcopy(handle.pair.base)

    result = finetune(model, handle.pair.processor, samples, method=request.method,
                      layers=request.layers, lr=request.lr, epochs=request.epochs,
                      batch_size=request.batch_size, seed=request.seed, rho=request.rho,
                      ema_beta=request.ema_beta, progress=progress, should_stop=should_stop,
                      on_loss=live.append)
    label = request.label
    with handle.lock:
        patches = [(label, model_patch(handle.pair.base, model))]
    if tailor_after is not None:
        patches.append((f"Model Tailor on {label}", tailor_after(model, label)))
    folder.mkdir(parents=True, exist_ok=True)
    models = []
    for i, (name, patch) in enumerate(patches):
        path = folder / f"model-{i}.safetensors"
        save_patch(patch, path)
        models.append((name, path))
    return TrainedModel(job_id="", label=label, method=request.method, settings=request.settings,
                        report=result.to_dict(), models=models, handle=handle, folder=folder,
                        seconds=time.perf_counter() - start)


def tailor_trained(handle: PairHandle, model, label: str, examples: list[Example],
                   batch_size: int, progress: Progress, should_stop: StopCheck):
    """Model Tailor's merge (dashboard defaults) of a model fine-tuned here into the base:
    its patch."""
    from tailor_ui.engine import run_method
    from tailor_ui.pair import Pair
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.tailor import batches

    with handle.lock:
        progress("Model Tailor on the fine-tuned model: calibration data", 0, 1)
        calibration = batches(handle, examples, "builtin", batch_size)
        pair = Pair(base=handle.pair.base, finetuned=[model], processor=handle.pair.processor,
                    base_id=handle.pair.base_id, finetuned_ids=[label])
        return run_method(pair, default_settings(), [calibration], progress=progress,
                          should_stop=should_stop).patch


def continual_run(handle: PairHandle, request: FinetuneRequest, tasks: tuple[str, ...],
                  progress: Progress, should_stop: StopCheck):
    """Train a copy of the base on the shapes world's `tasks` one after another with the
    request's method (a `ContinualMethod`) and settings;
    returns `run_continual`'s stage table (accuracy on every task after each stage)."""
    from tailor_ui.demo.tasks import shapes_sequence
    from tailor_ui.training.continual import ContinualMethod, run_continual

    method = ContinualMethod.of(request.method)
    with handle.lock:
        model = copy.deepcopy(handle.pair.base)
    with tempfile.TemporaryDirectory() as folder:  # the tasks' evaluation images
        sequence = shapes_sequence(folder, tasks, n_train=request.n,
                                   n_eval=CONTINUAL_EVAL_EXAMPLES, seed=request.seed + 1000)
        return run_continual(model, handle.pair.processor, sequence,
                             method, max_new_tokens=4,
                             layers=request.layers, lr=request.lr, epochs=request.epochs,
                             batch_size=request.batch_size, seed=request.seed,
                             ema_beta=request.ema_beta, progress=progress,
                             should_stop=should_stop)
