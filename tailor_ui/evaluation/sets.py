"""Evaluation sets a user brings: a JSONL with its images, a zip holding them, or a
`datasets` data set (a local folder or a hub id, a split, and the columns that hold the
image, the question and the answers).

Each set has a name, a role (`original`: a skill the base model had; `target`: what
fine-tuning taught; `anchor`: examples of the original skills for anchored Model Tailor
to calibrate on, never scored) and a task (`caption` or `vqa`: how answers are scored). Rows are
checked one by one: a problem is a `UserError` naming the JSONL line, or the data set's
row (numbered as the data set indexes it, from 0). Images from a data set are written to
a folder as files, so every set is a list of `data.Example` like the JSONL format's.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tailor_ui.data import (IMAGE_SUFFIXES, MAX_UPLOAD_BYTES, Example, check_image, import_examples,
                            read_examples)
from tailor_ui.errors import UserError
from tailor_ui.evaluation.evaluate import TASKS, EvalSet

# anchor: examples of the original skills that anchored Model Tailor holds the base to
# (calibration data, never scored)
ROLES = ("original", "target", "anchor")
SCORED_ROLES = ("original", "target")
# every model of a sweep answers every example: a few thousand already take hours on a CPU
MAX_EVAL_EXAMPLES = 2000
COLUMN_ROLES = ("image", "question", "answers")
_SPLIT = re.compile(r"^([\w.-]+)(?:\[(\d*):(\d*)\])?$")


@dataclass(frozen=True)
class EvalSpec:
    """An evaluation set the studio knows: its name, metric family, role and source."""

    name: str
    task: str  # "caption" or "vqa" (counting is scored like VQA)
    examples: tuple[Example, ...]
    role: str  # "original" or "target"
    source: str = ""  # where it was read from, as the user named it ("" for built-in sets)

    def cut(self, n: int | None = None) -> EvalSet:
        """The set to score, on its first `n` examples (all when None)."""
        return EvalSet(self.name, self.task, list(self.examples[:n]))


def check_kind(role: str, task: str | None) -> None:
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: original (a skill the base had), target "
                        "(what fine-tuning taught) or anchor (original-task calibration data)")
    if task is not None and task not in TASKS:
        raise UserError(f"unknown task {task!r}: caption or vqa")


class RowCheck:
    """What an evaluation row needs beyond the format: reference answers, and a question
    in a vqa set. Without a stated task, the first row decides: a question makes it vqa."""

    def __init__(self, task: str | None) -> None:
        self.task = task

    def __call__(self, example: Example) -> str | None:
        if self.task is None:
            self.task = "vqa" if example.question.strip() else "caption"
        if not any(a.strip() for a in example.answers):
            return "no reference answers: every evaluation row needs at least one"
        if self.task == "vqa" and not example.question.strip():
            return "a vqa row needs a question (a set without questions is a caption set)"
        return None


def read_jsonl_set(path: str | Path, *, role: str, task: str | None = None,
                   name: str | None = None, source: str | None = None,
                   max_examples: int | None = MAX_EVAL_EXAMPLES) -> EvalSpec:
    """A set from a JSONL file in the data format (images beside it); more than
    `max_examples` rows are refused."""
    check_kind(role, task)
    path = Path(path)
    check = RowCheck(task)
    examples = read_examples(path, rule=check, max_rows=max_examples)
    return EvalSpec(name or path.stem, check.task, tuple(examples), role, source or path.name)


def read_upload_set(files: Sequence[str], folder: Path, *, role: str, task: str | None = None,
                    name: str | None = None, max_bytes: int = MAX_UPLOAD_BYTES,
                    max_examples: int | None = MAX_EVAL_EXAMPLES) -> EvalSpec:
    """A set from uploaded files (a JSONL with its images, or a zip), brought into `folder`."""
    check_kind(role, task)
    paths = [Path(f) for f in files if f]
    folder.mkdir(parents=True, exist_ok=True)
    jsonl = import_examples([str(p) for p in paths], folder, max_bytes)
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    shown = zips[0] if zips else jsonl
    return read_jsonl_set(jsonl, role=role, task=task, name=name or shown.stem, source=shown.name,
                          max_examples=max_examples)


def parse_columns(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """'image=img, question=q, answers=refs' -> {role: column}; `question=` (empty) means
    a set without questions. Roles not named keep their defaults (the role's own name)."""
    if isinstance(text, Mapping):
        pairs = list(text.items())
    else:
        pairs = []
        for part in (text or "").split(","):
            if part.strip():
                key, eq, value = part.partition("=")
                if not eq:
                    raise UserError(f"columns: {part.strip()!r} is not ROLE=COLUMN (e.g. image=img)")
                pairs.append((key, value))
    columns: dict[str, str] = {}
    for key, value in pairs:
        key = key.strip()
        if key not in COLUMN_ROLES:
            raise UserError(f"columns: unknown role {key!r} (use image=, question=, answers=)")
        columns[key] = value.strip()
    return columns


def read_dataset_set(source: str, folder: Path, *, role: str, task: str | None = None,
                     split: str = "test", columns: str | Mapping[str, str] | None = None,
                     name: str | None = None, allowed_roots: Sequence[Path] | None = None,
                     max_examples: int | None = MAX_EVAL_EXAMPLES) -> EvalSpec:
    """A set from a `datasets` data set: a local folder (`save_to_disk`'s output, or files
    `load_dataset` reads) or a hub id; `split` may take a slice (`test[:500]`). Images
    are written into `folder`. With `allowed_roots` (the dashboard), local folders must lie
    under one of them."""
    check_kind(role, task)
    wanted = parse_columns(columns)
    spec, local = _dataset_source(source, allowed_roots)
    data = _load(spec, local, split)
    cols = _columns(data, wanted, task)
    shown = name or (local.name if local is not None else spec.rsplit("/", 1)[-1])
    if max_examples is not None and len(data) > max_examples:
        raise UserError(f"{shown}: {len(data)} rows; an evaluation set holds at most "
                        f"{max_examples} (every model answers each): take a slice, e.g. "
                        f"split {split.split('[')[0]}[:{max_examples}]")
    if not len(data):
        raise UserError(f"{shown}: the split {split!r} has no rows")
    data = _undecoded(data, cols["image"])
    folder.mkdir(parents=True, exist_ok=True)
    check, examples = RowCheck(task), []
    for index, row in enumerate(data):
        where = f"{shown} row {index}"
        example = _row_example(row, cols, index, where, folder, local)
        problem = check(example)
        if problem:
            raise UserError(f"{where}: {problem}")
        examples.append(example)
    return EvalSpec(shown, check.task, tuple(examples), role, f"{spec} ({split})")


def _dataset_source(spec: str, roots: Sequence[Path] | None) -> tuple[str, Path | None]:
    """(the source as shown, its local folder or None for a hub id)."""
    spec = (spec or "").strip()
    if not spec:
        raise UserError("no data set given: a local folder or a hub id (owner/name)")
    if roots is not None and not spec.startswith(("/", ".", "~")):
        under = next((r / spec for r in roots if (r / spec).resolve().is_relative_to(r.resolve())
                      and (r / spec).is_dir()), None)
        local = under.resolve() if under is not None else None
    else:
        path = Path(spec).expanduser()
        local = path.resolve() if path.exists() or spec.startswith(("/", ".", "~")) else None
    if local is not None:
        if roots is not None and not any(local.is_relative_to(Path(r).resolve()) for r in roots):
            raise UserError(f"{spec}: local folders outside the allowed folders are not accepted")
        if not local.is_dir():
            raise UserError(f"{spec}: no such data set folder")
        return spec, local
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        raise UserError(f"{spec!r} is neither an existing folder nor a hub id of the form "
                        "owner/name") from None
    return spec, None


def _load(spec: str, local: Path | None, split: str):
    """The split as a `datasets.Dataset`, sliced as asked."""
    match = _SPLIT.match(split.strip())
    if not match:
        raise UserError(f"split {split!r}: a name, optionally sliced: test, test[:500], train[100:200]")
    split_name, start, stop = match.group(1), match.group(2), match.group(3)
    import datasets

    quiet = not datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # their bars would come before the CLI's one error line
    try:
        data = _open(datasets, spec, local, split_name)
    except UserError:
        raise
    except Exception as exc:  # missing files, no network, a folder datasets cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{spec}: cannot load split {split_name!r} ({first[:200]})") from None
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if start or stop:
        data = data.select(range(len(data))[slice(int(start or 0), int(stop) if stop else None)])
    return data


def _open(datasets, spec: str, local: Path | None, split: str):
    if local is not None and (local / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(local))
        if split not in splits:
            raise UserError(f"{spec}: no split {split!r} (it has: {', '.join(splits)})")
        return splits[split]
    if local is not None and (local / "state.json").is_file():
        return datasets.load_from_disk(str(local))  # one saved split: the name is not needed
    return datasets.load_dataset(str(local) if local is not None else spec, split=split)


def _columns(data, wanted: Mapping[str, str], task: str | None) -> dict[str, str | None]:
    """The column of each role, checked against the data set's columns."""
    have = list(data.column_names)

    def known(role: str, column: str) -> str:
        if column not in have:
            raise UserError(f"unknown {role} column {column!r} (the data set has: {', '.join(have)})")
        return column

    cols: dict[str, str | None] = {"image": known("image", wanted.get("image") or "image"),
                                   "answers": known("answers", wanted.get("answers") or "answers")}
    question = wanted.get("question", "question" if "question" in have else "")
    cols["question"] = known("question", question) if question else None
    if cols["question"] is None and task == "vqa":
        raise UserError("a vqa set needs a question column: name it with question=COLUMN")
    return cols


def _undecoded(data, column: str):
    """The image column as stored (bytes and path), so each image is written, not decoded."""
    import datasets

    if isinstance(data.features.get(column), datasets.Image):
        return data.cast_column(column, datasets.Image(decode=False))
    return data


def _row_example(row: Mapping[str, Any], cols: Mapping[str, str | None], index: int, where: str,
                 folder: Path, local: Path | None) -> Example:
    question = row[cols["question"]] if cols["question"] else ""
    if question is None:
        question = ""
    if not isinstance(question, str):
        raise UserError(f"{where}: column {cols['question']!r} must hold text, not "
                        f"{type(question).__name__}")
    image = _write_image(row[cols["image"]], cols["image"], index, where, folder, local)
    return Example(image=image, question=question,
                   answers=_answers(row[cols["answers"]], cols["answers"], where))


def _answers(value: Any, column: str, where: str) -> tuple[str, ...]:
    """A string, a list of strings, or VQAv2's list of {"answer": ...} records."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)):
        items = [v.get("answer") if isinstance(v, Mapping) else v for v in value]
        if all(isinstance(v, str) for v in items):
            return tuple(items)
    raise UserError(f"{where}: column {column!r} must hold a string or a list of strings")


def _write_image(value: Any, column: str, index: int, where: str, folder: Path,
                 local: Path | None) -> Path:
    """The row's image as a checked file in `folder`."""
    from PIL import Image

    path = folder / f"{index:06d}.png"
    if isinstance(value, Image.Image):
        value.save(path)
    elif isinstance(value, Mapping) and value.get("bytes"):
        path.write_bytes(value["bytes"])
    elif isinstance(value, (str, Mapping)) and local is not None:
        stored = value if isinstance(value, str) else value.get("path") or ""
        original = (local / stored).resolve()
        if not stored or not original.is_relative_to(local) or not original.is_file():
            raise UserError(f"{where}: image file not found in the data set's folder: {stored}")
        if original.suffix.lower() in IMAGE_SUFFIXES:
            path = path.with_suffix(original.suffix.lower())
        shutil.copyfile(original, path)
    else:
        raise UserError(f"{where}: column {column!r} holds no image (an image, or a file in the "
                        "data set's folder)")
    check_image(path, where)
    return path


def parse_set_spec(text: str) -> tuple[str, str | None]:
    """'PATH[:caption|vqa]' -> (PATH, task or None): the command line's form of a set."""
    source, colon, task = text.rpartition(":")
    if colon and task in TASKS:
        return source, task
    return text, None


def read_set(source: str, folder: Path, *, role: str, task: str | None = None,
             split: str = "test", columns: str | Mapping[str, str] | None = None,
             name: str | None = None, max_examples: int | None = MAX_EVAL_EXAMPLES) -> EvalSpec:
    """A set from wherever `source` points: a .jsonl file, a .zip (unpacked into
    `folder`), or a data set folder / hub id (its images written into `folder`)."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        return read_jsonl_set(path, role=role, task=task, name=name, source=source,
                              max_examples=max_examples)
    if path.is_file() and suffix == ".zip":
        return read_upload_set([str(path)], folder, role=role, task=task, name=name,
                               max_examples=max_examples)
    if path.is_file() or (suffix in (".jsonl", ".zip") and not path.exists()):
        raise UserError(f"{source}: not found, or not a .jsonl file, a .zip or a data set folder")
    return read_dataset_set(source, folder, role=role, task=task, split=split, columns=columns,
                            name=name, max_examples=max_examples)
