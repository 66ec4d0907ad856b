"""Generation, captioning and VQA metrics, and scoring models on evaluation sets."""

from tailor_ui.evaluation.evaluate import (EvalResult, MajorityBaseline, evaluate, majority_baseline,
                                           save_result, score_predictions)
from tailor_ui.evaluation.generate import answer_one, generate_answers
from tailor_ui.evaluation.metrics import (bleu4, cider_d, cider_d_per_example,
                                          mean_vqa_accuracy, normalize_vqa_answer,
                                          tokenize_caption, vqa_accuracy)

__all__ = [
    "EvalResult", "MajorityBaseline", "answer_one", "bleu4", "cider_d", "cider_d_per_example",
    "evaluate", "generate_answers", "majority_baseline", "mean_vqa_accuracy", "normalize_vqa_answer", "save_result",
    "score_predictions", "tokenize_caption", "vqa_accuracy",
]
