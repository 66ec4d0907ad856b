"""A job computed in a worker process: a fork of the server, one per job.

The web server must keep answering pages, `/healthz` and job status while every core is
busy, and a job that crashes its process (a segfault in a kernel, the kernel's
out-of-memory kill) must not take the server with it. So a job runs in a fresh fork of
the server, made when the job starts:

- The fork inherits the state of that moment (the demo pair, a visitor's pair, sessions,
  calibration sets) copy-on-write: nothing is pickled on the way in and the pair's tensors
  are never copied per visitor (a job that patches the base in place copies only the
  pages it writes, in its own process).
- Progress comes back over a pipe; a cancel goes down it (the job's stop flag turns true,
  as in the server); `Relay` callbacks run in the server (a fine-tune's live losses, what
  a merge cached on the pair).
- The result comes back pickled, tensors copied through the pipe (torch's shared-memory
  tensors would each hold a file descriptor open in the server for as long as a session
  keeps them). A `PairHandle` travels by reference, so a merge arrives pointing at the
  server's own pair. An exception comes back with its message.
- A worker that dies (SIGKILL, out of memory) ends its job with `WorkerDied`; what it was
  writing stays in temporaries named after its process (`io.atomic_path`), which
  `remove_dead_temporaries` clears. The next job gets a fresh fork.

A fork cannot use torch's OpenMP thread pool once the server has run it: the fork inherits
the pool's bookkeeping but not its threads, and its first parallel operation waits for them
forever. So a server that forks (app.py) computes on one thread from its start and never
starts the pool (`prepare_forks`); each worker starts its own with the threads the server
would have had.

A fork cannot use CUDA once the server has initialised it: on a machine where the server
holds a CUDA context, jobs run in the lane's thread (`can_fork`). ZeroGPU's GPU jobs fork
through `spaces.GPU` instead (gpu.py).
"""

from __future__ import annotations

import gc
import itertools
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import threading
import time
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tailor_ui.control import Cancelled
from tailor_ui.errors import UserError

log = logging.getLogger(__name__)

_FORK = multiprocessing.get_context("fork")
POLL_SECONDS = 0.1  # how often the server checks for a cancel while a worker computes
PROGRESS_SECONDS = 0.05  # the most often a worker reports progress counts
# a worker yields the cores to the web server when both want them: at 10 its two compute
# threads weigh about a fifth of one server thread with the kernel's scheduler
WORKER_NICENESS = 10

_channel: Connection | None = None  # in a worker: its pipe to the server
_worker_threads = 1  # torch threads a worker computes with (`prepare_forks`)
_relays: weakref.WeakValueDictionary[int, Relay] = weakref.WeakValueDictionary()
_relay_keys = itertools.count(1)


class WorkerDied(Exception):
    """The job's worker process ended without a result (killed, or out of memory)."""


def in_worker() -> bool:
    """Whether this process is a job's worker (forked by `run_in_worker`)."""
    return _channel is not None


def can_fork() -> bool:
    """Whether a forked worker could compute: not once this process holds a CUDA context."""
    import torch

    return not torch.cuda.is_initialized()


def prepare_forks() -> None:
    """Make this process one that can fork workers that compute on every core: from here on
    it computes on one torch thread (its OpenMP pool never starts), and each worker on as
    many as it had. Call before the process runs any torch operation; a process that did
    not call it forks workers that compute on one thread."""
    global _worker_threads
    import torch

    if torch.get_num_threads() > 1:
        _worker_threads = torch.get_num_threads()
        torch.set_num_threads(1)


def stop_forking() -> None:
    """This process computes its jobs itself from now on (it holds a CUDA context): give it
    back the threads `prepare_forks` kept for the workers."""
    import torch

    if _worker_threads > torch.get_num_threads():
        torch.set_num_threads(_worker_threads)


class Relay:
    """A callback that runs in the server, whichever process calls it: called in a job's
    worker, its arguments go to the server (pickled, after the job's earlier progress) and
    `fn` runs there, in the lane's thread; called in the server, `fn` runs at once. Made
    in the server before the job starts, so the fork knows it by its key."""

    def __init__(self, fn: Callable[..., None]) -> None:
        self.fn = fn
        self.key = next(_relay_keys)
        _relays[self.key] = self

    def __call__(self, *args: Any) -> None:
        if _channel is not None:
            _put(_channel, ("relay", self.key, args))
        else:
            self.fn(*args)


def run_in_worker(fn: Callable[[Callable, Callable], Any], stop: threading.Event,
                  update: Callable[[str, int, int], None], *, end_on_stop: bool = False,
                  guard: Callable[[], AbstractContextManager] = nullcontext,
                  on_start: Callable[[int], None] | None = None) -> Any:
    """`fn(progress, should_stop)` computed in a fork of this process; its result here.

    `stop` is the job's stop flag: the fork's `should_stop` reads its own copy, which a
    cancel here sets (so does a cancel made in the fork itself); with `end_on_stop` a
    cancel ends the worker at once instead. `update(stage, done, total)` records the
    fork's progress here. `guard()` is held while forking (the pairs' locks: no pair is
    mid-patch in the copy, and the fork owns every lock it inherits). `on_start(pid)`
    tells the caller which process computes. Raises `Cancelled`, the job's own exception,
    or `WorkerDied`."""
    results, child_end = _FORK.Pipe(duplex=False)
    commands, parent_end = _FORK.Pipe(duplex=False)
    process = _FORK.Process(target=_worker, args=(fn, stop, child_end, commands),
                            daemon=True, name="tailor-job")
    with guard():
        process.start()
    child_end.close()
    commands.close()
    if on_start is not None:
        on_start(process.pid)
    try:
        result = _follow(process, results, parent_end, stop, update, end_on_stop)
    except BaseException:
        if process.is_alive():  # ended early (a cancel that ends it, or an error here)
            process.kill()
        process.join()
        raise
    finally:
        results.close()
        parent_end.close()
    # it has sent its result and is exiting: the job need not wait while it frees its memory
    threading.Thread(target=process.join, daemon=True, name="tailor-job-reaper").start()
    return result


def _follow(process, results: Connection, commands: Connection, stop: threading.Event,
            update: Callable[[str, int, int], None], end_on_stop: bool) -> Any:
    told = False
    while True:
        ready = wait([results, process.sentinel], POLL_SECONDS)
        if stop.is_set() and not told:
            told = True
            if end_on_stop:
                process.kill()
                raise Cancelled
            _send(commands, "stop")
        if results in ready:
            try:
                message = pickle.loads(results.recv_bytes())
            except EOFError:  # its end closed: it died (the sentinel says so too)
                raise _died(process) from None
            if message[0] == "progress":
                update(*message[1:])
            elif message[0] == "relay":
                relay = _relays.get(message[1])
                if relay is not None:
                    relay.fn(*message[2])
            elif message[0] == "raised":
                raise message[1]
            else:
                return message[1]
        elif process.sentinel in ready and not results.poll():
            raise _died(process)


def _send(commands: Connection, what: str) -> None:
    try:
        commands.send(what)
    except (BrokenPipeError, OSError):  # it has ended: its sentinel will say so
        pass


def _died(process) -> WorkerDied:
    process.join(5)
    code = process.exitcode
    if code is not None and code < 0:
        how = f"was killed by {signal.Signals(-code).name}"
        if -code == signal.SIGKILL:
            how += " (out of memory, or ended from outside)"
    else:
        how = f"exited with status {code}"
    return WorkerDied(f"the job's worker process {how}; nothing it was writing was kept: run it again")


def _worker(fn, stop: threading.Event, results: Connection, commands: Connection) -> None:
    """In the fork: run the job, send its progress and its outcome."""
    global _channel
    _channel = results
    # the collector would touch every object the server made, copying each page they sit on
    # into this process: they are the server's to collect
    gc.freeze()
    stop._cond._at_fork_reinit()  # a server thread may have held it at the fork
    os.nice(WORKER_NICENESS)
    import torch

    # a pool of its own where the server never started one (`prepare_forks`); else one thread,
    # as the pool it inherited cannot run
    torch.set_num_threads(_worker_threads)

    def listen() -> None:
        while True:
            try:
                what = commands.recv()
            except (EOFError, OSError):  # the server is gone: stop
                stop.set()
                return
            if what == "stop":
                stop.set()

    threading.Thread(target=listen, daemon=True).start()

    sent = {"stage": None, "at": 0.0}

    def progress(stage: str, done: int, total: int) -> None:
        if stop.is_set():
            raise Cancelled
        now = time.monotonic()
        # a new stage at once, counts at most every PROGRESS_SECONDS: each message costs the
        # server's process a little time under its interpreter lock
        if stage != sent["stage"] or now - sent["at"] >= PROGRESS_SECONDS:
            sent["stage"], sent["at"] = stage, now
            _put(results, ("progress", stage, int(done), int(total)))

    try:
        outcome = ("result", fn(progress, stop.is_set))
    except BaseException as exc:  # noqa: BLE001 - every outcome goes back to the server
        if not isinstance(exc, (Cancelled, UserError)):
            log.exception("a job failed in its worker process")
        outcome = ("raised", portable_error(exc))
    try:
        _put(results, outcome)
    except Exception as exc:  # the result cannot be pickled: say so instead
        _put(results, ("raised", RuntimeError(
            f"the job's result could not be sent back ({type(exc).__name__}: {exc})")))
    # the outcome is in the pipe: end now, without tearing down what the fork inherited (a
    # worker killed while it would be freeing its memory would have no job left to fail)
    os._exit(0)


def _put(conn: Connection, message: tuple) -> None:
    """Plain pickle, not multiprocessing's (which sends tensors as shared memory)."""
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


def portable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its class name and text
    (an exception whose __init__ takes other arguments cannot be rebuilt)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    exc.__traceback__ = None  # its frames stay in the worker
    return exc


def remove_dead_temporaries(folder: Path, pid: int, since: float | None = None) -> list[Path]:
    """Remove what process `pid` (a worker that did not finish) left under `folder`: the
    temporaries `io.atomic_path` names after their process, and then the folders directly
    under `folder` left empty that were made since `since` (when its job started: a run's
    folder it made before writing anything)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.rglob(f".*.tmp-{pid}-*"):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    if since is not None:
        for path in folder.iterdir():
            if path.is_dir() and path.stat().st_mtime >= since and not any(path.iterdir()):
                path.rmdir()
                removed.append(path)
    return removed
