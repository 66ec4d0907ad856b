"""A merge of a pair: calibration data, the method, a quick check on a few examples of
each built-in set, and the patch and report on disk. The command line writes its output
folder with the same `outputs.save_run`."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path

import pandas as pd

from tailor_ui.control import Progress, StopCheck
from tailor_ui.data import Example, import_examples, read_calibration
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sets import SCORED_ROLES, EvalSpec
from tailor_ui.outputs import PATCH_NAME, save_run
from tailor_ui.patch import PatchFile
from tailor_ui.app.session import PairHandle, Session, TailorRun


def calibration_examples(session: Session, handle: PairHandle, source: str,
                         files: Sequence[str] | None, n: int | None, max_bytes: int,
                         keep_apart: bool = True) -> tuple[list[Example], str]:
    """The (first `n`; None: all) examples a merge calibrates on and their source's name:
    the pair's own (`pair_calibration`, `keep_apart` as there), or an upload (kept in the
    session's folder, named by the files' digest)."""
    if n is not None and n < 1:
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
    from tailor_ui.app.service.evalsets import pair_sets

    examples, name, _ = pair_calibration(handle, pair_sets(session, handle), keep_apart)
    if not examples:
        raise UserError(f"{NO_CALIBRATION}, or upload a target-task JSONL (Calibration data)")
    return examples[:n], name


NO_CALIBRATION = ("this pair has no target-task data to calibrate on: add a set of the new skill with the "
                  "role 'target' in the Models tab (Evaluation sets)")


def pair_calibration(handle: PairHandle, sets: Sequence[EvalSpec] = (), keep_apart: bool = True
                     ) -> tuple[list[Example], str, str]:
    """The pair's own target-task calibration examples, their batch-cache name and where
    they come from, in words: its built-in set, else the visitor's sets of role `target`
    less the share `held_apart` keeps to score on (`keep_apart=False`: all of them, for
    Find settings, which splits them alike). No examples: none."""
    if handle.calibration:
        examples = list(handle.calibration)
        return examples, "builtin", f"the pair's built-in target-task set ({len(examples)})"
    targets = [s for s in sets if s.role == "target" and s.examples]
    examples = [ex for s in targets for ex in s.examples]
    names = ", ".join(repr(s.name) for s in targets)
    if not keep_apart or not examples:
        return examples, by_content("target", examples), f"your target set {names} ({len(examples)})"
    fit, _ = held_apart(examples)
    fit = [examples[i] for i in fit]
    return (fit, by_content("target", fit), f"{len(fit)} of the {len(examples)} examples of your target "
            f"set {names} (Models tab); the other {len(examples) - len(fit)} are kept apart to score on")


def held_apart(examples: Sequence[Example]) -> tuple[list[int], list[int]]:
    """Which of a visitor's target examples calibrate and which are kept apart to score
    merges on, by position: Find settings' default split, so its held-out share is theirs."""
    from tailor_ui.evaluation.search import DEFAULT_HOLDOUT, split_examples

    return split_examples(range(len(examples)), DEFAULT_HOLDOUT)


def scored_sets(handle: PairHandle, sets: Sequence[EvalSpec], calibrated: bool) -> tuple[EvalSpec, ...]:
    """The sets a merge is scored on: where it `calibrated` on the visitor's target sets
    (`pair_calibration`), each cut to the share kept apart from its calibration."""
    if not calibrated or handle.calibration:
        return tuple(sets)
    targets = [s for s in sets if s.role == "target" and s.examples]
    _, held = held_apart([ex for s in targets for ex in s.examples])
    held, start, cut = set(held), 0, {}
    for s in targets:
        cut[s.name] = replace(s, examples=tuple(ex for i, ex in enumerate(s.examples, start) if i in held))
        start += len(s.examples)
    return tuple(cut.get(s.name, s) for s in sets)


def anchor_set(handle: PairHandle, sets: Sequence[EvalSpec] = ()) -> list[Example]:
    """The original-task calibration examples anchored Model Tailor can use: the pair's
    built-in set and the visitor's sets of role `anchor`."""
    return [*handle.anchor, *(ex for s in sets if s.role == "anchor" for ex in s.examples)]


def has_anchor(handle: PairHandle, sets: Sequence[EvalSpec] = ()) -> bool:
    """Whether `anchor_set` has anything, without gathering it (the Tailor tab asks each poll)."""
    return bool(handle.anchor) or any(s.role == "anchor" and s.examples for s in sets)


def default_compensation(handle: PairHandle, sets: Sequence[EvalSpec] = ()) -> str:
    """Model Tailor's compensation for one merge where the user did not choose
    (`Settings.default_compensations`)."""
    from tailor_ui.settings import Settings

    return Settings.default_compensations(has_anchor(handle, sets))[-1]


def sweep_compensations(handle: PairHandle, sets: Sequence[EvalSpec] = (), search: bool = False) -> list[str]:
    """The compensation forms a sweep (or a search) draws where the user did not choose."""
    from tailor_ui.settings import Settings

    return Settings.default_compensations(has_anchor(handle, sets), search)


def anchor_examples(handle: PairHandle, needed: bool, sets: Sequence[EvalSpec] = ()) -> list[Example]:
    """`anchor_set` where anchored compensation needs it (empty where nothing does); refused
    when there is none."""
    if not needed:
        return []
    examples = anchor_set(handle, sets)
    if not examples:
        raise UserError("anchored compensation needs original-task calibration data and this pair "
                        "has none: add a set of the skills to keep with the role 'anchor' (Models "
                        "tab, Evaluation sets), or choose exact or greedy compensation")
    return examples


def anchor_source(examples: Sequence[Example]) -> str:
    """The batch cache's name for an anchor set."""
    return by_content("anchor", examples)


def by_content(kind: str, examples: Sequence[Example]) -> str:
    """A batch-cache name for a visitor's examples: by content, as a set removed and added
    again under its name may hold others."""
    content = repr([(str(e.image), e.question, e.answers) for e in examples]).encode()
    return f"{kind}:{hashlib.sha1(content).hexdigest()[:12]}"


def batches(handle: PairHandle, examples: list[Example], source: str, batch_size: int) -> list:
    """The calibration batches, built once per pair, source and size."""
    from tailor_ui.calibration import calibration_batches

    key = (source, len(examples), batch_size)
    if key not in handle.batches:
        handle.batches[key] = calibration_batches(handle.pair.processor, examples, batch_size)
    return handle.batches[key]


def tailor_run(handle: PairHandle, settings, examples: list[Example], source: str, label: str,
               session: Session | None, *, batch_size: int, quick_examples: int, progress: Progress,
               should_stop: StopCheck, sets: Sequence[EvalSpec] | None = None,
               anchor: Sequence[Example] = ()) -> TailorRun:
    """Merge the pair, check the merge on `quick_examples` of each evaluation set (`sets`,
    by default the pair's built-in ones), and (given a session) save its patch and report
    in a new folder of the session. A data-free merge with a folder writes its patch there
    as it goes and keeps none in memory (`merge`). `anchor`: anchored compensation's
    original-task calibration examples."""
    start = time.perf_counter()
    folder = None
    if session is not None:
        folder = session.new_dir(f"run-{hashlib.sha1(f'{time.time()}{label}'.encode()).hexdigest()[:10]}")
    try:
        with handle.lock:
            handle.trim_cache()
            result = merge(handle, settings, examples, source, batch_size, folder, progress, should_stop,
                           anchor)
            scored = [s for s in (handle.eval_sets if sets is None else sets) if s.role in SCORED_ROLES]
            quick, references = quick_check(handle, scored, result.patch, quick_examples, progress,
                                            should_stop)
    except BaseException:
        if folder is not None:  # a failed or cancelled merge leaves no folder behind
            shutil.rmtree(folder, ignore_errors=True)
        raise
    report = dict(result.report)
    report["calibration"] = {"source": source, "examples": len(examples)}
    if quick is not None:
        report["quick_check"] = quick.to_dict(orient="records")
        report["quick_examples"] = quick_examples
    held = None if isinstance(result.patch, PatchFile) else result.patch  # a file is read when used
    run = TailorRun(job_id="", label=label, settings=settings.to_dict(), patch=held,
                    report=report, handle=handle, quick=quick, references=references,
                    seconds=time.perf_counter() - start)
    if folder is not None:
        run.patch_file, run.report_file = save_run(folder, held, report)
    return run


def merge(handle: PairHandle, settings, examples: list[Example], source: str, batch_size: int,
          folder: Path | None, progress: Progress, should_stop: StopCheck, anchor: Sequence[Example] = ()):
    """The method run on the pair (an `engine.Result`). A data-free method given a folder
    streams its patch into folder/patch.safetensors tensor by tensor (`pair_stream`: the
    result's patch is that file); otherwise the engine's patch, in memory."""
    from tailor_ui.engine import run_method
    from tailor_ui.methods import REGISTRY

    if folder is not None and not REGISTRY[settings.method].needs_calibration:
        from tailor_ui.pair_stream import merge_to_file

        return merge_to_file(handle.pair, settings, folder / PATCH_NAME, progress=progress,
                             should_stop=should_stop)
    calibration = None
    if examples:
        progress("preparing the calibration data", 0, 1)
        calibration = [batches(handle, examples, source, batch_size)] * len(handle.pair.finetuned)
    anchored = list(anchor) if settings.anchored else []
    anchor_batches = batches(handle, anchored, anchor_source(anchored), batch_size) if anchored else None
    return run_method(handle.pair, settings, calibration, anchor=anchor_batches, progress=progress,
                      should_stop=should_stop)


def set_key(spec: EvalSpec, n: int) -> str:
    """Which scores a quick check may reuse: the set's name and its first `n` examples (two
    visitors' sets of one name on the shared demo pair differ in their examples)."""
    examples = repr((spec.task, spec.examples[:n])).encode()
    return f"{spec.name}#{hashlib.sha1(examples).hexdigest()[:12]}"


def quick_check(handle: PairHandle, sets: Sequence[EvalSpec], patch, n: int, progress: Progress,
                should_stop: StopCheck) -> tuple[pd.DataFrame | None, dict[str, dict[str, float]]]:
    """Score base, fine-tuned and the merge on `n` examples of each set; the table and the
    base / fine-tuned scores by set key (computed once per pair and set: Studio files them
    on the handle, and a later check scores only the sets it has not seen)."""
    if not n or not sets:
        return None, {}
    from tailor_ui.evaluation.evaluate import evaluate_all

    keyed = {set_key(s, n): s.cut(n) for s in sets}

    def scores(model, keys) -> dict[str, float]:
        results = evaluate_all(model, handle.pair.processor, [keyed[k] for k in keys],
                               batch_size=n, should_stop=should_stop)
        return {k: results[keyed[k].name].score for k in keys}

    progress(f"quick check on {n} examples per task", 0, 1)
    with handle.lock:
        references = {}
        for label, model in (("Pre-trained", partial(nullcontext, handle.pair.base)),
                             ("Fine-tuned", partial(handle.pair.finetuned_model, 0))):
            known = handle.reference_scores.get(label, {})
            missing = [k for k in keyed if k not in known]
            if missing:  # a fine-tuned model read lazily: the base holding its values
                with model() as scored:
                    known = {**known, **scores(scored, missing)}
            references[label] = {k: known[k] for k in keyed}
        with handle.patched(patch) as model:
            merged = scores(model, list(keyed))
    return quick_table(sets, n, references, merged), references


def quick_table(sets: Sequence[EvalSpec], n: int, references: dict[str, dict[str, float]],
                merged: dict[str, float]) -> pd.DataFrame:
    """One row per model: its score on each set (a column per set name) and its retention
    of the original and target tasks."""
    from tailor_ui.evaluation.sweep import retention

    names = {set_key(s, n): s.name for s in sets}

    def named(scores: dict[str, float]) -> dict[str, float]:
        return {names[k]: v for k, v in scores.items()}

    rows = [{"model": label, **named(scores)} for label, scores in references.items()]
    rows.append({"model": "This merge", **named(merged)})
    table = pd.DataFrame(rows)
    base, tuned = named(references["Pre-trained"]), named(references["Fine-tuned"])
    originals = {s.name: base.get(s.name) for s in sets if s.role == "original"}
    targets = {s.name: tuned.get(s.name) for s in sets if s.role == "target"}
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


