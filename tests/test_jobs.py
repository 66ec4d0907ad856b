"""The job runner: progress, cancel within one step, errors, owners, queue bounds, lanes."""

from __future__ import annotations

import threading
import time

import pytest

from tailor_ui.app import jobs
from tailor_ui.errors import UserError
from tailor_ui.app.jobs import CANCELLED, DONE, FAILED, QUEUED, RUNNING, JobRunner


@pytest.fixture
def runner():
    runner = JobRunner(["cpu"], max_queued=6, max_queued_per_owner=3, keep_finished=5)
    yield runner
    runner.shutdown(wait=True, timeout=5)


def wait_until(predicate, timeout: float = 5.0) -> None:
    end = time.time() + timeout
    while not predicate():
        if time.time() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.005)


def blocker(runner: JobRunner, owner: str = "a"):
    """A job that holds the lane until released."""
    release, started = threading.Event(), threading.Event()

    def fn(progress, should_stop):
        started.set()
        release.wait(5)
        return "released"

    job = runner.submit(owner, "sweep", fn)
    assert started.wait(5)
    return job, release


def test_job_reports_progress_and_result(runner):
    seen = []

    def fn(progress, should_stop):
        for i in range(3):
            progress(f"step {i + 1}/3", i, 3)
            seen.append(runner.get(job.id, "a").to_dict())
        return {"answer": 42}

    job = runner.submit("a", "tailor", fn, label="a merge")
    job = runner.wait(job.id, "a", 5)
    assert job.status == DONE and job.result == {"answer": 42} and job.error is None
    assert [s["stage"] for s in seen] == ["step 1/3", "step 2/3", "step 3/3"]
    assert [s["progress"] for s in seen] == pytest.approx([0, 1 / 3, 2 / 3], abs=1e-3)
    assert all(s["status"] == RUNNING for s in seen)
    info = job.to_dict()
    assert info["progress"] == 1.0 and info["run_s"] >= 0 and info["queued_s"] >= 0
    assert info["label"] == "a merge" and info["kind"] == "tailor"


def test_cancel_stops_a_running_job_within_one_step(runner):
    steps, started = [], threading.Event()

    def fn(progress, should_stop):
        for i in range(1000):
            progress(f"layer {i}", i, 1000)  # the engine's check between layers
            steps.append(i)
            started.set()
            time.sleep(0.01)
        return "finished"

    job = runner.submit("a", "tailor", fn)
    assert started.wait(5)
    wait_until(lambda: len(steps) >= 5)
    runner.cancel(job.id, "a")
    at_cancel = len(steps)
    job = runner.wait(job.id, "a", 5)
    assert job.status == CANCELLED and job.result is None
    assert len(steps) <= at_cancel + 1  # at most the step that was running finishes


def test_should_stop_turns_true_on_cancel(runner):
    observed = threading.Event()
    started = threading.Event()

    def fn(progress, should_stop):
        started.set()
        while not should_stop():
            time.sleep(0.005)
        observed.set()
        from tailor_ui.control import Cancelled

        raise Cancelled

    job = runner.submit("a", "sweep", fn)
    assert started.wait(5)
    runner.cancel(job.id, "a")
    assert runner.wait(job.id, "a", 5).status == CANCELLED
    assert observed.is_set()


def test_cancelled_while_queued_never_runs(runner):
    ran = []
    _, release = blocker(runner)
    job = runner.submit("a", "tailor", lambda p, s: ran.append(1))
    assert job.status == QUEUED and "ahead" in job.stage
    runner.cancel(job.id, "a")
    assert job.status == CANCELLED
    release.set()
    after = runner.submit("a", "tailor", lambda p, s: "next")
    assert runner.wait(after.id, "a", 5).status == DONE
    assert ran == []


def test_errors_are_recorded_and_free_the_lane(runner):
    def user_problem(progress, should_stop):
        raise UserError("keep must be between 0 and 1, got 2")

    def bug(progress, should_stop):
        raise KeyError("model.layers.3.q_proj")

    first = runner.wait(runner.submit("a", "tailor", user_problem).id, "a", 5)
    assert first.status == FAILED and first.error == "keep must be between 0 and 1, got 2"
    second = runner.wait(runner.submit("a", "tailor", bug).id, "a", 5)
    assert second.status == FAILED
    assert second.error.startswith("unexpected KeyError") and "q_proj" in second.error
    third = runner.wait(runner.submit("a", "tailor", lambda p, s: "ok").id, "a", 5)
    assert third.status == DONE and third.result == "ok"


def test_out_of_memory_gets_a_readable_message():
    class OutOfMemoryError(RuntimeError):
        pass

    assert "out of memory" in jobs.short_error(OutOfMemoryError("CUDA out of memory. Tried…"))
    assert jobs.short_error(ValueError("")) == "unexpected ValueError"


def test_owners_are_isolated(runner):
    job = runner.wait(runner.submit("alice", "tailor", lambda p, s: "secret").id, "alice", 5)
    for call in (runner.get, runner.cancel, runner.wait):
        with pytest.raises(UserError, match="no job"):
            call(job.id, "bob")
    assert runner.history("bob") == []
    assert [j.id for j in runner.history("alice")] == [job.id]
    with pytest.raises(UserError, match="no job"):
        runner.get("job-999-abcdef", "alice")


def test_queue_is_bounded_per_owner_and_overall(runner):
    _, release = blocker(runner, owner="x")
    for _ in range(3):
        runner.submit("a", "tailor", lambda p, s: None)
    with pytest.raises(UserError, match="already have 3 jobs waiting"):
        runner.submit("a", "tailor", lambda p, s: None)
    for _ in range(3):
        runner.submit("b", "tailor", lambda p, s: None)
    with pytest.raises(UserError, match="queue is full"):
        runner.submit("c", "tailor", lambda p, s: None)
    release.set()
    wait_until(lambda: not runner.active("a") and not runner.active("b"))
    runner.submit("c", "tailor", lambda p, s: None)  # room again


def test_a_full_queue_tells_visitors_to_come_back_when_it_would_have_drained(runner, monkeypatch):
    """The refusal's wait is the waiting jobs at the pace of the recent runs (median), at
    least a poller's wait and at most the cap: sooner, refused visitors would come back to
    a queue as full as they left it."""
    def refusal() -> str:
        with pytest.raises(UserError, match="queue is full") as refused:
            runner.submit("d", "tailor", lambda p, s: None)
        return str(refused.value)

    monkeypatch.setattr(runner, "max_queued", 0)
    assert refusal().endswith("try again in 10 s")  # no job has run yet: a poller's wait
    monkeypatch.setattr(runner, "max_queued", 6)
    for seconds in (0.2, 0.3, 0.9):  # median 0.3 s
        runner.wait(runner.submit("a", "tailor", lambda p, s, t=seconds: time.sleep(t)).id, "a", 5)
    job, release = blocker(runner, owner="x")
    queued = [runner.submit(owner, "tailor", lambda p, s: None) for owner in "bbbccc"]
    assert refusal().endswith("(6 jobs waiting, its limit); try again in 10 s")  # 1.8 s: the floor
    monkeypatch.setattr(jobs, "RETRY_MAX_SECONDS", 0.5)
    assert refusal().endswith("try again in 2 s")  # 6 waiting × 0.3 s
    monkeypatch.setattr(jobs, "FULL_QUEUE_RETRY_MAX_SECONDS", 1.0)
    assert refusal().endswith("try again in 1 s")
    release.set()
    for j in [job, *queued]:
        runner.wait(j.id, j.owner, 5)


def test_one_job_at_a_time_per_lane_and_lanes_in_parallel():
    runner = JobRunner(["cpu", "cuda"], max_queued=20, max_queued_per_owner=20)
    running = {"cpu": 0, "cuda": 0}
    peak = {"cpu": 0, "cuda": 0}
    both = threading.Event()
    lock = threading.Lock()

    def work(lane):
        def fn(progress, should_stop):
            with lock:
                running[lane] += 1
                peak[lane] = max(peak[lane], running[lane])
                if running["cpu"] and running["cuda"]:
                    both.set()
            time.sleep(0.03)
            with lock:
                running[lane] -= 1
        return fn

    submitted = [runner.submit("a", "tailor", work(lane), lane=lane)
                 for _ in range(4) for lane in ("cpu", "cuda")]
    for job in submitted:
        assert runner.wait(job.id, "a", 10).status == DONE
    runner.shutdown()
    assert peak == {"cpu": 1, "cuda": 1}
    assert both.is_set()


def test_gpu_lane_empties_the_cache_after_each_job(monkeypatch):
    calls = []
    monkeypatch.setattr(jobs, "_empty_cuda_cache", lambda: calls.append(1))
    runner = JobRunner(["cpu", "cuda"])
    runner.wait(runner.submit("a", "tailor", lambda p, s: 1, lane="cuda").id, "a", 5)
    runner.wait(runner.submit("a", "tailor", lambda p, s: 1 / 0, lane="cuda").id, "a", 5)
    runner.wait(runner.submit("a", "tailor", lambda p, s: 1, lane="cpu").id, "a", 5)
    runner.shutdown()
    assert len(calls) == 2
    with pytest.raises(UserError, match="no gpu device"):
        JobRunner(["cpu"]).submit("a", "tailor", lambda p, s: 1, lane="gpu")


def test_history_is_newest_first_and_pruned(runner):
    ids = [runner.wait(runner.submit("a", "tailor", lambda p, s: i).id, "a", 5).id for i in range(8)]
    history = runner.history("a")
    assert [j.id for j in history] == ids[::-1][:5]


def test_forget_cancels_and_drops_an_owners_jobs(runner):
    job, release = blocker(runner, owner="a")
    queued = runner.submit("a", "tailor", lambda p, s: "never")
    runner.forget("a")
    assert queued.status == CANCELLED
    release.set()
    runner.wait(job.id, "a", 5)  # still reachable until it finishes
    runner.forget("a")
    assert runner.history("a") == []


def test_on_finish_sees_every_outcome():
    seen = []
    runner = JobRunner(["cpu"], on_finish=lambda job: seen.append((job.kind, job.status)))
    runner.wait(runner.submit("a", "compare", lambda p, s: 1).id, "a", 5)
    runner.wait(runner.submit("a", "export", lambda p, s: 1 / 0).id, "a", 5)
    runner.shutdown()
    assert seen == [("compare", DONE), ("export", FAILED)]


def test_shutdown_refuses_new_jobs():
    runner = JobRunner(["cpu"])
    runner.shutdown()
    with pytest.raises(UserError, match="shutting down"):
        runner.submit("a", "tailor", lambda p, s: 1)
