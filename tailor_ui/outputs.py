"""A merge's outputs on disk, shared by the command line and the dashboard: a run's patch
and report, and the tailored model saved as a model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tailor_ui.io import atomic_path

PATCH_NAME = "patch.safetensors"


def save_run(folder: Path, patch, report: dict[str, Any]) -> tuple[Path, Path]:
    """A merge's files in `folder`: patch.safetensors and report.json (no patch: the report
    alone, the patch written already or not asked for)."""
    from tailor_ui.patch import save_patch

    patch_file, report_file = folder / PATCH_NAME, folder / "report.json"
    if patch is not None:
        save_patch(patch, patch_file)
    with atomic_path(report_file) as tmp:
        tmp.write_text(json.dumps(jsonable(report), indent=2), encoding="utf-8")
    return patch_file, report_file


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
