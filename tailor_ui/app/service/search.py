"""Find settings on a session's pair: the search of `evaluation.search` over the pair's
original-task sets and its target-task examples (`service.tailor.calibration_examples`:
the pair's own, or an upload), its table saved as CSV in the session."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tailor_ui.control import Progress, StopCheck
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sets import EvalSpec
from tailor_ui.io import atomic_path
from tailor_ui.app.session import PairHandle, SearchRun, Session


@dataclass
class SearchPlan:
    """What one search job runs: the grid, the original sets (scored on their first `limit`
    examples), the target-task examples and the held-out share."""

    methods: Sequence[str]
    keeps: Sequence[float]
    alphas: Sequence[float]
    lams: Sequence[float]
    options: Mapping[str, Sequence[str]]
    original: list
    limit: int
    examples: list[Example]
    holdout: float
    fit_limit: int  # of the examples not held out, those Model Tailor calibrates on
    candidates: int
    anchor: list[Example]  # original-task calibration examples (anchored compensation)

    @property
    def label(self) -> str:
        return (f"find settings: {self.candidates} candidates x {len(self.original)} original sets "
                f"x {self.limit} examples")


def original_sets(sets: Sequence[EvalSpec]) -> list:
    """The original-task sets among the pair's sets, refused when there is none."""
    from tailor_ui.app.service.evalsets import require

    require(sets, ["original"], "Find settings", "it scores what the base model could already do")
    return [s.cut() for s in sets if s.role == "original"]


def search_plan(sets: Sequence[EvalSpec], keeps: Sequence[float], alphas: Sequence[float],
                options: Mapping[str, Sequence[str]], limit: int, examples: list[Example],
                holdout: float, fit_limit: int, max_candidates: int,
                anchor: list[Example] | None = None, *,
                methods: Sequence[str] = ("tailor",), lams: Sequence[float] = ()) -> SearchPlan:
    """The plan, checked now so that a bad request is refused before it is queued."""
    from tailor_ui.evaluation.search import candidate_grid, split_examples

    original = original_sets(sets)
    if limit < 1:
        raise UserError("use at least one example per original-task set")
    if fit_limit < 1:
        raise UserError("use at least one calibration example")
    grid = candidate_grid(keeps, alphas, options, methods, lams)
    if len(grid) > max_candidates:
        raise UserError(f"{len(grid)} candidates is too many for one search (at most {max_candidates}): "
                        "give fewer values or methods")
    split_examples(examples, holdout)
    return SearchPlan(list(methods), keeps, alphas, lams, options, original, limit, examples, holdout,
                      fit_limit, len(grid), list(anchor or []))


def search_run(handle: PairHandle, plan: SearchPlan, session: Session, calib_batch: int,
               progress: Progress, should_stop: StopCheck) -> SearchRun:
    """Run the plan on the pair (under its lock) and save the table in the session."""
    from tailor_ui.evaluation.search import find_settings

    start = time.perf_counter()
    with handle.lock:
        handle.trim_cache()
        result = find_settings(handle.pair, plan.examples, plan.original, methods=plan.methods,
                               keeps=plan.keeps, alphas=plan.alphas, lams=plan.lams,
                               options=plan.options, holdout=plan.holdout, fit_limit=plan.fit_limit,
                               limit=plan.limit, batch_size=plan.limit, calib_batch=calib_batch,
                               anchor=plan.anchor, progress=progress, should_stop=should_stop)
    csv_file = session.new_dir(f"search-{int(time.time() * 1000)}") / "candidates.csv"
    with atomic_path(csv_file) as tmp:
        result.table.to_csv(tmp, index=False)
    return SearchRun(job_id="", result=result, csv_file=csv_file, seconds=time.perf_counter() - start)
