"""The built demo's data on disk (assets/demo): its stories (one fine-tune of the shared
base each), their evaluation and calibration sets, and the example questions the Compare
tab offers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tailor_ui.data import Example, read_examples
from tailor_ui.errors import UserError

if TYPE_CHECKING:
    from tailor_ui.evaluation.evaluate import EvalSet
    from tailor_ui.pair import Pair

DEMO_DIR = Path(__file__).resolve().parents[2] / "assets" / "demo"
DEMO_SEED = 0  # the world seed the shipped demo was built with (`demo build --seed`)
# the demo's evaluation files: name -> (metric family, role); the target set is the story's
DEMO_SETS = {"caption": ("caption", "original"), "vqa": ("vqa", "original"),
             "target": ("vqa", "target")}
# the original skills' calibration set (anchored compensation), beside the evaluation files
ORIGINAL_CALIB = "original_calib"


@dataclass(frozen=True)
class Story:
    """One fine-tune of the demo's base: where its model and target sets live, what it shows."""

    folder: str  # under the demo folder; "" for the default story
    task: str  # the world task it learnt (tailor_ui.demo.world.TASKS)
    title: str
    about: str


STORIES = {
    "spatial": Story("", "spatial", "Separable forgetting: spatial questions",
                     "fine-tuned to say which shape or colour is on the left, in the middle or on "
                     "the right, in words the base already answers with: what it learnt and what it "
                     "broke sit apart, so a small patch can keep one and drop the other (the paper's "
                     "case)."),
    "counting": Story("counting", "count", "Format forgetting: counting",
                      "fine-tuned to count (answers balanced over one, two, three): it learnt to "
                      "answer with numbers, and that change of format is itself what it forgot with, "
                      "so a patch chosen from counting data alone keeps the skill or the old ones, "
                      "not both; one that also sees examples of the old skills (anchored) keeps most "
                      "of both."),
}
DEFAULT_STORY = "spatial"


def story_dir(demo_dir: Path, story: str) -> Path:
    if story not in STORIES:
        raise UserError(f"unknown demo story {story!r} (choose from {', '.join(STORIES)})")
    return Path(demo_dir) / STORIES[story].folder


def check_built(demo_dir: Path | None, story: str = DEFAULT_STORY) -> Path:
    """The demo folder, refused unless the base and the story's fine-tune are built."""
    if demo_dir is None:
        raise UserError("no demo pair configured")
    demo_dir = Path(demo_dir)
    tuned = story_dir(demo_dir, story) / "finetuned"
    if not (demo_dir / "base" / "config.json").is_file() or not (tuned / "config.json").is_file():
        raise UserError(f"the demo pair is not built ({demo_dir.name}/base and "
                        f"{tuned.relative_to(demo_dir)} are missing): run `python -m tailor_ui demo build`")
    return demo_dir


def story_pair(demo_dir: Path | None, story: str = DEFAULT_STORY, device: str = "cpu") -> Pair:
    """The story's pair: the demo's base and the story's fine-tune, with short ids."""
    from tailor_ui.pair import load_pair  # torch and transformers: only when a pair is wanted

    demo_dir = check_built(demo_dir, story)
    tuned = story_dir(demo_dir, story) / "finetuned"
    pair = load_pair(str(demo_dir / "base"), str(tuned), device=device)
    pair.base_id, pair.finetuned_ids = "demo/base", [f"demo/{tuned.relative_to(demo_dir).as_posix()}"]
    return pair


def demo_calibration(demo_dir: Path, story: str = DEFAULT_STORY) -> tuple[Example, ...]:
    path = story_dir(demo_dir, story) / "target_calib.jsonl"
    return tuple(read_examples(path, check_images=False)) if path.is_file() else ()


def demo_anchor(demo_dir: Path) -> tuple[Example, ...]:
    """The original skills' calibration examples (empty where the demo predates them)."""
    path = Path(demo_dir) / f"{ORIGINAL_CALIB}.jsonl"
    return tuple(read_examples(path, check_images=False)) if path.is_file() else ()


def demo_sets(demo_dir: Path | None, story: str = DEFAULT_STORY) -> list[EvalSet]:
    """The demo's evaluation sets that exist on disk (images are checked when used): the
    original skills' and the story's target set; each one's role (original or target task)
    is DEMO_SETS[name][1]."""
    from tailor_ui.evaluation.evaluate import EvalSet  # the generator behind it loads slowly

    sets = []
    for name, (task, role) in DEMO_SETS.items():
        folder = story_dir(demo_dir, story) if role == "target" and demo_dir else demo_dir
        path = Path(folder) / f"{name}_eval.jsonl" if folder else None
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
    """(image path, question) pairs for the Compare tab, the original skills' and every
    story's target task's; empty when there is no demo."""
    try:
        rows = example_rows(demo_sets(demo_dir))
        for story in STORIES:
            if story != DEFAULT_STORY:
                rows += example_rows([s for s in demo_sets(demo_dir, story) if s.name == "target"])
        return rows
    except UserError:
        return []
