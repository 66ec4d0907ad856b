"""The settings of one merge, shared by the engine, the CLI and the dashboard."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Literal

from tailor_ui.errors import UserError
from tailor_ui.methods.selection import SCOPES, Scope
from tailor_ui.methods.tailor import Sensitivity, Sign
from tailor_ui.patch import OverlapRule

from tailor_ui.methods import REGISTRY

Others = Literal["finetuned", "base", "linear"]
HessianMode = Literal["sequential", "one-pass"]
Compensation = Literal["exact", "greedy", "anchored"]
Order = Literal["mask-first", "sparsegpt"]
Budget = Literal["uniform", "per-layer"]

# the knobs that take one of a few words, with what the error calls them
_CHOICES: dict[str, tuple[str, tuple[str, ...]]] = {
    "scope": ("scope", SCOPES),
    "sign": ("compensation sign", ("obs", "released")),
    "compensation": ("compensation form", ("exact", "greedy", "anchored")),
    "order": ("mask order", ("mask-first", "sparsegpt")),
    "budget": ("patch budget", ("uniform", "per-layer")),
    "sensitivity": ("sensitivity form", ("change", "weight")),
    "hessians": ("Hessian mode", ("sequential", "one-pass")),
    "others": ("policy for other tensors", ("finetuned", "base", "linear")),
    "overlap": ("overlap rule", ("mean", "sum", "first")),
}


@dataclass(frozen=True)
class Settings:
    """Every knob of a merge. Defaults are docs/methods.md's defaults.

    keep: fraction of each selection group's entries taken from the fine-tuned model
      (tailor, magnitude, ties trimming; DARE keeps it in expectation: drop = 1 − keep).
    alpha: fusion weight of salience against sensitivity (tailor).
    scope: where the top-`keep` is chosen: per 128-column block, row, tensor, or model.
    others: tensors outside the selected linears (norms, biases, embeddings, lm_head):
      keep the fine-tuned values, revert to the base, or merge them like the linears.
    lam: λ of the methods that scale task vectors; None takes the method's default
      (`Method.defaults`: wise_ft 0.5, the others 1.0).
    gamma: fraction of the largest |τ| that Model Breadcrumbs removes (mergekit's gamma).
    epsilon: width of DELLA's window of keep probabilities around keep (mergekit's epsilon).
    compensation (tailor): "exact", each row's kept entries solved by least squares given
      the mask (`methods.exact`), "greedy", SparseGPT's column loop (the paper's form), or
      "anchored": scores, mask and exact compensation all of an objective that also holds
      the base's outputs on original-task calibration inputs (needs them:
      `run_method(anchor=…)`; `methods.exact.anchored_problem`).
    anchor_weight (tailor, anchored): μ, the weight of the original-task term against the
      target term (each a mean over its tokens).
    order (tailor, greedy): "sparsegpt" chooses each 128-column block's mask after the
      earlier blocks were compensated; "mask-first" chooses the whole mask first (paper).
    budget (tailor): "per-layer" shares the patch out by each layer's share of the raw
      fused score (one-pass Hessians, as a model-wide threshold); "uniform": keep everywhere.
    Which method reads which knob: `tailor_ui.methods.REGISTRY[method].knobs`.
    """

    method: str = "tailor"
    keep: float = 0.10
    alpha: float = 0.8
    scope: Scope = "block"
    compensate: bool = True
    compensation: Compensation = "greedy"
    anchor_weight: float = 0.3
    order: Order = "mask-first"
    budget: Budget = "uniform"
    sign: Sign = "obs"
    sensitivity: Sensitivity = "change"
    hessians: HessianMode = "sequential"
    damp: float = 0.01
    block_size: int = 128
    modules: str | None = None
    others: Others = "finetuned"
    lam: float | None = None
    drop: float | None = None
    seed: int = 0
    gamma: float = 0.01
    epsilon: float = 0.1
    overlap: OverlapRule = "mean"

    def __post_init__(self) -> None:
        problems = []
        if self.method not in REGISTRY:
            problems.append(f"unknown method {self.method!r} (choose from {', '.join(REGISTRY)})")
        if not 0.0 <= self.keep <= 1.0:
            problems.append(f"keep must be between 0 and 1, got {self.keep}")
        if not 0.0 <= self.alpha <= 1.0:
            problems.append(f"alpha must be between 0 and 1, got {self.alpha}")
        for knob, (what, allowed) in _CHOICES.items():
            if getattr(self, knob) not in allowed:
                problems.append(f"unknown {what} {getattr(self, knob)!r} (choose from {', '.join(allowed)})")
        if self.order == "sparsegpt" and (self.compensation != "greedy" or self.scope != "block"):
            problems.append("the SparseGPT mask order goes with greedy compensation and the block scope")
        if self.budget == "per-layer" and self.scope == "global":
            problems.append("a per-layer budget shares the patch between layers; the global scope "
                            "already ranks the whole model")
        if not 0.0 < self.anchor_weight <= 1000.0:
            problems.append(f"anchor weight must be above 0 and at most 1000, got {self.anchor_weight}")
        if not 0.0 <= self.damp <= 10.0:
            problems.append(f"damping must be between 0 and 10, got {self.damp}")
        if self.block_size < 1:
            problems.append(f"block size must be positive, got {self.block_size}")
        if self.drop is not None and not 0.0 <= self.drop < 1.0:
            problems.append(f"DARE drop rate must be in [0, 1), got {self.drop}")
        if not 0.0 <= self.gamma < 1.0 or not 0.0 <= self.epsilon < 1.0:
            problems.append(f"gamma and epsilon must be in [0, 1), got {self.gamma}, {self.epsilon}")
        if self.modules is not None:
            try:
                re.compile(self.modules)
            except re.error as exc:
                problems.append(f"module pattern {self.modules!r} is not a valid regex ({exc})")
        if not problems and self.method in REGISTRY:
            problems += REGISTRY[self.method].problems(self)
        if problems:
            raise UserError("; ".join(problems))

    @staticmethod
    def default_compensations(anchor: bool, search: bool = False) -> list[str]:
        """Model Tailor's compensation forms where the user chose none: a sweep draws the
        paper's loop (a search: exact and greedy), and anchored beside it where there is
        original-task calibration data (`anchor`); a single merge takes the last (anchored
        where it can: the measured best, docs/results.md)."""
        first = ["exact", "greedy"] if search else [Settings.compensation]
        return first + (["anchored"] if anchor else [])

    @property
    def anchored(self) -> bool:
        """Anchored compensation: the merge needs original-task calibration data."""
        return REGISTRY[self.method].needs_calibration and self.compensate and self.compensation == "anchored"

    @property
    def effective_lambda(self) -> float:
        return self.lam if self.lam is not None else REGISTRY[self.method].defaults.get("lam", 1.0)

    @property
    def effective_drop(self) -> float:
        return self.drop if self.drop is not None else min(1.0 - self.keep, 0.999)

    def to_dict(self) -> dict:
        return asdict(self)
