"""The dashboard's shared state and the jobs behind its buttons (no Gradio here).

`Studio` holds what every visitor shares: the job runner (one lane per device), the
built-in demo pair (loaded once, read-only) and the session store. Its methods turn a
visitor's request into a background job (load, tailor, sweep, search, fine-tune) or run a short
job and wait for it (compare, export), always through the runner so one device does one
job at a time. What each job does lives in this package's other modules; the dashboard's
tab modules only translate widgets to these calls.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tailor_ui.app import gpu, workers
from tailor_ui.errors import UserError
from tailor_ui.app.jobs import DONE, FAILED, Job, JobKind, JobRunner
from tailor_ui.demo.sets import DEFAULT_STORY, STORIES
from tailor_ui.app.service import compare as compare_
from tailor_ui.app.service import evalsets as evalsets_
from tailor_ui.app.service import finetune as finetune_
from tailor_ui.app.service import pairs, tailor
from tailor_ui.app.service import search as search_
from tailor_ui.app.service import sweep as sweep_
from tailor_ui.app.service.config import SYSTEM, StudioConfig, default_settings, settings_label
from tailor_ui.app.service import export as export_
from tailor_ui.app.service.export import ExportKind
from tailor_ui.app.session import (PairHandle, SearchRun, Session, SessionStore, SweepRun, TailorRun,
                                   TrainedModel, every_pair_locked)

log = logging.getLogger(__name__)
IDLE_POLL_SECONDS = 3.0  # how often a page with no unfinished job polls


class Studio:
    def __init__(self, config: StudioConfig) -> None:
        import torch

        self.config = config
        config.workdir = Path(config.workdir)
        config.workdir.mkdir(parents=True, exist_ok=True)
        self.has_gpu = torch.cuda.is_available()
        device = config.device
        if device == "auto":
            device = "cuda" if self.has_gpu else "cpu"
        self.demo_device = device
        gpu_lane = self.has_gpu if config.gpu_lane is None else config.gpu_lane
        self.runner = JobRunner(["cpu", "cuda"] if gpu_lane else ["cpu"],
                                on_finish=self._on_finish, gpu_call=config.gpu_call or gpu.on_gpu,
                                workers=config.workers, fork_guard=every_pair_locked)
        self.sessions = SessionStore(config.workdir / "sessions", idle_seconds=config.idle_seconds)
        self.demo: PairHandle | None = None  # the default story, loaded at start
        self.stories: dict[str, PairHandle] = {}  # the other stories, loaded when first asked for
        self._stories_lock = threading.Lock()
        self.demo_error: str | None = None
        self.demo_seconds: float | None = None
        self.demo_ready = threading.Event()  # set when loaded or failed
        self.warm = threading.Event()  # set when the start-up merge is done (or skipped)
        self.warm_gate = threading.Event()  # the start-up merge waits for this (app.py: launched)
        self.warm_gate.set()
        self._stop_reaper = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- start-up ---------------------------------------------------------------------

    def start(self, *, background: bool = True) -> None:
        """Load the demo pair (in a thread unless told otherwise), then warm it up."""
        if background:
            threading.Thread(target=self._load_demo, daemon=True, name="demo-loader").start()
        else:
            self._load_demo()
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True, name="session-reaper")
        self._reaper.start()

    def _load_demo(self) -> None:
        start = time.perf_counter()
        try:
            gpu.emulate_cuda()  # this may be a thread of its own
            # the lane of the configured device: "auto" takes the cuda lane when there is one
            self.demo = pairs.load_demo_handle(self.config.demo_dir, self.demo_device,
                                         self.lane_for(self.config.device))
            self.demo_seconds = time.perf_counter() - start
            log.info("demo pair loaded in %.1f s", self.demo_seconds)
        except UserError as exc:
            self.demo_error = str(exc)
        except Exception as exc:  # keep the app up: visitors can still load their own pair
            log.exception("demo pair failed to load")
            self.demo_error = f"the demo pair failed to load ({type(exc).__name__}: {exc})"
        finally:
            self.demo_ready.set()
        if self.demo is not None and self.config.warm_up:
            self.warm_gate.wait()  # let the web server start first (app.py opens the gate)
            try:
                self._submit_warm_up(self.demo)
            except Exception:
                log.exception("the start-up merge could not be queued")
                self.warm.set()
        else:
            self.warm.set()

    def _submit_warm_up(self, handle: PairHandle) -> None:
        """Queue the default merge (the Tailor tab's defaults for this pair, so a first slider
        move re-thresholds its scores); _on_finish files it as the pair's default run."""
        settings = default_settings(compensation=tailor.default_compensation(handle))
        examples = list(handle.calibration[: self.config.calib_examples])
        anchor = tailor.anchor_examples(handle, settings.anchored)

        def job(progress, should_stop):
            return self._tailor_job(handle, settings, examples, "builtin", "warm-up", None,
                                    progress, should_stop, anchor=anchor)

        self._submit(SYSTEM, JobKind.TAILOR, handle, job, "warm-up: default merge")

    def lane_for(self, device: str) -> str:
        return "cuda" if device in ("cuda", "auto") and "cuda" in self.runner.lanes else "cpu"

    def health(self) -> dict[str, Any]:
        """What GET /healthz answers (container health checks, load balancers): cheap and
        never blocking, so it answers while a job runs or the demo pair loads."""
        if not self.demo_ready.is_set():
            demo = "loading"
        else:
            demo = "ready" if self.demo is not None else "unavailable"
        return {"status": "stopping" if self.runner.closed else "ok", "demo": demo,
                "jobs": self.runner.counts(), "device": self.demo_device,
                "lanes": list(self.runner.lanes), "gpu_mode": gpu.mode()}

    def poll_seconds(self, session: Session) -> float:
        """When the page should poll again: the soonest `retry_after` of the session's
        unfinished jobs; every second while the demo pair loads or warms up; else
        IDLE_POLL_SECONDS (a hundred idle pages must not poll the server every second)."""
        waits = [job.retry_after for job in self.runner.active(session.id)]
        if not self.warm.is_set():
            waits.append(1.0)
        return min(waits, default=IDLE_POLL_SECONDS)

    def close(self) -> None:
        self._stop_reaper.set()
        self.runner.shutdown(wait=True, timeout=5)

    def _reap_loop(self) -> None:
        while not self._stop_reaper.wait(300):
            for sid in self.sessions.expired():
                self.end_session(sid)

    def _submit(self, owner: str, kind: JobKind, handle: PairHandle, fn, label: str) -> Job:
        """Queue `fn` on the pair's lane; what it caches on the pair (scores a slider move
        re-thresholds, calibration batches) reaches the server's pair when it computes in a
        worker process."""
        return self.runner.submit(owner, kind, _keeping_caches(handle, fn), label=label,
                                  lane=handle.lane)

    def _on_finish(self, job: Job) -> None:
        """File what a finished job found on its pair, and its merge, sweep or fine-tuned
        model under its session. This runs in the main process: the job itself may have run
        in a fork, where whatever it set on shared objects stayed (workers.py, gpu.py). A
        worker that did not finish its job leaves nothing half-written behind."""
        if job.worker_pid is not None and job.status != DONE and job.started is not None:
            # its temporaries anywhere (an export of the start-up merge writes beside its
            # files, outside the session), and the run folders it made in its session
            workers.remove_dead_temporaries(self.config.workdir, job.worker_pid)
            session = self.sessions.peek(job.owner)
            if session is not None:
                workers.remove_dead_temporaries(session.folder, job.worker_pid, since=job.started)
        run = job.result if job.status == DONE and isinstance(job.result, TailorRun) else None
        if run is not None:  # the quick check's base / fine-tuned scores, per set
            for label, scores in run.references.items():
                run.handle.reference_scores.setdefault(label, {}).update(scores)
        if job.owner == SYSTEM:  # the start-up merge, the only system job
            if run is not None:
                try:  # with files, so the Export tab offers it too
                    export_.file_startup(run, self.config.workdir / f"start-up-{run.handle.key[1]}")
                except OSError:
                    log.exception("the start-up merge's files could not be written")
                run.handle.default_run = run
            self.warm.set()
            return
        session = self.sessions.peek(job.owner)
        if session is None:
            return
        self.record(session, job)

    def end_session(self, session_id: str) -> None:
        self.runner.forget(session_id)
        self.sessions.drop(session_id)

    # -- which pair a session works on ------------------------------------------------------

    def session(self, session_id: str | None) -> Session:
        return self.sessions.get(session_id)

    def demo_handle(self, story: str = DEFAULT_STORY, timeout: float = 60.0) -> PairHandle:
        if not self.demo_ready.wait(timeout):
            raise UserError("the demo pair is still loading; try again in a few seconds")
        if self.demo is None:
            raise UserError(self.demo_error or "the demo pair is not available")
        if story == DEFAULT_STORY:
            return self.demo
        with self._stories_lock:  # a few MB, loaded once and shared like the default
            if story not in self.stories:
                gpu.emulate_cuda()  # ZeroGPU: this web-server thread puts "cuda" models in host memory
                self.stories[story] = pairs.load_demo_handle(self.config.demo_dir, self.demo_device,
                                                             self.demo.lane, story)
            return self.stories[story]

    def handle_for(self, session: Session) -> PairHandle:
        """The session's own pair when it loaded one, else the shared demo pair."""
        if session.own is not None and not session.use_demo:
            return session.own
        if not session.use_demo and self.runner.active(session.id, JobKind.LOAD):
            raise UserError("your models are still loading (see the Models tab); wait for them or "
                            "use the demo pair")
        return self.demo_handle(session.demo_story)

    def use_demo(self, session: Session, story: str = DEFAULT_STORY) -> PairHandle:
        """Switch the session to one of the demo's stories (its fine-tune of the shared base)."""
        if story not in STORIES:
            raise UserError(f"unknown demo story {story!r} (choose from {', '.join(STORIES)})")
        handle = self.demo_handle(story)
        self._release_own(session)
        session.use_demo, session.demo_story = True, story
        return handle

    def _release_own(self, session: Session) -> None:
        """Let go of the visitor's own pair (and its merges, which reference it) so that
        its memory is freed."""
        handle = session.own
        if handle is None:
            return
        session.forget_handle(handle)
        for job in self.runner.history(session.id):  # finished jobs keep their results
            if job.is_finished and (job.result is handle or getattr(job.result, "handle", None) is handle):
                job.result = None
        session.own = None

    # -- loading a visitor's pair -------------------------------------------------------

    def submit_load(self, session: Session, base: str, finetuned: str, dtype: str = "float32",
                    device: str = "cpu") -> Job:
        roots = self.config.model_roots
        # refuse a bad request now, while the session still has its current pair
        pairs.check_load_request(base, finetuned, dtype, device, roots=roots, has_gpu=self.has_gpu)
        others = self.sessions.owned_pairs() - (session.own is not None)
        if others >= self.config.max_user_pairs:
            raise UserError(f"the server already holds {others} visitor-loaded pairs (its limit); "
                            "use the demo pair or try again later")
        lane = self.lane_for(device)
        released = threading.Event()

        def release() -> None:
            # the models' configs are read: from here on the visitor's pair makes room
            self._release_own(session)
            session.use_demo = False
            released.set()

        def job(progress, should_stop):
            try:
                handle = pairs.load_handle(base, finetuned, lane, progress, release, dtype=dtype,
                                           device=device, allowed_roots=roots)
            except BaseException:
                if released.is_set():
                    session.use_demo = True  # back to the demo pair rather than to nothing
                raise
            session.own, session.use_demo = handle, False
            return handle

        return self.runner.submit(session.id, JobKind.LOAD, job, label=f"load {base} + {finetuned}",
                                  lane=lane)

    # -- merging --------------------------------------------------------------------------

    def submit_tailor(self, session: Session, settings, *, calib_source: str = "builtin",
                      calib_files: Sequence[str] | None = None, calib_examples: int | None = None,
                      supersede: bool = False) -> Job:
        """Queue a merge of the session's pair; `supersede` cancels its unfinished merges
        (a slider moved again before the last run finished)."""
        from tailor_ui.methods import REGISTRY

        handle = self.handle_for(session)
        examples, source = [], ""
        if REGISTRY[settings.method].needs_calibration:
            examples, source = self._calibration_examples(session, handle, calib_source,
                                                          calib_files, calib_examples)
        sets = evalsets_.pair_sets(session, handle)
        anchor = tailor.anchor_examples(handle, settings.anchored, sets)  # refused now, not in the job
        sets = tailor.scored_sets(handle, sets, bool(examples) and calib_source != "upload")
        if supersede:
            for old in self.runner.active(session.id, JobKind.TAILOR):
                self.runner.cancel(old.id, session.id)
        label = settings_label(settings)

        def job(progress, should_stop):
            return self._tailor_job(handle, settings, examples, source, label, session,
                                    progress, should_stop, sets, anchor)

        return self._submit(session.id, JobKind.TAILOR, handle, job, label)

    def _calibration_examples(self, session: Session, handle: PairHandle, source: str,
                              files: Sequence[str] | None, n: int | None) -> tuple[list, str]:
        return tailor.calibration_examples(session, handle, source, files,
                                           int(n or self.config.calib_examples),
                                           self.config.max_upload_mb * 2**20)

    def _batches(self, handle: PairHandle, examples: list, source: str) -> list:
        return tailor.batches(handle, examples, source, self.config.calib_batch)

    def _tailor_job(self, handle: PairHandle, settings, examples: list, source: str, label: str,
                    session: Session | None, progress, should_stop, sets=None, anchor=()) -> TailorRun:
        return tailor.tailor_run(handle, settings, examples, source, label, session,
                                 batch_size=self.config.calib_batch,
                                 quick_examples=self.config.quick_examples, progress=progress,
                                 should_stop=should_stop, sets=sets, anchor=anchor)

    def record(self, session: Session, job: Job) -> None:
        """File a finished job's merge, sweep or fine-tuned model under its session, once.
        The runner's on_finish does it; `sync` repeats it for a job a poller or an API
        client sees done in the moment before on_finish ran."""
        filing = {JobKind.TAILOR: (TailorRun, session.add_run),
                  JobKind.SWEEP: (SweepRun, session.add_sweep),
                  JobKind.SEARCH: (SearchRun, session.add_search),
                  JobKind.FINETUNE: (TrainedModel, session.add_trained)}.get(job.kind)
        if filing is None or job.status != DONE:
            return
        kind, add = filing
        with session.lock:
            if job.id in session.filed or not isinstance(job.result, kind):
                return
            session.filed.add(job.id)
            job.result.job_id = job.id
            add(job.result)
            if isinstance(job.result, TrainedModel):
                session.live_losses.pop(job.id, None)
                job.result = job.result.summary()  # the session keeps the models, the history a summary

    def sync(self, session: Session, kind: JobKind) -> None:
        """File every finished job of `kind` (tailor, sweep, search, finetune) of the session."""
        for job in reversed(self.runner.history(session.id, kind)):
            self.record(session, job)

    # -- comparing ------------------------------------------------------------------------

    def compare(self, session: Session, image, question: str, *, max_new_tokens: int = 32,
                timeout: float = 600) -> list[tuple[str, str]]:
        """(model label, answer) for the base, each fine-tuned model and the session's merges
        (the latest of each method; the start-up merge when the session has none)."""
        if image is None:
            raise UserError("pick an example image or upload one")
        handle = self.handle_for(session)
        self.sync(session, JobKind.TAILOR)
        runs = compare_.compare_runs(session, handle)
        self.sync(session, JobKind.FINETUNE)
        trained = [m for t in session.trained_for(handle)[-2:][::-1] for m in t.patches()]
        question = (question or "").strip()

        def job(progress, should_stop):
            return compare_.answers(handle, runs, trained, image, question, max_new_tokens, progress)

        return self._run_and_wait(session, JobKind.COMPARE, handle, job, "compare answers", timeout)

    def eval_example(self, session: Session, name: str, number: int) -> tuple[str, str, list[str]]:
        """Example `number` (from 1) of one of the pair's evaluation sets, for Compare."""
        return evalsets_.example(session, self.handle_for(session), name, int(number))

    # -- evaluation sets --------------------------------------------------------------------

    def add_eval_set(self, session: Session, *, role: str, task: str | None, name: str = "",
                     files: Sequence[str] | None = None, dataset: str = "", split: str = "test",
                     columns: str = "") -> pd.DataFrame:
        """Add a visitor's set from uploaded files (a JSONL with its images, or a zip) or a
        `datasets` data set (a folder under the model folders, or a hub id); the sets table."""
        handle = self.handle_for(session)
        if files and dataset.strip():
            raise UserError("give uploaded files or a data set, not both")
        if dataset.strip():
            evalsets_.add_dataset(session, handle, dataset, split, columns, name, role, task,
                                  self.config.model_roots)
        else:
            evalsets_.add_upload(session, handle, files, name, role, task,
                                 self.config.max_upload_mb * 2**20)
        return self.eval_sets_table(session)

    def remove_eval_set(self, session: Session, name: str) -> pd.DataFrame:
        evalsets_.remove(session, self.handle_for(session), name)
        return self.eval_sets_table(session)

    def eval_sets_table(self, session: Session) -> pd.DataFrame:
        """The sets the session's pair is scored on (its built-in ones, then the visitor's)."""
        handle = None
        if self.demo_ready.is_set() or (session.own is not None and not session.use_demo):
            try:  # never waits: polling asks too
                handle = self.handle_for(session)
            except UserError:  # no pair (yet): the visitor's own sets
                pass
        return evalsets_.table(session, handle)

    def _run_and_wait(self, session: Session, kind: JobKind, handle: PairHandle, fn, label: str,
                      timeout: float) -> Any:
        job = self._submit(session.id, kind, handle, fn, label)
        job = self.runner.wait(job.id, session.id, timeout)
        if job.status == DONE:
            return job.result
        if job.status == FAILED:
            raise UserError(job.error or f"{kind} failed")
        if not job.is_finished:
            raise UserError(f"{kind} is still waiting behind other jobs ({job.stage}); see the history")
        raise UserError(f"{kind} was cancelled")

    # -- sweeps ---------------------------------------------------------------------------

    def submit_sweep(self, session: Session, methods: Sequence[str], keeps: Sequence[float],
                     lams: Sequence[float], *, alpha: float = 0.8, examples: int = 24,
                     hessians: str = "one-pass", calib_examples: int | None = None,
                     scope: str = "block", compensate: bool = True, calib_source: str = "builtin",
                     calib_files: Sequence[str] | None = None,
                     compensations: Sequence[str] | None = None) -> Job:
        """Queue a sweep on the pair's evaluation sets (built-in and the visitor's); Model
        Tailor calibrates on the pair's own target-task data (`tailor.pair_calibration`: a
        visitor's target sets are then scored on the share kept apart) or on uploaded files,
        and is swept over `compensations` (default: `tailor.sweep_compensations` of the pair)."""
        from tailor_ui.evaluation.sweep import sweep_grid
        from tailor_ui.methods import REGISTRY

        handle = self.handle_for(session)
        sets = evalsets_.pair_sets(session, handle)
        forms = list(compensations or tailor.sweep_compensations(handle, sets))
        grid = sweep_grid(methods, {"keep": keeps, "lam": lams, "alpha": [alpha]},
                          calibrated={"hessians": [hessians], "scope": [scope], "compensate": [compensate],
                                      "compensation": forms},
                          limit=sweep_.MAX_SWEEP_SETTINGS)
        anchor = tailor.anchor_examples(handle, any(s.anchored for s in grid), sets)
        sweep_.eval_sets(sets, int(examples))  # refused before an upload is unpacked
        self.sync(session, JobKind.FINETUNE)
        trained = [(t.method, name, patch) for t in session.trained_for(handle)
                   for name, patch in t.patches()]
        calibration = None
        if any(REGISTRY[s.method].needs_calibration for s in grid):
            calibration = self._calibration_examples(session, handle, calib_source, calib_files,
                                                     calib_examples)
        sets = tailor.scored_sets(handle, sets, calibration is not None and calib_source != "upload")
        original, target = sweep_.eval_sets(sets, int(examples))
        plan = sweep_.SweepPlan(grid, original, target, int(examples), trained, calibration, anchor)

        def job(progress, should_stop):
            return sweep_.sweep_run(handle, plan, session,
                                    lambda ex, source: self._batches(handle, ex, source),
                                    progress, should_stop)

        return self._submit(session.id, JobKind.SWEEP, handle, job, plan.label)

    # -- finding settings -----------------------------------------------------------------

    def submit_search(self, session: Session, keeps: Sequence[float], alphas: Sequence[float],
                      options: dict[str, Sequence[str]], *, methods: Sequence[str] = ("tailor",),
                      lams: Sequence[float] = (), examples: int = 16, holdout: float = 0.25,
                      calib_source: str = "builtin", calib_files: Sequence[str] | None = None,
                      calib_examples: int | None = None) -> Job:
        """Queue a search of which patch to use (`evaluation.search.candidate_grid`: Model
        Tailor's keep x alpha x options, the data-free `methods` on keep or λ) on the pair's
        original-task sets (`examples` each) and the held-out share of all its target-task
        examples; Model Tailor calibrates on `calib_examples` of the others."""
        handle = self.handle_for(session)
        sets = evalsets_.pair_sets(session, handle)
        search_.original_sets(sets)  # refused before an upload is unpacked
        calibration, _ = tailor.calibration_examples(session, handle, calib_source, calib_files, None,
                                                     self.config.max_upload_mb * 2**20, keep_apart=False)
        anchored = "tailor" in methods and "anchored" in options.get("compensation", ())
        anchor = tailor.anchor_examples(handle, anchored, sets)
        fit = self.config.calib_examples if calib_examples is None else int(calib_examples)
        plan = search_.search_plan(sets, keeps, alphas, options, int(examples), calibration,
                                   float(holdout), fit, sweep_.MAX_SWEEP_SETTINGS, anchor,
                                   methods=methods, lams=lams)

        def job(progress, should_stop):
            return search_.search_run(handle, plan, session, self.config.calib_batch, progress,
                                      should_stop)

        return self._submit(session.id, JobKind.SEARCH, handle, job, plan.label)

    # -- fine-tuning ----------------------------------------------------------------------

    def submit_finetune(self, session: Session, method: str = "full", *, examples: int = 32,
                        lr: float = 1e-3, epochs: int = 1, layers: str | int | None = None,
                        rho: float = 0.1, batch_size: int = 8, seed: int = 0,
                        tailor_after: bool = False, ema_beta: float = 0.99) -> Job:
        """Queue a fine-tuning run on a private copy of the pair's base model: the demo
        story's target task, freshly drawn training samples. The trained model (and,
        with `tailor_after`, Model Tailor's merge of it) joins the session's models."""
        from tailor_ui.training.finetune import METHODS

        handle = self.handle_for(session)
        if method not in METHODS:
            raise UserError(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
        if not handle.shared or not handle.eval_sets:
            raise UserError("the Fine-tune tab trains on the demo's target task: use the demo pair "
                            "(Models tab)")
        request = finetune_.checked_request(method, examples, lr, epochs, layers, rho, batch_size, seed,
                                            STORIES[session.demo_story].task, ema_beta)
        if tailor_after and not handle.calibration:
            raise UserError("Model Tailor needs the pair's calibration set, which it lacks")
        calib = list(handle.calibration[: self.config.calib_examples]) if tailor_after else []
        live: list[float] = []
        losses = _Losses(live)
        folder = session.folder / f"trained-{secrets.token_hex(6)}"  # its patches (made by the job)

        def job(progress, should_stop):
            def tailored(model, label):
                return finetune_.tailor_trained(handle, model, label, calib, self.config.calib_batch,
                                                progress, should_stop)

            return finetune_.finetune_run(handle, request, losses, tailored if tailor_after else None,
                                          folder, progress, should_stop)

        submitted = self._submit(session.id, JobKind.FINETUNE, handle, job,
                                 f"fine-tune: {request.label}")
        session.live_losses[submitted.id] = live
        return submitted

    def submit_continual(self, session: Session, method: str = "full", *, examples: int = 32,
                         lr: float = 1e-3, epochs: int = 1, layers: str | int | None = None,
                         ema_beta: float = 0.99, batch_size: int = 8, seed: int = 0) -> Job:
        """Queue a continual run on a private copy of the pair's base: the shapes world's
        default task sequence, `examples` per task; the job's result is the stage table."""
        from tailor_ui.demo.tasks import DEFAULT_SEQUENCE
        from tailor_ui.training.continual import ContinualMethod

        handle = self.handle_for(session)
        if not handle.shared:
            raise UserError("the continual run trains on the demo's shapes world: use the demo "
                            "pair (Models tab)")
        ContinualMethod.of(method)
        request = finetune_.checked_request(method, examples, lr, epochs, layers, 0.1, batch_size,
                                            seed, "continual", ema_beta)

        def job(progress, should_stop):
            return finetune_.continual_run(handle, request, DEFAULT_SEQUENCE, progress, should_stop)

        return self._submit(session.id, JobKind.CONTINUAL, handle, job, f"continual: {request.label}")

    def finetune_losses(self, session: Session, job_id: str) -> list[float]:
        """The losses of a fine-tuning job so far (all of them once it is done)."""
        trained = session.trained.get(job_id)
        if trained is not None:
            return trained.losses
        return list(session.live_losses.get(job_id, []))

    # -- export ---------------------------------------------------------------------------

    def export(self, session: Session, job_id: str | None, what: ExportKind | str, *,
               timeout: float = 600) -> Path:
        """The file for one of the session's merges (or its pair's start-up merge), by
        `ExportKind`: patch, report, model or adapter (zips, with their model cards)."""
        kind = ExportKind.of(what)
        self.sync(session, JobKind.TAILOR)
        run = export_.find_run(session, self.export_handle(session), job_id)
        scores = export_.known_scores(session, run)
        if kind is ExportKind.PATCH:
            return run.patch_file
        if kind is ExportKind.REPORT:
            return run.report_file
        if kind is ExportKind.ADAPTER:  # refitted on each request: seconds, and nothing kept per run
            return self._run_and_wait(session, JobKind.EXPORT, run.handle,
                                      lambda p, s: export_.adapter_zip(run, p, s, scores=scores),
                                      f"export adapter of {run.label}", timeout)
        if run.model_zip is not None and run.model_zip.is_file():
            return run.model_zip

        def job(progress, should_stop):
            return export_.model_zip(run, progress, should_stop, scores=scores)

        # filed here, not in the job: on ZeroGPU the job runs in a fork (gpu.py)
        run.model_zip = self._run_and_wait(session, JobKind.EXPORT, run.handle, job,
                                           f"export model of {run.label}", timeout)
        return run.model_zip

    def export_handle(self, session: Session) -> PairHandle | None:
        """The session's pair, whose start-up merge Export offers; None while there is none."""
        if session.own is None and not self.demo_ready.is_set():
            return None
        try:
            return self.handle_for(session)
        except UserError:
            return None


class _Losses(list):
    """A fine-tune's losses as the run appends them: each one reaches `target`, the
    server's list the page plots, also from a worker process (a `workers.Relay`)."""

    def __init__(self, target: list[float]) -> None:
        super().__init__()
        self._send = workers.Relay(target.append)

    def append(self, loss: float) -> None:
        self._send(loss)


def _keeping_caches(handle: PairHandle, fn):
    """`fn` as a job that, computed in a worker process, sends what it added to the pair's
    caches (scores, batches, the changed tensors) back to the server's pair (a
    `workers.Relay`; in the server they are there)."""
    keep = workers.Relay(functools.partial(_absorb_caches, handle))

    def job(progress, should_stop):
        known = _cache_sizes(handle)
        knew_changed = handle.pair.changed_if_known() is not None
        result = fn(progress, should_stop)
        if workers.in_worker():
            scores, batches = _learned(handle, known)
            # which tensors changed: one read of every fine-tuned tensor, done once per pair
            changed = None if knew_changed else handle.pair.changed_if_known()
            if scores or batches or changed is not None:
                keep(scores, batches, changed)
        return result

    return job


def _cache_sizes(handle: PairHandle) -> tuple[dict, set]:
    return {k: len(v) for k, v in handle.pair.cache.items()}, set(handle.batches)


def _learned(handle: PairHandle, known: tuple[dict, set]) -> tuple[dict, dict]:
    """The score cache entries that are new or grew since `known`, and the new batches."""
    sizes, batches = known
    scores = {k: v for k, v in handle.pair.cache.items() if len(v) > sizes.get(k, -1)}
    return scores, {k: v for k, v in handle.batches.items() if k not in batches}


def _absorb_caches(handle: PairHandle, scores: dict, batches: dict, changed: list[str] | None) -> None:
    with handle.lock:
        if changed is not None:
            handle.pair.remember_changed(changed)
        for key, entries in scores.items():
            # they crossed the pipe as ordinary memory: back on disk, as the engine keeps them
            handle.pair.cache.setdefault(key, {}).update(
                {name: e.on_disk() if hasattr(e, "on_disk") else e for name, e in entries.items()})
        handle.batches.update(batches)
        handle.trim_cache()
