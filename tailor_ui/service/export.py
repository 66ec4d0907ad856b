"""The tailored model on disk: base + patch saved as a model folder (the command line's
`tailor --save-model`) or zipped for download (the dashboard's Export tab)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tailor_ui.control import Progress, StopCheck
from tailor_ui.io import atomic_path, zip_folder
from tailor_ui.service.tailor import jsonable
from tailor_ui.session import TailorRun


def save_tailored(pair, patch, folder: Path) -> None:
    """The base with the patch written in, saved with the processor; the base is reverted."""
    from tailor_ui.patch import applied

    with applied(pair.base, patch) as model:
        model.save_pretrained(folder, max_shard_size="2GB")
    pair.processor.save_pretrained(folder)


def model_zip(run: TailorRun, progress: Progress, should_stop: StopCheck) -> Path | None:
    """tailored-model.zip beside the run's patch: model, processor and report (None when
    stopped before zipping)."""
    handle = run.handle
    folder = run.patch_file.parent
    target = folder / "tailored-model.zip"
    # the folder is only the zip's source: a scratch folder, gone however the job ends
    with tempfile.TemporaryDirectory(prefix=".model-", dir=folder) as scratch:
        model_dir = Path(scratch)
        progress("writing the tailored model", 0, 2)
        with handle.lock:  # the shared base holds the patch while it is written
            save_tailored(handle.pair, run.get_patch(), model_dir)
        (model_dir / "tailor_report.json").write_text(
            json.dumps(jsonable(run.report), indent=2), encoding="utf-8")
        if should_stop():
            return None
        progress("zipping", 1, 2)
        with atomic_path(target) as tmp:
            zip_folder(model_dir, tmp, "tailored-model")
    return target
