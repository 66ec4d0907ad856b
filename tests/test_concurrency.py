"""Many visitors at once: several gradio_client sessions tailor and compare at the same
time against the launched app. Each sees only its own jobs and files, the lane runs one
job at a time, everyone finishes; a full queue is a clear error for the visitor."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from conftest import hold_lane, tailor, wait
from tailor_ui.patch import load_patch

VISITORS = 3


def test_visitors_at_once_see_only_their_own_jobs_and_files(app, studio, tmp_path):
    clients = [Client(app.url, verbose=False, download_files=str(tmp_path / f"visitor{i}"))
               for i in range(VISITORS)]
    image, question = next((p, q) for p, q in studio.demo.examples if "target_eval" in p)
    start = threading.Barrier(VISITORS)
    seen: list[dict | None] = [None] * VISITORS
    failures: list[BaseException] = []

    def visit(i: int) -> None:
        try:
            client = clients[i]
            start.wait(30)  # everyone submits at once
            job_id = tailor(client, keep=0.03 + 0.01 * i)
            merged = wait(client, job_id, 180)
            answers = client.predict(handle_file(image), "question", question, api_name="/compare")
            patch = client.predict(job_id, api_name="/export_patch")
            seen[i] = {"job": job_id, "merged": merged, "answers": answers, "patch": patch,
                       "history": client.predict(api_name="/history")}
        except BaseException as exc:  # reported below, with the visitor's number
            failures.append(exc)

    threads = [threading.Thread(target=visit, args=(i,)) for i in range(VISITORS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not failures, failures
    assert all(s is not None for s in seen)

    histories = [{row["job"]: row for row in s["history"]} for s in seen]
    for s, history in zip(seen, histories):
        assert s["job"] in history and {row["kind"] for row in history.values()} == {"tailor", "compare"}
        assert all(row["status"] == "done" for row in history.values())
        assert load_patch(s["patch"]).num_entries == s["merged"]["result"]["patch_entries"]
        assert s["answers"][2]  # the merge answered
    for a, b in itertools.combinations(histories, 2):
        assert not set(a) & set(b)  # nobody sees another's jobs
    assert len({s["merged"]["result"]["patch_entries"] for s in seen}) == VISITORS

    # one lane, one job at a time: the visitors' jobs ran one after another
    states = [clients[i].predict(job_id, api_name="/job_status")
              for i, history in enumerate(histories) for job_id in history]
    spans = sorted((s["submitted"] + s["queued_s"], s["submitted"] + s["queued_s"] + s["run_s"])
                   for s in states)
    assert all(end <= next_start + 0.01 for (_, end), (next_start, _) in zip(spans, spans[1:]))

    # nobody can reach another's job or files
    for (i, owner), (j, other) in itertools.permutations(enumerate(seen), 2):
        intruder, job_id = clients[j], owner["job"]
        for args, api_name in (((job_id,), "/job_status"), ((job_id, 1), "/wait_job"),
                               ((job_id,), "/cancel_job")):
            with pytest.raises(AppError, match="no job"):
                intruder.predict(*args, api_name=api_name)
        with pytest.raises(AppError, match="no finished merge"):
            intruder.predict(job_id, api_name="/export_patch")


def sweep(client: Client) -> str:
    """A data-free sweep (WiSE-FT at one λ): queued like any heavy job."""
    job_id, _ = client.predict(["wise_ft"], "", "0.5", 0.8, 4, api_name="/sweep")
    return job_id


def test_a_full_queue_says_so(app, studio, monkeypatch):
    monkeypatch.setattr(studio.runner, "max_queued", 3)
    monkeypatch.setattr(studio.runner, "max_queued_per_owner", 2)
    alice, bob, carol = (Client(app.url, verbose=False) for _ in range(3))
    with hold_lane(studio):  # whatever they submit now waits
        waiting = [(alice, sweep(alice)), (alice, sweep(alice))]
        start = time.perf_counter()
        with pytest.raises(AppError, match=r"you already have 2 jobs waiting; wait for one to finish "
                                           r"or cancel one \(at most 2 per visitor\)"):
            sweep(alice)
        assert time.perf_counter() - start < 0.5  # refused at once, with the limit
        waiting.append((bob, sweep(bob)))
        start = time.perf_counter()
        with pytest.raises(AppError, match=r"the server's job queue is full \(3 jobs waiting, its "
                                           r"limit\); try again in 10 s"):
            tailor(carol)
        assert time.perf_counter() - start < 0.5
        # visitors in turn behind the running job: alice's first, bob's, then alice's second;
        # each told when to ask again
        status = [c.predict(j, api_name="/job_status") for c, j in waiting]
        assert [s["position"] for s in status] == [2, 4, 3]
        assert [s["retry_after"] for s in status] == [2.0, 4.0, 3.0]
        for client, job_id in waiting:
            assert client.predict(job_id, api_name="/cancel_job")["status"] == "cancelled"
    wait(carol, tailor(carol, keep=0.06))  # room again


def test_the_queue_keeps_no_per_event_analytics(app, client, monkeypatch):
    """Gradio's queue would rebuild a pandas table of its last 10,000 events after every
    event (for a monitoring page that is off): under 100 visitors a fifth of the server's
    CPU. Here no event builds it, and few events are kept for it."""
    queue = app.blocks._queue
    built = []
    monkeypatch.setattr(type(queue), "_get_df", staticmethod(lambda records: built.append(len(records))))
    for _ in range(3):
        client.predict(api_name="/history")
    assert built == [] and 0 < len(queue.event_analytics) <= 100
