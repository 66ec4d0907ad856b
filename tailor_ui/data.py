"""Calibration and evaluation examples: the JSONL format and image loading.

One example a line: {"image": "<path relative to the file>", "question": "<prompt; empty
for captioning>", "answers": ["...", ...]}. Every problem is reported with its line number.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tailor_ui.errors import UserError

# Far above any real MLLM input (they resize to ≤ 1-2k px) and far below a decompression bomb.
MAX_IMAGE_PIXELS = 4096 * 4096
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
MAX_UPLOAD_BYTES = 512 * 2**20  # an uploaded data set, packed and unpacked


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answers: tuple[str, ...] = field(default_factory=tuple)


# What a row must satisfy beyond the format: a problem to report with its line, or None.
RowRule = Callable[[Example], "str | None"]


def calibration_problem(example: Example) -> str | None:
    """Each calibration row must give a question or at least one answer (a captioning row
    has an empty question and reference captions), else its forward would calibrate on the
    image alone."""
    if example.question.strip() or any(a.strip() for a in example.answers):
        return None
    return ("a calibration row needs a question or answers (captioning: an empty question "
            "and reference captions)")


def read_calibration(path: str | Path) -> list[Example]:
    """Examples to calibrate on: the one rule every calibration path (CLI, dashboard) uses."""
    return read_examples(path, rule=calibration_problem)


def read_examples(path: str | Path, *, check_images: bool = True, rule: RowRule | None = None,
                  max_rows: int | None = None) -> list[Example]:
    """Parse and validate a JSONL file; image paths resolve against the file's folder.
    `rule` adds a check of each row (its problem is reported with the line number);
    more than `max_rows` examples are refused before the rest is read."""
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
        if max_rows is not None and len(examples) == max_rows:
            raise UserError(f"{path.name}: more than {max_rows} examples (at most {max_rows} are "
                            "taken: cut the file)")
        example = _parse_line(line, lineno, path, check_images)
        problem = rule(example) if rule is not None else None
        if problem:
            raise UserError(f"{path.name} line {lineno}: {problem}")
        examples.append(example)
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
        check_image(image_path, where)
    return Example(image=image_path, question=question, answers=tuple(answers))


def check_image(path: Path, where: str) -> None:
    """Refuse a file that is no readable image, or one too large (`where` starts the message)."""
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
    check_image(path, path.name)
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


def import_examples(files: Sequence[str], folder: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Bring an uploaded data set (a .zip, or a JSONL with its images) into `folder`.

    Images are matched to the JSONL's `image` fields by their relative path or, failing
    that, by file name, so uploading `data.jsonl` with `img1.png`, `img2.png` works.
    Returns the path of the JSONL to read (every problem is a `UserError`); it keeps the
    uploaded file's name and line numbers, so that read_examples' messages point into it.
    """
    paths = [Path(f) for f in files if f]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > max_bytes:
        raise UserError(f"the upload is too large ({total / 2**20:.1f} MB; at most "
                        f"{max_bytes / 2**20:g} MB)")
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips:
        _extract_zip(zips[0], folder, max_bytes)
        found = sorted(folder.rglob("*.jsonl"))
        if not found:
            raise UserError(f"{zips[0].name} holds no .jsonl file")
        return found[0]
    jsonl = [p for p in paths if p.suffix.lower() == ".jsonl"]
    if len(jsonl) != 1:
        raise UserError("upload exactly one .jsonl file with its images (or one .zip)")
    images = {p.name: p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES}
    source, lines = jsonl[0], []
    for lineno, line in enumerate(source.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as exc:
            raise UserError(f"{source.name} line {lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"]:
            name = Path(row["image"]).name
            if name not in images:
                raise UserError(f"{source.name} line {lineno}: image not found: {row['image']} "
                                "(it was not uploaded)")
            shutil.copyfile(images[name], folder / name)
            line = json.dumps({**row, "image": name})
        lines.append(line)  # every line, blank ones too: line numbers stay the user's
    target = folder / source.name
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target


def _extract_zip(path: Path, folder: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
    root = folder.resolve()
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if sum(m.file_size for m in members) > max_bytes:
                raise UserError(f"{path.name} unpacks to more than {max_bytes / 2**20:g} MB")
            for member in members:
                target = (root / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise UserError(f"{path.name}: {member.filename} would leave the upload folder")
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise UserError(f"{path.name} is not a readable zip file") from None
