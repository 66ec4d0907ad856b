"""A merge of a pair: calibration data, the method, a quick check on a few examples of
each built-in set, and the patch and report on disk. The command line writes its output
folder with the same `save_run`."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tailor_ui.control import Progress, StopCheck
from tailor_ui.data import Example, import_examples, read_calibration
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.session import PairHandle, Session, TailorRun


def calibration_examples(session: Session, handle: PairHandle, source: str,
                         files: Sequence[str] | None, n: int, max_bytes: int
                         ) -> tuple[list[Example], str]:
    """The examples a merge calibrates on and their source's name: the pair's built-in
    set, or an upload (kept in the session's folder, named by the files' digest)."""
    if n < 1:
        raise UserError("use at least one calibration example")
    if source == "upload":
        if not files:
            raise UserError("upload a calibration JSONL file (with its images, or a .zip)")
        folder = session.new_dir(f"calibration-{digest(files)}")
        try:
            path = import_examples(files, folder, max_bytes)
            examples = read_calibration(path)[:n]
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a refused upload leaves nothing behind
            raise
        return examples, f"upload:{folder.name}"
    if not handle.calibration:
        raise UserError("this pair has no built-in calibration set: upload a target-task JSONL")
    return list(handle.calibration[:n]), "builtin"


def batches(handle: PairHandle, examples: list[Example], source: str, batch_size: int) -> list:
    """The calibration batches, built once per pair, source and size."""
    from tailor_ui.calibration import calibration_batches

    key = (source, len(examples), batch_size)
    if key not in handle.batches:
        handle.batches[key] = calibration_batches(handle.pair.processor, examples, batch_size)
    return handle.batches[key]


def tailor_run(handle: PairHandle, settings, examples: list[Example], source: str, label: str,
               session: Session | None, *, batch_size: int, quick_examples: int, progress: Progress,
               should_stop: StopCheck) -> TailorRun:
    """Merge the pair, check the merge on `quick_examples` per built-in set, and (given a
    session) save its patch and report in a new folder of the session."""
    from tailor_ui.engine import run_method

    start = time.perf_counter()
    with handle.lock:
        handle.trim_cache()
        calibration = None
        if examples:
            progress("preparing the calibration data", 0, 1)
            calibration = [batches(handle, examples, source, batch_size)] * len(handle.pair.finetuned)
        result = run_method(handle.pair, settings, calibration, progress=progress,
                            should_stop=should_stop)
        quick, references = quick_check(handle, result.patch, quick_examples, progress, should_stop)
    report = dict(result.report)
    report["calibration"] = {"source": source, "examples": len(examples)}
    if quick is not None:
        report["quick_check"] = quick.to_dict(orient="records")
    run = TailorRun(job_id="", label=label, settings=settings.to_dict(), patch=result.patch,
                    report=report, handle=handle, quick=quick, references=references,
                    seconds=time.perf_counter() - start)
    if session is not None:
        name = hashlib.sha1(f"{time.time()}{label}".encode()).hexdigest()[:10]
        run.patch_file, run.report_file = save_run(session.new_dir(f"run-{name}"), result.patch, report)
    return run


def save_run(folder: Path, patch, report: dict[str, Any]) -> tuple[Path, Path]:
    """A merge's files in `folder`: patch.safetensors and report.json (no patch: the report
    alone, the patch written already or not asked for)."""
    from tailor_ui.patch import save_patch

    patch_file, report_file = folder / "patch.safetensors", folder / "report.json"
    if patch is not None:
        save_patch(patch, patch_file)
    with atomic_path(report_file) as tmp:
        tmp.write_text(json.dumps(jsonable(report), indent=2), encoding="utf-8")
    return patch_file, report_file


def quick_check(handle: PairHandle, patch, n: int, progress: Progress, should_stop: StopCheck
                ) -> tuple[pd.DataFrame | None, dict[str, dict[str, float]]]:
    """Score base, fine-tuned and the merge on `n` examples of each built-in set; the
    table and the base / fine-tuned scores (computed once per pair: Studio files them)."""
    if not n or not handle.eval_sets:
        return None, {}
    from tailor_ui.evaluation.evaluate import EvalSet, evaluate_all

    sets = [EvalSet(s.name, s.task, list(s.examples[:n])) for s in handle.eval_sets]

    def scores(model) -> dict[str, float]:
        results = evaluate_all(model, handle.pair.processor, sets, batch_size=n,
                               should_stop=should_stop)
        return {name: result.score for name, result in results.items()}

    progress(f"quick check on {n} examples per task", 0, 1)
    with handle.lock:
        references = handle.reference_scores or {
            "Pre-trained": scores(handle.pair.base), "Fine-tuned": scores(handle.pair.finetuned[0])}
        with handle.patched(patch) as model:
            merged = scores(model)
    return quick_table(handle, references, merged), references


def quick_table(handle: PairHandle, references: dict[str, dict[str, float]],
                merged: dict[str, float]) -> pd.DataFrame:
    """One row per model: its scores and its retention of the original and target tasks."""
    from tailor_ui.evaluation.sweep import retention

    rows = [{"model": name, **scores} for name, scores in references.items()]
    rows.append({"model": "This merge", **merged})
    table = pd.DataFrame(rows)
    base, tuned = references["Pre-trained"], references["Fine-tuned"]
    originals = {s.name: base.get(s.name) for s in handle.eval_sets if s.role == "original"}
    targets = {s.name: tuned.get(s.name) for s in handle.eval_sets if s.role == "target"}
    table["original retention"] = [retention(r, originals) for _, r in table.iterrows()]
    table["target retention"] = [retention(r, targets) for _, r in table.iterrows()]
    return table


def digest(items: Sequence[str]) -> str:
    """A short name for uploaded files: their names and contents."""
    sha = hashlib.sha256()
    for item in items:
        path = Path(item)
        sha.update(path.name.encode())
        if path.is_file():
            sha.update(hashlib.sha256(path.read_bytes()).digest())
    return sha.hexdigest()[:12]


def jsonable(value: Any) -> Any:
    """`value` as JSON can hold it: NaN as null, tensors and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
