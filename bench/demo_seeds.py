"""Model Tailor on a demo story with calibration sets drawn from several seeds: the spread.

The demo ships one calibration set per story (world seed 0, the calibration stream). This
draws the same number of calibration examples from other seeds of the same stream, runs
Model Tailor (sequential Hessians, the compensation forms asked for, a few patch sizes) with
each, and scores every merge on the story's full evaluation sets. Anchored compensation's
original-task calibration set is drawn from the same seed (half captions, half attribute
questions, as the shipped one). The data-free baselines do not
read calibration data, so one run of them (the sweep of docs/results.md) stands for every seed.
Run from the repository root:

    python bench/demo_seeds.py --story spatial --seeds 0,1,2 --keep 0.02,0.05,0.1,0.2 \
        --compensation greedy,exact,anchored --baselines bench/results/demo_sweep_spatial.csv \
        --out bench/results/demo_seeds_spatial.csv
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from story import front_gap, open_story, story_parser  # noqa: E402
from tailor_ui.calibration import calibration_batches  # noqa: E402
from tailor_ui.data import Example, read_examples  # noqa: E402
from tailor_ui.demo import world  # noqa: E402
from tailor_ui.demo.build import CALIB_STREAM  # noqa: E402
from tailor_ui.demo.sets import DEMO_DIR, STORIES  # noqa: E402
from tailor_ui.evaluation.evaluate import EvalSet  # noqa: E402
from tailor_ui.evaluation.sweep import sweep, sweep_grid  # noqa: E402


def calibration(tasks: list[str], seed: int, n: int, folder: Path) -> list[Example]:
    """`n` calibration examples of each world task from world seed `seed` (seed 0: the
    shipped set, drawn the same way)."""
    out = []
    for task in tasks:
        for i, sample in enumerate(world.generate(task, n, seed, CALIB_STREAM)):
            path = folder / f"{task}-{seed}-{i}.png"
            sample.image.save(path)
            out.append(Example(image=path, question=sample.question, answers=sample.answers))
    return out


def _grid(keeps: str, options: dict[str, list[str]]) -> list:
    """Model Tailor at each keep with every valid combination of the options."""
    from tailor_ui.errors import UserError

    grid = []
    for combo in itertools.product(*options.values()):
        try:
            more = sweep_grid(["tailor"], {"keep": [float(k) for k in keeps.split(",")], "alpha": [0.8]},
                              calibrated={"hessians": ["sequential"], **{k: [v] for k, v in zip(options, combo)}})
            grid += [s for s in more if s not in grid]  # μ only tells anchored settings apart
        except UserError:  # e.g. SparseGPT's order with exact compensation
            continue
    return grid


def main() -> None:
    ap = story_parser(__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--keep", default="0.02,0.05,0.1")
    ap.add_argument("--compensation", default="greedy,exact", help="greedy,exact,anchored")
    ap.add_argument("--anchor-weight", default="0.3", help="comma-separated μ (anchored)")
    ap.add_argument("--order", default="mask-first", help="mask-first,sparsegpt (greedy only)")
    ap.add_argument("--budget", default="uniform", help="uniform,per-layer")
    ap.add_argument("--n", type=int, default=128, help="calibration examples per seed")
    ap.add_argument("--baselines", type=Path, default=None,
                    help="a sweep table of the same story (docs/results.md's): print each seed's "
                         "baseline leads over Model Tailor's front, with its baselines' rows")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    folder, pair = open_story(args.story)
    original = [EvalSet(name, name, read_examples(DEMO_DIR / f"{name}_eval.jsonl"))
                for name in ("caption", "vqa")]
    target = [EvalSet("target", "vqa", read_examples(folder / "target_eval.jsonl"))]
    options = {k: getattr(args, k).split(",") for k in ("compensation", "order", "budget")}
    options["anchor_weight"] = [float(w) for w in args.anchor_weight.split(",")]
    grid = _grid(args.keep, options)
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in (int(s) for s in args.seeds.split(",")):
            batches = calibration_batches(pair.processor, calibration([STORIES[args.story].task], seed, args.n,
                                                                      Path(tmp)), 16)
            anchor = calibration_batches(pair.processor, calibration(["caption", "vqa"], seed, args.n // 2,
                                                                     Path(tmp)), 16)
            table = sweep(pair, grid, original, target, [batches], anchor=anchor, batch_size=50,
                          progress=lambda stage, *_: print(f"seed {seed}: {stage}", flush=True))
            tables.append(table.assign(calibration_seed=seed))
    result = pd.concat(tables, ignore_index=True)
    args.out.write_text(result.to_csv(index=False))
    merged = result[result["kind"] == "merged"]
    spread = merged.groupby("setting")[["original_retention", "target_gain"]].agg(["mean", "min", "max"])
    print(spread.round(3).to_string())
    if args.baselines is not None:
        print_leads(result, pd.read_csv(args.baselines), args.story)


def print_leads(seeds: pd.DataFrame, baselines: pd.DataFrame, story: str) -> None:
    """Each calibration seed's Model Tailor rows against the baselines' rows of a sweep of
    the same story (the baselines read no calibration data, so one run stands for all)."""
    folder, _ = open_story(story)
    target = EvalSet("target", "vqa", read_examples(folder / "target_eval.jsonl"))
    others = baselines[(baselines["kind"] == "merged") & (baselines["method"] != "tailor")]
    for seed, table in seeds.groupby("calibration_seed"):
        both = pd.concat([table, others], ignore_index=True)  # the base's and fine-tune's rows: the seed's
        print(f"calibration seed {seed}: baselines' lead over Model Tailor's front, in target examples:",
              front_gap(both, target))


if __name__ == "__main__":
    main()
