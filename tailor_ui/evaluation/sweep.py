"""Forgetting table: base, fine-tuned and every method x setting on every task, one row each.

Columns (one `score:<set>` column per evaluation set, named by the set):

- `kind` ("base", "finetuned", "majority" or "merged"), `method`, `setting` (a readable
  label); the majority row scores always giving each set's commonest answer, the floor
  that tells skill from prior (`evaluate.majority_baseline`);
  `keep`, `alpha`, `lam` (only where the method uses them; DARE's keep is 1 - drop);
- `score:<set>`: the set's primary metric (CIDEr-D, or VQA accuracy as a fraction);
- `original` / `target`: mean score over the original / target sets;
- `original_retention`: the mean over original sets of score / the base model's score;
  `target_retention`: the mean over target sets k of score / fine-tuned model k's score
  on its own set (per set, so CIDEr-D's 0-10 scale does not drown VQA's 0-1); `h_score`: harmonic mean of original and target (the scales of
  CIDEr-D and VQA accuracy relate as in the paper, where both are x100, so H-scores are
  the paper's divided by 100);
- `retention:<set>`: the set's score / its reference's (the base on an original set, the
  fine-tuned model on its target set), so one set's loss cannot hide in an average;
- `target_gain`: gain retention, the mean over target sets of (score − base) / (fine-tuned
  − base): how much of what fine-tuning added the row kept (0 = the base, 1 = fine-tuned),
  where `target_retention` also credits what the base already scored;
- `patch_fraction`: entries the row changes relative to the base / all parameters
  (the base row has keep 0 and the fine-tuned rows keep 1, placing them on a keep axis);
  `linear_fraction`: the same over the selected linear layers (merged rows);
- `seconds`: time to build the patch; `eval_seconds`: time to evaluate the row.

Patched models are made by writing each patch into the base in place and reverting it
after evaluation, so the sweep never holds a third copy of the model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import pandas as pd
import torch

from tailor_ui.calibration import finetuned_model
from tailor_ui.control import Progress, Stages, StopCheck, never_stop, no_progress
from tailor_ui.prompts import Batch
from tailor_ui.engine import run_method
from tailor_ui.errors import UserError
from tailor_ui.evaluation.evaluate import EvalSet, evaluate_all, majority_baseline
from tailor_ui.methods import REGISTRY
from tailor_ui.pair import Pair
from tailor_ui.patch import applied, changed_entries
from tailor_ui.settings import KNOBS, Settings, method_knobs
from tailor_ui.weights import read_param

# The λ a sweep may try (WiSE-FT, task arithmetic): beyond 1 extrapolates past the fine-tuned model
LAMBDA_RANGE = KNOBS["lam"].range
# the CLI's default sweep: these methods over these values of the knobs they sweep
SWEEP_METHODS = ("tailor", "magnitude", "dare", "ties", "wise_ft")
SWEEP_GRID: Mapping[str, Sequence[float]] = {"keep": (0.01, 0.05, 0.1, 0.2, 0.5), "alpha": (0.8,),
                                             "lam": (0.25, 0.5, 0.75)}
# Shown in every label that uses them, so they are not repeated as "non-default" extras.
_LABELLED = {"method", "keep", "alpha", "lam", "drop"}
MAJORITY = "always the commonest answer"  # as the dashboard names them in errors


def score_column(name: str) -> str:
    return f"score:{name}"


def _knob_values(s: Settings) -> dict[str, float | None]:
    """keep / alpha / lam where the method reads them (`Method.knobs`), else None; a method
    with a drop rate keeps 1 − drop."""
    used = REGISTRY[s.method].knobs
    values = {"keep": 1.0 - s.effective_drop if "drop" in used else s.keep,
              "alpha": s.alpha, "lam": s.effective_lambda}
    return {k: (v if k in used else None) for k, v in values.items()}


def setting_label(s: Settings) -> str:
    """A short readable name: the method, its knobs, then any other non-default setting it
    reads (`settings.method_knobs`: its own and what every method reads), so a value
    a method ignores (a magnitude patch's compensation form) does not name it."""
    knobs = _knob_values(s)
    parts = [REGISTRY[s.method].label]
    if "drop" in REGISTRY[s.method].knobs:
        parts.append(f"drop={s.effective_drop:g}")
    else:
        parts += [f"{k}={v:g}" for k, v in knobs.items() if v is not None]
    defaults = Settings(method=s.method)
    parts += [f"{name}={getattr(s, name)}" for name in method_knobs(s.method)
              if name not in _LABELLED and getattr(s, name) != getattr(defaults, name)]
    return " ".join(parts)


def h_score(original: float, target: float) -> float:
    """Harmonic mean: high only when neither the old skills nor the new one is lost."""
    total = original + target
    return 2 * original * target / total if total > 0 else 0.0


def changed_fraction(base: torch.nn.Module, value_of: Callable[[str], torch.Tensor],
                     names: Iterable[str] | None = None) -> float:
    """Entries that differ from `base` (bitwise), over all its parameters: `value_of(name)`
    gives the other model's value; `names` limits the look to the tensors that can differ."""
    params = dict(base.named_parameters())
    with torch.no_grad():  # read_param: accelerate-offloaded parameters too
        changed = sum(changed_entries(read_param(base, n).cpu(), value_of(n).cpu()).numel()
                      for n in (params if names is None else names))
    return changed / sum(p.numel() for p in params.values())


def finetuned_fraction(pair: Pair, k: int) -> float:
    """`changed_fraction` of fine-tuned model k, loaded or read lazily tensor by tensor."""
    cpu = torch.device("cpu")
    return changed_fraction(pair.base, lambda n: pair.finetuned_value(k, n, cpu), pair.changed())


class _Evaluator:
    """Runs every evaluation set on a model, reporting each set as a step of the model's
    stage and checking for cancellation between them."""

    def __init__(self, processor, sets: Sequence[EvalSet], batch_size: int,
                 should_stop: StopCheck) -> None:
        self.processor, self.sets, self.batch_size = processor, sets, batch_size
        self.should_stop = should_stop

    def __call__(self, model: torch.nn.Module, label: str, progress: Progress) -> dict[str, float]:
        done = 0

        def starting(s: EvalSet) -> None:
            nonlocal done
            progress(f"evaluating {label} on {s.name}", done, len(self.sets))
            done += 1

        results = evaluate_all(model, self.processor, self.sets, batch_size=self.batch_size,
                               before_each=starting, should_stop=self.should_stop)
        row = {score_column(name): r.score for name, r in results.items()}
        row["eval_seconds"] = sum(r.seconds for r in results.values())
        return row


def _check_sets(pair: Pair, original: Sequence[EvalSet], target: Sequence[EvalSet]) -> None:
    if not original or not target:
        raise UserError("a sweep needs at least one original-task and one target-task set")
    # one fine-tuned model learnt every target set; several learnt one each
    if len(pair.finetuned) > 1 and len(target) != len(pair.finetuned):
        raise UserError(f"give one target set per fine-tuned model: {len(pair.finetuned)} "
                        f"models, {len(target)} target sets")
    names = [s.name for s in (*original, *target)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UserError(f"evaluation set names must be unique; repeated: {', '.join(repeated)}")


def sweep(pair: Pair, settings: Sequence[Settings], original: Sequence[EvalSet],
          target: Sequence[EvalSet], calibration: Sequence[Sequence[Batch]] | None = None, *,
          anchor: Sequence[Batch] | None = None, batch_size: int = 16, progress: Progress | None = None,
          should_stop: StopCheck | None = None) -> pd.DataFrame:
    """Evaluate the base, each fine-tuned model and each setting's merge on every set.

    `target[k]` is the task fine-tuned model k learnt (a single fine-tuned model: every
    target set is its); `calibration[k]` its calibration
    batches (needed by Model Tailor); `anchor` the original-task calibration batches
    (anchored compensation). Settings that share Hessians and scores reuse them
    through the pair's cache (with one-pass Hessians, a sweep over keep and alpha computes
    them once). The pair's models are left exactly as they came.
    """
    _check_sets(pair, original, target)
    report = progress or no_progress
    stop = should_stop or never_stop
    run_eval = _Evaluator(pair.processor, [*original, *target], batch_size, stop)
    references = 1 + len(pair.finetuned)  # a stage each; a setting has two: its merge, its scores
    stages = Stages(report, [1] * (references + 2 * len(settings)))
    blank = {"alpha": None, "lam": None, "linear_fraction": None, "seconds": math.nan}

    rows = [{"kind": "base", "method": "base", "setting": pair.base_id, **blank, "keep": 0.0,
             "patch_fraction": 0.0, **run_eval(pair.base, "the base model", stages.stage(0))}]
    for k in range(len(pair.finetuned)):
        with finetuned_model(pair, k) as model:  # a lazy model: the base holding its values
            scores = run_eval(model, pair.finetuned_ids[k], stages.stage(1 + k))
        rows.append({"kind": "finetuned", "method": "finetuned",
                     "setting": pair.finetuned_ids[k], **blank, "keep": 1.0,
                     "patch_fraction": finetuned_fraction(pair, k), **scores})

    rows.append({"kind": "majority", "method": "majority", "setting": MAJORITY, **blank,
                 "keep": None, "patch_fraction": None,
                 **{score_column(e.name): majority_baseline(e.examples, e.task).score
                    for e in (*original, *target)}})

    for j, s in enumerate(settings):
        label = setting_label(s)
        prefix = f"[{j + 1}/{len(settings)}] {label}: "
        result = run_method(pair, s, calibration, anchor=anchor, should_stop=stop,
                            progress=stages.stage(references + 2 * j, prefix))
        with applied(pair.base, result.patch) as model:
            scores = run_eval(model, label, stages.stage(references + 2 * j + 1, prefix))
        rows.append({"kind": "merged", "method": s.method, "setting": label, **_knob_values(s),
                     "patch_fraction": result.report["model_fraction"],
                     "linear_fraction": result.report["linear_fraction"],
                     "seconds": result.report["timings_s"]["total"], **scores})
    return summarize(pd.DataFrame(rows), original, target)


def retention(scores: Mapping[str, float], reference: Mapping[str, float]) -> float:
    """The mean over sets of score / the reference model's score on that set (per set, so
    CIDEr-D's 0-10 scale does not drown VQA's 0-1). A set the reference scores 0 on (or
    lacks) is left out: it has no ratio to keep, and counting it as 0 or as 1 would
    invent one. NaN when no set is left."""
    ratios = [scores[name] / ref for name, ref in reference.items() if ref and ref > 0]
    return float(sum(ratios) / len(ratios)) if ratios else math.nan


def summarize(table: pd.DataFrame, original: Sequence[EvalSet], target: Sequence[EvalSet]
              ) -> pd.DataFrame:
    """Add the mean scores, retentions and H-score, and put the columns in a fixed order."""
    original_cols = [score_column(s.name) for s in original]
    target_cols = [score_column(s.name) for s in target]
    table["original"] = table[original_cols].mean(axis=1)
    table["target"] = table[target_cols].mean(axis=1)
    base = table[table["kind"] == "base"].iloc[0]
    finetuned = table[table["kind"] == "finetuned"]
    # fine-tuned model k is the reference on its own target set k (a single one on every set)
    original_ref = {c: float(base[c]) for c in original_cols}
    target_ref = {c: float(finetuned[c].iloc[k if len(finetuned) > 1 else 0])
                  for k, c in enumerate(target_cols)}
    rows = [row for _, row in table.iterrows()]
    table["original_retention"] = [retention(row, original_ref) for row in rows]
    table["target_retention"] = [retention(row, target_ref) for row in rows]
    base_on_target = {c: float(base[c]) for c in target_cols}
    table["target_gain"] = [gain_retention(row, base_on_target, target_ref) for row in rows]
    table["h_score"] = [h_score(o, t) for o, t in zip(table["original"], table["target"])]
    per_set = []
    for c, ref in {**original_ref, **target_ref}.items():
        per_set.append(retention_column(c[len("score:"):]))
        table[per_set[-1]] = [retention({c: row[c]}, {c: ref}) for row in rows]
    order = ["kind", "method", "setting", "keep", "alpha", "lam", *original_cols, *target_cols,
             "original", "target", "original_retention", "target_retention", "target_gain", "h_score",
             *per_set, "patch_fraction", "linear_fraction", "seconds", "eval_seconds"]
    return table[order]


def retention_column(name: str) -> str:
    return f"retention:{name}"


def gain_retention(scores: Mapping[str, float], base: Mapping[str, float],
                   finetuned: Mapping[str, float]) -> float:
    """The mean over sets of (score − base) / (fine-tuned − base): the share of what
    fine-tuning added that a model kept. A set fine-tuning did not improve is left out (no
    gain to keep); NaN when none is left."""
    gains = [(scores[c] - base[c]) / (finetuned[c] - base[c]) for c in finetuned
             if finetuned[c] - base[c] > 0]
    return float(sum(gains) / len(gains)) if gains else math.nan


def parse_numbers(text: str | Sequence[float] | None, name: str, low: float = 0.0,
                  high: float = 1.0) -> list[float]:
    """'0.05, 0.1 0.2' -> [0.05, 0.1, 0.2] (commas, spaces or semicolons; repeats dropped),
    each checked to lie in [low, high]."""
    if text is None:
        return []
    if not isinstance(text, str):
        values = [float(v) for v in text]
    else:
        values = []
        for part in text.replace(";", ",").replace(" ", ",").split(","):
            if not part.strip():
                continue
            try:
                values.append(float(part))
            except ValueError:
                raise UserError(f"{name}: {part.strip()!r} is not a number") from None
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise UserError(f"{name} values must lie in [{low:g}, {high:g}]: {bad[0]:g} is outside")
    return list(dict.fromkeys(values))


def format_numbers(values: Sequence[float]) -> str:
    """[0.05, 0.1] -> '0.05, 0.1': what `parse_numbers` reads back."""
    return ", ".join(f"{v:g}" for v in values)


def sweep_grid(methods: Sequence[str], values: Mapping[str, Sequence[float]], *,
               calibrated: Mapping[str, Sequence[Any]] | None = None,
               limit: int | None = None) -> list[Settings]:
    """The one sweep grid of the CLI and the dashboard: each method over every combination
    of the `values` of the knobs it sweeps (`Method.sweep`: λ methods over λ, patch-size
    methods over keep, Model Tailor over alpha and keep); methods that need calibration also
    over every combination of the `calibrated` settings (scope, compensation, Hessians…)."""
    if not methods:
        raise UserError("choose at least one method for the sweep")
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown:
        raise UserError(f"unknown method {unknown[0]!r} (choose from {', '.join(REGISTRY)})")
    grid = []
    for name in methods:
        method = REGISTRY[name]
        extra = dict(calibrated or {}) if method.needs_calibration else {}
        empty = [k for k in (*extra, *method.sweep) if not (extra.get(k) or values.get(k))]
        if empty:
            raise UserError(f"{name} needs at least one {KNOBS[empty[0]].label or empty[0]} value")
        for fixed in itertools.product(*extra.values()):
            for combo in itertools.product(*(values[k] for k in method.sweep)):
                s = Settings(method=name, **dict(zip(extra, fixed)),
                             **{k: float(v) for k, v in zip(method.sweep, combo)})
                if not s.anchored:  # μ means nothing to the other forms: one setting, not one per μ
                    s = replace(s, anchor_weight=Settings.anchor_weight)
                if s not in grid:
                    grid.append(s)
    if limit is not None and len(grid) > limit:
        raise UserError(f"{len(grid)} settings is too many for one sweep (at most {limit})")
    return grid
