"""The tailored model on disk: base + patch saved as a model folder (the command line's
`tailor --save-model`) or zipped for download (the dashboard's Export tab), each with its
model card; the Export tab's merges (the session's, and the pair's start-up merge) and
their publication to the Hub."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

from tailor_ui.control import Progress, StopCheck
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path, zip_folder
from tailor_ui.model_card import Artifact, Scores, sweep_scores, tailor_command, write_card
from tailor_ui.adapter_fit import ADAPTER_RANK
from tailor_ui.outputs import PATCH_NAME, checkpoint_folder, jsonable, save_run, save_tailored
from tailor_ui.app.session import PairHandle, Session, TailorRun
from tailor_ui.settings import Settings

STARTUP = "start-up"  # the job id the Export tab gives the pair's start-up merge
MODEL_ZIP, ADAPTER_ZIP = "tailored-model", "tailored-adapter"


def exportable_runs(session: Session, handle: PairHandle | None) -> list[TailorRun]:
    """The merges the Export tab offers, newest first: the session's, then the start-up
    merge of its pair (the one the Tailor tab shows before the visitor runs any)."""
    runs = list(session.runs.values())[::-1]
    if handle is not None and handle.default_run is not None:
        runs.append(handle.default_run)
    return runs


def find_run(session: Session, handle: PairHandle | None, job_id: str | None) -> TailorRun:
    """One of `exportable_runs` by job id; no id: the newest."""
    job_id = (job_id or "").strip()
    if job_id and job_id != STARTUP:
        return session.run(job_id)
    runs = exportable_runs(session, handle)
    runs = [r for r in runs if r.job_id == STARTUP] if job_id else runs
    if not runs:
        raise UserError("run a merge first (Tailor tab)")
    return runs[0]


def file_startup(run: TailorRun, folder: Path) -> None:
    """Give the start-up merge (run without a session) its files in `folder`, as every
    session's merge has them, and the job id the Export tab lists it under."""
    folder.mkdir(parents=True, exist_ok=True)
    run.patch_file, run.report_file = save_run(folder, run.get_patch(), run.report)
    run.job_id = STARTUP


def dashboard_command(report: dict) -> str:
    """The `tailor` command line of a dashboard merge; its calibration data (the pair's
    built-in set or an upload) stands as TARGET.jsonl, the anchor's as ORIGINAL.jsonl."""
    calibration = report.get("calibration", {})
    note = (f"  # --calib: the target-task examples it calibrated on ({calibration['examples']}, "
            f"{calibration['source']})") if calibration else ""
    return tailor_command(Settings(**report["settings"]), str(report.get("base", "BASE")),
                          [str(f) for f in report.get("finetuned", [])], calib=["TARGET.jsonl"],
                          anchor=["ORIGINAL.jsonl"]) + note


def known_scores(session: Session, run: TailorRun) -> list[Scores]:
    """The session's latest forgetting sweep's row of this merge's settings, if it ran them
    (the quick check is in the run's report); none for the start-up merge, whose files all
    sessions share."""
    sweep = session.latest_sweep()
    if sweep is None or session.runs.get(run.job_id) is not run:
        return []
    sets = [c[len("score:"):] for c in sweep.table.columns if c.startswith("score:")]
    return sweep_scores(sweep.table, Settings(**run.settings), sets)


class ExportKind(StrEnum):
    """What the Export tab hands out for a merge."""

    PATCH = "patch"  # the patch's safetensors file
    REPORT = "report"  # the run's report.json
    MODEL = "model"  # the tailored model, zipped (built once per run)
    ADAPTER = "adapter"  # the patch as a LoRA adapter, zipped (fitted on each request)

    @classmethod
    def of(cls, word: str) -> ExportKind:
        if word not in set(cls):
            raise UserError(f"unknown export {word!r}: {', '.join(cls)}")
        return cls(word)


def streamable_base(model) -> Path | None:
    """The local safetensors folder `model` was loaded from, where base + patch streamed
    from it equals the loaded base + patch saved: every floating tensor stored in the one
    dtype the model was loaded in, and every tensor loaded 1:1 (none fused or split by
    transformers); None otherwise."""
    from tailor_ui.checkpoint import Checkpoint, key_map

    folder = checkpoint_folder(str(getattr(model.config, "_name_or_path", "")))
    if folder is None:
        return None
    with Checkpoint(folder) as checkpoint:
        stored = {t.dtype for t in checkpoint.tensors.values() if t.dtype.is_floating_point}
        keys = checkpoint.keys
    loaded = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(loaded) != 1 or stored != loaded or key_map(folder, keys).converted:
        return None
    return folder


def write_tailored(pair, patch, folder: Path, progress: Progress, should_stop: StopCheck) -> int | None:
    """The tailored model and its processor in `folder`; the number of base tensors found
    there (see `save_model`). Streamed from the base's checkpoint with the patch read
    tensor by tensor (`stream_apply_patch`) where that equals the loaded base + patch
    (`streamable_base`): nothing of the model is held; else `save_tailored`."""
    base = streamable_base(pair.base)
    if base is None:
        return save_tailored(pair, patch, folder)
    from tailor_ui.stream import stream_apply_patch

    checked = stream_apply_patch(base, patch, folder, progress=progress,
                                 should_stop=should_stop)["tensors_checked"]
    pair.processor.save_pretrained(folder)  # as save_model writes it
    return checked


def model_zip(run: TailorRun, progress: Progress, should_stop: StopCheck,
              scores: Sequence[Scores] = ()) -> Path | None:
    """tailored-model.zip beside the run's patch: model, processor, report and model card
    (with `scores` beside the quick check; None when stopped before zipping)."""
    def write(folder: Path) -> Path:
        progress("writing the tailored model", 0, 2)
        # one job on the pair at a time; the in-memory path writes the patch into the shared base
        with run.handle.lock:
            checked = write_tailored(run.handle.pair, run.get_patch(), folder, progress, should_stop)
        (folder / "tailor_report.json").write_text(
            json.dumps(jsonable({**run.report, "tensors_checked": checked}), indent=2), encoding="utf-8")
        write_card(folder, Artifact.MODEL, run.report, command=dashboard_command(run.report), scores=scores)
        return folder

    return _zipped(run, MODEL_ZIP, write, progress, should_stop)




def adapter_zip(run: TailorRun, progress: Progress, should_stop: StopCheck,
                rank: int = ADAPTER_RANK, scores: Sequence[Scores] = ()) -> Path | None:
    """tailored-adapter.zip beside the run's patch: the patch as a rank-`rank` PEFT LoRA
    adapter (`adapter_fit`), with the fit's relative errors in adapter_fit.json and its
    model card."""
    from tailor_ui.adapter_fit import fit_from_model

    def write(folder: Path) -> Path:
        progress("fitting the adapter", 0, 2)
        pair, adapter = run.handle.pair, folder / "adapter"
        with run.handle.lock:  # base values are read from the shared base
            fit = fit_from_model(run.get_patch(), pair.base, pair.base_value, rank, adapter,
                                 base_id=pair.base_id)
        (adapter / "adapter_fit.json").write_text(json.dumps(jsonable(fit), indent=2), encoding="utf-8")
        write_card(adapter, Artifact.ADAPTER, {**run.report, "adapter": fit},
                   command=dashboard_command(run.report), scores=scores)
        return adapter

    return _zipped(run, ADAPTER_ZIP, write, progress, should_stop)


def patch_folder(run: TailorRun, folder: Path, scores: Sequence[Scores] = ()) -> Path:
    """The patch alone as a folder to publish: the patch file, its report and its card."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run.patch_file, folder / PATCH_NAME)
    shutil.copyfile(run.report_file, folder / "report.json")
    write_card(folder, Artifact.PATCH, run.report, command=dashboard_command(run.report), scores=scores)
    return folder


def publish(run: TailorRun, what: Artifact, repo_id: str, token: str, *, private: bool = False,
            zipped_model: Path | None = None, scores: Sequence[Scores] = ()) -> str:
    """Push the tailored model (its export zip, `zipped_model`, unpacked) or the patch
    alone (`patch_folder`) to the Hub repository `repo_id`; its URL."""
    from tailor_ui.hub import push_folder

    with tempfile.TemporaryDirectory(prefix=".hub-", dir=run.patch_file.parent) as scratch:
        if what is Artifact.MODEL:
            with zipfile.ZipFile(zipped_model) as archive:
                archive.extractall(scratch)
            folder = Path(scratch) / MODEL_ZIP
        else:
            folder = patch_folder(run, Path(scratch) / "patch", scores)
        return push_folder(folder, repo_id, token, private=private,
                           message=f"{run.label}: {what.value} from Model Tailor Studio")


def _zipped(run: TailorRun, name: str, write, progress: Progress, should_stop: StopCheck) -> Path | None:
    """NAME.zip beside the run's patch, of the folder `write` fills in a scratch folder
    (None when stopped before zipping)."""
    target = run.patch_file.parent / f"{name}.zip"
    # the folder is only the zip's source: a scratch folder, gone however the job ends (named
    # as atomic_path names its temporaries, so what a killed worker leaves is found)
    with tempfile.TemporaryDirectory(prefix=f".{name}.tmp-{os.getpid()}-", dir=run.patch_file.parent) as scratch:
        source = write(Path(scratch))
        if should_stop():
            return None
        progress("zipping", 1, 2)
        with atomic_path(target) as tmp:
            zip_folder(source, tmp, name)
    return target
