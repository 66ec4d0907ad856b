"""The shapes world, its processor, and the shipped demo pair (assets/demo)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from tailor_ui.data import read_examples
from tailor_ui.demo import world
from tailor_ui.demo.build import EVAL_TASKS, STORIES
from tailor_ui.demo.model import DemoArch
from tailor_ui.demo.processor import build_processor
from tailor_ui.evaluation.evaluate import EvalResult, evaluate, majority_baseline
from tailor_ui.prompts import IGNORE_INDEX, encode_prompts, encode_with_answers

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
STORY_DIRS = {story.name: DEMO / story.folder for story in STORIES}
ANSWER_WORDS = {"spatial": {*world.SHAPES, *world.COLOURS}, "counting": set(world.NUMBERS)}
N_EVAL = 40  # examples per task in the model tests: enough for stable floors, still fast


def _pixels(samples: list[world.Sample]) -> list[np.ndarray]:
    return [np.asarray(s.image) for s in samples]


@pytest.mark.parametrize("task", world.TASKS)
def test_world_is_deterministic_per_seed(task):
    first, again, other = (world.generate(task, 8, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(again)))
    assert [(s.question, s.answers) for s in first] == [(s.question, s.answers) for s in again]
    assert not all(np.array_equal(a, b) for a, b in zip(_pixels(first), _pixels(other)))
    assert [s.scene for s in first] != [s.scene for s in other]


def test_world_ground_truth_matches_scene():
    scene = world.Scene("gray", (world.Shape("circle", "red", "small", 8, 24, 4),
                                 world.Shape("square", "red", "large", 40, 24, 7)))
    assert "a small red circle left of a large red square" in world.captions(scene)
    assert "one red circle and one red square" in world.captions(scene)
    assert ("what shape is the red object?", "circle") not in world.vqa_pairs(scene)  # ambiguous
    assert ("what colour is the square?", "red") in world.vqa_pairs(scene)
    assert ("how many red shapes are there?", "two") in world.count_pairs(scene)
    assert ("how many circles are there?", "one") in world.count_pairs(scene)
    assert ("what shape is on the left?", "circle") in world.spatial_pairs(scene)
    assert ("what colour is the shape on the right?", "red") in world.spatial_pairs(scene)
    assert world.spatial_pairs(world.Scene("gray", scene.shapes[:1])) == []  # needs two shapes
    image = np.asarray(world.render(scene, np.random.default_rng(0))).astype(int)
    assert image.shape == (world.IMAGE_SIZE, world.IMAGE_SIZE, 3)
    assert image[24, 40, 0] > 150 and image[24, 40, 2] < 100  # the square's centre is red
    assert abs(image[5, 5] - 128).max() < 30  # gray background


ARCH = DemoArch()
IMAGE_TOKENS = (ARCH.image_size // ARCH.patch_size) ** 2  # one per patch, CLS dropped


@pytest.fixture(scope="module")
def processor():
    return build_processor(world.vocabulary(), image_size=ARCH.image_size,
                           patch_size=ARCH.patch_size)


def test_every_world_text_is_in_the_vocabulary(processor):
    unk = processor.tokenizer.unk_token_id
    for task in world.TASKS:
        for sample in world.generate(task, 200, 0):
            for text in (sample.question, *sample.answers):
                assert unk not in processor.tokenizer(text)["input_ids"], text


def test_processor_round_trip_and_label_masking(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert loaded.image_token_id == processor.image_token_id

    samples = world.generate("vqa", 3, 0) + world.generate("caption", 1, 0)
    images = [s.image for s in samples]
    questions = [s.question for s in samples]
    answers = [s.answers[0] for s in samples]
    batch = encode_with_answers(loaded, images, questions, answers)
    tok = loaded.tokenizer
    for ids, labels, question, answer in zip(batch["input_ids"], batch["labels"], questions,
                                             answers):
        assert (ids == loaded.image_token_id).sum() == IMAGE_TOKENS
        answer_ids = labels[labels != IGNORE_INDEX]  # the loss sees the answer and </s> only
        assert answer_ids[-1] == tok.eos_token_id
        assert tok.decode(answer_ids[:-1]) == answer
        text = tok.decode(ids[ids != loaded.image_token_id], skip_special_tokens=True)
        assert text.split() == f"user : {question} assistant : {answer}".split()
    assert batch["pixel_values"].shape == (4, 3, ARCH.image_size, ARCH.image_size)

    prompts = encode_prompts(loaded, images, questions)
    assert (prompts["input_ids"][:, -2:] == torch.tensor(tok.convert_tokens_to_ids(
        ["assistant", ":"]))).all()  # left-padded: every prompt ends at the last column
    assert prompts["attention_mask"][:, -1].all()


def test_counting_answers_are_balanced_and_spatial_answers_are_words_the_base_knows():
    counts = world.generate("count", 90, 0)
    assert [s.answers[0] for s in counts[:6]] == [*world.NUMBERS, *world.NUMBERS]
    assert {n: sum(s.answers[0] == n for s in counts) for n in world.NUMBERS} == dict.fromkeys(
        world.NUMBERS, 30)
    assert all((s.question, s.answers[0]) in world.count_pairs(s.scene) for s in counts)
    spatial = world.generate("spatial", 90, 0)
    assert all(len(s.scene.shapes) >= 2 for s in spatial)
    assert all((s.question, s.answers[0]) in world.spatial_pairs(s.scene) for s in spatial)
    caption_words = {w for s in world.generate("caption", 200, 0) for ref in s.answers
                     for w in ref.split()}
    assert {s.answers[0] for s in spatial} <= caption_words


# --- the shipped checkpoints -------------------------------------------------------------

def _results(model_dir: Path, tasks: dict[str, Path]) -> dict[str, EvalResult]:
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    proc = AutoProcessor.from_pretrained(model_dir)
    return {task: evaluate(model, proc, read_examples(path)[:N_EVAL], EVAL_TASKS[task])
            for task, path in tasks.items()}


@pytest.fixture(scope="module")
def demo_results() -> dict[str, dict[str, dict[str, EvalResult]]]:
    """Per story, the shipped base and fine-tuned models, loaded like hub models, on the
    first N_EVAL examples of each set (the base's caption and VQA scores are shared)."""
    original = {task: DEMO / f"{task}_eval.jsonl" for task in ("caption", "vqa")}
    base = _results(DEMO / "base", original)
    results = {}
    for story, folder in STORY_DIRS.items():
        target = {"target": folder / "target_eval.jsonl"}
        results[story] = {"base": {**base, **_results(DEMO / "base", target)},
                          "finetuned": _results(folder / "finetuned", {**original, **target})}
    return results


def test_shipped_files_are_complete():
    assert (DEMO / "base" / "model.safetensors").stat().st_size < 15 * 2**20
    for task in ("caption", "vqa"):
        assert len(read_examples(DEMO / f"{task}_eval.jsonl")) == 150
    for folder in STORY_DIRS.values():
        assert (folder / "finetuned" / "model.safetensors").stat().st_size < 15 * 2**20
        assert len(read_examples(folder / "target_eval.jsonl")) == 150
        assert len(read_examples(folder / "target_calib.jsonl")) == 128
        calib = {e.image.read_bytes() for e in read_examples(folder / "target_calib.jsonl")}
        evaluation = {e.image.read_bytes() for e in read_examples(folder / "target_eval.jsonl")}
        assert not calib & evaluation


def test_counting_sets_are_balanced_and_scores_record_each_majority_baseline():
    scores = json.loads((DEMO / "scores.json").read_text())
    for story, folder in STORY_DIRS.items():
        recorded = scores["stories"][story]["majority"]
        for split in ("target_eval", "target_calib"):
            examples = read_examples(folder / f"{split}.jsonl")
            baseline = majority_baseline(examples, "vqa")
            assert recorded[split] == {"answer": baseline.answer, "share": round(baseline.share, 4),
                                       "score": round(baseline.score, 4)}
            if story == "counting":
                assert {ex.answers[0] for ex in examples} == set(world.NUMBERS)
                assert baseline.share <= 0.4
    assert scores["stories"]["counting"]["majority"]["train"]["share"] <= 0.4


@pytest.mark.parametrize("story", list(STORY_DIRS))
def test_finetuning_touched_only_the_last_half_of_the_decoder(story):
    base = load_file(DEMO / "base" / "model.safetensors")
    tuned = load_file(STORY_DIRS[story] / "finetuned" / "model.safetensors")
    assert base.keys() == tuned.keys()
    layer_of = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")
    n_layers = len({m.group(1) for name in base if (m := layer_of.search(name))})
    changed = [name for name in base if not torch.equal(base[name], tuned[name])]
    assert all(layer_of.search(name) for name in changed)
    assert {int(layer_of.search(name).group(1)) for name in changed} == set(
        range(n_layers // 2, n_layers))


def test_base_model_has_the_original_skills(demo_results):
    base = demo_results["spatial"]["base"]
    assert base["caption"].score > 3.0  # CIDEr-D, coco-caption scale (~1 is good on COCO)
    assert base["vqa"].score > 0.8


def test_base_captions_name_the_shapes_in_the_image(demo_results):
    examples = read_examples(DEMO / "caption_eval.jsonl")[:N_EVAL]
    shape = re.compile(r"(small|large) (\w+) (circle|square|triangle)")
    # The first reference lists every shape as "a <size> <colour> <kind>".
    right = [sorted(shape.findall(pred)) == sorted(shape.findall(ex.answers[0]))
             for pred, ex in zip(demo_results["spatial"]["base"]["caption"].predictions, examples)]
    assert sum(right) >= 0.7 * len(right)


# Per story: the base's target score stays under `base_below`, the fine-tune's goes over
# `tuned_above`, which clears the set's majority-answer baseline by `margin`.
TARGET_FLOORS = {"spatial": {"base_below": 0.4, "tuned_above": 0.5, "margin": 0.25},
                 "counting": {"base_below": 0.2, "tuned_above": 0.7, "margin": 0.3}}


@pytest.mark.parametrize("story", list(STORY_DIRS))
def test_finetuned_model_learnt_its_target_and_forgot(demo_results, story):
    base, tuned = demo_results[story]["base"], demo_results[story]["finetuned"]
    floors = TARGET_FLOORS[story]
    assert set(tuned["target"].predictions) <= ANSWER_WORDS[story]  # the target's answer words
    assert base["target"].score < floors["base_below"] < floors["tuned_above"] < tuned["target"].score
    examples = read_examples(STORY_DIRS[story] / "target_eval.jsonl")[:N_EVAL]
    assert tuned["target"].score > majority_baseline(examples, "vqa").score + floors["margin"]
    retention = (tuned["caption"].score / base["caption"].score
                 + tuned["vqa"].score / base["vqa"].score) / 2
    assert retention < 0.8  # forgetful: at least 20 % of the original score lost


def test_demo_build_is_byte_for_byte_deterministic_and_tunes_only_the_last_half(tmp_path):
    """`demo build` on a tiny recipe (seconds), twice: every file identical, both stories
    written, and each fine-tune moved only the last half of the decoder."""
    from tailor_ui.demo.build import Recipe, Story, build_demo

    recipe = Recipe(eval_size=4, calib_size=4, vision_epochs=1, base_examples_per_task=16, base_epochs=1,
                    stories=tuple(Story(s.name, examples=16, epochs=1, lr=s.lr, batch=8, warmup=1)
                                  for s in STORIES))
    first, second = tmp_path / "a", tmp_path / "b"
    for folder in (first, second):
        build_demo(folder, recipe=recipe)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    different = [f for f in files if (first / f).read_bytes() != (second / f).read_bytes()]
    assert different == []
    base = load_file(first / "base" / "model.safetensors")
    tuned_names = re.compile(r"language_model\.(model\.)?layers\.[23]\.")
    for story in STORIES:
        tuned = load_file(first / story.folder / "finetuned" / "model.safetensors")
        moved = {n for n in base if not torch.equal(base[n], tuned[n])}
        assert moved and all(tuned_names.search(n) for n in moved), story.name
        assert len(read_examples(first / story.folder / "target_eval.jsonl")) == 4
