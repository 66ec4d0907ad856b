"""Turn examples into model inputs through the model's own processor and chat template.

Generation, calibration and training all go through here so the three see the same
prompt layout: a user turn holding the image and the question (nothing but the image for
captioning), then the assistant's answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

IGNORE_INDEX = -100  # label value that the loss skips (prompt and padding tokens)
Batch = dict[str, torch.Tensor]  # a processor's output: input ids, pixel values, masks…


def _messages(question: str, answer: str | None) -> list[dict]:
    content: list[dict] = [{"type": "image"}]
    if question:
        content.append({"type": "text", "text": question})
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def _has_template(processor) -> bool:
    # InstructBLIP and BLIP-2 ship none: their processors insert the image's query tokens
    # themselves and take the plain question as the prompt
    return getattr(processor, "chat_template", None) is not None


def prompt_text(processor, question: str) -> str:
    """The text that precedes the answer, up to and including the assistant's cue."""
    if not _has_template(processor):
        return question
    return processor.apply_chat_template(_messages(question, None), add_generation_prompt=True)


def answer_text(processor, question: str, answer: str) -> str:
    """What the chat template writes after the prompt for this answer (end marker included)."""
    if not _has_template(processor):
        return (" " if question else "") + answer + (processor.tokenizer.eos_token or "")
    prompt = prompt_text(processor, question)
    full = processor.apply_chat_template(_messages(question, answer))
    if full.startswith(prompt):
        return full[len(prompt):]
    eos = processor.tokenizer.eos_token or ""
    return answer + eos


def encode_prompts(processor, images: Sequence[Image.Image], questions: Sequence[str]) -> dict:
    """Left-padded inputs for generation: the answers are appended on the right."""
    texts = [prompt_text(processor, q) for q in questions]
    return dict(processor(images=list(images), text=texts, padding=True,
                          padding_side="left", return_tensors="pt"))


def encode_with_answers(processor, images: Sequence[Image.Image], questions: Sequence[str],
                        answers: Sequence[str]) -> dict:
    """Right-padded prompt+answer inputs with labels on the answer tokens only.

    Used for training and for target-task calibration (the layers see the answer tokens
    just as they did during fine-tuning).
    """
    prompts = [prompt_text(processor, q) for q in questions]
    fulls = [p + answer_text(processor, q, a) for p, q, a in zip(prompts, questions, answers)]
    batch = dict(processor(images=list(images), text=fulls, padding=True,
                           padding_side="right", return_tensors="pt"))
    prompt_ids = processor(images=list(images), text=prompts, padding=True,
                           padding_side="right", return_tensors="pt")
    prompt_lens = prompt_ids["attention_mask"].sum(dim=1)
    labels = batch["input_ids"].clone()
    positions = torch.arange(labels.shape[1]).unsqueeze(0)
    labels[positions < prompt_lens.unsqueeze(1)] = IGNORE_INDEX
    labels[batch["attention_mask"] == 0] = IGNORE_INDEX
    batch["labels"] = labels
    return batch
