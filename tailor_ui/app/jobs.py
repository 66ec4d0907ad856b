"""Background jobs: progress, cancel, history, fair queues, one lane per device.

Every heavy action of the dashboard (loading a pair, a merge, a sweep, a comparison, an
export) runs here rather than in the web server's request thread. Each device has one
lane: a queue and one worker thread, so one job runs at a time per device (on a CPU-only
machine heavy jobs run one after another instead of fighting over the cores). A lane
serves visitors in turn (round-robin over owners), so one visitor's queue cannot starve
another's.

A job of a kind that computes in a worker (`JobKind.in_worker`) runs in a fork of the
server (workers.py) when the runner is made with `workers=True`: the web server's
process only waits on a pipe, so pages, `/healthz` and job status answer while every core
computes, and a worker that dies ends its job FAILED and nothing else.

A job function receives `progress(stage, done, total)` and `should_stop()`. Cancelling
sets a flag: `should_stop()` turns true and the next `progress` call raises `Cancelled`,
so a job stops at its next check (the engine checks between layers and blocks); a kind
whose work has no such checks has its worker ended instead (`CancelRoute`).

Jobs belong to an owner (a browser session): one owner never sees, waits on or cancels
another's jobs. Nothing here knows about Gradio.

A job that fails, runs out of memory included, ends FAILED with a one-line message; its
memory is collected (and the CUDA cache emptied) before the lane takes the next job.
"""

from __future__ import annotations

import gc
import logging
import secrets
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from tailor_ui.app import workers
from tailor_ui.control import Cancelled, Progress, StopCheck, forward_only
from tailor_ui.errors import UserError

log = logging.getLogger(__name__)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


QUEUED, RUNNING, DONE, FAILED, CANCELLED = JobStatus
FINISHED = frozenset({DONE, FAILED, CANCELLED})


class CancelRoute(StrEnum):
    """How a cancel reaches a running job."""

    STOP_FLAG = "stop-flag"  # should_stop() turns true; the job stops at its next check
    END_WORKER = "end-worker"  # its worker process is ended at once (in a thread: the flag)


class JobKind(StrEnum):
    """What a job does, and so where it computes and how it is cancelled."""

    LOAD = "load"
    TAILOR = "tailor"
    COMPARE = "compare"
    SWEEP = "sweep"
    SEARCH = "search"
    FINETUNE = "finetune"
    CONTINUAL = "continual"
    EXPORT = "export"

    @property
    def in_worker(self) -> bool:
        """Whether it computes in a worker process (a fork of the server; on ZeroGPU the
        `spaces.GPU` worker). Not loading a pair: it makes a `PairHandle`, which only the
        server's process may make (a handle pickles by reference to it)."""
        return self is not JobKind.LOAD

    @property
    def cancel(self) -> CancelRoute:
        """Generation (compare) and writing a model (export) check for a cancel rarely or
        never, and a worker holds nothing the server shares: end it. The others check
        between layers, settings or steps, and tidy up as they stop."""
        return CancelRoute.END_WORKER if self in (JobKind.COMPARE, JobKind.EXPORT) else CancelRoute.STOP_FLAG


JobFn = Callable[[Progress, StopCheck], Any]
RETRY_MAX_SECONDS = 10.0  # the longest a poller of a queued job is told to wait
# a visitor refused by a full queue is told to come back once the waiting jobs would have
# started, at the pace recent jobs ran (not sooner than a poller, not later than this)
FULL_QUEUE_RETRY_MAX_SECONDS = 300.0
RECENT_RUNS = 20  # finished jobs whose run times set that pace


@dataclass
class Job:
    """One unit of background work and everything the UI shows about it."""

    id: str
    owner: str
    kind: JobKind
    label: str
    lane: str
    in_worker: bool = False  # computed in a worker process (when it can fork)
    status: JobStatus = QUEUED
    stage: str = "waiting in the queue"
    position: int = 0  # while queued: 1 = the lane's next job
    done: int = 0
    total: int = 0
    result: Any = field(default=None, repr=False)
    error: str | None = None
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    worker_pid: int | None = None  # the worker process that computed it, if one did
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

    @property
    def retry_after(self) -> float | None:
        """When a poller should ask again, in seconds (None: finished, nothing will change):
        a second while it runs, longer the further back it waits."""
        if self.is_finished:
            return None
        if self.status == QUEUED:
            return min(max(float(self.position), 1.0), RETRY_MAX_SECONDS)
        return 1.0

    def to_dict(self) -> dict[str, Any]:
        """Everything but the result, JSON-ready (for API clients and the history table)."""
        run = self.run_seconds
        return {"id": self.id, "kind": str(self.kind), "label": self.label, "status": str(self.status),
                "stage": self.stage, "progress": round(self.fraction, 4), "done": self.done,
                "total": self.total, "error": self.error, "lane": self.lane,
                "position": self.position if self.status == QUEUED else None,
                "retry_after": self.retry_after,
                "submitted": self.submitted, "queued_s": round(self.queued_seconds, 3),
                "run_s": None if run is None else round(run, 3)}


class _Lane:
    """A lane's waiting jobs by owner, served in turn: the first owner's next job, then
    the owner goes to the back of the line."""

    def __init__(self) -> None:
        self.waiting: dict[str, deque[tuple[Job, JobFn]]] = {}
        self.busy = False

    def push(self, job: Job, fn: JobFn) -> None:
        self.waiting.setdefault(job.owner, deque()).append((job, fn))

    def pop(self) -> tuple[Job, JobFn]:
        owner = next(iter(self.waiting))
        jobs = self.waiting.pop(owner)
        item = jobs.popleft()
        if jobs:
            self.waiting[owner] = jobs  # to the back of the line
        return item

    def remove(self, job: Job) -> None:
        jobs = self.waiting.get(job.owner)
        if jobs is None:
            return
        for item in [i for i in jobs if i[0] is job]:
            jobs.remove(item)
        if not jobs:
            del self.waiting[job.owner]

    def restage(self) -> None:
        """Each waiting job's place in the round-robin order (1 = next)."""
        lines = list(self.waiting.values())
        for k, jobs in enumerate(lines):
            for i, (job, _) in enumerate(jobs):
                ahead = sum(min(len(other), i) for other in lines)
                ahead += sum(len(other) > i for other in lines[:k]) + self.busy
                job.position = ahead + 1
                job.stage = f"waiting in the queue ({ahead} ahead)" if ahead else "next in the queue"


class JobRunner:
    """Lanes of background work (one worker thread each) with bounded, fair queues.

    `lanes` names the devices ("cpu", "cuda"); a job goes to the lane of the device it
    uses. `max_queued` bounds the jobs waiting over all owners, `max_queued_per_owner` the
    jobs one owner may have waiting; `keep_finished` is how many finished jobs (with their
    results) each owner's history keeps. `on_finish(job)` runs in the lane's thread after a
    job ends, whatever the outcome, before its waiters wake. `gpu_call(fn, kind)` is how a
    job on a GPU lane is called (tailor_ui.app.gpu.on_gpu: unchanged, or inside ZeroGPU's
    `@spaces.GPU`). With `workers`, jobs of kinds that compute in a worker run in a fork
    of this process (workers.py), made while `fork_guard()` is held.
    """

    def __init__(self, lanes: Iterable[str] = ("cpu",), *, max_queued: int = 32,
                 max_queued_per_owner: int = 4, keep_finished: int = 30,
                 on_finish: Callable[[Job], None] | None = None,
                 gpu_call: Callable[[JobFn, JobKind], JobFn] | None = None, workers: bool = False,
                 fork_guard: Callable[[], AbstractContextManager] = nullcontext) -> None:
        self.max_queued = max_queued
        self.max_queued_per_owner = max_queued_per_owner
        self.keep_finished = keep_finished
        self.on_finish = on_finish
        self.gpu_call = gpu_call
        self.workers = workers
        self.fork_guard = fork_guard
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._jobs: dict[str, Job] = {}
        self._recent_runs: deque[float] = deque(maxlen=RECENT_RUNS)
        self._count = 0
        self._closed = False
        self._lanes: dict[str, _Lane] = {}
        self._threads: list[threading.Thread] = []
        for lane in dict.fromkeys(lanes):
            self._lanes[lane] = _Lane()
            thread = threading.Thread(target=self._work, args=(lane,), daemon=True,
                                      name=f"tailor-jobs-{lane}")
            thread.start()
            self._threads.append(thread)

    @property
    def lanes(self) -> tuple[str, ...]:
        return tuple(self._lanes)

    # -- submitting and controlling ---------------------------------------------------

    def submit(self, owner: str, kind: JobKind | str, fn: JobFn, *, label: str = "",
               lane: str | None = None, in_worker: bool | None = None) -> Job:
        """Queue `fn`; refused at once (UserError) when the queue is full. `in_worker`
        overrides the kind's choice (a job whose function shares state with its caller)."""
        kind = JobKind(kind)
        lane = lane or next(iter(self._lanes))
        if lane not in self._lanes:
            raise UserError(f"no {lane} device on this server (available: {', '.join(self._lanes)})")
        with self._lock:
            if self._closed:
                raise UserError("the server is shutting down; try again in a moment")
            waiting = [j for j in self._jobs.values() if j.status == QUEUED]
            mine = sum(j.owner == owner for j in waiting)
            if mine >= self.max_queued_per_owner:
                raise UserError(f"you already have {mine} jobs waiting; wait for one to finish "
                                f"or cancel one (at most {self.max_queued_per_owner} per visitor)")
            if len(waiting) >= self.max_queued:
                raise UserError(f"the server's job queue is full ({len(waiting)} jobs waiting, its "
                                f"limit); try again in {self._full_queue_retry(len(waiting)):.0f} s")
            self._count += 1
            job = Job(id=f"job-{self._count}-{secrets.token_hex(3)}", owner=owner, kind=kind,
                      label=label or str(kind), lane=lane,
                      in_worker=kind.in_worker and self.workers if in_worker is None else in_worker)
            self._jobs[job.id] = job
            self._lanes[lane].push(job, fn)
            self._lanes[lane].restage()
            self._wakeup.notify_all()
        return job

    def _full_queue_retry(self, waiting: int) -> float:
        """Seconds until `waiting` jobs would all have started, each lane running the median
        of the recent jobs' run times (a poller's wait while none has finished yet): told
        less, refused visitors would come back to a queue as full as they left it."""
        if not self._recent_runs:
            return RETRY_MAX_SECONDS
        drain = waiting * statistics.median(self._recent_runs) / len(self._lanes)
        return min(max(drain, RETRY_MAX_SECONDS), FULL_QUEUE_RETRY_MAX_SECONDS)

    def get(self, job_id: str, owner: str) -> Job:
        job = self._jobs.get((job_id or "").strip())
        if job is None or job.owner != owner:
            raise UserError(f"no job {job_id!r} in this session")
        return job

    def cancel(self, job_id: str, owner: str) -> Job:
        """Stop a job: a queued one never starts, a running one stops at its next check
        (or its worker is ended, for a kind whose cancel route says so)."""
        job = self.get(job_id, owner)
        with self._lock:
            if job.is_finished:
                return job
            job._stop.set()
            if job.status == QUEUED:
                lane = self._lanes[job.lane]
                lane.remove(job)
                lane.restage()
                self._finish(job, CANCELLED, stage="cancelled before it started")
            else:
                job.stage = f"cancelling… ({job.stage})"
        return job

    def wait(self, job_id: str, owner: str, timeout: float | None = None) -> Job:
        """Block until the job ends (or `timeout` seconds pass); return it either way."""
        job = self.get(job_id, owner)
        job._over.wait(timeout)
        return job

    def history(self, owner: str, kind: JobKind | str | None = None) -> list[Job]:
        """The owner's jobs, newest first."""
        with self._lock:
            jobs = [j for j in self._jobs.values() if j.owner == owner and (kind is None or j.kind == kind)]
        return jobs[::-1]

    def active(self, owner: str, kind: JobKind | str | None = None) -> list[Job]:
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
        """Refuse new jobs, cancel the waiting ones and stop the running ones."""
        with self._lock:
            self._closed = True
            for job in self._jobs.values():
                if not job.is_finished:
                    job._stop.set()
            for lane in self._lanes.values():
                while lane.waiting:
                    job, _ = lane.pop()
                    self._finish(job, CANCELLED, stage="cancelled: the server stopped")
            self._wakeup.notify_all()
        if wait:
            for thread in self._threads:
                thread.join(timeout)

    # -- the lanes' threads -----------------------------------------------------------------

    def _work(self, name: str) -> None:
        lane = self._lanes[name]
        while True:
            with self._lock:
                while not lane.waiting and not self._closed:
                    self._wakeup.wait()
                if self._closed:
                    return
                job, fn = lane.pop()
                lane.busy = True
                job.status, job.started, job.stage = RUNNING, time.time(), "starting"
                lane.restage()
            self._run(job, fn)
            with self._lock:
                lane.busy = False
                lane.restage()
            # the function's closure may hold a whole model: do not keep it alive while idle
            del job, fn

    def _call(self, job: Job, fn: JobFn) -> Any:
        """The job's function called where it computes: ZeroGPU's worker (a GPU lane's
        gpu_call), a worker process of ours, or this thread."""
        def show(stage: str, done: int, total: int) -> None:
            job.stage, job.done, job.total = stage, int(done), int(total)

        update = forward_only(show)  # wherever the job computes, its bar never moves back

        def progress(stage: str, done: int, total: int) -> None:
            if job._stop.is_set():
                raise Cancelled
            update(stage, done, total)

        if job.lane.startswith("cuda") and self.gpu_call is not None:
            return self.gpu_call(fn, job.kind)(progress, job._stop.is_set)
        if job.in_worker and workers.can_fork():
            def started(pid: int) -> None:
                job.worker_pid = pid

            return workers.run_in_worker(fn, job._stop, update, guard=self.fork_guard, on_start=started,
                                         end_on_stop=job.kind.cancel is CancelRoute.END_WORKER)
        if job.in_worker:  # this process holds a CUDA context: it computes its jobs itself
            workers.stop_forking()
        return fn(progress, job._stop.is_set)

    def _run(self, job: Job, fn: JobFn) -> None:
        outcome, stage, error, result = DONE, "done", None, None
        gpu = job.lane.startswith("cuda")
        try:
            result = self._call(job, fn)
            if job._stop.is_set() and result is None:
                outcome, stage = CANCELLED, "cancelled"
        except Cancelled:
            outcome, stage = CANCELLED, "cancelled"
        except UserError as exc:
            outcome, stage, error = FAILED, "failed", str(exc)
        except workers.WorkerDied as exc:
            log.warning("job %s (%s): %s", job.id, job.kind, exc)
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
            job.status, job.stage, job.error, job.finished = outcome, stage, error, time.time()
            if job.started is not None:
                self._recent_runs.append(job.finished - job.started)
        if self.on_finish is not None:
            try:
                self.on_finish(job)
            except Exception:
                log.exception("on_finish failed for job %s", job.id)
        with self._lock:
            job._over.set()
            self._prune(job.owner)

    def _finish(self, job: Job, status: JobStatus, *, stage: str, error: str | None = None) -> None:
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
