"""Per-visitor state, and the model pairs visitors work on.

A `PairHandle` wraps a loaded pair with its lock: the shared demo pair is loaded once and
used read-only by everyone (patches are written into its base in place only while its lock
is held, and always reverted); a pair a visitor loads belongs to their `Session`. A handle
pickles by reference (a key into this process's registry), so a result sent back from
ZeroGPU's forked GPU worker (tailor_ui/app/gpu.py) points at the main process's own pair.

A `Session` is one browser tab (Gradio's session hash) or one API client: its own pair,
its merge results and sweep tables, and a private folder for the files it downloads.
`SessionStore` creates them on first use and drops them when the tab closes or after a
while without activity. Nothing here knows about Gradio.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tailor_ui.data import Example
from tailor_ui.demo.sets import DEFAULT_STORY
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sets import EvalSpec
from tailor_ui.pair import Pair
from tailor_ui.patch import Patch, PatchFile, applied

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# every live PairHandle of this process by its key (process id, number); a fork inherits it
_HANDLES: weakref.WeakValueDictionary[tuple[int, int], PairHandle] = weakref.WeakValueDictionary()
_HANDLE_NUMBERS = itertools.count(1)


def handle_by_key(key: tuple[int, int]) -> PairHandle:
    """The live handle with this key: how a pickled PairHandle is read back."""
    handle = _HANDLES.get(tuple(key))
    if handle is not None:
        return handle
    if key[0] != os.getpid():
        raise LookupError(f"pair handle {key} was made in another process (pid {key[0]}), not in "
                          f"this one (pid {os.getpid()}): a job run in ZeroGPU's forked GPU worker "
                          "cannot send back a pair it loaded; load pairs in the main process "
                          "(tailor_ui/app/jobs.py: JobKind.in_worker)")
    raise LookupError(f"pair handle {key} is gone: its pair was released")


@contextmanager
def every_pair_locked() -> Iterator[None]:
    """Every live pair's lock, taken in one order (by key, so two callers cannot deadlock):
    a job's worker forked meanwhile (workers.py) sees no pair half-patched, and its one
    thread owns every lock it inherits."""
    with ExitStack() as stack:
        for key in sorted(list(_HANDLES.keys())):
            handle = _HANDLES.get(key)
            if handle is not None:
                stack.enter_context(handle.lock)
        yield


@dataclass
class PairHandle:
    """A loaded pair, its lock, and what the dashboard shows and reuses about it."""

    pair: Pair
    label: str
    shared: bool
    lane: str  # the job lane of the device the pair lives on
    summary: pd.DataFrame
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)
    calibration: tuple[Example, ...] = ()  # the built-in calibration set, if any
    anchor: tuple[Example, ...] = ()  # built-in original-task calibration set (anchored compensation)
    eval_sets: tuple[EvalSpec, ...] = ()  # built-in evaluation sets, if any
    examples: tuple[tuple[str, str], ...] = ()  # (image path, question) for Compare
    # quick-check scores of base / fine-tuned models by set key (service.tailor.set_key),
    # computed once per set
    reference_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    default_run: "TailorRun | None" = None  # the warm-up merge (default settings)
    batches: dict[tuple, list] = field(default_factory=dict, repr=False)
    loaded_at: float = field(default_factory=time.time)
    key: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.key = (os.getpid(), next(_HANDLE_NUMBERS))
        _HANDLES[self.key] = self

    def __reduce__(self):
        # by reference: the models and the lock stay where they are
        return handle_by_key, (self.key,)

    @contextmanager
    def patched(self, patch: Patch | PatchFile | None) -> Iterator[Any]:
        """The base model with `patch` written into it, under the lock; reverted after (a
        file is written and reverted tensor by tensor)."""
        with self.lock, applied(self.pair.base, patch) as model:
            yield model

    def trim_cache(self, keep: int | None = None) -> None:
        """Bound the engine's score cache (and ours) to the most recent entries: a few for
        the small shared demo pair, one for a visitor's (possibly large) pair."""
        keep = keep if keep is not None else (6 if self.shared else 1)
        with self.lock:
            for cache in (self.pair.cache, self.batches):
                for key in list(cache)[:-keep] if len(cache) > keep else []:
                    del cache[key]


@dataclass
class TailorRun:
    """One finished merge of a session: the patch, its report and its files."""

    job_id: str
    label: str
    settings: dict
    patch: Patch | None  # None: only in `patch_file` (`get_patch`)
    report: dict
    handle: PairHandle = field(repr=False)
    patch_file: Path | None = None
    report_file: Path | None = None
    model_zip: Path | None = None
    quick: pd.DataFrame | None = None  # quick-check scores, when the pair has eval sets
    # the quick check's base / fine-tuned scores, filed on the handle by the main process
    references: dict[str, dict[str, float]] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    def get_patch(self) -> Patch | PatchFile:
        """The patch in memory, or else its file, read tensor by tensor where it is used
        (a data-free merge's patch is never in memory: it was written as it was made)."""
        if self.patch is not None:
            return self.patch
        if self.patch_file is None:
            raise UserError("this merge's patch is no longer available; run it again")
        return PatchFile(self.patch_file)

    def offload(self) -> None:
        """Drop the in-memory patch when it is saved (a large model's patch is gigabytes)."""
        if self.patch_file is not None and self.patch_file.is_file():
            self.patch = None


@dataclass
class SweepRun:
    job_id: str
    table: pd.DataFrame
    csv_file: Path
    heatmap_report: dict | None = None
    heatmap_label: str = ""
    seconds: float = 0.0


@dataclass
class SearchRun:
    """A finished Find-settings search: `result` is an `evaluation.search.SearchResult`
    (candidates, front, best settings), its table also saved as CSV."""

    job_id: str
    result: Any
    csv_file: Path
    seconds: float = 0.0


@dataclass
class TrainedModel:
    """A model fine-tuned in the dashboard (Fine-tune tab), trained on a private copy of the
    pair's base, that joins Compare and the Forgetting sweep as extra models. It is kept as
    the patch that turns the base into it, in a file in the session's folder (`folder`):
    the server holds no copy of a model per visitor, and a job writes it into the base as
    it does a merge. `models` holds (label, patch file): the trained model and, when asked,
    Model Tailor's merge of it into the base."""

    job_id: str
    label: str
    method: str  # full, dowser, llaca or ema
    settings: dict
    report: dict  # TrainReport.to_dict()
    models: list[tuple[str, Path]] = field(repr=False)
    handle: PairHandle = field(repr=False)
    folder: Path | None = None
    seconds: float = 0.0

    @property
    def losses(self) -> list[float]:
        return list(self.report.get("losses", []))

    def patches(self) -> list[tuple[str, PatchFile]]:
        """(label, patch) of each model, read tensor by tensor where it is written in."""
        return [(label, PatchFile(path)) for label, path in self.models]

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def summary(self) -> dict:
        """What was trained and how the loss went, without the models (the job history
        keeps this; the session keeps the models)."""
        losses = self.losses
        return {"label": self.label, "method": self.method, "settings": self.settings,
                "layers": self.report.get("layers"), "steps": self.report.get("steps"),
                "trainable_fraction": self.report.get("trainable_fraction"),
                "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                "models": [name for name, _ in self.models], "seconds": self.seconds}


@dataclass
class Session:
    id: str
    folder: Path
    own: PairHandle | None = None
    use_demo: bool = True
    demo_story: str = DEFAULT_STORY  # which fine-tune of the demo (demo.sets.STORIES)
    runs: dict[str, TailorRun] = field(default_factory=dict)
    sweeps: dict[str, SweepRun] = field(default_factory=dict)
    searches: dict[str, SearchRun] = field(default_factory=dict)  # Find settings (Tailor tab)
    trained: dict[str, TrainedModel] = field(default_factory=dict)  # Fine-tune tab
    # evaluation sets the visitor added (service.evalsets), used with any pair's built-in ones
    eval_sets: list[EvalSpec] = field(default_factory=list)
    eval_set_folders: dict[str, Path] = field(default_factory=dict)  # each set's images, by set name
    live_losses: dict[str, list[float]] = field(default_factory=dict)  # per fine-tuning job
    # jobs whose result was filed above: filed once, even after it was pruned from there
    filed: set[str] = field(default_factory=set)
    last_seen: float = field(default_factory=time.time)
    # what the page was last sent, per output, so polling sends only what changed
    sent: dict[str, Any] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def touch(self) -> None:
        self.last_seen = time.time()

    def new_dir(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def latest_run(self, handle: PairHandle | None = None) -> TailorRun | None:
        runs = [r for r in self.runs.values() if handle is None or r.handle is handle]
        return runs[-1] if runs else None

    def latest_sweep(self) -> SweepRun | None:
        return list(self.sweeps.values())[-1] if self.sweeps else None

    def latest_search(self) -> SearchRun | None:
        return list(self.searches.values())[-1] if self.searches else None

    def add_run(self, run: TailorRun, keep: int = 12, in_memory: int = 2) -> None:
        """File a run; keep the files of the last `keep` runs and the patches of the last
        `in_memory` runs in memory (older ones are read back from disk when needed)."""
        with self.lock:
            self.runs[run.job_id] = run
            for old in list(self.runs.values())[:-in_memory]:
                old.offload()
            for job_id in list(self.runs)[:-keep]:
                old = self.runs.pop(job_id)
                for f in (old.patch_file, old.report_file, old.model_zip):
                    if f is not None:
                        shutil.rmtree(f.parent, ignore_errors=True)

    def add_sweep(self, run: SweepRun, keep: int = 5) -> None:
        self._add_table(self.sweeps, run, keep)

    def add_search(self, run: SearchRun, keep: int = 5) -> None:
        self._add_table(self.searches, run, keep)

    def _add_table(self, runs: dict, run: SweepRun | SearchRun, keep: int) -> None:
        """File a run whose table lives in a folder of its own; keep the last `keep`."""
        with self.lock:
            runs[run.job_id] = run
            for job_id in list(runs)[:-keep]:
                shutil.rmtree(runs.pop(job_id).csv_file.parent, ignore_errors=True)

    def add_trained(self, model: TrainedModel, keep: int = 3) -> None:
        """File a fine-tuned model; keep only the last `keep` (and their files)."""
        with self.lock:
            self.trained[model.job_id] = model
            for job_id in list(self.trained)[:-keep]:
                self.trained.pop(job_id).remove()

    def trained_for(self, handle: PairHandle | None) -> list[TrainedModel]:
        """This session's fine-tuned models of `handle` (oldest first)."""
        return [t for t in self.trained.values() if handle is None or t.handle is handle]

    def forget_handle(self, handle: PairHandle) -> None:
        """Drop the merges made on `handle` (they keep its models alive) and their files."""
        with self.lock:
            for job_id in [j for j, t in self.trained.items() if t.handle is handle]:
                self.trained.pop(job_id).remove()
            for job_id in [j for j, r in self.runs.items() if r.handle is handle]:
                old = self.runs.pop(job_id)
                if old.patch_file is not None:
                    shutil.rmtree(old.patch_file.parent, ignore_errors=True)

    def run(self, job_id: str) -> TailorRun:
        run = self.runs.get((job_id or "").strip())
        if run is None:
            raise UserError(f"no finished merge {job_id!r} in this session")
        return run


class SessionStore:
    """Sessions by id; each gets a folder under `root`. Thread-safe."""

    def __init__(self, root: Path, *, idle_seconds: float = 3 * 3600) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.idle_seconds = idle_seconds
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def get(self, session_id: str | None) -> Session:
        if not session_id:
            raise UserError("no session: reload the page")
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                folder = self.root / (_UNSAFE.sub("_", session_id)[:64] or "anonymous")
                folder.mkdir(parents=True, exist_ok=True)
                session = self._sessions[session_id] = Session(id=session_id, folder=folder)
        session.touch()
        return session

    def peek(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def drop(self, session_id: str) -> Session | None:
        with self._lock:
            session = self._sessions.pop(session_id, None)
        if session is not None:
            session.own = None
            session.runs.clear()
            session.sweeps.clear()
            session.searches.clear()
            session.trained.clear()
            session.eval_sets.clear()
            session.eval_set_folders.clear()
            shutil.rmtree(session.folder, ignore_errors=True)
        return session

    def expired(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        with self._lock:
            return [sid for sid, s in self._sessions.items() if now - s.last_seen > self.idle_seconds]

    def owned_pairs(self) -> int:
        with self._lock:
            return sum(s.own is not None for s in self._sessions.values())

    def __len__(self) -> int:
        return len(self._sessions)
