"""Captioning and VQA metrics, written to reproduce the reference scorers exactly.

Forgetting is measured as a ratio to the base model's score, so a metric that drifts from
the published definition by a point distorts every retention number. CIDEr-D and BLEU-4
therefore follow coco-caption (`pycocoevalcap`) line for line, quirks included, and VQA
accuracy follows the official VQA evaluation script; the tests check both against the
reference code. Everything here is plain Python: no torch, no Java.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

NGRAM_ORDER = 4
CIDER_SIGMA = 6.0

NGram = tuple[str, ...]

# ---------------------------------------------------------------------------------------
# Caption tokenisation
# ---------------------------------------------------------------------------------------

# coco-caption runs Stanford's PTBTokenizer with -lowerCase, then drops these tokens.
_PTB_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)
# What we drop: the list above, written as the raw characters PTB would have converted
# (brackets become -LRB- etc., double quotes become `` or '').
_DROPPED = _PTB_PUNCTUATION | frozenset(['"', "(", ")", "[", "]", "{", "}"])
# Typographic quotes count as their ASCII forms (PTB normalises them too).
_ASCII_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"'})
# PTB splits these clitics off the word before them: "don't" -> "do n't", "dog's" -> "dog 's".
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(
    r"n't|'(?:s|re|ve|ll|d|m)\b"  # clitics split off above
    r"|\d+(?:[.,]\d+)+"  # numbers keep their separators: 3.5, 1,000
    r"|\w+(?:[-/&']\w+)*"  # words keep inner hyphens, slashes, apostrophes: o'clock
    r"|\.\.\.|--|\S"  # anything else is a one-character token
)


def tokenize_caption(text: str) -> str:
    """Lower-case, PTB-style tokens joined by single spaces, punctuation removed.

    A small stand-in for coco-caption's PTBTokenizer (which needs Java): it agrees with it
    on plain English captions -- lower case, clitics split ("don't" -> "do n't"), the PTB
    punctuation tokens dropped. Known differences, all rare in captions: PTB keeps square
    brackets as "-lsb-"/"-rsb-" tokens and splits a few abbreviations differently.
    Idempotent, so already-tokenised text passes through unchanged.
    """
    text = _CLITIC.sub(r" \1", text.lower().translate(_ASCII_QUOTES))
    return " ".join(tok for tok in _TOKEN.findall(text) if tok not in _DROPPED)


def _ngram_counts(words: Sequence[str], order: int = NGRAM_ORDER) -> Counter[NGram]:
    counts: Counter[NGram] = Counter()
    for k in range(1, order + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check_corpus(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference sets")
    if not candidates:
        raise ValueError("cannot score an empty corpus")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every candidate needs at least one reference")


# ---------------------------------------------------------------------------------------
# CIDEr-D
# ---------------------------------------------------------------------------------------

def _tfidf(counts: Counter[NGram], doc_freq: Counter[NGram], log_n_docs: float
           ) -> tuple[list[dict[NGram, float]], list[float], int]:
    """Per-order TF-IDF vectors, their norms, and coco-caption's "length".

    That length is the number of *bigrams* (a quirk of the reference code, which counts
    terms where the 0-based order index equals 1). It is the word count minus one for any
    non-empty sentence, so length differences match word-length differences except
    against an empty sentence; we keep it so scores match the published numbers.
    """
    vec: list[dict[NGram, float]] = [{} for _ in range(NGRAM_ORDER)]
    norm = [0.0] * NGRAM_ORDER
    length = 0
    for ngram, tf in counts.items():
        order = len(ngram) - 1
        weight = float(tf) * (log_n_docs - math.log(max(1.0, doc_freq[ngram])))
        vec[order][ngram] = weight
        norm[order] += weight * weight
        if order == 1:
            length += tf
    return vec, [math.sqrt(x) for x in norm], length


def cider_d_per_example(candidates: Sequence[str], references: Sequence[Sequence[str]]
                        ) -> list[float]:
    """CIDEr-D of each candidate against its references, with corpus-wide IDF.

    Document frequency counts, for each n-gram, the examples whose reference set contains
    it; the IDF is log(#examples) - log(max(1, df)). Each candidate/reference pair scores
    the mean over n = 1..4 of the cosine of TF-IDF vectors with the candidate's weights
    clipped by the reference's, times a Gaussian length penalty (sigma = 6); the result is
    averaged over references and multiplied by 10 (coco-caption's scale: ~1 is good).
    A score depends on the whole corpus through the IDF, so score corpora, not sentences.
    """
    _check_corpus(candidates, references)
    cand_counts = [_ngram_counts(tokenize_caption(c).split()) for c in candidates]
    ref_counts = [[_ngram_counts(tokenize_caption(r).split()) for r in refs]
                  for refs in references]
    doc_freq: Counter[NGram] = Counter()
    for refs in ref_counts:
        doc_freq.update(set().union(*refs))
    log_n_docs = math.log(float(len(candidates)))
    penalty_denominator = 2 * CIDER_SIGMA ** 2

    scores = []
    for cand, refs in zip(cand_counts, ref_counts):
        vec, norm, length = _tfidf(cand, doc_freq, log_n_docs)
        total = 0.0
        for ref in refs:
            vec_ref, norm_ref, length_ref = _tfidf(ref, doc_freq, log_n_docs)
            penalty = math.exp(-float(length - length_ref) ** 2 / penalty_denominator)
            for order in range(NGRAM_ORDER):
                val = sum(min(w, vec_ref[order].get(g, 0.0)) * vec_ref[order].get(g, 0.0)
                          for g, w in vec[order].items())
                if norm[order] != 0 and norm_ref[order] != 0:
                    val /= norm[order] * norm_ref[order]
                total += val * penalty
        scores.append(total / NGRAM_ORDER / len(refs) * 10.0)
    return scores


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_per_example` (coco-caption's reported value)."""
    scores = cider_d_per_example(candidates, references)
    return sum(scores) / len(scores)


# ---------------------------------------------------------------------------------------
# BLEU-4
# ---------------------------------------------------------------------------------------

# coco-caption's smoothing constants: a zero match count gives ~1e-15/1e-9, not a crash.
_TINY = 1e-15
_SMALL = 1e-9


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 as coco-caption computes it.

    Clipped n-gram matches (each n-gram counted at most its maximum count in any one
    reference) and candidate n-gram totals are summed over the corpus before the
    geometric mean over n = 1..4; the brevity penalty compares the total candidate length
    with the total of, per example, the reference length closest to the candidate's
    (ties go to the shorter reference).
    """
    _check_corpus(candidates, references)
    correct = [0] * NGRAM_ORDER
    guess = [0] * NGRAM_ORDER
    test_len = 0
    ref_len = 0
    for cand, refs in zip(candidates, references):
        words = tokenize_caption(cand).split()
        ref_words = [tokenize_caption(r).split() for r in refs]
        max_ref_counts: Counter[NGram] = Counter()
        for rw in ref_words:
            max_ref_counts |= _ngram_counts(rw)
        for ngram, count in _ngram_counts(words).items():
            correct[len(ngram) - 1] += min(max_ref_counts[ngram], count)
        for k in range(NGRAM_ORDER):
            guess[k] += max(0, len(words) - k)
        test_len += len(words)
        ref_len += min((abs(len(rw) - len(words)), len(rw)) for rw in ref_words)[1]

    precision_product = 1.0
    for k in range(NGRAM_ORDER):
        precision_product *= (correct[k] + _TINY) / (guess[k] + _SMALL)
    score = precision_product ** (1.0 / NGRAM_ORDER)
    ratio = (test_len + _TINY) / (ref_len + _SMALL)
    if ratio < 1:
        score *= math.exp(1 - 1 / ratio)
    return score


# ---------------------------------------------------------------------------------------
# VQA accuracy
# ---------------------------------------------------------------------------------------

# The official VQA evaluation script's tables, verbatim (its odd entries included: the
# capitalised keys never match after lower-casing, exactly as in the original).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset(["a", "an", "the"])
# Official regex, kept as written: "(?!<=\d)" is a look-*ahead* (a typo for a look-behind),
# so the effect is "drop a period not followed by a digit" ("3.5" survives, "dog." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]
# A match needs this many agreeing annotators for full credit (VQA's "3 of 10").
_VQA_FULL_CREDIT = 3


def _process_punctuation(text: str) -> str:
    out = text
    # The official test for each mark looks at the original text, not the running result.
    strip_marks = _COMMA_BETWEEN_DIGITS.search(text) is not None
    for p in _PUNCT:
        if strip_marks or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation: punctuation, lower case, number words to
    digits, articles dropped, missing apostrophes restored ("dont" -> "don't").

    E.g. "Two" -> "2", "a dog." -> "dog", "yes!" -> "yes". (The official script only
    passes the period-strip regex a count of 32 by accident, which no short answer hits.)
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA soft accuracy of one prediction against the annotators' answers (0 to 1).

    With 10 answers this is the official metric: for each annotator left out in turn,
    min(#other annotators who gave the prediction / 3, 1), averaged -- so 1 match scores
    0.3, 2 score 0.6, 3 score 0.9 and 4 or more score 1.0.

    Differences from the official script, both deliberate: (1) the references get the same
    full normalisation as the prediction (the script only strips their punctuation because
    the official annotations are pre-normalised; for them this changes nothing except that
    a reference "none" now matches a predicted "none"); (2) with n < 4 answers the
    full-credit threshold becomes max(n - 1, 1) agreeing annotators instead of 3, and a
    single answer is scored by exact match -- the official formula would cap such data
    sets below 1 (or at 0 for one answer). From 4 answers up it is the official formula.
    """
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    threshold = min(_VQA_FULL_CREDIT, len(refs) - 1)
    matches = sum(ref == pred for ref in refs)
    # Leaving out annotator i removes one match exactly when annotator i matched.
    return sum(min(1.0, (matches - (ref == pred)) / threshold) for ref in refs) / len(refs)


def mean_vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]
                      ) -> float:
    """Mean per-question VQA accuracy over a data set (a fraction, not a percentage)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} answer sets")
    if not predictions:
        raise ValueError("cannot score an empty data set")
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, references)) / len(predictions)
