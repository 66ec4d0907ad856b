"""Build the demo: evaluation and calibration sets, the base model and two fine-tunes of it.

The base is trained from scratch on the original skills (captioning and attribute VQA).
Each fine-tuned model is that base trained on one target skill only, the way the Model
Tailor paper's LLaVA runs were made: full fine-tuning of the last half of the language
model's decoder layers, with the vision tower, projector, embeddings, final norm and lm_head
frozen. The two targets tell two stories:

- spatial questions (the default story, at the top of the assets folder): the answers are
  shape and colour words the base already gives, so what fine-tuning learns and what it
  breaks sit apart -- the paper's case, where a small patch keeps the skill and drops the
  forgetting;
- counting (`counting/`), answers balanced over one/two/three: learning it means answering
  in a new format, and that change of format is itself the forgetting, so a patch chosen
  from counting data alone cannot keep one and drop the other (one that also sees the
  original skills' calibration set, anchored, keeps most of both: docs/results.md).

The original skills' calibration set (`original_calib.jsonl`, half captions, half attribute
questions, from the calibration stream) is what anchored Model Tailor holds the base to.

Nothing is tuned to help or hurt any merging method; the recipes are ordinary ones and the
forgetting is whatever plain fine-tuning does. scores.json holds every score and, per set,
the majority-answer baseline (always giving the set's commonest answer).

Everything is seeded; the build is written to a temporary folder and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tailor_ui.data import read_examples, write_examples
from tailor_ui.demo import world
from tailor_ui.demo.model import DemoArch, make_model
from tailor_ui.demo.processor import build_processor
from tailor_ui.demo.sets import DEMO_SEED, ORIGINAL_CALIB, STORIES as STORY_INFO
from tailor_ui.demo.train import Progress, pretrain_vision
from tailor_ui.evaluation.evaluate import evaluate, majority_baseline
from tailor_ui.training.finetune import encode_epoch
from tailor_ui.training.loop import train_loop, training_only

# Set -> the metric family evaluate() applies (both targets' one-word answers score like VQA).
EVAL_TASKS = {"caption": "caption", "vqa": "vqa", "target": "vqa"}
ORIGINAL = ("caption", "vqa")
# Streams of world.generate: one per split, so splits never share a scene draw (each world
# task has its own generators too).
TRAIN_STREAM, EVAL_STREAM, CALIB_STREAM = 0, 1, 2


@dataclass(frozen=True)
class Story:
    """One fine-tune of the base: its target task, where it lives, and how it is trained."""

    name: str  # a key of demo.sets.STORIES: where it lives, what it learns and shows
    examples: int
    epochs: int
    lr: float
    batch: int
    warmup: int

    @property
    def folder(self) -> str:
        return STORY_INFO[self.name].folder

    @property
    def task(self) -> str:
        return STORY_INFO[self.name].task


# Spatial: the control recipe (lr 1e-3, batch 8) run until it forgets at least 20 % of
# the original score: on this base 150 steps forget 12 %, 450 steps 17 %, 600 steps 36 %
# (docs/results.md, "The built-in demo"). Counting: 563 steps at lr 1e-4 learn the format and forget
# most of the original score.
STORIES = (Story("spatial", examples=4800, epochs=1, lr=1e-3, batch=8, warmup=20),
           Story("counting", examples=6000, epochs=3, lr=1e-4, batch=32, warmup=20))


@dataclass(frozen=True)
class Recipe:
    arch: DemoArch = DemoArch()
    eval_size: int = 150
    calib_size: int = 128
    # Vision tower: pre-trained to see, on the base training images (see pretrain_vision).
    vision_epochs: int = 2
    vision_lr: float = 1e-3
    vision_batch: int = 64
    # Base: projector and language model from scratch on the original tasks.
    base_examples_per_task: int = 6000
    base_epochs: int = 3
    base_lr: float = 1e-3
    base_batch: int = 32
    base_warmup: int = 100
    # Fine-tuning: one target task per story, last half of the decoder.
    stories: tuple[Story, ...] = STORIES


def finetuned_layers(text_layers: int) -> re.Pattern[str]:
    """The parameter names a story's fine-tune trains: the last half of the decoder."""
    first = text_layers // 2
    layers = "|".join(str(i) for i in range(first, text_layers))
    return re.compile(rf"language_model\.layers\.({layers})\.")


def _write_split(folder: Path, name: str, samples: list[world.Sample]) -> Path:
    image_dir = folder / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sample in enumerate(samples):
        image_path = image_dir / f"{i:04d}.png"
        sample.image.save(image_path, optimize=True)
        rows.append({"image": image_path.relative_to(folder).as_posix(),
                     "question": sample.question, "answers": list(sample.answers)})
    path = folder / f"{name}.jsonl"
    write_examples(path, rows)
    return path


def _scores(model, processor, eval_files: dict[str, Path]) -> dict[str, dict]:
    out = {}
    for task, path in eval_files.items():
        result = evaluate(model, processor, read_examples(path), EVAL_TASKS[task], batch_size=50)
        out[task] = {"metric": result.metric, "score": round(result.score, 4)}
    return out


def _majority(examples, task: str) -> dict:
    baseline = majority_baseline(examples, EVAL_TASKS[task])
    return {"answer": baseline.answer, "share": round(baseline.share, 4),
            "score": round(baseline.score, 4)}


def train_batches(model: torch.nn.Module, batches: list[dict], trainable: Callable[[str], bool], *,
                  lr: float, epochs: int, weight_decay: float, warmup_steps: int,
                  progress: Progress) -> list[float]:
    """The demo's recipe on the training package's loop: AdamW with β = (0.9, 0.95),
    gradients clipped at 1, the same encoded batches every epoch. Returns each epoch's
    mean loss."""
    def report(what: str, done: int, total: int) -> None:
        if done % 100 == 0:
            progress(f"step {done}/{total}, {what}")

    names = [name for name, _ in model.named_parameters() if trainable(name)]
    with training_only(model, names) as params:
        result = train_loop(model, params, lambda _epoch: batches, len(batches), lr=lr,
                            epochs=epochs, weight_decay=weight_decay, warmup_steps=warmup_steps,
                            betas=(0.9, 0.95), progress=report)
    for epoch, loss in enumerate(result.epoch_losses, start=1):
        progress(f"epoch {epoch}/{epochs}: loss {loss:.3f}")
    return result.epoch_losses


def _folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def build_demo(assets_dir: Path, *, seed: int = DEMO_SEED, recipe: Recipe = Recipe(),
               progress: Progress = print) -> dict:
    """Regenerate `assets_dir`: data sets, the base/ checkpoint, each story's finetuned/
    checkpoint and target sets (in the story's folder), and scores.json.

    Returns the build time, the size, and per story the base and fine-tuned scores on every
    task with each set's majority-answer baseline.
    """
    start = time.perf_counter()
    assets_dir = Path(assets_dir)
    work = assets_dir.with_name(assets_dir.name + ".building")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            torch.use_deterministic_algorithms(True)
            # One thread: the same bits on any machine (a multi-threaded matmul splits its
            # sums by core count), and no slowdown from oversubscribed cores.
            torch.set_num_threads(1)
            report = _build(work, seed, recipe, progress)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
    # scores.json holds only what the seed determines, so a rebuild leaves it unchanged.
    (work / "scores.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    report["size_mb"] = round(_folder_mb(work), 2)
    report["seconds"] = round(time.perf_counter() - start, 1)
    shutil.rmtree(assets_dir, ignore_errors=True)
    work.rename(assets_dir)
    progress(f"demo built in {report['seconds']:.0f} s, {report['size_mb']:.1f} MB")
    for name, story in report["stories"].items():
        progress(f"{name} (majority-answer baseline on its target: "
                 f"{story['majority']['target_eval']['score']:.3f})")
        for model_name in ("base", "finetuned"):
            progress(f"  {model_name:9s} " + "  ".join(
                f"{task} {s['metric']} {s['score']:.3f}" for task, s in story[model_name].items()))
    return report


def _write_sets(work: Path, seed: int, recipe: Recipe
                ) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """The original skills' evaluation sets ({task: JSONL}) and their calibration set (half
    each skill, for anchored compensation), and each story's target evaluation and
    calibration sets ({story: {split: JSONL}}), in the story's folder."""
    original = {task: _write_split(work, f"{task}_eval",
                                   world.generate(task, recipe.eval_size, seed, EVAL_STREAM))
                for task in ORIGINAL}
    half = recipe.calib_size // 2
    _write_split(work, ORIGINAL_CALIB, [sample for task in ORIGINAL
                                        for sample in world.generate(task, half, seed, CALIB_STREAM)])
    targets = {story.name: {
        "target_eval": _write_split(work / story.folder, "target_eval", world.generate(
            story.task, recipe.eval_size, seed, EVAL_STREAM)),
        "target_calib": _write_split(work / story.folder, "target_calib", world.generate(
            story.task, recipe.calib_size, seed, CALIB_STREAM))}
        for story in recipe.stories}
    return original, targets


def _train_base(work: Path, seed: int, recipe: Recipe, processor, rng: np.random.Generator,
                progress: Progress) -> tuple[torch.nn.Module, dict]:
    base_samples = (world.generate("caption", recipe.base_examples_per_task, seed, TRAIN_STREAM)
                    + world.generate("vqa", recipe.base_examples_per_task, seed, TRAIN_STREAM))
    model = make_model(processor, recipe.arch)
    progress("pre-training the vision tower")
    vision_accuracy = pretrain_vision(
        model.model.vision_tower, processor.image_processor, base_samples,
        lr=recipe.vision_lr, epochs=recipe.vision_epochs, batch_size=recipe.vision_batch, rng=rng,
        progress=progress)
    progress("training the base model on captioning and VQA (vision tower frozen, as LLaVA)")
    base_losses = train_batches(model, list(encode_epoch(processor, base_samples, recipe.base_batch, rng)),
                                lambda name: "vision_tower" not in name, lr=recipe.base_lr,
                                epochs=recipe.base_epochs, weight_decay=0.01,
                                warmup_steps=recipe.base_warmup, progress=progress)
    model.save_pretrained(work / "base")
    processor.save_pretrained(work / "base")
    return model, {"vision_cell_accuracy": round(vision_accuracy, 4), "base_losses": base_losses}


def finetune_story(model: torch.nn.Module, processor, story: Story, samples: list[world.Sample],
                   text_layers: int, rng: np.random.Generator, progress: Progress) -> list[float]:
    progress(f"fine-tuning the last half of the decoder on {story.name} ({story.task} questions)")
    tuned = finetuned_layers(text_layers)
    return train_batches(model, list(encode_epoch(processor, samples, story.batch, rng)),
                         lambda name: tuned.search(name) is not None, lr=story.lr, epochs=story.epochs,
                         weight_decay=0.0, warmup_steps=story.warmup, progress=progress)


def _build(work: Path, seed: int, recipe: Recipe, progress: Progress) -> dict:
    rng = np.random.default_rng(seed)
    processor = build_processor(world.vocabulary(), image_size=recipe.arch.image_size,
                                patch_size=recipe.arch.patch_size)
    progress("writing evaluation and calibration sets")
    original, targets = _write_sets(work, seed, recipe)
    model, base_report = _train_base(work, seed, recipe, processor, rng, progress)
    base_scores = _scores(model, processor, original)
    base_targets = {name: _scores(model, processor, {"target": sets["target_eval"]})
                    for name, sets in targets.items()}
    base_state = {name: value.clone() for name, value in model.state_dict().items()}
    stories = {}
    for story in recipe.stories:
        model.load_state_dict(base_state)  # every story starts from the same base
        samples = world.generate(story.task, story.examples, seed, TRAIN_STREAM)
        # its own shuffling stream: one story's recipe does not change another's fine-tune
        losses = finetune_story(model, processor, story, samples, recipe.arch.text_layers,
                                np.random.default_rng(seed), progress)
        model.save_pretrained(work / story.folder / "finetuned")
        processor.save_pretrained(work / story.folder / "finetuned")
        sets = targets[story.name]
        stories[story.name] = {
            "folder": story.folder,
            "base": {**base_scores, **base_targets[story.name]},
            "finetuned": _scores(model, processor, {**original, "target": sets["target_eval"]}),
            "majority": {"train": _majority(samples, "target"),
                         **{split: _majority(read_examples(path), "target")
                            for split, path in sets.items()}},
            "losses": losses}
    majority = {f"{task}_eval": _majority(read_examples(path), task)
                for task, path in original.items()}
    return {"seed": seed, "recipe": asdict(recipe), "majority": majority, "stories": stories,
            **base_report}
