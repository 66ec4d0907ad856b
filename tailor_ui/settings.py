"""The settings of one merge, shared by the engine, the CLI and the dashboard.

Every knob is declared once, as a `Settings` field: its default, and in its metadata (a
`Knob`) its help, what each of its words means (the words themselves come from its type),
its range and how the dashboard shows it. The CLI's flags, the Tailor tab's controls,
validation and readable labels are generated from these declarations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from enum import StrEnum
from functools import cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from tailor_ui.errors import UserError
from tailor_ui.methods.selection import Scope
from tailor_ui.methods.tailor import Sensitivity, Sign
from tailor_ui.patch import OverlapRule

from tailor_ui.methods import REGISTRY

Others = Literal["finetuned", "base", "linear"]
HessianMode = Literal["sequential", "one-pass"]
Order = Literal["mask-first", "sparsegpt"]
Budget = Literal["uniform", "per-layer"]


class Compensation(StrEnum):
    """How Model Tailor compensates its patch."""

    EXACT = "exact"
    GREEDY = "greedy"
    ANCHORED = "anchored"


@dataclass(frozen=True)
class Knob:
    """How one `Settings` field is described, checked and shown.

    help: one line for --help and the dashboard.
    label: what the dashboard calls it; noun: what an error calls it (default: its name).
    words: what each of its words means (the words are its type's, in the type's order).
    range: (low, high) a value must lie in, `bounds` saying which ends are included
      ("[]", "(]", "[)"); high None: no upper limit.
    slider: (low, high, step) of its dashboard slider; a number without one gets a box.
    advanced: shown under the Tailor tab's Advanced.
    common: read by every method (which `Method.knobs` therefore do not list).
    dashboard: False where the dashboard has no control for it (it sets it otherwise).
    """

    help: str
    label: str = ""
    noun: str = ""
    words: Mapping[str, str] = field(default_factory=dict)
    range: tuple[float, float | None] | None = None
    bounds: str = "[]"
    slider: tuple[float, float, float] | None = None
    advanced: bool = False
    common: bool = False
    dashboard: bool = True


def knob(default: Any, help: str, **declared: Any) -> Any:
    """A `Settings` field with its declaration (`Knob`) in the metadata."""
    return field(default=default, metadata={"knob": Knob(help, **declared)})


@dataclass(frozen=True)
class Settings:
    """Every knob of a merge; defaults are docs/methods.md's. Each field's `Knob` says what
    it means; which method reads which knob: `tailor_ui.methods.REGISTRY[method].knobs`."""

    method: str = "tailor"
    keep: float = knob(0.10, "patch size: fraction of each selection group's entries taken from the "
                       "fine-tuned model (DARE keeps it in expectation: drop = 1 - keep)",
                       label="Patch size (keep)", range=(0.0, 1.0), slider=(0.01, 1.0, 0.01))
    alpha: float = knob(0.8, "fusion weight of salience against sensitivity",
                        label="Fusion weight (alpha)", range=(0.0, 1.0), slider=(0.0, 1.0, 0.05))
    scope: Scope = knob("block", "where the top-keep is chosen", label="Threshold scope",
                        words={"block": "per 128-column block (authors' code)", "row": "per output row",
                               "tensor": "per weight matrix", "global": "across the whole model"})
    compensate: bool = knob(True, "compensate the patch (OBS decoration)",
                            label="Compensate the patch (OBS decoration)")
    compensation: Compensation = knob(
        Compensation.GREEDY, "how the kept entries are compensated", label="Compensation",
        noun="compensation form",
        words={"exact": "least squares per row, given the patch",
               "greedy": "SparseGPT's column loop (the paper's)",
               "anchored": "patch and least squares of an objective that also holds the base's "
                           "outputs on original-task examples"})
    anchor_weight: float = knob(0.3, "μ: weight of the original-task inputs against the target's "
                                "(anchored compensation)", label="Anchor weight (μ)",
                                noun="anchor weight", range=(0.0, 1000.0), bounds="(]",
                                slider=(0.01, 3.0, 0.01))
    order: Order = knob("mask-first", "mask order of greedy compensation (block scope)",
                        label="Mask order", noun="mask order", advanced=True,
                        words={"mask-first": "the whole mask first (paper)",
                               "sparsegpt": "each block's mask after the earlier blocks were "
                                            "compensated (SparseGPT's)"})
    budget: Budget = knob("uniform", "how the patch is shared between layers", label="Patch budget",
                          noun="patch budget", advanced=True,
                          words={"uniform": "keep in every layer",
                                 "per-layer": "by each layer's share of the fused score"})
    sign: Sign = knob("obs", "sign of the greedy compensation", label="Compensation sign (greedy)",
                      noun="compensation sign", advanced=True,
                      words={"obs": "subtract (OBS)", "released": "add (the released code)"})
    sensitivity: Sensitivity = knob("change", "what the sensitivity score weighs",
                                    label="Sensitivity form", noun="sensitivity form", advanced=True,
                                    words={"change": "W_ft − W_pre", "weight": "W_ft (authors' code)"})
    hessians: HessianMode = knob("sequential", "when the Hessians are collected", label="Hessians",
                                 noun="Hessian mode", advanced=True,
                                 words={"sequential": "each layer's after the earlier layers were "
                                                      "patched (authors' order; every change recomputes)",
                                        "one-pass": "all from the fine-tuned model at once (scores are cached: a "
                                                    "new keep or alpha re-thresholds them)"})
    damp: float = knob(0.01, "Hessian damping, as a fraction of its mean diagonal", label="Damping",
                       noun="damping", range=(0.0, 10.0), advanced=True)
    block_size: int = knob(128, "columns per block of the block scope and the greedy loop",
                           label="Block size", noun="block size", range=(1, None), advanced=True)
    modules: str | None = knob(None, "regex over linear module names (default: every linear "
                               "fine-tuning changed)", label="Module regex", common=True,
                               dashboard=False)
    others: Others = knob("finetuned", "tensors outside the selected linears (norms, biases, "
                          "embeddings, lm_head)", label="Other tensors (norms, biases, embeddings)",
                          noun="policy for other tensors", advanced=True, common=True,
                          words={"finetuned": "keep the fine-tuned values", "base": "revert to the base",
                                 "linear": "merge them like the linears"})
    lam: float | None = knob(None, "λ of the methods that scale task vectors (mergekit's lambda; "
                             "default: the method's own)", label="λ", noun="λ", range=(0.0, 2.0),
                             slider=(0.0, 2.0, 0.05))
    drop: float | None = knob(None, "DARE's drop rate (default 1 - keep; the dashboard sets it "
                              "through keep)", noun="DARE drop rate", range=(0.0, 1.0), bounds="[)",
                              dashboard=False)
    seed: int = knob(0, "random seed", label="Seed", advanced=True)
    gamma: float = knob(0.01, "fraction of the largest |τ| removed (keep is the density)",
                        label="Top fraction removed (γ)", range=(0.0, 1.0), bounds="[)",
                        slider=(0.0, 0.5, 0.01))
    epsilon: float = knob(0.1, "width of the window of keep probabilities around keep",
                          label="Keep-probability window (ε)", range=(0.0, 1.0), bounds="[)",
                          slider=(0.0, 0.5, 0.01))
    overlap: OverlapRule = knob("mean", "rule where several fine-tuned models' patches overlap",
                                label="Overlap rule (several models)", noun="overlap rule",
                                advanced=True, common=True,
                                words={"mean": "their mean", "sum": "their sum", "first": "the first's"})

    def __post_init__(self) -> None:
        if self.compensation in set(Compensation):  # a word becomes the enum member
            object.__setattr__(self, "compensation", Compensation(self.compensation))
        problems = [p for p in [method_problem(self.method)] if p]
        problems += [p for name in KNOBS if (p := knob_problem(name, getattr(self, name)))]
        if self.order == "sparsegpt" and (self.compensation != "greedy" or self.scope != "block"):
            problems.append("the SparseGPT mask order goes with greedy compensation and the block scope")
        if self.budget == "per-layer" and self.scope == "global":
            problems.append("a per-layer budget shares the patch between layers; the global scope "
                            "already ranks the whole model")
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
        where it can: the measured best, README)."""
        first = [Compensation.EXACT, Compensation.GREEDY] if search else [Settings.compensation]
        return [str(form) for form in first + ([Compensation.ANCHORED] if anchor else [])]

    @property
    def anchored(self) -> bool:
        """Anchored compensation: the merge needs original-task calibration data."""
        return (reads(self.method, "compensation") and self.compensate
                and self.compensation == Compensation.ANCHORED)

    @property
    def effective_lambda(self) -> float:
        return self.lam if self.lam is not None else REGISTRY[self.method].defaults.get("lam", 1.0)

    @property
    def effective_drop(self) -> float:
        return self.drop if self.drop is not None else min(1.0 - self.keep, 0.999)

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, StrEnum) else v for k, v in asdict(self).items()}


# every knob's declaration by field name (every field but `method`)
KNOBS: dict[str, Knob] = {f.name: f.metadata["knob"] for f in fields(Settings) if "knob" in f.metadata}


def default(name: str) -> Any:
    """A knob's declared default."""
    value = next(f.default for f in fields(Settings) if f.name == name)
    return None if value is MISSING else value


@cache
def value_type(name: str) -> type:
    """float, int, bool or str: what a knob's value is (None aside)."""
    kind = get_type_hints(Settings)[name]
    if get_origin(kind) is Union or type(kind).__name__ == "UnionType":
        kind = next(a for a in get_args(kind) if a is not type(None))
    return str if get_origin(kind) is Literal or isinstance(kind, type) and issubclass(kind, StrEnum) else kind


@cache
def choices(name: str) -> tuple[str, ...]:
    """The words a knob takes, from its type (a Literal or a str enum); () for a number."""
    kind = get_type_hints(Settings)[name]
    if get_origin(kind) is Literal:
        return get_args(kind)
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return tuple(str(member) for member in kind)
    return ()


def method_problem(method: str) -> str | None:
    """What is wrong with a method's name (None: it is registered)."""
    return None if method in REGISTRY else f"unknown method {method!r} (choose from {', '.join(REGISTRY)})"


def knob_problem(name: str, value: Any) -> str | None:
    """What is wrong with one knob's value, in words (None: nothing)."""
    spec = KNOBS[name]
    noun = spec.noun or name
    words = choices(name)
    if words and value not in words:
        return f"unknown {noun} {value!r} (choose from {', '.join(words)})"
    if spec.range is None or value is None:
        return None
    low, high = spec.range
    high_ok = high is None or (value <= high if spec.bounds[1] == "]" else value < high)
    low_ok = value >= low if spec.bounds[0] == "[" else value > low
    if low_ok and high_ok and not (isinstance(value, float) and math.isnan(value)):
        return None
    if high is None:
        return f"{noun} must be at least {low:g}, got {value}"
    span = {"[]": "between {} and {}", "(]": "above {} and at most {}",
            "[)": "at least {} and below {}"}[spec.bounds].format(f"{low:g}", f"{high:g}")
    return f"{noun} must be {span}, got {value}"


def reads(method: str, name: str) -> bool:
    """Whether a method reads a knob: its own (`Method.knobs`) and those every method reads."""
    return name in KNOBS and (KNOBS[name].common or name in REGISTRY[method].knobs)


def method_knobs(method: str) -> list[str]:
    """The knobs a method reads, in declaration order."""
    return [name for name in KNOBS if reads(method, name)]


def unread(method: str, given: Mapping[str, Any]) -> list[str]:
    """The knobs among `given` that the method does not read."""
    return [name for name in given if name in KNOBS and not reads(method, name)]


def readers(name: str) -> list[str]:
    """The methods that read a knob."""
    return [method for method in REGISTRY if reads(method, name)]
