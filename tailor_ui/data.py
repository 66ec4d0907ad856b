"""Calibration and evaluation examples: the JSONL format and image loading.

One example a line: {"image": "<path relative to the file>", "question": "<prompt; empty
for captioning>", "answers": ["...", ...]}. Every problem is reported with its line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tailor_ui.errors import UserError

# Far above any real MLLM input (they resize to ≤ 1-2k px) and far below a decompression bomb.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answers: tuple[str, ...] = field(default_factory=tuple)


def read_examples(path: str | Path, *, check_images: bool = True) -> list[Example]:
    """Parse and validate a JSONL file; image paths resolve against the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path.name}")
    examples: list[Example] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path.name}: not UTF-8 text ({exc.reason})") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        examples.append(_parse_line(line, lineno, path, check_images))
    if not examples:
        raise UserError(f"{path.name}: no examples (the file is empty)")
    return examples


def _parse_line(line: str, lineno: int, path: Path, check_images: bool) -> Example:
    where = f"{path.name} line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    image = row.get("image")
    if not isinstance(image, str) or not image:
        raise UserError(f"{where}: 'image' must be a non-empty string")
    question = row.get("question", "")
    if not isinstance(question, str):
        raise UserError(f"{where}: 'question' must be a string")
    answers = row.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f"{where}: 'answers' must be a list of strings")
    image_path = (path.parent / image).resolve()
    if not image_path.is_relative_to(path.parent.resolve()):
        raise UserError(f"{where}: image path leaves the data folder: {image}")
    if check_images:
        if not image_path.is_file():
            raise UserError(f"{where}: image not found: {image}")
        _check_image(image_path, where)
    return Example(image=image_path, question=question, answers=tuple(answers))


def _check_image(path: Path, where: str) -> None:
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise UserError(f"{where}: image too large ({width}x{height} pixels)")
            img.verify()
    except UserError:
        raise
    except Image.DecompressionBombError:  # PIL's own limit, past twice its 89M-pixel warning
        raise UserError(f"{where}: image too large: {path.name}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UserError(f"{where}: not a readable image: {path.name}") from None


def load_image(path: str | Path) -> Image.Image:
    """Open an image as RGB, refusing non-images and decompression bombs."""
    path = Path(path)
    _check_image(path, path.name)
    with Image.open(path) as img:
        return img.convert("RGB")


def fingerprint(examples: list[Example]) -> str:
    """Identity of a data set (texts and image bytes) for cache keys."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.question, list(ex.answers)]).encode())
        digest.update(hashlib.sha256(ex.image.read_bytes()).digest())
    return digest.hexdigest()[:16]


def write_examples(path: str | Path, rows: list[dict]) -> None:
    """Write rows in the JSONL format (used by the demo builder and tests)."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
