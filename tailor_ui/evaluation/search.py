"""Find settings: which patch keeps the old skills and the new one best.

The user's target-task examples are split (seeded) into a part Model Tailor calibrates on
and a held-out part every candidate is scored on, so a candidate is not judged on the data
it was fit to. The candidates are Model Tailor's (keep x alpha x the option combinations)
and, beside them, the data-free baselines each on its own axis (keep for the patch-size
methods, λ for WiSE-FT), all under one candidate budget. Every candidate runs through the
forgetting sweep of `evaluation.sweep`; Model Tailor's use one-pass Hessians, so the
scores are computed once per compensation form and every other candidate re-thresholds
them (docs/ARCHITECTURE.md "Caches"). Per candidate: original retention (score / the base's, mean over
the original sets), target gain on the held-out split ((score − base) / (fine-tuned −
base)), and `h`, their harmonic mean; the best candidate is the highest `h`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from tailor_ui.calibration import calibration_batches, finetuned_model
from tailor_ui.control import Progress, StopCheck, no_progress
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.evaluation.evaluate import EvalSet, evaluate, task_of
from tailor_ui.evaluation.sweep import h_score, sweep, sweep_grid
from tailor_ui.methods import REGISTRY
from tailor_ui.pair import Pair
from tailor_ui.settings import Settings

# the Settings knobs a search may vary besides keep and alpha
OPTIONS = ("compensation", "order", "budget", "scope")
DEFAULT_OPTIONS: Mapping[str, Sequence[str]] = {"compensation": ("exact", "greedy")}
# the default grid, read by the CLI and the dashboard (21 candidates with anchor data, 18
# without: inside the sweep's budget): the baselines a user would otherwise try by hand, and
# keeps that reach the best trade-off of both demo stories (spatial near 0.05-0.1, counting
# near 0.2)
DEFAULT_METHODS = ("tailor", "magnitude", "ties", "dare", "wise_ft")
SEARCH_GRID: Mapping[str, Sequence[float]] = {"keep": (0.05, 0.1, 0.2), "alpha": (0.8,),
                                              "lam": (0.25, 0.5, 0.75)}
DEFAULT_HOLDOUT = 0.25
DEFAULT_LIMIT = 32  # examples per original-task set
HELDOUT = "held-out"  # the name of the held-out target set (its table column: score:held-out)
RANKED = ("original_retention", "target_gain")  # the two axes of the front


@dataclass
class SearchResult:
    """`table`: the sweep's table (base, fine-tuned, one row per candidate) with `h` (harmonic
    mean of original retention and target gain; candidates only), `front` (on the Pareto
    front) and `best` (the highest h); `settings`: each candidate's Settings, in the order
    of its rows; `best`: the best candidate's; `used`: which examples scored and fit;
    `gain_step`: how far one held-out answer can move a target gain (1 / (held-out
    examples x the fine-tune's gain in VQA accuracy)), the search's resolution on that
    axis; NaN for a caption task, whose CIDEr-D per answer has no such bound."""

    table: pd.DataFrame
    settings: list[Settings]
    best: Settings
    used: dict[str, str]
    gain_step: float

    @property
    def candidates(self) -> pd.DataFrame:
        return self.table[self.table["kind"] == "merged"]

    @property
    def front(self) -> pd.DataFrame:
        return self.candidates[self.candidates["front"]].sort_values(RANKED[0])

    @property
    def best_row(self) -> pd.Series:
        return self.table[self.table["best"]].iloc[0]


def split_examples(examples: Sequence[Example], holdout: float, seed: int = 0
                   ) -> tuple[list[Example], list[Example]]:
    """(fit, held out): a seeded shuffle, round(holdout · n) examples (at least one) held
    out; each part keeps the examples' order."""
    if not 0.0 < holdout < 1.0:
        raise UserError(f"the held-out share must lie strictly between 0 and 1, got {holdout:g}")
    n = len(examples)
    held = max(1, round(holdout * n))
    if held >= n:
        raise UserError(f"{n} target-task example(s) cannot be split into a part to calibrate on and a "
                        f"held-out part ({holdout:g} held out): give more examples or hold out less")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return ([examples[i] for i in sorted(order[held:])], [examples[i] for i in sorted(order[:held])])


def candidate_grid(keeps: Sequence[float], alphas: Sequence[float],
                   options: Mapping[str, Sequence[str]], methods: Sequence[str] = ("tailor",),
                   lams: Sequence[float] = ()) -> list[Settings]:
    """Model Tailor (with one-pass Hessians) over keep x alpha x every combination of the
    option values that go together (the SparseGPT order needs greedy compensation and the
    block scope, a per-layer budget not the global scope: other combinations are skipped),
    then each data-free method of `methods` over its own axis (`sweep_grid`: keep, or λ)."""
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise UserError(f"a search cannot vary {unknown[0]!r} (only {', '.join(OPTIONS)})")
    if not methods:
        raise UserError("choose at least one method to search")
    sweep_grid(methods, {"keep": keeps, "alpha": alphas, "lam": lams})  # refuses unknown methods, empty axes
    calibrated = [m for m in methods if REGISTRY[m].needs_calibration]
    grid = []
    if calibrated:
        for knob, values in options.items():
            if not values:
                raise UserError(f"give at least one {knob} value")
            for value in values:
                Settings(**{knob: value})  # refuses an unknown value by itself
        for values in itertools.product(*options.values()):
            combo = dict(zip(options, values))
            try:
                Settings(**combo)
            except UserError:
                continue
            grid += sweep_grid(calibrated, {"keep": keeps, "alpha": alphas},
                               calibrated={"hessians": ["one-pass"], **{k: [v] for k, v in combo.items()}})
        if not grid:
            raise UserError("no combination of the chosen options goes together (the SparseGPT order "
                            "needs greedy compensation and the block scope)")
    free = [m for m in methods if not REGISTRY[m].needs_calibration]
    return grid + (sweep_grid(free, {"keep": keeps, "lam": lams}) if free else [])


def pareto_front(table: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for the rows no other row beats: at least as high on both columns and higher on
    one. Rows with a missing value are never on it (and beat no one)."""
    valid = table[[x, y]].notna().all(axis=1)
    points = table.loc[valid, [x, y]].to_numpy(dtype=float)
    on = []
    for px, py in points:
        beaten = ((points[:, 0] >= px) & (points[:, 1] >= py)
                  & ((points[:, 0] > px) | (points[:, 1] > py))).any()
        on.append(not beaten)
    front = pd.Series(False, index=table.index)
    if on:
        front[valid[valid].index] = on
    return front


def balance(original_retention: float, target_gain: float) -> float:
    """The harmonic mean of the two, high only when neither skill is lost; a gain below 0
    (worse than the base on the target) counts as 0. NaN when either is unknown."""
    if math.isnan(original_retention) or math.isnan(target_gain):
        return math.nan
    return h_score(max(original_retention, 0.0), max(target_gain, 0.0))


def best_index(candidates: pd.DataFrame):
    """The row label of the highest `h`; ties go to the smaller patch, then the first row."""
    ranked = candidates.dropna(subset=["h"])
    if ranked.empty:
        raise UserError("no candidate could be ranked (its retention or target gain is unknown)")
    order = ranked.sort_values(["h", "patch_fraction"], ascending=[False, True], kind="stable")
    return order.index[0]


def rank(table: pd.DataFrame) -> pd.DataFrame:
    """The table with `h`, `front` and `best` for the candidate rows (the `merged` kind)."""
    merged = table["kind"] == "merged"
    table = table.assign(h=[balance(o, g) if m else math.nan for o, g, m in
                            zip(table[RANKED[0]], table[RANKED[1]], merged)], front=False, best=False)
    table.loc[merged, "front"] = pareto_front(table[merged], *RANKED)
    table.loc[best_index(table[merged]), "best"] = True
    return table


def find_settings(pair: Pair, calibration: Sequence[Example], original: Sequence[EvalSet], *,
                  keeps: Sequence[float] = SEARCH_GRID["keep"], alphas: Sequence[float] = SEARCH_GRID["alpha"],
                  options: Mapping[str, Sequence[str]] = DEFAULT_OPTIONS,
                  methods: Sequence[str] = ("tailor",), lams: Sequence[float] = (),
                  holdout: float = DEFAULT_HOLDOUT, fit_limit: int | None = None, seed: int = 0,
                  limit: int | None = None, batch_size: int = 16, calib_batch: int = 8,
                  anchor: Sequence[Example] = (), progress: Progress | None = None,
                  should_stop: StopCheck | None = None) -> SearchResult:
    """Score every candidate (`candidate_grid`) on the original sets (their first `limit`
    examples each) and on the held-out split of `calibration`, the rest of which (its
    first `fit_limit`) calibrates Model Tailor; `anchor` holds the original-task calibration examples anchored
    compensation needs."""
    if not original:
        raise UserError("finding settings needs at least one original-task evaluation set")
    if len(pair.finetuned) != 1:
        raise UserError(f"finding settings works on a pair with one fine-tuned model, not "
                        f"{len(pair.finetuned)}")
    if limit is not None and limit < 1:
        raise UserError("use at least one example per original-task set")
    grid = candidate_grid(keeps, alphas, options, methods, lams)
    if any(s.anchored for s in grid) and not anchor:
        raise UserError("anchored compensation needs original-task calibration data (an anchor set)")
    fit, held = split_examples(calibration, holdout, seed)
    fit = fit[:fit_limit]
    sets = [EvalSet(s.name, s.task, list(s.examples[:limit]), s.max_new_tokens) for s in original]
    target = EvalSet(HELDOUT, task_of(held), held)
    (progress or no_progress)("checking what fine-tuning gained on the held-out examples", 0, 1)
    base = evaluate(pair.base, pair.processor, held, target.task, batch_size=batch_size).score
    with finetuned_model(pair, 0) as tuned:  # a lazy model: the base holding its values
        finetuned = evaluate(tuned, pair.processor, held, target.task, batch_size=batch_size).score
    _check_gain(base, finetuned)  # refused before the long part
    calibrated = any(REGISTRY[s.method].needs_calibration for s in grid)
    batches = [calibration_batches(pair.processor, fit, calib_batch)] if calibrated else None
    anchor_batches = None
    if anchor and calibrated:
        anchor_batches = calibration_batches(pair.processor, anchor, calib_batch)
    table = sweep(pair, grid, sets, [target], batches, anchor=anchor_batches, batch_size=batch_size,
                  progress=progress, should_stop=should_stop)
    _check_retention(table)
    table = rank(table)
    used = {s.name: f"first {len(s.examples)} of {len(o.examples)}" for s, o in zip(sets, original)}
    used[HELDOUT] = f"{len(held)} of {len(calibration)} target-task examples (seed {seed}); " \
                    f"{len(fit)} of the others calibrated"
    best = list(table.loc[table["kind"] == "merged", "best"]).index(True)
    step = 1 / (len(held) * (finetuned - base)) if target.task == "vqa" else math.nan
    return SearchResult(table=table, settings=grid, best=grid[best], used=used, gain_step=step)


def _check_gain(base: float, finetuned: float) -> None:
    """Refuse a search whose held-out examples show no gain from fine-tuning to keep."""
    if not finetuned > base:
        raise UserError(f"the fine-tuned model does not beat the base on the held-out target examples "
                        f"({finetuned:.3f} vs {base:.3f}), so no gain can be kept: give more "
                        "target-task examples or hold out more of them")


def _check_retention(table: pd.DataFrame) -> None:
    if math.isnan(table.loc[table["kind"] == "base", RANKED[0]].iloc[0]):
        raise UserError("the base model scores 0 on every original-task set, so no retention can "
                        "be measured: use other sets or more examples")
