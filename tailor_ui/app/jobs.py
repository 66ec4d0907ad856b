"""Background jobs: progress, cancel, history, one worker per device.

Every heavy action of the dashboard (loading a pair, a merge, a sweep, a comparison, an
export) runs here rather than in the web server's request thread, so the page stays
responsive for everyone. Each device has one lane: a queue and one worker thread, so one
GPU job runs at a time (and on a CPU-only machine heavy jobs run one after another instead
of fighting over the cores).

A job function receives `progress(stage, done, total)` and `should_stop()`. Cancelling
sets a flag: `should_stop()` turns true and the next `progress` call raises `Cancelled`,
so a job stops at its next check (the engine checks between layers and blocks).

Jobs belong to an owner (a browser session): one owner never sees, waits on or cancels
another's jobs. Nothing here knows about Gradio.

A job that fails, runs out of memory included, ends FAILED with a one-line message; its
memory is collected (and the CUDA cache emptied) before the lane takes the next job.
"""

from __future__ import annotations

import gc
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from tailor_ui.control import Cancelled, Progress, StopCheck, forward_only
from tailor_ui.errors import UserError

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})

JobFn = Callable[[Progress, StopCheck], Any]


@dataclass
class Job:
    """One unit of background work and everything the UI shows about it."""

    id: str
    owner: str
    kind: str
    label: str
    lane: str
    status: str = QUEUED
    stage: str = "waiting in the queue"
    done: int = 0
    total: int = 0
    result: Any = field(default=None, repr=False)
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _over: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fraction(self) -> float:
        if self.status == DONE:
            return 1.0
        return min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0

    @property
    def is_finished(self) -> bool:
        return self.status in FINISHED

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def run_seconds(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def queued_seconds(self) -> float:
        return (self.started or self.finished or time.time()) - self.submitted

    def to_dict(self) -> dict[str, Any]:
        """Everything but the result, JSON-ready (for API clients and the history table)."""
        run = self.run_seconds
        return {"id": self.id, "kind": self.kind, "label": self.label, "status": self.status,
                "stage": self.stage, "progress": round(self.fraction, 4), "done": self.done,
                "total": self.total, "error": self.error, "lane": self.lane,
                "submitted": self.submitted, "queued_s": round(self.queued_seconds, 3),
                "run_s": None if run is None else round(run, 3)}


class JobRunner:
    """Lanes of background work (one worker thread each) with bounded queues.

    `lanes` names the devices ("cpu", "cuda"); a job goes to the lane of the device it
    uses. `max_queued` bounds the jobs waiting over all owners, `max_queued_per_owner` the
    jobs one owner may have waiting; `keep_finished` is how many finished jobs (with their
    results) each owner's history keeps. `on_finish(job)` runs in the worker after a job
    ends, whatever the outcome. `gpu_call(fn, kind)` is how a job on a GPU lane is called
    (tailor_ui.app.gpu.on_gpu: unchanged, or inside ZeroGPU's `@spaces.GPU`).
    """

    def __init__(self, lanes: Iterable[str] = ("cpu",), *, max_queued: int = 32,
                 max_queued_per_owner: int = 4, keep_finished: int = 30,
                 on_finish: Callable[[Job], None] | None = None,
                 gpu_call: Callable[[JobFn, str], JobFn] | None = None) -> None:
        self.max_queued = max_queued
        self.max_queued_per_owner = max_queued_per_owner
        self.keep_finished = keep_finished
        self.on_finish = on_finish
        self.gpu_call = gpu_call
        self._lock = threading.Lock()
        self._jobs: dict[str, Job] = {}
        self._count = 0
        self._closed = False
        self._queues: dict[str, queue.Queue] = {}
        self._threads: list[threading.Thread] = []
        for lane in dict.fromkeys(lanes):
            self._queues[lane] = queue.Queue()
            thread = threading.Thread(target=self._work, args=(lane,), daemon=True,
                                      name=f"tailor-jobs-{lane}")
            thread.start()
            self._threads.append(thread)

    @property
    def lanes(self) -> tuple[str, ...]:
        return tuple(self._queues)

    # -- submitting and controlling ---------------------------------------------------

    def submit(self, owner: str, kind: str, fn: JobFn, *, label: str = "",
               lane: str | None = None) -> Job:
        lane = lane or next(iter(self._queues))
        if lane not in self._queues:
            raise UserError(f"no {lane} device on this server (available: {', '.join(self._queues)})")
        with self._lock:
            if self._closed:
                raise UserError("the server is shutting down; try again in a moment")
            waiting = [j for j in self._jobs.values() if j.status == QUEUED]
            mine = sum(j.owner == owner for j in waiting)
            if mine >= self.max_queued_per_owner:
                raise UserError(f"you already have {mine} jobs waiting; wait for one to finish "
                                "or cancel one")
            if len(waiting) >= self.max_queued:
                raise UserError(f"the server's job queue is full ({len(waiting)} jobs waiting); "
                                "try again in a minute")
            self._count += 1
            job = Job(id=f"job-{self._count}-{secrets.token_hex(3)}", owner=owner, kind=kind,
                      label=label or kind, lane=lane)
            ahead = sum(j.lane == lane and j.status in (QUEUED, RUNNING) for j in self._jobs.values())
            if ahead:
                job.stage = f"waiting in the queue ({ahead} ahead)"
            self._jobs[job.id] = job
            self._queues[lane].put((job, fn))
        return job

    def get(self, job_id: str, owner: str) -> Job:
        job = self._jobs.get((job_id or "").strip())
        if job is None or job.owner != owner:
            raise UserError(f"no job {job_id!r} in this session")
        return job

    def cancel(self, job_id: str, owner: str) -> Job:
        """Stop a job: a queued one never starts, a running one stops at its next check."""
        job = self.get(job_id, owner)
        with self._lock:
            if job.is_finished:
                return job
            job._stop.set()
            if job.status == QUEUED:
                self._finish(job, CANCELLED, stage="cancelled before it started")
            else:
                job.stage = f"cancelling… ({job.stage})"
        return job

    def wait(self, job_id: str, owner: str, timeout: float | None = None) -> Job:
        """Block until the job ends (or `timeout` seconds pass); return it either way."""
        job = self.get(job_id, owner)
        job._over.wait(timeout)
        return job

    def history(self, owner: str, kind: str | None = None) -> list[Job]:
        """The owner's jobs, newest first."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.owner == owner and (kind is None or j.kind == kind)]
        return jobs[::-1]

    def active(self, owner: str, kind: str | None = None) -> list[Job]:
        return [j for j in self.history(owner, kind) if not j.is_finished]

    def counts(self) -> dict[str, int]:
        """Jobs queued and running over all owners (the health check's numbers)."""
        with self._lock:
            statuses = [j.status for j in self._jobs.values()]
        return {"queued": statuses.count(QUEUED), "running": statuses.count(RUNNING)}

    @property
    def closed(self) -> bool:
        return self._closed

    def forget(self, owner: str) -> None:
        """Cancel the owner's jobs and drop their history (the session ended)."""
        for job in self.active(owner):
            self.cancel(job.id, owner)
        with self._lock:
            for job_id in [i for i, j in self._jobs.items() if j.owner == owner and j.is_finished]:
                del self._jobs[job_id]

    def shutdown(self, wait: bool = True, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
            jobs = list(self._jobs.values())
        for job in jobs:
            if not job.is_finished:
                job._stop.set()
        for q in self._queues.values():
            q.put(None)
        if wait:
            for thread in self._threads:
                thread.join(timeout)

    # -- the workers ----------------------------------------------------------------------

    def _work(self, lane: str) -> None:
        q = self._queues[lane]
        while True:
            item = q.get()
            if item is None:
                return
            job, fn = item
            if job.is_finished or job.stop_requested:  # cancelled while it waited
                with self._lock:
                    if not job.is_finished:
                        self._finish(job, CANCELLED, stage="cancelled before it started")
            else:
                self._run(job, fn)
            # the function's closure may hold a whole model: do not keep it alive while idle
            del item, job, fn

    def _run(self, job: Job, fn: JobFn) -> None:
        def progress(stage: str, done: int, total: int) -> None:
            if job._stop.is_set():
                raise Cancelled
            job.stage, job.done, job.total = stage, int(done), int(total)

        with self._lock:
            job.status, job.started, job.stage = RUNNING, time.time(), "starting"
        outcome, stage, error, result = DONE, "done", None, None
        gpu = job.lane.startswith("cuda")
        try:
            call = self.gpu_call(fn, job.kind) if gpu and self.gpu_call is not None else fn
            result = call(forward_only(progress), job._stop.is_set)
            if job._stop.is_set() and result is None:
                outcome, stage = CANCELLED, "cancelled"
        except Cancelled:
            outcome, stage = CANCELLED, "cancelled"
        except UserError as exc:
            outcome, stage, error = FAILED, "failed", str(exc)
        except Exception as exc:  # a bug or a resource problem: short message, full log
            device = out_of_memory_device(exc, job.lane)
            if device is not None:
                # the text only: a log record holding the exception would keep its frames,
                # and the tensors in them, alive
                log.warning("job %s (%s) ran out of memory on %s: %s", job.id, job.kind, device,
                            str(exc))
            else:
                log.exception("job %s (%s) failed", job.id, job.kind)
            error = short_error(exc, job.lane)
            outcome, stage = FAILED, "failed"
        finally:
            if outcome == FAILED:
                # the failed job's tensors may sit in reference cycles (frames of the
                # traceback, which is gone by now): free them before the next job starts
                gc.collect()
            if gpu:
                _empty_cuda_cache()
        with self._lock:
            job.result = result
            self._finish(job, outcome, stage=stage, error=error)
            self._prune(job.owner)
        if self.on_finish is not None:
            try:
                self.on_finish(job)
            except Exception:
                log.exception("on_finish failed for job %s", job.id)

    def _finish(self, job: Job, status: str, *, stage: str, error: str | None = None) -> None:
        job.status, job.stage, job.error, job.finished = status, stage, error, time.time()
        job._over.set()

    def _prune(self, owner: str) -> None:
        finished = [j for j in self._jobs.values() if j.owner == owner and j.is_finished]
        for job in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._jobs[job.id]


def out_of_memory_device(exc: BaseException, lane: str = "cpu") -> str | None:
    """The device whose memory ran out ("cpu", "cuda"), or None when `exc` is no
    out-of-memory error. Torch raises OutOfMemoryError on a GPU and a RuntimeError from its
    CPU allocator on the host; Python raises MemoryError."""
    text = str(exc).lower()
    if isinstance(exc, MemoryError) or "can't allocate memory" in text:
        return "cpu"
    if "OutOfMemoryError" in type(exc).__name__ or "out of memory" in text:
        return "cuda" if "cuda" in text else lane.split(":")[0]
    return None


def out_of_memory_message(device: str) -> str:
    if device == "cpu":
        return ("out of memory on cpu: the model needs more memory than this server has; "
                "try a smaller model or dtype (bfloat16), or fewer calibration examples")
    return (f"out of memory on {device}: the model needs more memory than the device has; "
            "try a smaller dtype (bfloat16), device cpu, or fewer calibration examples")


def short_error(exc: BaseException, lane: str = "cpu") -> str:
    """One line a user can read for an unexpected exception (of a job on `lane`)."""
    device = out_of_memory_device(exc, lane)
    if device is not None:
        return out_of_memory_message(device)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"unexpected {name}: {text[:200]}" if text else f"unexpected {name}"


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # never let cleanup hide the job's own outcome
        log.exception("torch.cuda.empty_cache failed")
