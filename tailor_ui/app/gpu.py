"""Where GPU work runs: inside `@spaces.GPU` on a ZeroGPU Space, in the job runner elsewhere.

On a ZeroGPU Space the process has no GPU of its own: a GPU is lent only while a function
decorated with `spaces.GPU` runs. On a dedicated GPU, in Docker or locally, the job
runner's worker thread calls the job directly (the `spaces` package, where installed,
leaves functions alone there; a fork of ours could not use the CUDA context the server
holds, see workers.py).

`mode()` decides once per process and `on_gpu()` is the one place that acts on it: the
job runner calls every job of a GPU lane through it, so queueing, owners, progress and
history are the same in both modes.

What `spaces` does (spaces/zero/wrappers.py, 0.51): the first call of a decorated function
forks a worker process, which moves every tensor the main process placed on "cuda" to the
lent GPU, runs the function and puts its result on a multiprocessing queue (pickled; torch
sends CPU tensors as shared memory). An exception comes back as its class name only (a
`gr.Error` keeps its message). Later calls of the same decorated function reuse that
worker while it lives and ZeroGPU reports its GPU idle, sending the arguments pickled.
Hence, on ZeroGPU:

- One decoration per job, so each job gets a fresh fork that inherits the state of the
  moment (pairs, runs, calibration) and nothing is pickled on the way in.
- A job's result crosses processes: it holds CPU tensors only, and a `PairHandle` travels
  by reference (session.py), so a run arrives pointing at the main process's own pair. A
  handle made in the fork cannot come back; so loading a pair (`JobKind.LOAD`, the one
  kind that is not `in_worker`) runs in the main process, where `spaces` emulates "cuda": the tensors stay in host memory and each
  worker moves them to its GPU.
- An exception comes back as the job's result (`_Raised`) and is raised again here, so a
  `UserError` keeps its message.
- In-place effects in the fork are lost. What the dashboard needs from a job is filed from
  its result by the runner's `on_finish` in the main process, in both modes (the warm-up's
  default run, the quick check's reference scores; an export's zip). Caches are simply
  lost: `Pair.cache` (the scores a slider move re-thresholds), `Pair.changed()` and the
  calibration batches are recomputed by every job, so each slider move costs a full merge
  (our own workers send them back through a `workers.Relay`, which has no way out of
  spaces' fork).
- Progress and cancel checks inside the fork do not reach the page: the job shows one
  "running" stage until it ends, and a cancel asked meanwhile drops its result when it
  returns. A fine-tune's live loss curve appears only when it ends.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tailor_ui.app.jobs import JobFn, JobKind

log = logging.getLogger(__name__)

ZEROGPU, RUNNER = "zerogpu", "runner"
# what one GPU job may hold a lent ZeroGPU device for (ZeroGPU's quota counts it)
GPU_SECONDS = int(os.environ.get("MTS_GPU_SECONDS", "120"))

_mode: str | None = None
_emulating = threading.local()


def detect_mode() -> str:
    """ZEROGPU when the `spaces` package imports and its configuration says this is a
    ZeroGPU Space (`spaces.config.Config.zero_gpu`, from SPACES_ZERO_GPU), else RUNNER."""
    try:
        import spaces
    except ImportError:
        return RUNNER
    except Exception as exc:  # on a ZeroGPU Space `spaces` patches torch at import; keep serving
        log.warning("the spaces package failed to import (%s: %s); GPU jobs run in the job "
                    "runner", type(exc).__name__, exc)
        return RUNNER
    return ZEROGPU if spaces.config.Config.zero_gpu else RUNNER


def mode() -> str:
    """The execution mode of this process, decided on first use."""
    global _mode
    if _mode is None:
        _mode = detect_mode()
        log.info("GPU jobs run in mode %s", _mode)
    return _mode


def on_gpu(fn: JobFn, kind: JobKind, *, seconds: int = GPU_SECONDS,
           fork: Callable[[Callable[[], Any]], Any] | None = None) -> JobFn:
    """The job as the runner calls it on a GPU lane: `fn` itself, or on ZeroGPU, for the
    kinds that compute in a worker (`JobKind.in_worker`: every kind but loading a pair,
    which runs in the main process), a call that runs it inside
    `spaces.GPU(duration=seconds)`.

    `fork(task)` runs `task()` in a forked worker and returns its result; it defaults to
    spaces.GPU on ZeroGPU. Given (tests/test_zerogpu.py), this path runs on any machine."""
    if fork is None:
        if mode() != ZEROGPU:
            return fn
        if not kind.in_worker:
            return _emulating_cuda(fn)
        fork = functools.partial(_spaces_gpu, seconds=seconds)
    elif not kind.in_worker:
        return fn

    def job(progress, should_stop) -> Any:
        progress("running on a lent GPU (its progress shows when it ends)", 0, 0)
        outcome = fork(functools.partial(_returning_errors, fn, progress, should_stop))
        if isinstance(outcome, _Raised):
            raise outcome.error
        if should_stop():  # the cancel could not reach the fork: drop what it returned
            from tailor_ui.control import Cancelled

            raise Cancelled
        return outcome

    return job


@dataclass
class _Raised:
    """An exception of a job in the GPU worker, sent back as its result: `spaces` would
    send only the exception's class name."""

    error: BaseException


def _returning_errors(fn: JobFn, progress, should_stop) -> Any:
    """In the worker: the job's result, or its exception as a `_Raised`."""
    from tailor_ui.control import Cancelled
    from tailor_ui.errors import UserError
    from tailor_ui.app.workers import portable_error

    try:
        return fn(progress, should_stop)
    except Exception as exc:
        if not isinstance(exc, (UserError, Cancelled)):  # its traceback stays in this process
            log.exception("a job failed in the GPU worker")
        return _Raised(portable_error(exc))


def _spaces_gpu(task: Callable[[], Any], seconds: int) -> Any:
    import spaces

    try:
        return spaces.GPU(duration=seconds)(task)()
    finally:
        _forget(task)


def _forget(task: Any) -> None:
    """Drop `spaces`' cache entry for a one-off task (it would keep the job's closure,
    models included, alive for the life of the process)."""
    try:
        from spaces.zero.decorator import decorated_cache
    except Exception:
        return
    decorated = decorated_cache.pop(task, None)
    if decorated is not None:
        decorated_cache.pop(decorated, None)


def _emulating_cuda(fn: JobFn) -> JobFn:
    def job(progress, should_stop) -> Any:
        emulate_cuda()
        return fn(progress, should_stop)

    return job


def emulate_cuda() -> None:
    """On ZeroGPU, let this thread put models on "cuda" outside spaces.GPU (a no-op
    elsewhere). `spaces` emulates CUDA in the main process with torch modes, which are
    per thread, and enters them in the thread that imported it only: the demo loader's
    and the job runner's threads enter them here."""
    if mode() != ZEROGPU or getattr(_emulating, "on", False):
        return
    from spaces.zero import torch as zero_torch
    from torch.overrides import _get_current_function_mode_stack

    if not any(type(m).__module__.startswith("spaces.") for m in _get_current_function_mode_stack()):
        zero_torch.enter_mode()
    _emulating.on = True
