"""The tailored model on disk: base + patch saved as a model folder (the command line's
`tailor --save-model`) or zipped for download (the dashboard's Export tab)."""

from __future__ import annotations

import json
import tempfile
from enum import StrEnum
from pathlib import Path

from tailor_ui.control import Progress, StopCheck
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path, zip_folder
from tailor_ui.service.tailor import jsonable
from tailor_ui.session import TailorRun


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


def save_tailored(pair, patch, folder: Path) -> int | None:
    """The base with the patch written in, saved with the processor; the base is reverted.
    Returns the number of base tensors found in the saved folder (see `save_model`)."""
    from tailor_ui.patch import applied

    with applied(pair.base, patch) as model:
        return save_model(model, pair.processor, folder)


def save_model(model, processor, folder: Path) -> int | None:
    """save_pretrained (model and processor), then check the folder holds every tensor of
    the checkpoint the model was loaded from (a `UserError` names what is missing). Returns
    the number of tensors checked; None where that checkpoint is no local safetensors folder."""
    from tailor_ui.checkpoint import check_saved

    model.save_pretrained(folder, max_shard_size="2GB")
    processor.save_pretrained(folder)
    base = checkpoint_folder(str(getattr(model.config, "_name_or_path", "")))
    return check_saved(base, folder, dtype=model.dtype) if base is not None else None


def checkpoint_folder(source: str) -> Path | None:
    """The local safetensors folder a model was loaded from: the folder itself, or the hub
    cache's snapshot of a repository id; None where there is none."""
    from tailor_ui.checkpoint import INDEX_NAME, SINGLE_NAME

    path = Path(source) if source else None
    if path is not None and not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # not an id, or not cached: nothing on disk to compare with
            return None
    if path is None or not ((path / SINGLE_NAME).is_file() or (path / INDEX_NAME).is_file()):
        return None
    return path


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


def model_zip(run: TailorRun, progress: Progress, should_stop: StopCheck) -> Path | None:
    """tailored-model.zip beside the run's patch: model, processor and report (None when
    stopped before zipping)."""
    def write(folder: Path) -> Path:
        progress("writing the tailored model", 0, 2)
        # one job on the pair at a time; the in-memory path writes the patch into the shared base
        with run.handle.lock:
            checked = write_tailored(run.handle.pair, run.get_patch(), folder, progress, should_stop)
        (folder / "tailor_report.json").write_text(
            json.dumps(jsonable({**run.report, "tensors_checked": checked}), indent=2), encoding="utf-8")
        return folder

    return _zipped(run, "tailored-model", write, progress, should_stop)


ADAPTER_RANK = 16  # the dashboard's adapter export (the CLI's --adapter-rank default)


def adapter_zip(run: TailorRun, progress: Progress, should_stop: StopCheck,
                rank: int = ADAPTER_RANK) -> Path | None:
    """tailored-adapter.zip beside the run's patch: the patch as a rank-`rank` PEFT LoRA
    adapter (`adapter_fit`), with the fit's relative errors in adapter_fit.json."""
    from tailor_ui.adapter_fit import fit_from_model

    def write(folder: Path) -> Path:
        progress("fitting the adapter", 0, 2)
        pair, adapter = run.handle.pair, folder / "adapter"
        with run.handle.lock:  # base values are read from the shared base
            fit = fit_from_model(run.get_patch(), pair.base, pair.base_value, rank, adapter,
                                 base_id=pair.base_id)
        (adapter / "adapter_fit.json").write_text(json.dumps(jsonable(fit), indent=2), encoding="utf-8")
        return adapter

    return _zipped(run, "tailored-adapter", write, progress, should_stop)


def _zipped(run: TailorRun, name: str, write, progress: Progress, should_stop: StopCheck) -> Path | None:
    """NAME.zip beside the run's patch, of the folder `write` fills in a scratch folder
    (None when stopped before zipping)."""
    target = run.patch_file.parent / f"{name}.zip"
    # the folder is only the zip's source: a scratch folder, gone however the job ends
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=run.patch_file.parent) as scratch:
        source = write(Path(scratch))
        if should_stop():
            return None
        progress("zipping", 1, 2)
        with atomic_path(target) as tmp:
            zip_folder(source, tmp, name)
    return target
