"""The metrics against coco-caption's reference scorers and the official VQA examples."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from tailor_ui.evaluation.metrics import (bleu4, cider_d, cider_d_per_example,
                                          mean_vqa_accuracy, normalize_vqa_answer,
                                          tokenize_caption, vqa_accuracy)


def coco_scores(candidates: list[str], references: list[list[str]]) -> tuple[float, list, float]:
    """(CIDEr-D, per-example CIDEr-D, BLEU-4) from pycocoevalcap on our tokenisation."""
    gts = {i: [tokenize_caption(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize_caption(c)] for i, c in enumerate(candidates)}
    cider, per_example = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return float(cider), list(per_example), bleu[3]


def assert_matches_coco(candidates: list[str], references: list[list[str]]) -> None:
    cider, per_example, bleu = coco_scores(candidates, references)
    assert cider_d(candidates, references) == pytest.approx(cider, abs=1e-6)
    assert cider_d_per_example(candidates, references) == pytest.approx(per_example, abs=1e-6)
    assert bleu4(candidates, references) == pytest.approx(bleu, abs=1e-6)


HAND_MADE = [
    (["a man riding a horse on a beach", "two dogs play in the snow",
      "a plate of food with broccoli"],
     [["a man rides a horse along the beach", "a person on a horse near the ocean"],
      ["two dogs playing in snow", "dogs running through the snow", "a pair of dogs in snow"],
      ["a plate with broccoli and rice", "food on a white plate"]]),
    # punctuation, case and clitics go through the tokeniser on our side only
    (["A dog's ball, red.", "The cat isn't sleeping!"],
     [["The dog's red ball.", "a red ball"], ["a cat that isn't asleep", "the cat is awake"]]),
    # one word, empty candidate, and a candidate longer than every reference
    (["dog", "", "a very very long caption that keeps going and going on and on"],
     [["a dog", "dog"], ["a cat on a mat"], ["a short one", "short"]]),
]


@pytest.mark.parametrize(("candidates", "references"), HAND_MADE)
def test_hand_made_corpora_match_coco(candidates, references):
    assert_matches_coco(candidates, references)


@pytest.mark.parametrize("seed", range(8))
def test_random_corpora_match_coco(seed):
    rng = random.Random(seed)
    vocab = "a the dog cat man runs sits on in grass red big".split()

    def sentence() -> list[str]:
        return rng.choices(vocab, k=rng.randint(3, 12))

    def perturbed(words: list[str]) -> str:
        """A candidate that shares many n-grams with a reference, as real ones do."""
        kept = [w if rng.random() < 0.8 else rng.choice(vocab) for w in words
                if rng.random() < 0.9]
        return " ".join(kept)

    n = rng.randint(3, 12)
    references = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(n)]
    candidates = [perturbed(rng.choice(refs)) for refs in references]
    references = [[" ".join(r) for r in refs] for refs in references]
    assert_matches_coco(candidates, references)
    assert bleu4(candidates, references) > 1e-3  # the comparison exercised real 4-grams


def test_identical_candidate_and_reference():
    corpus = ["a man riding a horse on the beach", "two dogs play in the snow"]
    assert bleu4(corpus, [[c] for c in corpus]) == pytest.approx(1.0)
    # With two images every n-gram of one reference set has IDF log(2); perfect copies
    # score cosine 1 at every order, times 10.
    other = [["a cat sleeps"], ["a bird sings"]]
    perfect = cider_d_per_example(corpus, [[c] for c in corpus])
    assert perfect == pytest.approx([10.0, 10.0])
    assert cider_d(corpus, other) == 0.0


def test_brevity_penalty_uses_closest_reference_length():
    # 4-word candidate, references of 4 and 8 words: the closest (4) means no penalty.
    cand = ["the dog runs fast"]
    assert bleu4(cand, [["the dog runs fast", "a b c d e f g h"]]) == pytest.approx(1.0)
    # Only an 8-word reference: BP = exp(1 - 8/4).
    refs = [["the dog runs fast and far away now"]]
    assert bleu4(cand, refs) == pytest.approx(math.exp(1 - 8 / 4), rel=1e-6)


def test_single_image_corpus_has_zero_idf():
    # log(#images) = log(1) = 0, so every TF-IDF weight vanishes (coco-caption agrees).
    assert cider_d(["a dog"], [["a dog"]]) == 0.0


def test_tokenizer_follows_ptb_conventions():
    assert tokenize_caption("A Dog's ball, RED.") == "a dog 's ball red"
    assert tokenize_caption("Don't (really) -- stop...") == "do n't really stop"
    assert tokenize_caption('a "black-and-white" cat at 3.5 o\'clock') == (
        "a black-and-white cat at 3.5 o'clock")
    assert tokenize_caption("the dog’s “ball”") == "the dog 's ball"


def test_corpus_shape_errors():
    with pytest.raises(ValueError):
        cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        bleu4([], [])
    with pytest.raises(ValueError):
        cider_d(["a", "b"], [["a"], []])


@pytest.mark.parametrize(("raw", "normalised"), [
    ("Two", "2"), ("a dog.", "dog"), ("yes!", "yes"), ("dont", "don't"),
    ("The  Ten\tcats", "10 cats"), ("3.5", "3.5"), ("1,000", "1000"),
    ("red/blue", "red blue"), ("red / blue", "red blue"), ("none", "0"),
])
def test_vqa_normalisation_matches_official_script(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(("matches", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                                   (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_annotators(matches, expected):
    answers = ["cat"] * matches + ["dog"] * (10 - matches)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(expected)


def test_vqa_accuracy_few_annotators():
    assert vqa_accuracy("Two", ["2"]) == 1.0
    assert vqa_accuracy("three", ["2"]) == 0.0
    assert vqa_accuracy("cat", ["cat", "cat"]) == 1.0
    assert vqa_accuracy("cat", ["cat", "dog"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        vqa_accuracy("cat", [])
    assert mean_vqa_accuracy(["yes", "no"], [["yes"], ["yes"]]) == pytest.approx(0.5)


_words = st.sampled_from(["a", "dog", "cat", "red", "runs", "the", "on"])
_sentences = st.lists(_words, max_size=8).map(" ".join)


@st.composite
def corpora(draw):
    n = draw(st.integers(1, 6))
    candidates = draw(st.lists(_sentences, min_size=n, max_size=n))
    references = draw(st.lists(st.lists(_sentences, min_size=1, max_size=4),
                               min_size=n, max_size=n))
    return candidates, references


@settings(max_examples=60, deadline=None)
@given(corpora(), st.randoms(use_true_random=False))
def test_scores_in_range_and_permutation_invariant(corpus, rnd):
    candidates, references = corpus
    cider, bleu = cider_d(candidates, references), bleu4(candidates, references)
    assert 0.0 <= bleu <= 1.0 + 1e-9
    assert 0.0 <= cider <= 10.0 + 1e-9
    order = list(range(len(candidates)))
    rnd.shuffle(order)
    shuffled = ([candidates[i] for i in order], [references[i] for i in order])
    assert cider_d(*shuffled) == pytest.approx(cider, abs=1e-9)
    assert bleu4(*shuffled) == pytest.approx(bleu, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=30), st.lists(st.text(max_size=10), min_size=1, max_size=10))
def test_vqa_accuracy_in_range(prediction, answers):
    assert 0.0 <= vqa_accuracy(prediction, answers) <= 1.0
    # an exact copy of one of at least four agreeing annotators always gets full credit
    assert vqa_accuracy(answers[0], answers[:1] * 4) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_tokenizer_is_idempotent(text):
    once = tokenize_caption(text)
    assert tokenize_caption(once) == once
