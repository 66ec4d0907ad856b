"""What the demo-story benchmarks share: their command line's start and the story's pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tailor_ui.demo.sets import DEMO_DIR, story_dir, story_pair  # noqa: E402
from tailor_ui.evaluation.evaluate import EvalSet  # noqa: E402
from tailor_ui.evaluation.sweep import score_column  # noqa: E402
from tailor_ui.pair import Pair  # noqa: E402


def story_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--story", default="spatial", help="a demo story: spatial | counting")
    return parser


def open_story(story: str) -> tuple[Path, Pair]:
    """The story's folder and pair, on one thread (the figures in docs/results.md are so)."""
    torch.set_num_threads(1)
    return story_dir(DEMO_DIR, story), story_pair(DEMO_DIR, story)


def front_gap(table: pd.DataFrame, target: EvalSet, floor: float = 0.8, slack: float = 0.005) -> dict:
    """Per baseline, its largest lead over Model Tailor's front, in target examples: for each
    of its points keeping ≥ `floor` of the original score, its gain minus the best gain of a
    Model Tailor point keeping at least as much (less `slack`, about one VQA answer in 150).
    0 or less: Model Tailor's front is on or above it everywhere from `floor` up."""
    merged = table[table["kind"] == "merged"]
    tailor = merged[merged["method"] == "tailor"]
    score = table[score_column(target.name)]
    span = score[table["kind"] == "finetuned"].iloc[0] - score[table["kind"] == "base"].iloc[0]
    gaps = {}
    for method, points in merged[merged["method"] != "tailor"].groupby("method"):
        worst = -np.inf
        for _, p in points[points["original_retention"] >= floor].iterrows():
            ours = tailor.loc[tailor["original_retention"] >= p["original_retention"] - slack, "target_gain"]
            worst = max(worst, p["target_gain"] - (ours.max() if len(ours) else -np.inf))
        gaps[method] = round(float(worst * span * len(target.examples)), 1)
    return gaps
