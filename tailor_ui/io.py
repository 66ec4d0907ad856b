"""Writing outputs so that nobody ever sees a half-written one."""

from __future__ import annotations

import glob
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it into place only on success.

    Works for a file or a folder: whatever the body writes at the yielded path replaces
    `target` in one rename. On any exception the temporary is removed and `target` is
    left as it was. The temporary is a hidden folder named after `target` and this
    process; one left by a killed process is removed by the next write of `target`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    tmp = tmp_dir / target.name
    try:
        yield tmp
        if target.is_dir() and not target.is_symlink():
            # two renames instead of deleting first: the old output stays whole until the
            # instant the new one takes its place (the aside copy goes with tmp_dir)
            os.replace(target, tmp_dir / ".replaced")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries of `target` whose writing process no longer runs (killed
    mid-write); returns what was removed."""
    target = Path(target)
    removed = []
    own = re.compile(rf"\.{re.escape(target.name)}\.tmp-(\d+)-[^/]+")
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        match = own.fullmatch(path.name)
        if match and path.is_dir() and not _running(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def zip_folder(folder: Path, target: Path, prefix: str) -> None:
    """Weights do not compress: store them, deflate the small text files."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                compress = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                archive.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}",
                              compress_type=compress)
