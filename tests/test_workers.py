"""Jobs compute in worker processes: progress, relays, cancel and results cross the pipe; a
worker killed mid-job fails that job alone; lanes serve visitors in turn."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest
import torch

from conftest import demo_available
from failing_jobs import fail_bug, fail_unpicklable_error, fail_user
from tailor_ui.app import workers
from tailor_ui.app.jobs import CANCELLED, DONE, FAILED, CancelRoute, JobKind, JobRunner


@pytest.fixture
def runner():
    runner = JobRunner(["cpu"], workers=True)
    yield runner
    runner.shutdown(wait=True, timeout=10)


def wait_until(predicate, timeout: float = 30.0) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, "condition not reached in time"
        time.sleep(0.005)


def test_every_kind_but_loading_computes_in_a_worker_and_says_how_it_is_cancelled():
    assert {k for k in JobKind if not k.in_worker} == {JobKind.LOAD}
    assert {k for k in JobKind if k.cancel is CancelRoute.END_WORKER} == {JobKind.COMPARE,
                                                                          JobKind.EXPORT}
    assert JobKind("tailor") is JobKind.TAILOR and f"{JobKind.SWEEP}" == "sweep"


def test_a_job_computes_in_a_fork_and_its_progress_relays_and_result_come_back(runner):
    seen: list[int] = []
    relay = workers.Relay(seen.append)  # made here, before the fork

    def report(progress, should_stop):
        for i in range(3):
            progress(f"step {i + 1}/3", i, 3)
            relay(i * 10)
        return {"pid": os.getpid(), "tensor": torch.arange(4), "handled": workers.in_worker(),
                "nice": os.nice(0)}

    stages = []
    job = runner.submit("a", JobKind.TAILOR, report)
    wait_until(lambda: job.worker_pid is not None)
    while not job.is_finished:
        stages.append(job.stage)
        time.sleep(0.001)
    job = runner.wait(job.id, "a", 30)
    assert job.status == DONE, job.error
    assert job.result["pid"] == job.worker_pid != os.getpid() and job.result["handled"]
    # it yields the cores to the server
    assert job.result["nice"] == min(os.nice(0) + workers.WORKER_NICENESS, 19)
    assert torch.equal(job.result["tensor"], torch.arange(4))
    assert seen == [0, 10, 20]  # the relay ran here, in order
    assert job.done == 2 and job.total == 3
    assert not workers.in_worker()


# A server as app.py makes it (prepare_forks first, or not), whose lane runs a parallel torch
# operation in the server (a load), then a job whose worker computes one (Pair.changed's
# torch.equal): without a thread count the worker can use, that job never ends
_FORKING_SERVER = """
import os, sys, torch
from tailor_ui.app import workers
from tailor_ui.app.jobs import JobKind, JobRunner
if sys.argv[1] == "prepared":
    workers.prepare_forks()
big = torch.randn(3000, 3000)
runner = JobRunner(["cpu"], workers=True)
runner.wait(runner.submit("a", JobKind.LOAD, lambda p, s: torch.equal(big, big.clone())).id, "a", 60)
job = runner.wait(runner.submit("a", JobKind.TAILOR, lambda p, s: (torch.equal(big, big.clone()),
                                                                   torch.get_num_threads())).id, "a", 30)
print(job.status, job.result and job.result[1], torch.get_num_threads(), flush=True)
os._exit(0)
"""


@pytest.mark.parametrize("mode", ["prepared", "plain"])
def test_a_worker_forked_after_the_server_computed_finishes_on_its_threads(mode):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": root}  # a pool of two on any machine
    out = subprocess.run([sys.executable, "-c", _FORKING_SERVER, mode], capture_output=True, text=True,
                         timeout=120, env=env, cwd=root)
    # prepared (app.py): the server computes on one thread, its workers on two; a server that
    # did not prepare keeps its two and its workers compute on one
    expected = "done 2 1" if mode == "prepared" else "done 1 2"
    assert out.stdout.strip() == expected, out.stdout + out.stderr[-2000:]


def test_loading_and_jobs_told_so_stay_in_the_server(runner):
    in_here = runner.wait(runner.submit("a", JobKind.LOAD, lambda p, s: os.getpid()).id, "a", 10)
    told = runner.wait(runner.submit("a", JobKind.TAILOR, lambda p, s: os.getpid(),
                                     in_worker=False).id, "a", 10)
    assert in_here.result == told.result == os.getpid()
    assert in_here.worker_pid is None and told.worker_pid is None


def _until_stopped(progress, should_stop):
    while True:
        progress("working", 0, 1)
        time.sleep(0.01)


def _lingering(progress, should_stop):
    progress("generating", 0, 1)
    time.sleep(60)  # no checks at all: only ending the worker stops it


def test_cancel_reaches_the_worker_by_its_kinds_route(runner):
    flagged = runner.submit("a", JobKind.SWEEP, _until_stopped)
    wait_until(lambda: flagged.stage == "working")
    runner.cancel(flagged.id, "a")
    assert runner.wait(flagged.id, "a", 10).status == CANCELLED

    ended = runner.submit("a", JobKind.COMPARE, _lingering)
    wait_until(lambda: ended.stage == "generating")
    start = time.perf_counter()
    runner.cancel(ended.id, "a")
    assert runner.wait(ended.id, "a", 10).status == CANCELLED
    assert time.perf_counter() - start < 2
    with pytest.raises(ProcessLookupError):
        os.kill(ended.worker_pid, 0)


def _unpicklable_result(progress, should_stop):
    return threading.Lock()


@pytest.mark.parametrize("fn, error", [
    (fail_user, "this pair has no built-in calibration set"),
    (fail_bug, "unexpected ZeroDivisionError: division by zero"),
    (fail_unpicklable_error, "unexpected RuntimeError: TwoArgs: stopped because of a test"),
    (_unpicklable_result, "unexpected RuntimeError: the job's result could not be sent back "
                          "(TypeError: cannot pickle '_thread.lock' object)"),
])
def test_a_failing_job_in_a_worker_keeps_its_message(runner, fn, error):
    job = runner.wait(runner.submit("a", JobKind.TAILOR, fn).id, "a", 30)
    assert job.status == FAILED and job.error == error


def test_a_killed_worker_fails_its_job_and_the_lane_goes_on(runner, tmp_path):
    job = runner.submit("a", JobKind.TAILOR, _until_stopped)
    after = runner.submit("b", JobKind.TAILOR, lambda p, s: os.getpid())
    wait_until(lambda: job.stage == "working")
    os.kill(job.worker_pid, signal.SIGKILL)
    job = runner.wait(job.id, "a", 10)
    assert job.status == FAILED
    assert job.error == ("the job's worker process was killed by SIGKILL (out of memory, or ended "
                         "from outside); nothing it was writing was kept: run it again")
    after = runner.wait(after.id, "b", 30)
    assert after.status == DONE and after.result == after.worker_pid != job.worker_pid


def test_what_a_dead_worker_left_half_written_is_removed(tmp_path):
    since = time.time() - 1
    run = tmp_path / "run-1"
    (run / ".patch.safetensors.tmp-4242-abc").mkdir(parents=True)
    (run / ".patch.safetensors.tmp-4242-abc" / "patch.safetensors").write_bytes(b"half")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "report.json").write_text("{}")
    (tmp_path / "kept" / ".x.tmp-4243-abc").mkdir()  # another process's: not this one's
    removed = workers.remove_dead_temporaries(tmp_path, 4242, since=since)
    assert sorted(p.name for p in removed) == [".patch.safetensors.tmp-4242-abc", "run-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert (tmp_path / "kept" / ".x.tmp-4243-abc").is_dir()


def test_lanes_serve_visitors_in_turn_with_positions():
    runner = JobRunner(["cpu"], max_queued_per_owner=8)
    release, order = threading.Event(), []
    try:
        runner.submit("x", JobKind.TAILOR, lambda p, s: release.wait(10))
        wait_until(lambda: runner.counts()["running"] == 1)
        queued = [runner.submit(owner, JobKind.TAILOR, lambda p, s, o=owner, n=n: order.append(f"{o}{n}"))
                  for owner, n in [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("c", 1), ("b", 2)]]
        # behind the running job, one of each visitor's in turn
        assert [j.position for j in queued] == [2, 5, 7, 3, 4, 6]
        assert [j.to_dict()["retry_after"] for j in queued] == [2.0, 5.0, 7.0, 3.0, 4.0, 6.0]
        assert queued[0].stage == "waiting in the queue (1 ahead)"
        runner.cancel(queued[3].id, "b")  # b's first leaves: b's second moves up
        assert [j.position for j in queued if j.status == "queued"] == [2, 5, 6, 4, 3]
        release.set()
        for job in queued:
            runner.wait(job.id, job.owner, 10)
        assert order == ["a1", "b2", "c1", "a2", "a3"]
    finally:
        release.set()
        runner.shutdown()


# -- the dashboard: a worker killed mid-job among other visitors' jobs -------------------------


def base_digest(handle) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(handle.pair.base.state_dict().items()):
        digest.update(name.encode() + p.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.skipif(not demo_available(), reason="the demo pair is not built")
def test_a_worker_killed_mid_merge_fails_that_job_alone(studio, monkeypatch):
    """Visitor A's merge is SIGKILLed while it writes its patch, with B's and C's jobs waiting:
    A's job fails with a message and leaves no files, B and C finish, A merges again, and
    the shared pair and the server are as before."""
    from tailor_ui import patch as patch_
    from tailor_ui.io import atomic_path
    from tailor_ui.app.service.config import default_settings

    handle = studio.demo
    before = base_digest(handle)
    a, b, c = (studio.session(f"killed-{name}") for name in "abc")

    def half_then_hang(patch, path):  # A's worker is forked with this: it hangs half-way
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a patch")
            time.sleep(120)

    monkeypatch.setattr(patch_, "save_patch", half_then_hang)
    doomed = studio.submit_tailor(a, default_settings(keep=0.21))
    wait_until(lambda: any(a.folder.glob("run-*/.patch.safetensors.tmp-*/patch.safetensors")), 120)
    monkeypatch.undo()  # the others' workers are forked after this
    others = [(b, studio.submit_tailor(b, default_settings(keep=0.22))),
              (c, studio.submit_sweep(c, ["tailor"], [0.1], [], examples=2)),
              (b, studio.submit_tailor(b, default_settings(keep=0.23)))]
    assert studio.health()["jobs"] == {"queued": 3, "running": 1}

    os.kill(doomed.worker_pid, signal.SIGKILL)
    doomed = studio.runner.wait(doomed.id, a.id, 30)
    assert doomed.status == FAILED and "worker process was killed by SIGKILL" in doomed.error
    assert not a.runs and list(a.folder.iterdir()) == []  # nothing half-written is left
    for session, job in others:
        job = studio.runner.wait(job.id, session.id, 120)
        assert job.status == DONE, job.error
        assert job.worker_pid not in (None, doomed.worker_pid, os.getpid())
    studio.sync(b, JobKind.TAILOR)
    assert len(b.runs) == 2 and all(r.patch_file.is_file() for r in b.runs.values())
    assert c.latest_sweep() is not None

    again = studio.runner.wait(studio.submit_tailor(a, default_settings(keep=0.21)).id, a.id, 120)
    assert again.status == DONE
    studio.sync(a, JobKind.TAILOR)
    assert a.run(again.id).patch_file.is_file()
    assert studio.health()["status"] == "ok" and base_digest(handle) == before
    for session in (a, b, c):
        studio.end_session(session.id)


@pytest.mark.skipif(not demo_available(), reason="the demo pair is not built")
def test_a_merge_in_a_worker_leaves_its_scores_for_the_next_slider_move(studio):
    """What a merge cached on the pair in its worker comes back: the next merge of the same
    settings at another keep re-thresholds cached scores, and no later job reads every
    fine-tuned tensor again to learn which ones changed."""
    from tailor_ui.app.service.config import default_settings

    session = studio.session("cache-carrier")
    handle = studio.handle_for(session)
    expected = handle.pair.changed()
    handle.pair._changed = None  # as a pair no job has used yet
    first = studio.runner.wait(studio.submit_tailor(session, default_settings(keep=0.17, damp=0.0123)).id,
                               session.id, 120)
    assert first.status == DONE and first.worker_pid is not None
    assert first.result.report["score_cache"]["hits"] == 0
    assert handle.pair.changed_if_known() == expected  # computed in the worker, kept here
    # in the server too the scores are backed by disk (unlinked files), as the engine keeps them
    factors = [e.factor for cache in handle.pair.cache.values() for e in cache.values()]
    assert factors and all(f.untyped_storage().filename is not None for f in factors)
    second = studio.runner.wait(studio.submit_tailor(session, default_settings(keep=0.27, damp=0.0123)).id,
                                session.id, 120)
    cache = second.result.report["score_cache"]
    assert second.status == DONE and cache["misses"] == 0 < cache["hits"]
    studio.end_session(session.id)


@pytest.mark.skipif(not demo_available(), reason="the demo pair is not built")
def test_the_page_polls_as_soon_as_its_jobs_have_news_and_slowly_when_idle(app):
    import gradio as gr

    from conftest import hold_lane, request_for
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.studio import IDLE_POLL_SECONDS

    studio = app.studio
    session = studio.session("poll-timer")
    assert studio.poll_seconds(session) == IDLE_POLL_SECONDS
    assert app.poll_interval(session) == IDLE_POLL_SECONDS  # the page starts at one second
    assert app.poll_interval(session) == gr.skip()  # sent once
    with hold_lane(studio):
        job = studio.submit_tailor(session, default_settings(keep=0.19))
        assert job.position == 2 and studio.poll_seconds(session) == 2.0
        assert app.poll_interval(session) == 2.0
        assert app.job_status(job.id, request=request_for(session.id))["retry_after"] == 2.0
    wait_until(lambda: job.status == "running" or job.is_finished, 60)
    if not job.is_finished:
        assert studio.poll_seconds(session) == 1.0
    studio.runner.wait(job.id, session.id, 120)
    assert studio.poll_seconds(session) == IDLE_POLL_SECONDS
    studio.end_session(session.id)
