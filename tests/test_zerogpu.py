"""The dashboard's jobs run the ZeroGPU way, for real, on a CPU machine.

On a ZeroGPU Space `spaces.GPU` runs a GPU job in a forked worker and sends its result back
pickled (spaces/zero/wrappers.py). `run_in_fork` does the same with the same pieces: a
fork, spaces' SimpleQueue (torch sends CPU tensors through it as shared memory), OkResult,
and for an exception escaping the task only its class name. A Studio on the CPU gets a
"cuda" lane whose jobs go through gpu.on_gpu with this fork, so the studio's own jobs of
every kind that computes in a worker (`JobKind.in_worker`: warm-up, tailor, compare, sweep,
Find settings, fine-tune, continual, export) cross processes as on ZeroGPU, and loading a
pair stays in the main process.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pickle import PicklingError
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from PIL import Image
from spaces.utils import SimpleQueue
from spaces.zero.types import ExceptionResult, OkResult

from conftest import DEMO, ROOT, demo_available
from failing_jobs import fail_bug, fail_unpicklable_error, fail_user
from tailor_ui.app import gpu
from tailor_ui.errors import UserError
from tailor_ui.app.jobs import CANCELLED, DONE, FAILED, RUNNING, JobKind
from tailor_ui.app.session import PairHandle, SearchRun, SweepRun, TailorRun, TrainedModel

FORK = multiprocessing.get_context("fork")

pytestmark = pytest.mark.skipif(not demo_available(), reason="the demo pair is not built")


class ZeroGPUWorkerError(Exception):
    """What spaces raises for an exception that escaped the worker: its class name only."""


def run_in_fork(task):
    """`task()` in a forked worker, its result pickled back: spaces' regular_function_wrapper
    with the scheduling left out."""
    results: SimpleQueue = SimpleQueue()
    received = FORK.Event()

    def worker() -> None:
        torch.set_num_threads(1)  # as conftest: two threads per op fight on 2 cores

        def run_task() -> None:  # spaces runs it in a thread of the worker too
            try:
                res = OkResult(task())
            except Exception as exc:
                res = ExceptionResult(traceback.format_exc(), type(exc).__name__, None)
            try:
                results.put(res)
            except PicklingError as exc:
                results.put(ExceptionResult(traceback.format_exc(), type(exc).__name__, None))

        with ThreadPoolExecutor() as executor:
            executor.submit(run_task).result()
        # spaces' worker lives on: the parent fetches shared tensors from it while unpickling
        received.wait(60)

    process = FORK.Process(target=worker, daemon=True)
    process.start()
    try:
        res = results.get()
    finally:
        received.set()
        process.join(30)
    if isinstance(res, ExceptionResult):
        raise ZeroGPUWorkerError(res.error_cls)
    return res.value


GPU_WORKER_KINDS = [kind for kind in JobKind if kind.in_worker]


def wait_done(studio, job, timeout=120):
    job = studio.runner.wait(job.id, job.owner, timeout)
    assert job.status == DONE, job.error
    return job


@pytest.fixture(scope="module")
def zero(tmp_path_factory, model_root):
    """A CPU Studio whose demo pair sits on a "cuda" lane run through the fork, warmed up,
    and one result of every kind that runs in the GPU worker.

    On a machine with a GPU too: ZeroGPU's main process never holds a real CUDA context
    (spaces patches torch there: "cuda" tensors stay in host memory, a CUDA init raises),
    and a fork of a process that does could not use CUDA. So this module hides the GPU
    from the main process, as on a CPU machine, and the forks inherit that. `spaces`
    itself acts only where SPACES_ZERO_GPU is set: GPU() returns the function unchanged
    elsewhere and torch is not patched, with or without CUDA; what this file takes from
    it (SimpleQueue, OkResult, ExceptionResult) does not depend on the device."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        yield from _zero_studio(tmp_path_factory, model_root)


def _zero_studio(tmp_path_factory, model_root):
    from tailor_ui.app.service.studio import Studio, StudioConfig, default_settings

    root = tmp_path_factory.mktemp("zerogpu")
    forked: list[JobKind] = []  # the kind of every job that went through the fork

    def gpu_call(fn, kind):
        def fork(task):
            forked.append(kind)
            return run_in_fork(task)

        return gpu.on_gpu(fn, kind, fork=fork)

    config = StudioConfig(workdir=root / "work", demo_dir=DEMO, device="auto",
                          model_roots=[ROOT / "assets", model_root], calib_examples=32,
                          quick_examples=4, gpu_lane=True, gpu_call=gpu_call)
    studio = Studio(config)
    studio.start(background=False)
    try:
        assert studio.demo is not None, studio.demo_error
        assert studio.warm.wait(120), "the start-up merge did not finish"
        assert studio.demo.lane == "cuda" and studio.demo_device == "cpu"
        cache_at_start = len(studio.demo.pair.cache)  # before any job runs in this process
        session = studio.session("zerogpu-visitor")
        settings = default_settings(keep=0.05)
        tailor = wait_done(studio, studio.submit_tailor(session, settings))
        image_path, question = studio.demo.examples[0]
        image = Image.open(image_path).convert("RGB")  # read here: a fork shares open files
        results = {
            "tailor": tailor.result,
            "compare": studio.compare(session, image, question, max_new_tokens=8),
            "sweep": wait_done(studio, studio.submit_sweep(session, ["tailor"], [0.1], [],
                                                           examples=2)).result,
            "search": wait_done(studio, studio.submit_search(session, [0.1], [0.8], {},
                                                             examples=2)).result,
            "continual": wait_done(studio, studio.submit_continual(session, "full", examples=4,
                                                                   batch_size=4)).result,
        }
        finetune = wait_done(studio, studio.submit_finetune(session, "full", examples=8,
                                                            batch_size=8))
        results["finetune"] = session.trained[finetune.id]  # filed by on_finish
        results["export"] = studio.export(session, tailor.id, "model")
        yield SimpleNamespace(studio=studio, session=session, results=results, forked=forked,
                              cache_at_start=cache_at_start, settings=settings, image=image,
                              question=question, tailor_job=tailor, finetune_job=finetune)
    finally:
        studio.close()


def test_warm_up_runs_in_the_fork_and_is_filed_by_the_main_process(zero):
    demo = zero.studio.demo
    run = demo.default_run
    assert isinstance(run, TailorRun) and run.handle is demo and run.patch.num_entries > 0
    # the quick check's reference scores came back with the run and were filed once
    assert set(demo.reference_scores) == {"Pre-trained", "Fine-tuned"}
    assert demo.reference_scores == run.references
    # what the job cached on the pair stayed in the fork: here it was computed elsewhere
    assert zero.cache_at_start == 0 and not demo.batches


def test_tailor_in_the_fork_points_at_the_parents_pair_and_equals_in_process(zero):
    studio, session = zero.studio, zero.session
    run = zero.results["tailor"]
    assert run.handle is studio.demo and session.runs[zero.tailor_job.id] is run
    assert run.patch_file.is_file() and run.quick is not None
    assert run.references == studio.demo.reference_scores  # the fork reused the filed scores
    examples = list(studio.demo.calibration[: studio.config.calib_examples])
    here = studio._tailor_job(studio.demo, zero.settings, examples, "builtin", "here", None,
                              lambda *a: None, lambda: False)
    assert studio.demo.pair.cache  # in this process the scores are cached
    assert run.patch.tensors.keys() == here.patch.tensors.keys()
    for name, t in here.patch.tensors.items():
        assert torch.equal(run.patch.tensors[name].index, t.index), name
        assert torch.equal(run.patch.tensors[name].values, t.values), name
    pd.testing.assert_frame_equal(run.quick, here.quick)


def test_compare_sweep_finetune_export_come_back(zero):
    from tailor_ui.evaluation.generate import answer_one

    studio, session = zero.studio, zero.session
    answers = dict(zero.results["compare"])
    pair = studio.demo.pair
    assert answers["Pre-trained"] == answer_one(pair.base, pair.processor, zero.image,
                                                zero.question, 8)
    assert answers["Fine-tuned"] == answer_one(pair.finetuned[0], pair.processor, zero.image,
                                               zero.question, 8)
    assert zero.results["tailor"].label in answers

    sweep = zero.results["sweep"]
    assert isinstance(sweep, SweepRun) and sweep.csv_file.is_file()
    assert session.latest_sweep() is sweep and len(sweep.table) >= 3  # base, tuned, merge

    trained = zero.results["finetune"]
    assert isinstance(trained, TrainedModel) and trained.handle is studio.demo
    assert trained.losses and studio.finetune_losses(session, zero.finetune_job.id) == trained.losses
    # the trained model is its patch over the base, written by the GPU worker into the
    # session's folder; it answers in the next job's fork as it does here
    [(label, patch)] = trained.patches()
    assert label == trained.label and patch.path.is_relative_to(session.folder) and patch.num_entries
    again = dict(studio.compare(session, zero.image, zero.question, max_new_tokens=8))
    with studio.demo.patched(patch) as model:
        assert again[trained.label] == answer_one(model, pair.processor, zero.image, zero.question, 8)

    zipped = zero.results["export"]
    assert zipped.is_file() and zero.results["tailor"].model_zip == zipped  # filed here


def test_pairs_load_in_the_main_process(zero, disk_pair):
    studio = zero.studio
    fn = lambda progress, should_stop: None  # noqa: E731
    assert gpu.on_gpu(fn, JobKind.LOAD, fork=run_in_fork) is fn
    session = studio.session("zerogpu-loader")
    job = wait_done(studio, studio.submit_load(session, str(disk_pair / "base"),
                                               str(disk_pair / "ft"), device="auto"))
    assert job.lane == "cuda" and session.own is job.result
    assert session.own.key[0] == os.getpid()
    studio.use_demo(session)


def test_a_handle_made_in_the_worker_cannot_come_back(zero):
    demo = zero.studio.demo

    def make() -> PairHandle:
        return PairHandle(pair=demo.pair, label="made in the worker", shared=False, lane="cuda",
                          summary=demo.summary)

    with pytest.raises(LookupError, match=r"made in another process .* load pairs in the main"):
        run_in_fork(make)
    assert pickle.loads(pickle.dumps(demo)) is demo  # made here: it comes back as itself


def test_a_studio_job_failing_in_the_fork_keeps_its_message(zero):
    studio = zero.studio
    session = studio.session("zerogpu-lost-patch")
    run = wait_done(studio, studio.submit_tailor(session, zero.settings)).result
    run.patch = None  # dropped from memory, and its file is gone too
    run.patch_file.unlink()
    with pytest.raises(UserError, match="^patch file not found: patch.safetensors$"):
        studio.compare(session, zero.image, zero.question, max_new_tokens=8)
    job = studio.runner.history(session.id, "compare")[0]
    assert job.status == FAILED and job.error == "patch file not found: patch.safetensors"


def _run_a_second(progress, should_stop):
    """Stops early when it sees a cancel (which in the fork it never does)."""
    end = time.monotonic() + 1.0
    while time.monotonic() < end and not should_stop():
        time.sleep(0.01)
    return "done"


def test_progress_and_cancel_stay_outside_the_fork(zero):
    runner = zero.studio.runner
    job = runner.submit("cancelling", "tailor", _run_a_second, lane="cuda")
    stage = "running on a lent GPU (its progress shows when it ends)"
    deadline = time.monotonic() + 30
    while job.stage != stage and time.monotonic() < deadline:
        time.sleep(0.01)
    assert job.status == RUNNING and job.stage == stage
    runner.cancel(job.id, "cancelling")
    job = runner.wait(job.id, "cancelling", 30)
    # it ran its full second, then its result was dropped
    assert job.status == CANCELLED and job.result is None and job.run_seconds >= 1.0


def _unpicklable_result(progress, should_stop):
    return lambda: None


@pytest.mark.parametrize("fn, error", [
    (fail_user, "this pair has no built-in calibration set"),
    (fail_bug, "unexpected ZeroDivisionError: division by zero"),
    (fail_unpicklable_error, "unexpected RuntimeError: TwoArgs: stopped because of a test"),
    # the result cannot leave the worker: spaces sends back the class name only
    (_unpicklable_result, "unexpected ZeroGPUWorkerError: PicklingError"),
])
def test_a_failing_job_in_the_fork_ends_failed_with_its_message(zero, fn, error):
    runner = zero.studio.runner
    job = runner.wait(runner.submit("failing", "tailor", fn, lane="cuda").id, "failing", 60)
    assert job.status == FAILED and job.error == error


def test_every_kind_but_loading_computed_in_the_gpu_worker(zero):
    """Each studio job above went through spaces.GPU's fork, one kind at a time; every kind
    of the vocabulary that is not LOAD is among them."""
    assert set(zero.forked) == set(GPU_WORKER_KINDS) == set(JobKind) - {JobKind.LOAD}
    assert set(zero.results) == {str(kind) for kind in GPU_WORKER_KINDS}


@pytest.mark.parametrize("kind", GPU_WORKER_KINDS)
def test_every_result_of_a_gpu_worker_kind_pickles_with_the_pair_by_reference(zero, kind):
    result = zero.results[str(kind)]
    back = pickle.loads(pickle.dumps(result))
    handle = getattr(result, "handle", None)
    if handle is not None:
        assert back.handle is handle is zero.studio.demo
    if isinstance(result, TailorRun):
        assert back.patch.tensors.keys() == result.patch.tensors.keys()
        assert all(torch.equal(back.patch.tensors[n].values, t.values)
                   for n, t in result.patch.tensors.items())
    elif isinstance(result, TrainedModel):
        assert back.models == result.models and back.folder == result.folder  # its files, by path
    elif isinstance(result, SweepRun):
        pd.testing.assert_frame_equal(back.table, result.table)
    elif isinstance(result, SearchRun):
        pd.testing.assert_frame_equal(back.result.table, result.result.table)
        assert back.result.best == result.result.best and back.csv_file.is_file()
    elif isinstance(result, pd.DataFrame):  # the continual run's stage table
        assert len(result) > 0
        pd.testing.assert_frame_equal(back, result)
    else:
        assert back == result
