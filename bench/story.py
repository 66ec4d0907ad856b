"""What the demo-story benchmarks share: their command line's start and the story's pair."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tailor_ui.demo.sets import DEMO_DIR, story_dir, story_pair  # noqa: E402
from tailor_ui.pair import Pair  # noqa: E402


def story_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--story", default="spatial", help="a demo story: spatial | counting")
    return parser


def open_story(story: str) -> tuple[Path, Pair]:
    """The story's folder and pair, on one thread (the figures in the README are so)."""
    torch.set_num_threads(1)
    return story_dir(DEMO_DIR, story), story_pair(DEMO_DIR, story)
