"""Generation and evaluation on a tiny random LLaVA (CPU, a few seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tailor_ui.data import Example, load_image
from tailor_ui.demo.model import DemoArch, make_model
from tailor_ui.demo.processor import build_processor
from tailor_ui.errors import UserError
from tailor_ui.evaluation import (EvalResult, answer_one, evaluate, generate_answers,
                                  majority_baseline, save_result, score_predictions,
                                  vqa_accuracy)
from tailor_ui.prompts import encode_prompts

WORDS = "what colour is the shape how many a red blue green circle square one two".split()
QUESTIONS = ["", "what colour is the shape ?", "how many ?", "what is the red shape ?", "",
             "what colour is the circle ?"]
MAX_NEW = 6


@pytest.fixture(scope="module")
def processor():
    return build_processor(WORDS, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    arch = DemoArch(image_size=32, patch_size=8, vision_hidden=32, vision_layers=2,
                    text_hidden=32, text_layers=2, heads=2)
    return make_model(processor, arch).eval()


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i, question in enumerate(QUESTIONS):
        path = folder / f"{i}.png"
        # different sizes and colours: the processor resizes, the model sees different inputs
        Image.new("RGB", (32 + 8 * i, 40), (40 * i, 255 - 40 * i, 90)).save(path)
        out.append(Example(image=path, question=question, answers=("red circle", "a circle")))
    return out


def greedy_by_hand(model, processor, example: Example) -> str:
    """Reference decoding without `generate`: unbatched argmax steps over a KV cache."""
    inputs = encode_prompts(processor, [load_image(example.image)], [example.question])
    mask = inputs["attention_mask"]
    new_ids: list[int] = []
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        for _ in range(MAX_NEW):
            next_id = int(out.logits[0, -1].argmax())
            new_ids.append(next_id)
            if next_id == processor.tokenizer.eos_token_id:
                break
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
            out = model(input_ids=torch.tensor([[next_id]]), attention_mask=mask,
                        past_key_values=out.past_key_values, use_cache=True)
    return processor.tokenizer.decode(new_ids, skip_special_tokens=True).strip()


def test_answers_are_greedy_decodes_of_new_tokens_only(model, processor, examples):
    answers = generate_answers(model, processor, examples, batch_size=4, max_new_tokens=MAX_NEW)
    assert len(answers) == len(examples)
    assert all(isinstance(a, str) for a in answers)
    assert answers == [greedy_by_hand(model, processor, ex) for ex in examples]
    assert any(answers)  # the comparison is not vacuous


def test_batch_size_does_not_change_answers(model, processor, examples):
    # Left padding differs between these partitions (the questions differ in length).
    by_one = generate_answers(model, processor, examples, batch_size=1, max_new_tokens=MAX_NEW)
    by_four = generate_answers(model, processor, examples, batch_size=4, max_new_tokens=MAX_NEW)
    all_at_once = generate_answers(model, processor, examples, batch_size=64,
                                   max_new_tokens=MAX_NEW, progress=True)
    assert by_one == by_four == all_at_once


def test_answer_one_matches_batched(model, processor, examples):
    batched = generate_answers(model, processor, examples[:2], max_new_tokens=MAX_NEW)
    for ex, expected in zip(examples[:2], batched):
        image = Image.open(ex.image).convert("RGBA")  # answer_one converts to RGB
        assert answer_one(model, processor, image, ex.question, MAX_NEW) == expected


def test_half_precision_model_and_training_mode_restored(model, processor, examples):
    half = make_model(processor, DemoArch(image_size=32, patch_size=8, vision_hidden=32,
                                          vision_layers=2, text_hidden=32, text_layers=2,
                                          heads=2)).to(torch.bfloat16).train()
    answers = generate_answers(half, processor, examples[:2], max_new_tokens=2)
    assert len(answers) == 2  # float32 pixel values were cast to bfloat16
    assert half.training


def test_evaluate_vqa_scores_its_own_answers_perfectly(model, processor, examples):
    answers = generate_answers(model, processor, examples, max_new_tokens=MAX_NEW)
    own = [Example(ex.image, ex.question, (a,)) for ex, a in zip(examples, answers)]
    result = evaluate(model, processor, own, "vqa", batch_size=3, max_new_tokens=MAX_NEW)
    assert result.task == "vqa" and result.metric == "vqa_accuracy"
    assert result.predictions == answers
    assert result.score == result.metrics["vqa_accuracy"] == 1.0
    assert result.per_example == [1.0] * len(examples)
    assert result.n == len(examples) and result.seconds > 0


def test_evaluate_caption_and_save(model, processor, examples, tmp_path):
    result = evaluate(model, processor, examples, "caption", max_new_tokens=MAX_NEW)
    assert set(result.metrics) == {"cider_d", "bleu4"}
    assert result.score == result.metrics["cider_d"]
    assert len(result.per_example) == len(result.predictions) == result.n == len(examples)
    assert score_predictions(result.predictions, examples, "caption") == (
        result.metrics, result.per_example)

    path = tmp_path / "out" / "result.json"
    save_result(result, path)
    assert EvalResult(**json.loads(path.read_text())) == result
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]  # no temp file left


def test_unscorable_sets_are_refused_before_generating(model, processor, examples):
    no_answers = [Example(examples[0].image, "what colour ?")]
    with pytest.raises(UserError, match="no reference answers"):
        evaluate(model, processor, no_answers, "vqa")
    with pytest.raises(UserError, match="unknown task"):
        evaluate(model, processor, examples, "count")  # type: ignore[arg-type]


def test_majority_baseline_is_the_score_of_always_giving_the_commonest_answer(tmp_path):
    image = tmp_path / "x.png"
    mixed = ("two",) * 2 + ("one",) * 8  # two annotators of ten said "two"
    vqa = [Example(image, "q", answers) for answers in
           [("two",) * 10, ("two",) * 10, mixed, ("three",) * 10, ("one",) * 10]]
    baseline = majority_baseline(vqa, "vqa")
    assert (baseline.answer, baseline.share) == ("two", 0.6)  # 3 examples, "one" 2, "three" 1
    assert baseline.score == pytest.approx((1 + 1 + vqa_accuracy("two", list(mixed))) / 5)
    assert 0.4 < baseline.score < 0.6  # the mixed example gives partial credit
    tie = majority_baseline(vqa[3:], "vqa")
    assert (tie.answer, tie.share, tie.score) == ("three", 0.5, 0.5)  # ties: the first seen
    captions = [Example(image, "", ("a red circle", "a circle")), Example(image, "", ("a circle",))]
    assert majority_baseline(captions, "caption").answer == "a circle"
    with pytest.raises(UserError, match="empty"):
        majority_baseline([], "vqa")
