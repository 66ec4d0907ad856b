"""Greedy answers from any image-text-to-text model, batched.

Every score in the studio (base, fine-tuned, each patched model) comes from here, so the
decoding is fixed: greedy, prompts built by `tailor_ui.prompts` exactly as in training and
calibration, and only the newly generated tokens decoded. Batching must not change an
answer: prompts are left-padded with an attention mask, so a batch of 16 and 16 single
calls give the same text (the tests check this).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from PIL import Image
from tqdm.auto import tqdm

from tailor_ui.weights import to_model
from tailor_ui.data import Example, load_image
from tailor_ui.prompts import encode_prompts


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Switch off dropout for the duration, then restore the caller's mode (a model may be
    evaluated in the middle of training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _generate(model, processor, images: Sequence[Image.Image], questions: Sequence[str],
              max_new_tokens: int) -> list[str]:
    inputs = to_model(encode_prompts(processor, images, questions), model)
    tokenizer = processor.tokenizer
    # Many checkpoints leave the pad id unset, and generate() would warn on every call.
    pad_id = next((i for i in (model.generation_config.pad_token_id, tokenizer.pad_token_id,
                               tokenizer.eos_token_id) if i is not None), None)
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, num_beams=1,
                                max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    # Left padding puts every prompt's end at the same column; what follows is the answer.
    new_tokens = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def generate_answers(model, processor, examples: Sequence[Example], *, batch_size: int = 16,
                     max_new_tokens: int = 32, progress: bool = False) -> list[str]:
    """One greedy answer per example, in order.

    Images are loaded one batch at a time so a large evaluation set never sits in memory.
    `progress` shows a tqdm bar (for the CLI; the dashboard reports its own progress).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    answers: list[str] = []
    starts = range(0, len(examples), batch_size)
    with _eval_mode(model):
        for start in tqdm(starts, desc="generating", unit="batch", disable=not progress):
            batch = examples[start:start + batch_size]
            images = [load_image(ex.image) for ex in batch]
            answers.extend(_generate(model, processor, images, [ex.question for ex in batch],
                                     max_new_tokens))
    return answers


def answer_one(model, processor, image: Image.Image, question: str,
               max_new_tokens: int = 32) -> str:
    """The greedy answer for one in-memory image (the dashboard's side-by-side compare)."""
    with _eval_mode(model):
        return _generate(model, processor, [image.convert("RGB")], [question], max_new_tokens)[0]
