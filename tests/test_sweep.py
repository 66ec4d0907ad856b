"""The forgetting table on a tiny random model pair (CPU, a few seconds)."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch
from PIL import Image

from tailor_ui.calibration import calibration_batches
from tailor_ui.control import Cancelled
from tailor_ui.data import Example
from tailor_ui.demo.model import DemoArch, make_model
from tailor_ui.demo.processor import build_processor
from tailor_ui.errors import UserError
from tailor_ui.evaluation.generate import generate_answers
from tailor_ui.evaluation.sweep import (EvalSet, gain_retention, h_score, parse_numbers, retention,
                                        MAJORITY, setting_label, sweep, sweep_grid)
from tailor_ui.pair import Pair
from tailor_ui.settings import Settings

WORDS = "what colour is the shape how many a red blue green circle square one two".split()
QUESTIONS = ["what colour is the shape ?", "how many ?", "what is the red shape ?",
             "what colour is the circle ?"]
MAX_NEW = 4
SETTINGS = [
    Settings(method="magnitude", keep=1.0),  # every change kept: the fine-tuned model
    Settings(method="magnitude", keep=0.0, others="base"),  # nothing kept: the base model
    Settings(method="tailor", keep=0.2, hessians="one-pass"),
    Settings(method="wise_ft", lam=0.5),
]


@pytest.fixture(scope="module")
def pair() -> Pair:
    processor = build_processor(WORDS, image_size=32, patch_size=8)
    torch.manual_seed(0)
    base = make_model(processor, DemoArch(image_size=32, patch_size=8, vision_hidden=32,
                                          vision_layers=2, text_hidden=32, text_layers=2,
                                          heads=2)).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():  # "fine-tune" the last decoder layer
        for name, p in tuned.named_parameters():
            if "language_model.layers.1." in name:
                p.add_(torch.randn_like(p))
    return Pair(base=base, finetuned=[tuned], processor=processor)


@pytest.fixture(scope="module")
def sets(pair, tmp_path_factory) -> tuple[list[EvalSet], list[EvalSet]]:
    """VQA sets whose references are the base's answers (original task) and the
    fine-tuned model's answers (target task), so the reference models score 1.0."""
    folder = tmp_path_factory.mktemp("images")
    examples = []
    for i, question in enumerate(QUESTIONS):
        path = folder / f"{i}.png"
        Image.new("RGB", (32, 32), (60 * i, 200 - 40 * i, 30)).save(path)
        examples.append(Example(image=path, question=question))

    def answered_by(model) -> list[Example]:
        answers = generate_answers(model, pair.processor, examples, max_new_tokens=MAX_NEW)
        return [Example(ex.image, ex.question, (a,)) for ex, a in zip(examples, answers)]

    captions = [Example(ex.image, "", ("a red circle", "a blue square")) for ex in examples]
    original = [EvalSet("vqa", "vqa", answered_by(pair.base), MAX_NEW),
                EvalSet("caption", "caption", captions, MAX_NEW)]
    target = [EvalSet("target", "vqa", answered_by(pair.finetuned[0]), MAX_NEW)]
    assert original[0].examples != target[0].examples  # the "fine-tuning" changed answers
    return original, target


@pytest.fixture(scope="module")
def table(pair, sets) -> pd.DataFrame:
    original, target = sets
    calibration = [calibration_batches(pair.processor, target[0].examples, batch_size=2)]
    before = {n: p.detach().clone() for n, p in pair.base.named_parameters()}
    events = []
    result = sweep(pair, SETTINGS, original, target, calibration, batch_size=3,
                   progress=lambda *event: events.append(event))
    after = dict(pair.base.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # base left as it came
    # one overall fraction across the merges and evaluations, only ever forward
    fractions = [done / total for _, done, total in events]
    assert fractions == sorted(fractions) and 0.9 < fractions[-1] <= 1
    assert sum(e[0].startswith("evaluating") for e in events) == 2 * 3  # base, fine-tuned: 3 sets each
    assert any(e[0].startswith("[3/4] Model Tailor") for e in events)
    assert any(e[0].startswith("[3/4] Model Tailor") and e[0].endswith("% of this step)") for e in events)
    return result


def test_columns_and_rows(table):
    assert list(table.columns) == [
        "kind", "method", "setting", "keep", "alpha", "lam", "score:vqa", "score:caption",
        "score:target", "original", "target", "original_retention", "target_retention",
        "target_gain", "h_score", "retention:vqa", "retention:caption", "retention:target",
        "patch_fraction", "linear_fraction", "seconds", "eval_seconds"]
    assert list(table["kind"]) == ["base", "finetuned", "majority"] + ["merged"] * len(SETTINGS)
    assert list(table["setting"]) == ["base", "finetuned", MAJORITY, "Magnitude patch keep=1",
                                      "Magnitude patch keep=0 others=base",
                                      "Model Tailor keep=0.2 alpha=0.8 hessians=one-pass",
                                      "WiSE-FT lam=0.5"]


def test_reference_rows_define_the_ratios(table):
    base, tuned = table.iloc[0], table.iloc[1]
    assert base["score:vqa"] == 1.0 and tuned["score:target"] == 1.0
    assert base["original"] == pytest.approx((base["score:vqa"] + base["score:caption"]) / 2)
    assert base["original_retention"] == 1.0 and tuned["target_retention"] == 1.0
    assert base["patch_fraction"] == 0.0 and 0.0 < tuned["patch_fraction"] < 1.0
    assert table["h_score"].tolist() == pytest.approx(
        [h_score(o, t) for o, t in zip(table["original"], table["target"])])
    per_set = [table[c] / base[c] for c in ("score:vqa", "score:caption") if base[c] > 0]
    assert table["original_retention"].tolist() == pytest.approx((sum(per_set) / len(per_set)).tolist())
    if base["score:caption"] > 0:
        assert table["retention:caption"].tolist() == pytest.approx((table["score:caption"] / base["score:caption"]).tolist())
    assert table["retention:target"].tolist() == pytest.approx((table["score:target"] / tuned["score:target"]).tolist())
    gain = tuned["score:target"] - base["score:target"]
    assert gain > 0 and base["target_gain"] == 0.0 and tuned["target_gain"] == 1.0
    assert table["target_gain"].tolist() == pytest.approx(((table["score:target"] - base["score:target"]) / gain).tolist())


def test_gain_retention_on_a_hand_made_table():
    base, tuned = {"a": 0.2, "b": 0.5, "c": 0.4}, {"a": 0.8, "b": 0.5, "c": 0.6}
    # set b did not gain: left out; a kept (0.5 - 0.2) / 0.6, c kept (0.4 - 0.4) / 0.2
    assert gain_retention({"a": 0.5, "b": 0.1, "c": 0.4}, base, tuned) == pytest.approx((0.5 + 0.0) / 2)
    assert gain_retention({"a": 1.1, "b": 0.0, "c": 0.2}, base, tuned) == pytest.approx((1.5 - 1.0) / 2)
    assert pd.isna(gain_retention({"b": 0.9}, {"b": 0.5}, {"b": 0.5}))


def test_extreme_patches_reproduce_the_reference_models(table):
    scores = ["score:vqa", "score:caption", "score:target"]
    base, tuned, keep_all, keep_none = (table.iloc[i] for i in (0, 1, 3, 4))
    assert keep_all[scores].tolist() == tuned[scores].tolist()
    assert keep_all["patch_fraction"] == pytest.approx(tuned["patch_fraction"])
    assert keep_none[scores].tolist() == base[scores].tolist()
    assert keep_none["patch_fraction"] == 0.0


def test_merged_rows_carry_their_knobs(table):
    tailor, wise = table.iloc[5], table.iloc[6]
    assert (tailor["keep"], tailor["alpha"]) == (0.2, 0.8) and pd.isna(tailor["lam"])
    assert tailor["linear_fraction"] == pytest.approx(0.2, abs=0.01)
    assert wise["lam"] == 0.5 and pd.isna(wise["keep"]) and pd.isna(wise["alpha"])
    assert (table.loc[table["kind"] == "merged", "seconds"] >= 0).all()
    assert table[["original", "target", "h_score"]].apply(lambda c: c.between(0, 1)).all().all()


def test_labels_and_h_score():
    assert setting_label(Settings(method="dare", keep=0.1)) == "DARE drop=0.9"
    assert setting_label(Settings(scope="row", compensate=False)) == (
        "Model Tailor keep=0.1 alpha=0.8 scope=row compensate=False")
    # a setting the method does not read does not name it (the dashboard sends every widget)
    assert setting_label(Settings(method="magnitude", compensation="anchored", others="base")) == (
        "Magnitude patch keep=0.1 others=base")
    assert h_score(0.5, 0.5) == 0.5
    assert h_score(1.0, 0.0) == 0.0 and h_score(0.0, 0.0) == 0.0
    assert h_score(0.9, 0.6) == pytest.approx(0.72)


def test_bad_sets_and_cancel_are_refused(pair, sets):
    original, target = sets
    with pytest.raises(UserError, match="unique"):  # one fine-tuned model: every target set is its
        sweep(pair, SETTINGS, original, target * 2)
    with pytest.raises(UserError, match="unique"):
        sweep(pair, SETTINGS, original, [original[0]])
    with pytest.raises(Cancelled):
        sweep(pair, SETTINGS, original, target, should_stop=lambda: True)


def test_retention_leaves_out_sets_the_reference_scores_zero_on():
    scores = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert retention(scores, {"a": 1.0, "b": 0.6}) == pytest.approx(0.5)
    assert retention(scores, {"a": 1.0, "b": 0.0, "c": None}) == pytest.approx(0.5)
    assert pd.isna(retention(scores, {"a": 0.0}))


def test_one_grid_for_cli_and_dashboard():
    grid = sweep_grid(["tailor", "magnitude", "wise_ft"], {"keep": [0.1, 0.2], "lam": [0.5, 1.5], "alpha": [0.5, 0.8]},
                      calibrated={"scope": ["block", "row"], "compensate": [False], "hessians": ["sequential"]})
    tailor = [(s.scope, s.alpha, s.keep) for s in grid if s.method == "tailor"]
    assert tailor == [(scope, a, k) for scope in ("block", "row") for a in (0.5, 0.8) for k in (0.1, 0.2)]
    assert all(not s.compensate and s.hessians == "sequential" for s in grid if s.method == "tailor")
    assert [s.keep for s in grid if s.method == "magnitude"] == [0.1, 0.2]
    assert [s.lam for s in grid if s.method == "wise_ft"] == [0.5, 1.5]
    with pytest.raises(UserError, match="unknown method 'nope'"):
        sweep_grid(["nope"], {"keep": [0.1], "lam": [0.5]})
    with pytest.raises(UserError, match="needs at least one λ"):
        sweep_grid(["wise_ft"], {"keep": [0.1], "lam": []})
    assert parse_numbers("0.5, 1.5", "--lam", 0.0, 2.0) == [0.5, 1.5]
    with pytest.raises(UserError, match=r"--lam values must lie in \[0, 2\]: 2.5 is outside"):
        parse_numbers("2.5", "--lam", 0.0, 2.0)


def test_the_majority_row_scores_always_giving_each_sets_commonest_answer(table, sets):
    row = table[table["kind"] == "majority"].iloc[0]
    original, target = sets
    for spec in (original[0], target[0]):  # one reference answer each: accuracy is the share
        answers = [ex.answers[0] for ex in spec.examples]
        commonest = max(set(answers), key=answers.count)
        assert row[f"score:{spec.name}"] == pytest.approx(sum(a == commonest for a in answers) / len(answers))
