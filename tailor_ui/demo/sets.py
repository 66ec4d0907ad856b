"""The built demo pair's data on disk (assets/demo): its evaluation sets, calibration set
and the example questions the Compare tab offers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tailor_ui.data import Example, read_examples
from tailor_ui.errors import UserError

if TYPE_CHECKING:
    from tailor_ui.evaluation.evaluate import EvalSet

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
# the demo's evaluation files: name -> (metric family, role)
DEMO_SETS = {"caption": ("caption", "original"), "vqa": ("vqa", "original"),
             "target": ("vqa", "target")}


def check_built(demo_dir: Path | None) -> Path:
    """The demo folder, refused unless both models are built."""
    if demo_dir is None:
        raise UserError("no demo pair configured")
    demo_dir = Path(demo_dir)
    if not (demo_dir / "base" / "config.json").is_file() or not (demo_dir / "finetuned" / "config.json").is_file():
        raise UserError(f"the demo pair is not built ({demo_dir.name}/base and finetuned are missing): "
                        "run `python -m tailor_ui demo build`")
    return demo_dir


def demo_calibration(demo_dir: Path) -> tuple[Example, ...]:
    path = Path(demo_dir) / "target_calib.jsonl"
    return tuple(read_examples(path, check_images=False)) if path.is_file() else ()


def demo_sets(demo_dir: Path | None) -> list[EvalSet]:
    """The demo's evaluation sets that exist on disk (images are checked when used); each
    one's role (original or target task) is DEMO_SETS[name][1]."""
    from tailor_ui.evaluation.evaluate import EvalSet  # the generator behind it loads slowly

    sets = []
    for name, (task, _role) in DEMO_SETS.items():
        path = Path(demo_dir) / f"{name}_eval.jsonl" if demo_dir else None
        if path is not None and path.is_file():
            sets.append(EvalSet(name=name, task=task,
                                examples=tuple(read_examples(path, check_images=False))))
    return sets


def example_rows(sets: Sequence[EvalSet]) -> list[tuple[str, str]]:
    """(image path, question) pairs: the first few of each set."""
    rows = []
    for spec in sets:
        for ex in spec.examples[: 2 if spec.task == "caption" else 3]:
            rows.append((str(ex.image), ex.question))
    return rows


def demo_examples(demo_dir: Path | None) -> list[tuple[str, str]]:
    """(image path, question) pairs for the Compare tab; empty when there is no demo."""
    try:
        return example_rows(demo_sets(demo_dir))
    except UserError:
        return []
