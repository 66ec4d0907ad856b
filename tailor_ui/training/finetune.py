"""Fine-tune an MLLM in place with any registered training method, on the one loop.

What trains, as in the papers' LLaVA runs: the decoder layers of the last N language-model
layers (default: the last half) — attention q/k/v/o, MLP gate/up/down, their biases and the
layers' norms. The vision tower, the projector, the embeddings, the final norm and lm_head
stay frozen.

The methods (`tailor_ui.training.registry.TRAINING_METHODS`): `full` (every entry of the
trained layers), `dowser` (Model-Dowser, docs/methods.md#model-dowser, in `dowser.py`), `llaca` (LLaCA,
docs/methods.md#llaca) and `ema` (its fixed-β baseline), both in `llaca.py`. `finetune` checks the
options, picks the trained tensors, lets the method prepare, runs `loop.train_loop` with the
method's hooks and writes the report. Everything is seeded: the batch order, the reference
answer drawn for each example, dropout and Model-Dowser's probes.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tailor_ui.control import Progress, StopCheck, no_progress
from tailor_ui.data import load_image, read_examples
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.pair import load_model
from tailor_ui.names import component, layer_index
from tailor_ui.prompts import encode_with_answers
from tailor_ui.training.loop import Batch, LossCallback, train_loop, training_only
from tailor_ui.training.method import RunSetup
from tailor_ui.training.registry import (METHODS, TRAINING_METHODS, accepted_options,
                                         option_problems)

Layers = int | Sequence[int] | str | None


# ------------------------------------------------------------------ what trains

def decoder_layers(model: torch.nn.Module) -> list[int]:
    """Indices of the language model's decoder layers (vision tower and projector excluded)."""
    found = {layer_index(n) for n, _ in model.named_parameters() if component(n) == "language"}
    found.discard(None)
    if not found:
        raise UserError("no numbered language-model decoder layers found in this model")
    return sorted(found)  # type: ignore[arg-type]


def choose_layers(model: torch.nn.Module, layers: Layers = None) -> list[int]:
    """None: the last half of the decoder; an int N: the last N layers; a list: those
    layers; "all": every layer; another string: the CLI form (`parse_layers`)."""
    available = decoder_layers(model)
    if isinstance(layers, str):
        layers = parse_layers(layers)
    if layers is None:
        return available[len(available) // 2:]
    if layers == "all":
        return available
    if isinstance(layers, bool):
        raise UserError("layers must be a number of last layers or a list of layer indices")
    if isinstance(layers, int):
        if not 1 <= layers <= len(available):
            raise UserError(f"cannot train the last {layers} layers: the decoder has "
                            f"{len(available)} (choose 1 to {len(available)})")
        return available[-layers:]
    chosen = sorted(set(int(i) for i in layers))
    missing = [i for i in chosen if i not in available]
    if not chosen or missing:
        raise UserError(f"no decoder layer {missing or '(none given)'}; the decoder has layers "
                        f"{available[0]} to {available[-1]}")
    return chosen


def parse_layers(text: str | None) -> Layers:
    """CLI form: "" / None → default (last half), "last:N" or "N" → the last N layers,
    "20-31" or "0,2,5-7" → those layer indices, "all" → every layer."""
    if text is None or not text.strip():
        return None
    text = text.strip().lower()
    if text == "all":
        return "all"
    if text.startswith("last:"):
        text = text[5:]
        if not text.isdigit():
            raise UserError(f"bad layer spec 'last:{text}': expected last:N")
    if text.isdigit():
        return int(text)
    out: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise UserError(f"bad layer spec {text!r}: use N (last N), last:N, A-B, or a list like 0,2,5-7")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise UserError(f"bad layer range {first}-{last}")
        out.extend(range(first, last + 1))
    return out


def trainable_parameters(model: torch.nn.Module, layers: Sequence[int],
                         modules: str | None = None) -> list[str]:
    """Parameter names of the chosen decoder layers (optionally narrowed by a regex)."""
    wanted = set(layers)
    regex = re.compile(modules) if modules else None
    names = [n for n, _ in model.named_parameters()
             if component(n) == "language" and layer_index(n) in wanted
             and (regex is None or regex.search(n))]
    if not names:
        raise UserError("nothing to train: no parameter of the chosen layers"
                        + (f" matches {modules!r}" if modules else ""))
    return names


# ------------------------------------------------------------------------ data

def _image(example: Any) -> Image.Image:
    image = example.image
    return image.convert("RGB") if isinstance(image, Image.Image) else load_image(image)


def check_examples(examples: Sequence[Any]) -> None:
    if not examples:
        raise UserError("no training examples")
    for i, ex in enumerate(examples):
        if not ex.answers or not all(isinstance(a, str) and a for a in ex.answers):
            raise UserError(f"training example {i + 1} has no answer to learn; every training "
                            "example needs at least one non-empty answer")


def encode_epoch(processor: Any, examples: Sequence[Any], batch_size: int,
                 rng: np.random.Generator) -> Iterator[Batch]:
    """One epoch of shuffled batches, encoded lazily; each example trains on one of its
    answers drawn at random (a caption with five references trains on one of them)."""
    order = rng.permutation(len(examples))
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        answers = [ex.answers[int(rng.integers(len(ex.answers)))] for ex in chunk]
        yield encode_with_answers(processor, [_image(ex) for ex in chunk],
                                  [ex.question for ex in chunk], answers)


# ------------------------------------------------------------------------ finetune

@dataclass
class TrainReport:
    """What a fine-tuning run did. `losses` has one entry per optimizer step."""

    method: str
    layers: list[int]
    trainable_tensors: int
    trainable_entries: int  # entries allowed to change (Dowser: the masked count)
    total_entries: int  # every parameter of the model
    steps: int
    losses: list[float]
    epoch_losses: list[float]
    seconds: float
    settings: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_entries / self.total_entries if self.total_entries else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "trainable_fraction": self.trainable_fraction}


def check_options(method: str, lr: float, epochs: int, batch_size: int,
                  weight_decay: float = 0.0, warmup_steps: int = 0, **method_options: Any) -> None:
    """Raise one UserError listing every bad setting; `method_options` are the options the
    registered methods own (each method checks its own, whichever method runs)."""
    unknown = sorted(set(method_options) - set(accepted_options()))
    if unknown:
        raise TypeError(f"unknown fine-tuning option(s): {', '.join(unknown)}")
    problems = []
    if method not in TRAINING_METHODS:
        problems.append(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
    if not (lr > 0 and math.isfinite(lr)):
        problems.append(f"learning rate must be positive, got {lr}")
    if epochs < 1:
        problems.append(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        problems.append(f"batch size must be at least 1, got {batch_size}")
    if weight_decay < 0:
        problems.append(f"weight decay must not be negative, got {weight_decay}")
    if warmup_steps < 0:
        problems.append(f"warm-up steps must not be negative, got {warmup_steps}")
    problems += option_problems(method_options)
    if problems:
        raise UserError("; ".join(problems))


def finetune(model: torch.nn.Module, processor: Any, examples: Sequence[Any], *,
             method: str = "full", layers: Layers = None, modules: str | None = None,
             lr: float = 1e-4, epochs: int = 1, batch_size: int = 8, seed: int = 0,
             weight_decay: float = 0.0, warmup_steps: int = 0, max_grad_norm: float | None = 1.0,
             betas: tuple[float, float] = (0.9, 0.999), progress: Progress | None = None,
             should_stop: StopCheck | None = None, on_loss: LossCallback | None = None,
             **method_options: Any) -> TrainReport:
    """Train `model` in place on `examples` and return the report.

    `examples`: objects with `.image` (a path or a PIL image), `.question` and `.answers`
    (`tailor_ui.data.Example`, or the demo world's samples). `layers`: None (last half),
    N (last N decoder layers) or a list of layer indices; `modules` narrows by regex.
    `method_options`: the registered methods' own options (Model-Dowser: rho, importance,
    importance_cache, probe_prompts, probes; LLaCA: llaca_form; EMA: ema_beta); the method
    that runs reads its own and ignores the rest.
    `on_loss` hears each optimizer step's loss as it comes.
    Cancelling (`should_stop`) raises `Cancelled` and leaves the model part-trained.
    """
    check_options(method, lr, epochs, batch_size, weight_decay, warmup_steps, **method_options)
    if not processor:
        raise UserError("fine-tuning needs the model's processor to read images and prompts")
    check_examples(examples)
    report = progress or no_progress
    chosen = choose_layers(model, layers)
    names = trainable_parameters(model, chosen, modules)
    training = TRAINING_METHODS[method](**method_options)
    settings = {"method": method, "layers": chosen, "modules": modules, "lr": lr, "epochs": epochs,
                "batch_size": batch_size, "seed": seed, "weight_decay": weight_decay,
                "warmup_steps": warmup_steps, "max_grad_norm": max_grad_norm,
                "betas": list(betas), "examples": len(examples), **training.settings()}
    start = time.perf_counter()
    training.prepare(RunSetup(model, processor, names, seed, report, should_stop))
    rng = np.random.default_rng(seed)
    with training_only(model, names) as params, \
            torch.random.fork_rng(devices=_cuda_devices(model)):
        torch.manual_seed(seed)
        result = train_loop(
            model, params, lambda _epoch: encode_epoch(processor, examples, batch_size, rng),
            math.ceil(len(examples) / batch_size), lr=lr, epochs=epochs,
            weight_decay=weight_decay, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
            betas=tuple(betas), hooks=training, progress=report, should_stop=should_stop,
            on_loss=on_loss)
        training.finish()
    return TrainReport(
        method=method, layers=chosen, trainable_tensors=len(names),
        trainable_entries=sum(training.trainable_entries(n, model.get_parameter(n)) for n in names),
        total_entries=sum(p.numel() for p in model.parameters()), steps=result.steps,
        losses=result.losses, epoch_losses=result.epoch_losses,
        seconds=time.perf_counter() - start, settings=settings, extra=training.extra())


def _cuda_devices(model: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


# ------------------------------------------------------------------------ save / CLI

def save_checkpoint(model: torch.nn.Module, processor: Any, out: str | Path,
                    report: TrainReport | None = None) -> Path:
    """Write model + processor with save_pretrained (safetensors), renamed into place only
    when complete; the training report goes beside them as training_report.json."""
    out = Path(out)
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if processor:
            processor.save_pretrained(tmp)
        if report is not None:
            (tmp / "training_report.json").write_text(
                json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return out


def finetune_cli(base: str, data: str | Path, out: str | Path, method: str = "full", *,
                 layers: Layers = None, limit: int | None = None, dtype: str = "float32",
                 device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False,
                 **options: Any) -> TrainReport:
    """Load `base`, fine-tune it on the JSONL `data`, write the checkpoint to `out`.

    `layers` may be a CLI string (see `parse_layers`); `limit` trains on the first N
    examples; every other keyword goes to `finetune` (lr, epochs, batch_size, seed, rho,
    importance_cache, probe_prompts, probes, llaca_form, ema_beta, weight_decay,
    warmup_steps, modules, progress, should_stop).
    """
    if method not in METHODS:
        raise UserError(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
    out = Path(out).expanduser()
    base_path = Path(base).expanduser()
    if base_path.exists() and out.resolve() == base_path.resolve():
        raise UserError("--out must not be the base model's folder (it would be replaced)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    examples = read_examples(data)
    if limit is not None:
        examples = examples[:limit]
    model, processor = load_model(base, dtype=dtype, device=device,  # type: ignore[arg-type]
                                  allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    if not processor:
        raise UserError(f"{base}: the processor could not be loaded "
                        f"({getattr(processor, 'reason', 'unknown reason')}); fine-tuning needs it")
    report = finetune(model, processor, examples, method=method, layers=layers, **options)
    report.settings.update(base=str(base), data=str(data))
    save_checkpoint(model, processor, out, report)
    return report
