"""The shapes world: seeded 48x48 scenes of one to three shapes, with ground truth.

Four tasks share the scenes. The base model's original skills are captioning (five
reference phrasings per image, as COCO has, so CIDEr-D sees consensus) and attribute VQA
(the colour, shape or size of a uniquely named shape, or the background colour). Two target
skills are learnt only by fine-tuning:

- spatial questions ("what shape is on the left?" -> "circle"): a new question type whose
  answers are shape and colour words the base already says, so learning it need not change
  how the model answers -- the paper's case, where forgetting is a side effect a patch can undo;
- counting ("how many red shapes are there?" -> "two"): a new one-word answer style, drawn
  balanced over one/two/three. The number words already occur in one caption phrasing, as a
  real LLM knows them from pre-training, but answering with them is a change of format.

Everything is drawn from one `numpy` generator seeded per call, so a seed fixes the images
and the texts exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 48
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 205, 40),
    "purple": (140, 60, 190),
    "orange": (240, 135, 30),
}
BACKGROUNDS = {"white": (240, 240, 240), "gray": (128, 128, 128), "black": (25, 25, 25)}
GRID = 3  # shapes sit in a GRID x GRID layout of cells, one column each
CELL = IMAGE_SIZE // GRID
SIZES = {"small": (3, 4), "large": (6, 7)}  # half-widths in pixels, drawn uniformly
NUMBERS = ("one", "two", "three")
TASKS = ("caption", "vqa", "count", "spatial")  # two original skills, then two targets
# VQA data sets carry ten annotator answers; ours agree, so a match scores 1.
VQA_ANSWER_COPIES = 10

# Words the templates below write besides the attribute names (the tokenizer's vocabulary).
_TEMPLATE_WORDS = (
    "a and on the background left right of in middle there is with shapes circles squares"
    " triangles what colour shape size object how many are ?"
).split()


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    size: str
    cx: int
    cy: int
    half: int


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # ordered left to right


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str  # empty for captioning
    answers: tuple[str, ...]
    scene: Scene


def vocabulary() -> list[str]:
    """Every word the world can write, in a fixed order."""
    words = [*SHAPES, *COLOURS, *BACKGROUNDS, *SIZES, *NUMBERS, *_TEMPLATE_WORDS]
    return list(dict.fromkeys(words))


def make_scene(rng: np.random.Generator) -> Scene:
    """One to three shapes, each in its own column of a 3x3 grid so "left of" is unambiguous.

    Grid cells match the vision tower's 16-pixel patches: each shape sits near the centre of
    one patch, so a small ViT trained from scratch learns to see it within a few minutes.
    """
    count = int(rng.integers(1, 4))
    columns = np.sort(rng.choice(GRID, size=count, replace=False))
    shapes = []
    for column in columns:
        size = str(rng.choice(list(SIZES)))
        low, high = SIZES[size]
        cx, cy = (int(column) + 0.5) * CELL, (int(rng.integers(GRID)) + 0.5) * CELL
        shapes.append(Shape(
            kind=str(rng.choice(SHAPES)),
            colour=str(rng.choice(list(COLOURS))),
            size=size,
            cx=int(cx + rng.integers(-1, 2)),
            cy=int(cy + rng.integers(-1, 2)),
            half=int(rng.integers(low, high + 1)),
        ))
    return Scene(background=str(rng.choice(list(BACKGROUNDS))), shapes=tuple(shapes))


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Draw the scene on a noisy background; colours are jittered so no two images match."""
    base = np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    noise = rng.integers(-12, 13, size=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.int16)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        jitter = rng.integers(-20, 21, size=3)
        fill = tuple(int(c) for c in np.clip(np.array(COLOURS[s.colour]) + jitter, 0, 255))
        box = (s.cx - s.half, s.cy - s.half, s.cx + s.half, s.cy + s.half)
        if s.kind == "circle":
            draw.ellipse(box, fill=fill)
        elif s.kind == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(s.cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return image


def cell_labels(scene: Scene) -> list[tuple[int, int, int]]:
    """(kind, colour, size) class ids of each grid cell in row-major order; 0 = empty.

    Supervision for the vision tower's pre-training (see `demo.train.pretrain_vision`).
    """
    labels = [(0, 0, 0)] * (GRID * GRID)
    for s in scene.shapes:
        labels[(s.cy // CELL) * GRID + s.cx // CELL] = (
            SHAPES.index(s.kind) + 1, list(COLOURS).index(s.colour) + 1, list(SIZES).index(s.size) + 1)
    return labels


def _describe(s: Shape) -> str:
    return f"a {s.size} {s.colour} {s.kind}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else " ".join(parts[:-1]) + " and " + parts[-1]


def _grouped(scene: Scene) -> str:
    """Shapes grouped by colour and kind, with counts: "two red circles and one blue square"."""
    groups: dict[tuple[str, str], int] = {}
    for s in scene.shapes:
        groups[(s.colour, s.kind)] = groups.get((s.colour, s.kind), 0) + 1
    return _join([f"{NUMBERS[n - 1]} {colour} {kind}{'s' if n > 1 else ''}"
                  for (colour, kind), n in groups.items()])


def captions(scene: Scene) -> list[str]:
    """Five valid, differently phrased references."""
    descs = [_describe(s) for s in scene.shapes]
    listed = _join(descs)
    if len(descs) == 1:
        layout = f"there is {descs[0]}"
        reverse = f"a {scene.background} background with {listed}"
    elif len(descs) == 2:
        layout = f"{descs[0]} left of {descs[1]}"
        reverse = f"{descs[1]} right of {descs[0]}"
    else:
        layout = f"{descs[0]} on the left {descs[1]} in the middle and {descs[2]} on the right"
        reverse = f"a {scene.background} background with {listed}"
    return [f"{listed} on a {scene.background} background", layout, _grouped(scene), reverse,
            listed]


def vqa_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Every attribute question whose answer is unambiguous in this scene."""
    pairs = [("what colour is the background?", scene.background)]
    kinds = [s.kind for s in scene.shapes]
    colours = [s.colour for s in scene.shapes]
    named = [(s.colour, s.kind) for s in scene.shapes]
    for s in scene.shapes:
        if kinds.count(s.kind) == 1:
            pairs.append((f"what colour is the {s.kind}?", s.colour))
        if colours.count(s.colour) == 1:
            pairs.append((f"what shape is the {s.colour} object?", s.kind))
        if named.count((s.colour, s.kind)) == 1:
            pairs.append((f"what size is the {s.colour} {s.kind}?", s.size))
    return pairs


def count_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Counting questions about the whole scene, one shape kind or one colour present."""
    pairs = [("how many shapes are there?", NUMBERS[len(scene.shapes) - 1])]
    for kind in dict.fromkeys(s.kind for s in scene.shapes):
        n = sum(s.kind == kind for s in scene.shapes)
        pairs.append((f"how many {kind}s are there?", NUMBERS[n - 1]))
    for colour in dict.fromkeys(s.colour for s in scene.shapes):
        n = sum(s.colour == colour for s in scene.shapes)
        pairs.append((f"how many {colour} shapes are there?", NUMBERS[n - 1]))
    return pairs


def _positions(scene: Scene) -> list[tuple[str, Shape]]:
    shapes = scene.shapes
    if len(shapes) == 2:
        return [("on the left", shapes[0]), ("on the right", shapes[1])]
    return [("on the left", shapes[0]), ("in the middle", shapes[1]), ("on the right", shapes[2])]


def spatial_pairs(scene: Scene) -> list[tuple[str, str]]:
    """Which shape, or which colour, is on the left / in the middle / on the right (scenes of
    two or three shapes; each shape has its own column, so the answer is unambiguous)."""
    if len(scene.shapes) < 2:
        return []
    pairs = []
    for where, s in _positions(scene):
        pairs.append((f"what shape is {where}?", s.kind))
        pairs.append((f"what colour is the shape {where}?", s.colour))
    return pairs


QuestionPairs = Callable[[Scene], list[tuple[str, str]]]
_QUESTIONS: dict[str, QuestionPairs] = {"vqa": vqa_pairs, "count": count_pairs,
                                        "spatial": spatial_pairs}


def question_sample(rng: np.random.Generator, pairs_of: QuestionPairs) -> Sample:
    """One question about a fresh scene, drawn from `pairs_of(scene)`; scenes that offer no
    question (e.g. a spatial one needs two shapes) are drawn again."""
    while True:
        scene = make_scene(rng)
        pairs = pairs_of(scene)
        if pairs:
            break
    image = render(scene, rng)
    question, answer = pairs[int(rng.integers(len(pairs)))]
    return Sample(image, question, (answer,) * VQA_ANSWER_COPIES, scene)


def _with_answer(answer: str) -> QuestionPairs:
    return lambda scene: [(q, a) for q, a in count_pairs(scene) if a == answer]


def _sample(task: str, rng: np.random.Generator, index: int) -> Sample:
    if task == "caption":
        scene = make_scene(rng)
        return Sample(render(scene, rng), "", tuple(captions(scene)), scene)
    if task == "count":
        # Balanced answers: sample i answers NUMBERS[i % 3], else "one" would be most of
        # them (most scenes have one shape of a kind or colour) and a model that always
        # answers "one" would look like it learnt to count.
        return question_sample(rng, _with_answer(NUMBERS[index % len(NUMBERS)]))
    return question_sample(rng, _QUESTIONS[task])


def generate(task: str, n: int, seed: int, stream: int = 0) -> list[Sample]:
    """`n` samples of one task; the same (task, seed, stream) always gives the same samples.

    Streams separate the splits (training, evaluation, calibration) drawn from one seed.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    rng = np.random.default_rng([seed, stream, TASKS.index(task)])
    return [_sample(task, rng, i) for i in range(n)]
