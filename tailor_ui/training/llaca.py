"""LLaCA: an EMA copy of the trained weights that follows them with a gradient-chosen weight.

docs/methods.md#llaca. After every optimizer step each trainable tensor's EMA copy θ* moves toward
the live weights θ; at the end of a task the EMA weights replace the live ones. Four
forms of the step, all reducing each quantity to one number per tensor by its L1 norm:

- `code` (**default**; the authors' released code, ECNU-SII's Continual-NExT, whose peft
  LoRA tuner runs it as "CIA" after every optimizer step: docs/AUDIT.md): a = ‖θ − θ*‖₁,
  b = ‖g‖₁, c = ‖g − g_prev‖₁, w = 0.01·(1 + b)/(a·c), w = 0.001 (their `base_weight`) when
  it falls outside (0, 1) and on a task's first step, which has no previous gradient;
  θ* ← (1 − w)·θ* + w·θ. (An earlier transcription, w = 2(1 + b)/(a·c) with 0.01, is not
  what their code does.)
- `paper` (the paper's equations): β = (L' + 1)/((θ − θ*)·L'') with L' = ‖g‖₁,
  θ − θ* → ‖θ − θ*‖₁ and L'' ≈ ‖g − g_prev‖₁; β = 0.99 outside (0, 1);
  θ* ← β·θ* + (1 − β)·θ.
- `mean` (**ours**, not the authors'): the code form on per-entry means (each L1 norm divided
  by the tensor's size), so w no longer grows or shrinks with the tensor's size. Where
  mean|θ − θ*|·mean|g − g_prev| < 2 (every tensor of the demo, and of a 7B model at fine-tuning
  learning rates) it always falls back, i.e. it is the fixed EMA with β = 0.99; it is here to
  show that, not as a better LLaCA (docs/AUDIT.md).
- `fixed`: the plain EMA baseline, θ* ← β·θ* + (1 − β)·θ with one fixed β.

Conventions: g is the gradient the optimizer just used (after clipping, and after any
gradient masking), as in the authors' code; on a task's first step the code form falls back,
as theirs does, and the paper form takes g_prev = 0 (ours); θ* is kept in float32 whatever the
model's dtype, so a bfloat16 model's EMA does not round every small step away.

`LLaCATraining` and `EMATraining` are the methods `finetune` runs: the tracker steps after
every optimizer step, and at the end the EMA weights replace the live ones.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch

from tailor_ui.training.method import RunSetup, TrainingMethod

Form = Literal["code", "paper", "mean", "fixed"]
FORMS: tuple[Form, ...] = ("code", "paper", "mean", "fixed")
CODE_SCALE = 0.01  # the authors' code multiplies (1 + b)/(a·c) by this
CODE_FALLBACK = 0.001  # their base_weight: the live weights' weight when w leaves (0, 1)
PAPER_FALLBACK = 0.99  # β (weight on the EMA) when the paper form's β leaves (0, 1)


def _inside_unit(x: float) -> bool:
    return math.isfinite(x) and 0.0 < x < 1.0


def code_weight(a: float, b: float, c: float, fallback: float = CODE_FALLBACK) -> float:
    """The authors' code: w = 0.01·(1 + b)/(a·c), or `fallback` when a·c = 0 or w ∉ (0, 1).

    w is the weight the *live* weights get: θ* ← (1 − w)·θ* + w·θ.
    """
    denominator = a * c
    if denominator == 0 or not math.isfinite(denominator):
        return fallback
    w = CODE_SCALE * (1.0 + b) / denominator
    return w if _inside_unit(w) else fallback


def paper_beta(grad: float, change: float, grad_change: float,
               fallback: float = PAPER_FALLBACK) -> float:
    """The paper: β = (L' + 1)/((θ − θ*)·L''), or `fallback` when undefined or β ∉ (0, 1).

    `grad` = L', `change` = θ − θ*, `grad_change` = L'' (each already reduced to a number).
    β is the weight the *EMA* keeps: θ* ← β·θ* + (1 − β)·θ.
    """
    denominator = change * grad_change
    if denominator == 0 or not math.isfinite(denominator):
        return fallback
    beta = (grad + 1.0) / denominator
    return beta if _inside_unit(beta) else fallback


def live_weight(form: Form, a: float, b: float, c: float, beta: float = 0.99) -> float:
    """The weight the live weights get in θ* ← (1 − w)·θ* + w·θ, for any form.

    a = ‖θ − θ*‖₁, b = ‖g‖₁, c = ‖g − g_prev‖₁ (for `mean`: the per-entry means); `beta`
    is the fixed form's β.
    """
    if form in ("code", "mean"):
        return code_weight(a, b, c)
    if form == "paper":
        return 1.0 - paper_beta(b, a, c)
    if form == "fixed":
        return 1.0 - beta
    raise ValueError(f"unknown EMA form {form!r}; expected one of {FORMS}")


class EMATracker:
    """EMA copies of a set of parameters, stepped after each optimizer step.

    `update()` must run after `optimizer.step()` and before the gradients are cleared.
    `swap_in()` writes the EMA weights into the live parameters (the end of a task).
    `weights` records every per-tensor weight w given to the live weights, and
    `fallbacks` how many of them were the fallback, for the training report;
    `lag_ratio()` says how far the EMA trails: ‖θ − θ*‖ / ‖θ − θ₀‖ (θ₀: the weights the
    tracker started from), 0 when it sits on the live weights, 1 when it never moved.
    """

    def __init__(self, params: Iterable[tuple[str, torch.nn.Parameter]], form: Form = "code",
                 beta: float = 0.99) -> None:
        if form not in FORMS:
            raise ValueError(f"unknown EMA form {form!r}; expected one of {FORMS}")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"EMA beta must be in [0, 1], got {beta}")
        self.form, self.beta = form, beta
        self.params = dict(params)
        self.ema = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.start = {n: t.clone() for n, t in self.ema.items()}
        self.grad_prev: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.weight_sum = 0.0
        self.adaptive_sum = 0.0  # the weights that were not the fallback
        self.updates = 0
        self.fallbacks = 0

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            ema = self.ema[name]
            theta = p.detach().float()
            grad = (p.grad.detach().to(torch.float32, copy=True) if p.grad is not None
                    else torch.zeros_like(theta))
            prev = self.grad_prev.get(name)
            size = theta.numel() if self.form == "mean" else 1
            a = float((theta - ema).abs().sum()) / size
            b = float(grad.abs().sum()) / size
            c = float((grad - prev).abs().sum()) / size if prev is not None else b
            if self.form == "paper":
                beta = paper_beta(b, a, c)
                fallback = beta == PAPER_FALLBACK
                w = 1.0 - beta
                ema.mul_(beta).add_(theta, alpha=w)
            else:
                adaptive = self.form in ("code", "mean")
                w = (CODE_FALLBACK if adaptive and prev is None
                     else live_weight(self.form, a, b, c, self.beta))
                fallback = adaptive and w == CODE_FALLBACK
                ema.mul_(1.0 - w).add_(theta, alpha=w)
            self.fallbacks += fallback
            self.adaptive_sum += 0.0 if fallback else w
            self.weight_sum += w
            self.updates += 1
            self.grad_prev[name] = grad
        self.steps += 1

    @torch.no_grad()
    def lag_ratio(self) -> float:
        """‖θ − θ*‖ / ‖θ − θ₀‖ over every tracked tensor together (NaN before any move)."""
        lag = sum(float((p.detach().float() - self.ema[n]).pow(2).sum())
                  for n, p in self.params.items())
        moved = sum(float((p.detach().float() - self.start[n]).pow(2).sum())
                    for n, p in self.params.items())
        return math.sqrt(lag / moved) if moved > 0 else math.nan

    @torch.no_grad()
    def swap_in(self) -> None:
        """Replace the live weights by the EMA weights (in the parameters' dtype)."""
        for name, p in self.params.items():
            p.copy_(self.ema[name].to(p.dtype))

    def stats(self) -> dict[str, float]:
        adaptive = self.updates - self.fallbacks
        return {"form": self.form, "steps": self.steps,
                "mean_live_weight": self.weight_sum / self.updates if self.updates else math.nan,
                "mean_adaptive_weight": self.adaptive_sum / adaptive if adaptive else math.nan,
                "fallback_fraction": self.fallbacks / self.updates if self.updates else math.nan}


class LLaCATraining(TrainingMethod):
    """LLaCA: an EMA copy with a gradient-chosen weight replaces the trained weights at the
    end. Option: `llaca_form`, "code" (the authors' code, default), "paper", or "mean" (ours:
    the code form on per-entry means)."""

    label = "LLaCA (adaptive EMA)"
    short = "llaca"
    about = ("an EMA copy of the trained weights follows them with a gradient-chosen weight "
             "(the authors' released form) and replaces them at the end. On the demo the copy "
             "trails so far that a task is barely learnt: little forgetting, little new skill "
             "(docs/AUDIT.md).")
    options = {"llaca_form": "code"}
    option_help = {"llaca_form": "LLaCA's weight: code (authors') | paper | mean (ours: per-entry means)"}

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        form = options.get("llaca_form", "code")
        return [] if form in FORMS and form != "fixed" else [
            f"unknown LLaCA form {form!r} (code, paper or mean)"]

    def form(self) -> tuple[Form, float]:
        """The tracker's form and its fixed β (unused by the adaptive forms)."""
        return self.values["llaca_form"], 0.99

    def settings(self) -> dict[str, Any]:
        return {"form": self.values["llaca_form"]}

    def prepare(self, setup: RunSetup) -> None:
        form, beta = self.form()
        self.tracker = EMATracker([(n, setup.model.get_parameter(n)) for n in setup.names],
                                  form=form, beta=beta)

    def after_step(self) -> None:
        self.tracker.update()

    def finish(self) -> None:
        self.lag = self.tracker.lag_ratio()  # before the swap, which sets θ = θ*
        self.tracker.swap_in()

    def extra(self) -> dict[str, Any]:
        return {"ema": {**self.tracker.stats(), "lag_ratio": getattr(self, "lag", math.nan)}}


class EMATraining(LLaCATraining):
    """The plain EMA baseline LLaCA is compared against. Option: `ema_beta` (fixed β)."""

    label = "EMA (fixed β)"
    short = "ema"
    about = "the same with a fixed β (default 0.99), the baseline LLaCA is compared against."
    options = {"ema_beta": 0.99}
    option_help = {"ema_beta": "the fixed β"}

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        beta = options.get("ema_beta", 0.99)
        return [] if 0.0 <= beta <= 1.0 else [f"EMA beta must be between 0 and 1, got {beta}"]

    def form(self) -> tuple[Form, float]:
        return "fixed", self.values["ema_beta"]

    def settings(self) -> dict[str, Any]:
        return {"form": "fixed", "ema_beta": self.values["ema_beta"]}
