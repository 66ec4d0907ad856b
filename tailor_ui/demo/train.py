"""The demo's vision pre-training (the language model trains on `tailor_ui.training.loop`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from tailor_ui.demo import world
from tailor_ui.demo.world import Sample

Progress = Callable[[str], None]


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
