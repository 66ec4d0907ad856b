"""A visitor's evaluation sets: added from an upload or a `datasets` data set, listed,
removed, and joined to the pair's built-in sets (the demo's) wherever sets are used: the
Forgetting sweep, the Tailor tab's quick check, Find settings and Compare's examples."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from tailor_ui.demo.sets import DEMO_SETS
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sets import EvalSpec, read_dataset_set, read_upload_set
from tailor_ui.app.session import PairHandle, Session

MAX_SETS = 12  # per visitor: each holds its images in the session's folder
RESERVED = tuple(DEMO_SETS)  # names no visitor's set may take: the demo's built-in sets
TABLE_COLUMNS = ["name", "role", "task", "examples", "source"]
HOW_TO_ADD = ("Add evaluation sets in the Models tab, under Evaluation sets: upload a JSONL with its "
              "images (or a zip of both), one example a line: {\"image\": \"a.png\", \"question\": "
              "\"what is on the left?\", \"answers\": [\"a circle\"]} (a caption set has no question), "
              "or name a datasets folder or hub id with its split and columns. Mark each set original "
              "(a skill the base model had) or target (what fine-tuning taught).")
_NAME_FOLDER = "evalset-"


def pair_sets(session: Session, handle: PairHandle) -> tuple[EvalSpec, ...]:
    """The pair's built-in sets, then the visitor's."""
    return (*handle.eval_sets, *session.eval_sets)


def require(sets: Sequence[EvalSpec], roles: Sequence[str], what: str, why: str) -> None:
    """Refuse, saying how to add them, when `sets` lacks a set of each of `roles`."""
    missing = [r for r in roles if not any(s.role == r for s in sets)]
    if missing:
        raise UserError(f"{what} needs {' and '.join(f'{r}-task' for r in roles)} evaluation sets "
                        f"({why}); this pair has no {' or '.join(f'{r}-task' for r in missing)} set. "
                        f"{HOW_TO_ADD}")


def add_upload(session: Session, handle: PairHandle, files: Sequence[str] | None, name: str, role: str,
               task: str | None, max_bytes: int) -> EvalSpec:
    """A set from uploaded files (a JSONL with its images, or a zip), kept in the session."""
    if not files:
        raise UserError("upload a JSONL file with its images, or a .zip holding them")
    return _add(session, handle, name, lambda folder, named: read_upload_set(
        list(files), folder, role=role, task=task, name=named, max_bytes=max_bytes))


def add_dataset(session: Session, handle: PairHandle, source: str, split: str, columns: str,
                name: str, role: str, task: str | None, roots: Sequence[Path]) -> EvalSpec:
    """A set from a `datasets` folder under the allowed folders, or a hub id."""
    return _add(session, handle, name, lambda folder, named: read_dataset_set(
        source, folder, role=role, task=task, split=(split or "test").strip(), columns=columns,
        name=named, allowed_roots=list(roots)))


def _add(session: Session, handle: PairHandle, name: str, read) -> EvalSpec:
    """Read a set into a new folder of the session (gone again if refused) and file it
    under a name no other set of the visitor's or of a built-in pair has."""
    name = (name or "").strip()
    if name:
        _check_name(session, handle, name)
    if len(session.eval_sets) >= MAX_SETS:
        raise UserError(f"you have {MAX_SETS} evaluation sets, the most one visitor may hold: "
                        "remove one first")
    stamp = hashlib.sha1(f"{time.time()}{name}".encode()).hexdigest()[:10]
    folder = session.new_dir(f"{_NAME_FOLDER}{stamp}")
    try:
        spec = read(folder, name or None)
        if not name:
            spec = _free_name(session, handle, spec)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # a refused set leaves nothing behind
        raise
    with session.lock:
        session.eval_sets.append(spec)
        session.eval_set_folders[spec.name] = folder
    return spec


def _taken(session: Session, handle: PairHandle) -> set[str]:
    return {*RESERVED, *(s.name for s in pair_sets(session, handle))}


def _check_name(session: Session, handle: PairHandle, name: str) -> None:
    if len(name) > 64 or not name.isprintable():
        raise UserError("a set name is at most 64 printable characters")
    if name in _taken(session, handle):
        raise UserError(f"there is already a set named {name!r} (or it is a built-in set's "
                        "name): choose another name")


def _free_name(session: Session, handle: PairHandle, spec: EvalSpec) -> EvalSpec:
    """The set under its derived name, numbered when that name is taken."""
    taken, name, k = _taken(session, handle), spec.name[:60] or "set", 2
    candidate = name
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    return spec if candidate == spec.name else EvalSpec(candidate, spec.task, spec.examples,
                                                        spec.role, spec.source)


def remove(session: Session, handle: PairHandle, name: str) -> None:
    """Drop one of the visitor's sets and its files."""
    name = (name or "").strip()
    with session.lock:
        found = next((s for s in session.eval_sets if s.name == name), None)
        if found is None:
            if any(s.name == name for s in handle.eval_sets):
                raise UserError(f"{name!r} is a built-in set of this pair; it cannot be removed")
            raise UserError(f"you have no evaluation set named {name!r}")
        session.eval_sets.remove(found)
        folder = session.eval_set_folders.pop(name, None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def table(session: Session, handle: PairHandle | None) -> pd.DataFrame:
    """One row per set the pair is scored on: name, role, task, examples, source."""
    sets = pair_sets(session, handle) if handle is not None else tuple(session.eval_sets)
    return pd.DataFrame([{"name": s.name, "role": s.role, "task": s.task, "examples": len(s.examples),
                          "source": s.source or "built-in"} for s in sets], columns=TABLE_COLUMNS)


def example(session: Session, handle: PairHandle, name: str, number: int) -> tuple[str, str, list[str]]:
    """Example `number` (from 1) of a set: image path, question and reference answers."""
    spec = next((s for s in pair_sets(session, handle) if s.name == name), None)
    if spec is None:
        raise UserError(f"no evaluation set named {name!r} for this pair. {HOW_TO_ADD}")
    if not 1 <= number <= len(spec.examples):
        raise UserError(f"{name} has examples 1 to {len(spec.examples)}")
    chosen = spec.examples[number - 1]
    return str(chosen.image), chosen.question, list(chosen.answers)
