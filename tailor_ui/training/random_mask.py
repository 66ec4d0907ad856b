"""A random sparse mask: the control for Model-Dowser (ours, not from a paper).

Of each trained linear weight exactly round(ρ·n) entries, drawn uniformly at random (seeded
by the run's seed and the tensor's position), train; everything else is Model-Dowser's
machinery (gradients and weight decay masked, norms and biases train fully). At the same ρ,
Model-Dowser's importance mask only earns its probing if it beats this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tailor_ui.training.dowser import DowserTraining, keep_lowest, linear_weights
from tailor_ui.training.method import RunSetup


def random_masks(model: torch.nn.Module, weights: Sequence[str], rho: float,
                 seed: int) -> dict[str, torch.Tensor]:
    """For each named weight, exactly round(ρ·n) entries drawn uniformly (seeded)."""
    out = {}
    for index, name in enumerate(weights):
        shape = model.get_parameter(name).shape
        generator = torch.Generator().manual_seed(seed * 100_003 + index)
        out[name] = keep_lowest(torch.rand(shape, generator=generator), rho)
    return out


class RandomMaskTraining(DowserTraining):
    """Random-mask control: Model-Dowser's training with the mask drawn at random."""

    label = "Random mask (sparse control)"
    short = "random-mask"
    about = ("only a random ρ of the entries of each weight matrix move, drawn per run: the "
             "control Model-Dowser's importance mask must beat (ours, not from a paper).")
    options = {"rho": 0.1}

    def settings(self) -> dict[str, Any]:
        return {"rho": self.values["rho"]}

    def prepare(self, setup: RunSetup) -> None:
        model = setup.model
        self.use_masks(model, random_masks(model, linear_weights(model, setup.names),
                                           self.values["rho"], setup.seed))
