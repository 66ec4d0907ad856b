"""The forgetting table of a session's pair on its built-in sets: the sweep of
`evaluation.sweep`, a row per model fine-tuned in the session, and the map of where one
setting's patch lives."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from tailor_ui.control import Progress, Stages, StopCheck
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sets import EvalSpec
from tailor_ui.io import atomic_path
from tailor_ui.app.service.config import settings_label
from tailor_ui.app.session import PairHandle, Session, SweepRun
from tailor_ui.app.service.tailor import anchor_source
from tailor_ui.patch import PatchFile
from tailor_ui.training.registry import TRAINING_METHODS

MAX_SWEEP_SETTINGS = 24


@dataclass
class SweepPlan:
    """What one sweep job evaluates: its settings, the sets cut to `n` examples each, the
    models fine-tuned in the session, and the calibration batches' source (or None)."""

    grid: list
    original: list
    target: list
    n: int
    trained: list[tuple[str, str, PatchFile]]  # (method, label, its patch over the base)
    calibration: tuple[list, str] | None  # (examples, source) when a setting needs them
    anchor: list = field(default_factory=list)  # original-task calibration examples, where needed

    @property
    def label(self) -> str:
        sets = [*self.original, *self.target]
        sizes = sorted({len(s.examples) for s in sets})
        each = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}–{sizes[-1]}"
        label = f"sweep: {len(self.grid)} settings x {len(sets)} sets x {each} examples"
        return label + (f" (+{len(self.trained)} fine-tuned here)" if self.trained else "")


def eval_sets(sets: Sequence[EvalSpec], n: int) -> tuple[list, list]:
    """The original-task and target-task sets, `n` examples each; refused, saying how to
    add them, when either role has none."""
    from tailor_ui.app.service.evalsets import require

    if n < 1:
        raise UserError("use at least one example per evaluation set")
    require(sets, ["original", "target"], "The sweep", "it measures what a merge keeps of both")
    cut = {role: [s.cut(n) for s in sets if s.role == role] for role in ("original", "target")}
    return cut["original"], cut["target"]


def sweep_run(handle: PairHandle, plan: SweepPlan, session: Session, batches,
              progress: Progress, should_stop: StopCheck) -> SweepRun:
    """Run the plan on the pair (under its lock) and save the table as CSV in the session.
    `batches(examples, source)` gives the calibration batches."""
    from tailor_ui.evaluation.sweep import sweep

    start = time.perf_counter()
    # the shares of sweep(): a stage per reference model, two per setting (merge, scores)
    stages = Stages(progress, [1 + len(handle.pair.finetuned) + 2 * len(plan.grid),
                               len(plan.trained), 1])
    with handle.lock:
        handle.trim_cache()
        calibration = None
        if plan.calibration is not None:
            calibration = [batches(*plan.calibration)] * len(handle.pair.finetuned)
        anchor = batches(plan.anchor, anchor_source(plan.anchor)) if plan.anchor else None
        table = sweep(handle.pair, plan.grid, plan.original, plan.target, calibration, anchor=anchor,
                      batch_size=plan.n, progress=stages.stage(0), should_stop=should_stop)
        if plan.trained:
            table = trained_rows(handle, table, plan, stages.stage(1), should_stop)
        report, shown_label = heatmap_report(handle, plan.grid, calibration, anchor, stages.stage(2),
                                             should_stop)
    folder = session.new_dir(f"sweep-{int(time.time() * 1000)}")
    csv_file = folder / "forgetting.csv"
    with atomic_path(csv_file) as tmp:
        table.to_csv(tmp, index=False)
    return SweepRun(job_id="", table=table, csv_file=csv_file, heatmap_report=report,
                    heatmap_label=shown_label, seconds=time.perf_counter() - start)


def heatmap_report(handle: PairHandle, grid: Sequence, calibration, anchor, progress: Progress,
                   should_stop: StopCheck) -> tuple[dict | None, str]:
    """The report of the setting whose patch the dashboard maps (Model Tailor's first, else
    a patch-size baseline's), cut to the linear layers; (None, "") when there is none."""
    from tailor_ui.engine import run_method
    from tailor_ui.methods import REGISTRY

    shown = next((s for s in grid if REGISTRY[s.method].needs_calibration), None) or next(
        (s for s in grid if "keep" in REGISTRY[s.method].knobs), None)
    if shown is None:
        return None, ""
    progress("mapping where the patch lives", 0, 1)
    report = run_method(handle.pair, shown, calibration, anchor=anchor, should_stop=should_stop).report
    linear = set(handle.summary.loc[handle.summary["linear"], "name"])
    report = {**report, "tensors": {n: t for n, t in report["tensors"].items() if n in linear}}
    return report, settings_label(shown)


def trained_rows(handle: PairHandle, table: pd.DataFrame, plan: SweepPlan, progress: Progress,
                 should_stop: StopCheck) -> pd.DataFrame:
    """The sweep's table with a row per model fine-tuned in the session, scored on the same
    sets and examples (retention and H-score recomputed against the same references)."""
    from tailor_ui.evaluation.evaluate import evaluate_all
    from tailor_ui.evaluation.sweep import score_column, summarize

    size = sum(p.numel() for p in handle.pair.base.parameters())
    rows = []
    for i, (method, name, patch) in enumerate(plan.trained):
        def starting(s, _i: int = i, _name: str = name) -> None:
            progress(f"evaluating {_name} on {s.name}", _i, len(plan.trained))

        with handle.patched(patch) as model:
            results = evaluate_all(model, handle.pair.processor, [*plan.original, *plan.target],
                                   batch_size=plan.n, before_each=starting, should_stop=should_stop)
        rows.append({"kind": "trained", "setting": name, "keep": None, "alpha": None, "lam": None,
                     "method": ("tailor-ft" if name.startswith("Model Tailor on ")
                                else TRAINING_METHODS[method].short),
                     "patch_fraction": patch.num_entries / size,
                     "linear_fraction": None, "seconds": math.nan,
                     **{score_column(k): r.score for k, r in results.items()},
                     "eval_seconds": sum(r.seconds for r in results.values())})
    return summarize(pd.concat([table, pd.DataFrame(rows)], ignore_index=True), plan.original,
                     plan.target)


# the README's sweep of each demo story, run once and shipped in bench/results, so the
# Forgetting tab shows a true table before a visitor runs one
SHIPPED_COMMAND = (
    "python -m tailor_ui sweep --base assets/demo/base --finetuned assets/demo/{folder}finetuned "
    "--calib assets/demo/{folder}target_calib.jsonl --original assets/demo/caption_eval.jsonl "
    "assets/demo/vqa_eval.jsonl --target assets/demo/{folder}target_eval.jsonl "
    "--methods tailor,magnitude,wise_ft,ties,dare --compensation exact,greedy,anchored "
    "--anchor assets/demo/original_calib.jsonl --anchor-weight 0.3,1 --keep 0.02,0.05,0.1,0.2 "
    "--lam 0.25,0.5,0.75 --batch-size 50 --out bench/results/demo_sweep_{story}.csv")


@dataclass(frozen=True)
class ShippedSweep:
    table: pd.DataFrame
    command: str


@functools.lru_cache(maxsize=None)
def shipped_sweep(story: str) -> ShippedSweep | None:
    """The shipped sweep of a demo story (bench/results/demo_sweep_<story>.csv) and the
    command that made it; None when the file is not there."""
    from tailor_ui.demo.sets import STORIES
    from tailor_ui.app.service.config import ROOT

    path = ROOT / "bench" / "results" / f"demo_sweep_{story}.csv"
    if story not in STORIES or not path.is_file():
        return None
    folder = f"{STORIES[story].folder}/" if STORIES[story].folder else ""
    return ShippedSweep(pd.read_csv(path), SHIPPED_COMMAND.format(folder=folder, story=story))


def keep_hint(table: pd.DataFrame, default_keep: float) -> str:
    """Model Tailor's best-balanced row of a sweep (highest H-score) in words, and a hint to
    try its larger keep when the Tailor tab starts below it."""
    rows = table[(table["method"] == "tailor") & table["h_score"].notna()]
    if rows.empty:
        return ""
    best = rows.loc[rows["h_score"].idxmax()]
    text = (f"In its precomputed sweep Model Tailor balances best at **{best['setting']}**: "
            f"{100 * best['original_retention']:.0f}% of the original skills kept, "
            f"{100 * best['target_gain']:.0f}% of the new skill's gain.")
    if best["keep"] > default_keep:
        text += (f" The Tailor tab starts at keep {default_keep:g}, which keeps less of the new "
                 f"skill: try keep {best['keep']:g}.")
    return text
