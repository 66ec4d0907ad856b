"""Training for the demo pair: batches from the world, and one plain AdamW loop.

Both the base's from-scratch training and the fine-tuning use `train`; they differ only in
data, trainable parameters and learning rate, as a real pre-train / fine-tune pair would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tailor_ui.demo import world
from tailor_ui.demo.world import Sample
from tailor_ui.prompts import encode_with_answers

Progress = Callable[[str], None]


def encode_batches(processor, samples: Sequence[Sample], batch_size: int,
                   rng: np.random.Generator) -> list[dict]:
    """Shuffled, padded training batches; a caption sample trains on one of its references,
    drawn at random (as COCO training pairs an image with each of its captions)."""
    order = rng.permutation(len(samples))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = [samples[i] for i in order[start:start + batch_size]]
        answers = [s.answers[int(rng.integers(len(s.answers)))] for s in chunk]
        batches.append(encode_with_answers(processor, [s.image for s in chunk],
                                           [s.question for s in chunk], answers))
    return batches


def train(model: torch.nn.Module, batches: Sequence[dict], *, lr: float, epochs: int,
          trainable: Callable[[str], bool] = lambda name: True, weight_decay: float = 0.01,
          warmup_steps: int = 0, progress: Progress = print) -> list[float]:
    """AdamW with linear warm-up and cosine decay; parameters `trainable` rejects are frozen.

    Returns the mean loss of each epoch.
    """
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(trainable(name))
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    total = epochs * len(batches)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total - warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    epoch_losses = []
    for epoch in range(epochs):
        losses = []
        for step, batch in enumerate(batches, start=1):
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            if step % 100 == 0:
                progress(f"epoch {epoch + 1}/{epochs} step {step}/{len(batches)}: "
                         f"loss {np.mean(losses[-100:]):.3f}")
        epoch_losses.append(float(np.mean(losses)))
        progress(f"epoch {epoch + 1}/{epochs}: loss {epoch_losses[-1]:.3f}")
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    return epoch_losses


def pretrain_vision(vision_tower: torch.nn.Module, image_processor, samples: Sequence[Sample], *,
                    lr: float, epochs: int, batch_size: int, rng: np.random.Generator,
                    progress: Progress = print) -> float:
    """Pre-train the vision tower to recognise what is in each grid cell; returns accuracy.

    A real LLaVA starts from a pre-trained CLIP tower; ours has none to download, so it
    learns to see first, from per-patch labels (shape, colour, size of the shape in that
    cell, or empty) through linear heads that are then thrown away. Learning to see only
    through the language model's loss takes far longer than the build's time budget.
    """
    hidden = vision_tower.config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, len(world.SHAPES) + 1),
                                 torch.nn.Linear(hidden, len(world.COLOURS) + 1),
                                 torch.nn.Linear(hidden, len(world.SIZES) + 1)])
    pixels = image_processor([s.image for s in samples], return_tensors="pt")["pixel_values"]
    labels = torch.tensor([world.cell_labels(s.scene) for s in samples])  # (n, cells, 3)
    params = [*vision_tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95))
    vision_tower.train()
    for epoch in range(epochs):
        order = torch.from_numpy(rng.permutation(len(samples)))
        correct = total = 0
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            # The same features LLaVA feeds its projector: last layer, CLS dropped.
            feats = vision_tower(pixels[idx], output_hidden_states=True).hidden_states[-1][:, 1:]
            loss = 0.0
            for k, head in enumerate(heads):
                logits = head(feats)
                loss = loss + torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1), labels[idx][..., k].flatten())
                correct += (logits.argmax(-1) == labels[idx][..., k]).sum().item()
                total += labels[idx][..., k].numel()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        progress(f"vision epoch {epoch + 1}/{epochs}: cell accuracy {correct / total:.3f}")
    vision_tower.eval()
    return correct / total
