"""The dashboard's shared state and the jobs behind its buttons (no Gradio here).

`Studio` holds what every visitor shares: the job runner (one lane per device), the
built-in demo pair (loaded once, read-only) and the session store. Its methods turn a
visitor's request into a background job (load, tailor, sweep) or run a short job and wait
for it (compare, export), always through the runner so one device does one job at a time.
The tab modules in this package only translate widgets to these calls.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from tailor_ui import gpu
from tailor_ui.data import Example, read_examples
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.jobs import DONE, FAILED, Job, JobRunner
from tailor_ui.session import (EvalSpec, PairHandle, Session, SessionStore, SweepRun, TailorRun,
                               TrainedModel)

log = logging.getLogger(__name__)
_LOSS = re.compile(r"loss ([-+0-9.eEinfa]+)$")  # the training loop's stage: "epoch 1/2: loss 1.234"

ROOT = Path(__file__).resolve().parents[2]
DEMO_DIR = ROOT / "assets" / "demo"
SYSTEM = "system"  # owner of the start-up jobs
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# the demo's evaluation files: name -> (metric family, role)
DEMO_SETS = {"caption": ("caption", "original"), "vqa": ("vqa", "original"),
             "target": ("vqa", "target")}
MAX_SWEEP_SETTINGS = 24
# Fine-tune tab: the shapes world's counting task (the demo's target skill), drawn from its
# training stream (the evaluation and calibration sets are streams 1 and 2 of build.py)
FINETUNE_TASK, FINETUNE_STREAM = "count", 0
MAX_FINETUNE_EXAMPLES = 2000
FINETUNE_METHOD_NAMES = {"full": "full-ft", "dowser": "dowser", "llaca": "llaca", "ema": "ema"}
FINETUNE_LABELS = {"full": "Full fine-tune", "dowser": "Model-Dowser", "llaca": "LLaCA",
                   "ema": "EMA"}
MAX_UPLOAD_BYTES = 512 * 2**20


@dataclass
class StudioConfig:
    """Everything a deployment may change (app.py reads these from the environment)."""

    workdir: Path
    demo_dir: Path | None = DEMO_DIR
    device: str = "auto"  # where the demo pair lives: auto = cuda when there is one
    model_roots: list[Path] = field(default_factory=list)  # local folders visitors may load
    max_user_pairs: int = 2  # pairs visitors may hold at once (memory)
    calib_examples: int = 64  # built-in calibration examples per run (default)
    calib_batch: int = 16
    max_upload_mb: int = 512  # per uploaded file (Gradio refuses more) and per calibration set
    quick_examples: int = 16  # examples per set in a merge's quick check (0 = off)
    warm_up: bool = True  # compute the default merge at start, so the first run is fast
    idle_seconds: float = 3 * 3600
    # the job runner's "cuda" lane and how its jobs are called (None: a cuda lane when torch
    # sees a GPU, called through gpu.on_gpu). tests/test_zerogpu.py gives a CPU machine a
    # cuda lane whose jobs run in a fork, as on ZeroGPU, with device "auto" for the demo
    gpu_lane: bool | None = None
    gpu_call: Callable | None = None


def default_settings(**overrides: Any):
    """The dashboard's defaults: the CLI's, except one-pass Hessians so that moving a
    slider after the first run re-thresholds cached scores instead of recomputing."""
    from tailor_ui.settings import Settings

    return Settings(**{"hessians": "one-pass", **overrides})


def settings_label(settings) -> str:
    """The sweep's readable label, relative to the dashboard's defaults (one-pass Hessians)."""
    from tailor_ui.evaluation.sweep import setting_label

    label = setting_label(settings).replace(" hessians=one-pass", "")
    if settings.method == "tailor" and settings.hessians == "sequential":
        label += " hessians=sequential"
    return label


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
                                on_finish=self._on_finish, gpu_call=config.gpu_call or gpu.on_gpu)
        self.sessions = SessionStore(config.workdir / "sessions", idle_seconds=config.idle_seconds)
        self.demo: PairHandle | None = None
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
            self.demo = load_demo_handle(self.config.demo_dir, self.demo_device,
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
        """Queue the default merge; _on_finish files it as the pair's default run."""
        settings = default_settings()
        examples = list(handle.calibration[: self.config.calib_examples])

        def job(progress, should_stop):
            return self._tailor_job(handle, settings, examples, "builtin", "warm-up", None,
                                    progress, should_stop)

        self.runner.submit(SYSTEM, "tailor", job, label="warm-up: default merge", lane=handle.lane)

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

    def close(self) -> None:
        self._stop_reaper.set()
        self.runner.shutdown(wait=True, timeout=5)

    def _reap_loop(self) -> None:
        while not self._stop_reaper.wait(300):
            for sid in self.sessions.expired():
                self.end_session(sid)

    def _on_finish(self, job: Job) -> None:
        """File what a finished job found on its pair, and its merge, sweep or fine-tuned
        model under its session. This runs in the main process: on ZeroGPU the job itself
        ran in a fork, where whatever it set on shared objects stayed (gpu.py)."""
        run = job.result if job.status == DONE and isinstance(job.result, TailorRun) else None
        if run is not None and not run.handle.reference_scores:
            run.handle.reference_scores = run.references
        if job.owner == SYSTEM:  # the start-up merge, the only system job
            if run is not None:
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

    def demo_handle(self, timeout: float = 60.0) -> PairHandle:
        if not self.demo_ready.wait(timeout):
            raise UserError("the demo pair is still loading; try again in a few seconds")
        if self.demo is None:
            raise UserError(self.demo_error or "the demo pair is not available")
        return self.demo

    def handle_for(self, session: Session) -> PairHandle:
        """The session's own pair when it loaded one, else the shared demo pair."""
        if session.own is not None and not session.use_demo:
            return session.own
        if not session.use_demo and self.runner.active(session.id, "load"):
            raise UserError("your models are still loading (see the Models tab); wait for them or "
                            "use the demo pair")
        return self.demo_handle()

    def use_demo(self, session: Session) -> PairHandle:
        handle = self.demo_handle()
        self._release_own(session)
        session.use_demo = True
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
        from tailor_ui.pair import DTYPES, check_local_pair, resolve_source

        roots = self.config.model_roots
        base_src = resolve_source(base, allowed_roots=roots)
        tuned_src = [resolve_source(s, allowed_roots=roots) for s in _split_models(finetuned)]
        if not tuned_src:
            raise UserError("no fine-tuned model given: enter a hub id (owner/name) or a local folder")
        # refuse a bad local pair now, while the session still has its current pair
        check_local_pair(base, _split_models(finetuned), allowed_roots=roots)
        if dtype not in DTYPES:
            raise UserError(f"unknown dtype {dtype!r}")
        if device == "cuda" and not self.has_gpu:
            raise UserError("there is no GPU on this server: choose cpu")
        others = self.sessions.owned_pairs() - (session.own is not None)
        if others >= self.config.max_user_pairs:
            raise UserError(f"the server already holds {others} visitor-loaded pairs (its limit); "
                            "use the demo pair or try again later")
        options = {"dtype": dtype, "device": device, "allowed_roots": roots}
        lane = self.lane_for(device)

        released = threading.Event()

        def job(progress, should_stop):
            try:
                return load(progress, should_stop)
            except BaseException:
                if released.is_set():
                    session.use_demo = True  # back to the demo pair rather than to nothing
                raise

        def load(progress, should_stop):
            from tailor_ui.pair import (Pair, check_match, check_same_architecture, load_model,
                                        model_type, summarize)

            steps = 3 + len(tuned_src)
            progress("reading the models' configs", 0, steps)
            base_type = model_type(base_src, allowed_roots=roots)
            for src in tuned_src:
                check_same_architecture(base_type, model_type(src, allowed_roots=roots))
            # a model that cannot be reached or read has been refused by now, with the
            # visitor's pair still in place; from here on it makes room for the new one
            self._release_own(session)
            session.use_demo = False
            released.set()
            progress(f"loading the base model {base}", 1, steps)
            base_model, processor = load_model(base_src, **options)
            tuned = []
            for i, (spec, src) in enumerate(zip(_split_models(finetuned), tuned_src), start=2):
                progress(f"loading the fine-tuned model {spec}", i, steps)
                model, _ = load_model(src, **options)
                check_match(base_model, model)
                tuned.append(model)
            progress("summarising what fine-tuning changed", steps - 1, steps)
            pair = Pair(base=base_model, finetuned=tuned, processor=processor,
                        base_id=base.strip(), finetuned_ids=_split_models(finetuned))
            handle = PairHandle(pair=pair, label=f"{base.strip()} + {finetuned.strip()}",
                                shared=False, lane=lane, summary=summarize(base_model, tuned[0]))
            session.own, session.use_demo = handle, False
            return handle

        return self.runner.submit(session.id, "load", job, label=f"load {base} + {finetuned}",
                                  lane=lane)

    # -- merging --------------------------------------------------------------------------

    def submit_tailor(self, session: Session, settings, *, calib_source: str = "builtin",
                      calib_files: Sequence[str] | None = None, calib_examples: int | None = None,
                      supersede: bool = False) -> Job:
        """Queue a merge of the session's pair; `supersede` cancels its unfinished merges
        (a slider moved again before the last run finished)."""
        from tailor_ui.methods import REGISTRY

        handle = self.handle_for(session)
        examples: list[Example] = []
        source = ""
        if REGISTRY[settings.method].needs_calibration:
            examples, source = self._calibration_examples(session, handle, calib_source,
                                                          calib_files, calib_examples)
        if supersede:
            for old in self.runner.active(session.id, "tailor"):
                self.runner.cancel(old.id, session.id)
        label = settings_label(settings)

        def job(progress, should_stop):
            return self._tailor_job(handle, settings, examples, source, label, session,
                                    progress, should_stop)

        return self.runner.submit(session.id, "tailor", job, label=label, lane=handle.lane)

    def _calibration_examples(self, session: Session, handle: PairHandle, source: str,
                              files: Sequence[str] | None, n: int | None
                              ) -> tuple[list[Example], str]:
        n = int(n or self.config.calib_examples)
        if n < 1:
            raise UserError("use at least one calibration example")
        if source == "upload":
            if not files:
                raise UserError("upload a calibration JSONL file (with its images, or a .zip)")
            folder = session.new_dir(f"calibration-{_digest(files)}")
            try:
                path = import_examples(files, folder, self.config.max_upload_mb * 2**20)
                examples = read_examples(path)[:n]
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)  # a refused upload leaves nothing behind
                raise
            return examples, f"upload:{folder.name}"  # named by the files' digest
        if not handle.calibration:
            raise UserError("this pair has no built-in calibration set: upload a target-task JSONL")
        return list(handle.calibration[:n]), "builtin"

    def _batches(self, handle: PairHandle, examples: list[Example], source: str) -> list:
        from tailor_ui.calibration import calibration_batches

        key = (source, len(examples), self.config.calib_batch)
        if key not in handle.batches:
            handle.batches[key] = calibration_batches(handle.pair.processor, examples,
                                                      self.config.calib_batch)
        return handle.batches[key]

    def _tailor_job(self, handle: PairHandle, settings, examples: list[Example], source: str,
                    label: str, session: Session | None, progress, should_stop) -> TailorRun:
        from tailor_ui.engine import run_method
        from tailor_ui.patch import save_patch

        start = time.perf_counter()
        with handle.lock:
            handle.trim_cache()
            calibration = None
            if examples:
                progress("preparing the calibration data", 0, 1)
                batches = self._batches(handle, examples, source)
                calibration = [batches] * len(handle.pair.finetuned)
            result = run_method(handle.pair, settings, calibration, progress=progress,
                                should_stop=should_stop)
            quick, references = self._quick_check(handle, result.patch, progress, should_stop)
        seconds = time.perf_counter() - start
        report = dict(result.report)
        report["calibration"] = {"source": source, "examples": len(examples)}
        if quick is not None:
            report["quick_check"] = quick.to_dict(orient="records")
        run = TailorRun(job_id="", label=label, settings=settings.to_dict(), patch=result.patch,
                        report=report, handle=handle, quick=quick, references=references,
                        seconds=seconds)
        if session is not None:
            folder = session.new_dir(f"run-{hashlib.sha1(f'{time.time()}{label}'.encode()).hexdigest()[:10]}")
            run.patch_file = folder / "patch.safetensors"
            run.report_file = folder / "report.json"
            save_patch(result.patch, run.patch_file)
            with atomic_path(run.report_file) as tmp:
                tmp.write_text(json.dumps(_jsonable(report), indent=2), encoding="utf-8")
        return run

    def _quick_check(self, handle: PairHandle, patch, progress, should_stop
                     ) -> tuple[pd.DataFrame | None, dict[str, dict[str, float]]]:
        """Score base, fine-tuned and the merge on a few examples of each built-in set; the
        table and the base / fine-tuned scores (computed once per pair: see _on_finish)."""
        n = self.config.quick_examples
        if not n or not handle.eval_sets:
            return None, {}
        from tailor_ui.evaluation.evaluate import evaluate

        sets = [(s, list(s.examples[:n])) for s in handle.eval_sets]

        def scores(model) -> dict[str, float]:
            out = {}
            for spec, examples in sets:
                if should_stop():
                    from tailor_ui.control import Cancelled

                    raise Cancelled
                out[spec.name] = evaluate(model, handle.pair.processor, examples, spec.task,
                                          batch_size=n).score
            return out

        progress(f"quick check on {n} examples per task", 0, 1)
        with handle.lock:
            references = handle.reference_scores or {
                "Pre-trained": scores(handle.pair.base), "Fine-tuned": scores(handle.pair.finetuned[0])}
            with handle.patched(patch) as model:
                merged = scores(model)
        return quick_table(handle, references, merged), references

    def record(self, session: Session, job: Job) -> None:
        """File a finished job's merge, sweep or fine-tuned model under its session, once.
        The runner's on_finish does it; `sync` repeats it for a job a poller or an API
        client sees done in the moment before on_finish ran."""
        filing = {"tailor": (TailorRun, session.add_run), "sweep": (SweepRun, session.add_sweep),
                  "finetune": (TrainedModel, session.add_trained)}.get(job.kind)
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

    def sync(self, session: Session, kind: str) -> None:
        """File every finished job of `kind` ("tailor", "sweep", "finetune") of the session."""
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
        self.sync(session, "tailor")
        runs = compare_runs(session, handle)
        self.sync(session, "finetune")
        trained = [m for t in session.trained_for(handle)[-2:][::-1] for m in t.models]
        question = (question or "").strip()

        def job(progress, should_stop):
            from tailor_ui.evaluation.generate import answer_one

            pair = handle.pair
            total = 1 + len(pair.finetuned) + len(runs) + len(trained)
            answers = []
            with handle.lock:
                progress("answering with the pre-trained model", 0, total)
                answers.append(("Pre-trained", answer_one(pair.base, pair.processor, image,
                                                          question, max_new_tokens)))
                for k, model in enumerate(pair.finetuned):
                    name = "Fine-tuned" if len(pair.finetuned) == 1 else f"Fine-tuned {pair.finetuned_ids[k]}"
                    progress(f"answering with {name}", 1 + k, total)
                    answers.append((name, answer_one(model, pair.processor, image, question,
                                                     max_new_tokens)))
                for i, run in enumerate(runs):
                    progress(f"answering with {run.label}", 1 + len(pair.finetuned) + i, total)
                    with handle.patched(run.get_patch()) as model:
                        answers.append((run.label, answer_one(model, pair.processor, image,
                                                              question, max_new_tokens)))
            for j, (name, model) in enumerate(trained):  # private copies: no lock needed
                progress(f"answering with {name}", total - len(trained) + j, total)
                answers.append((name, answer_one(model, pair.processor, image, question,
                                                 max_new_tokens)))
            return answers

        return self._run_and_wait(session, "compare", job, "compare answers", handle.lane, timeout)

    def _run_and_wait(self, session: Session, kind: str, fn, label: str, lane: str,
                      timeout: float) -> Any:
        job = self.runner.submit(session.id, kind, fn, label=label, lane=lane)
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
                     scope: str = "block", compensate: bool = True) -> Job:
        from tailor_ui.evaluation.sweep import EvalSet, sweep
        from tailor_ui.methods import REGISTRY

        handle = self.handle_for(session)
        if not handle.eval_sets:
            raise UserError("this pair has no evaluation sets; the sweep needs the demo pair's "
                            "built-in sets")
        grid = sweep_settings(methods, keeps, lams, alpha=alpha, hessians=hessians, scope=scope,
                              compensate=compensate)
        n = int(examples)
        if n < 1:
            raise UserError("use at least one example per evaluation set")
        original = [EvalSet(s.name, s.task, list(s.examples[:n])) for s in handle.eval_sets
                    if s.role == "original"]
        target = [EvalSet(s.name, s.task, list(s.examples[:n])) for s in handle.eval_sets
                  if s.role == "target"]
        needs_calib = any(REGISTRY[s.method].needs_calibration for s in grid)
        self.sync(session, "finetune")
        trained = [(t.method, name, model) for t in session.trained_for(handle)
                   for name, model in t.models]
        calib_examples_list, source = ([], "")
        if needs_calib:
            calib_examples_list, source = self._calibration_examples(session, handle, "builtin",
                                                                     None, calib_examples)

        def job(progress, should_stop):
            from tailor_ui.engine import run_method

            start = time.perf_counter()
            with handle.lock:
                handle.trim_cache()
                calibration = None
                if needs_calib:
                    batches = self._batches(handle, calib_examples_list, source)
                    calibration = [batches] * len(handle.pair.finetuned)
                table = sweep(handle.pair, grid, original, target, calibration,
                              batch_size=max(n, 1), progress=progress, should_stop=should_stop)
                if trained:
                    table = trained_rows(handle, table, trained, original, target, n, progress,
                                         should_stop)
                shown = next((s for s in grid if s.method == "tailor"), None) or next(
                    (s for s in grid if s.method in ("magnitude", "ties", "dare")), None)
                report, shown_label = None, ""
                if shown is not None:
                    progress("mapping where the patch lives", 0, 1)
                    report = run_method(handle.pair, shown, calibration,
                                        should_stop=should_stop).report
                    linear = set(handle.summary.loc[handle.summary["linear"], "name"])
                    report = {**report, "tensors": {n: t for n, t in report["tensors"].items()
                                                    if n in linear}}
                    shown_label = settings_label(shown)
            folder = session.new_dir(f"sweep-{int(time.time() * 1000)}")
            csv_file = folder / "forgetting.csv"
            with atomic_path(csv_file) as tmp:
                table.to_csv(tmp, index=False)
            return SweepRun(job_id="", table=table, csv_file=csv_file, heatmap_report=report,
                            heatmap_label=shown_label, seconds=time.perf_counter() - start)

        label = f"sweep: {len(grid)} settings x {len(original) + len(target)} sets x {n} examples"
        if trained:
            label += f" (+{len(trained)} fine-tuned here)"
        return self.runner.submit(session.id, "sweep", job, label=label, lane=handle.lane)

    # -- fine-tuning ----------------------------------------------------------------------

    def submit_finetune(self, session: Session, method: str = "full", *, examples: int = 32,
                        lr: float = 1e-3, epochs: int = 1, layers: str | int | None = None,
                        rho: float = 0.1, batch_size: int = 8, seed: int = 0,
                        tailor_after: bool = False) -> Job:
        """Queue a fine-tuning run on a private copy of the pair's base model: the demo's
        target task (counting), freshly drawn training samples. The trained model (and,
        with `tailor_after`, Model Tailor's merge of it) joins the session's models."""
        from tailor_ui.training.finetune import METHODS, _check_options, parse_layers

        handle = self.handle_for(session)
        if method not in METHODS:
            raise UserError(f"unknown fine-tuning method {method!r} (choose from {', '.join(METHODS)})")
        if not handle.shared or not handle.eval_sets:
            raise UserError("the Fine-tune tab trains on the demo's counting task: use the demo pair "
                            "(Models tab)")
        n, epochs, batch_size = int(examples), int(epochs), int(batch_size)
        if not 1 <= n <= MAX_FINETUNE_EXAMPLES:
            raise UserError(f"use between 1 and {MAX_FINETUNE_EXAMPLES} training examples")
        _check_options(method, float(lr), epochs, batch_size, float(rho), "code", 0.99, 0.0, 0)
        layer_spec = parse_layers(str(layers).strip()) if layers not in (None, "") else None
        if tailor_after and not handle.calibration:
            raise UserError("Model Tailor needs the pair's calibration set, which it lacks")
        settings = {"method": method, "examples": n, "lr": float(lr), "epochs": epochs,
                    "layers": layers or "last half", "batch_size": batch_size, "seed": int(seed),
                    **({"rho": float(rho)} if method == "dowser" else {})}
        label = (f"{FINETUNE_LABELS[method]} lr={float(lr):g} epochs={epochs} n={n}"
                 + (f" rho={float(rho):g}" if method == "dowser" else ""))
        live: list[float] = []
        calib = list(handle.calibration[: self.config.calib_examples]) if tailor_after else []

        def job(progress, should_stop):
            import copy

            from tailor_ui.demo import world
            from tailor_ui.training.finetune import finetune

            start = time.perf_counter()
            progress(f"drawing {n} counting examples", 0, 1)
            # the training stream, with a seed offset so the draw is not the demo's own
            # fine-tuning set (built from seed 0) either
            samples = world.generate(FINETUNE_TASK, n, int(seed) + 1000, FINETUNE_STREAM)
            with handle.lock:  # the shared base is only ever patched under its lock
                model = copy.deepcopy(handle.pair.base)

            def report(stage: str, done: int, total: int) -> None:
                match = _LOSS.search(stage)
                if match:
                    live.append(float(match.group(1)))
                progress(stage, done, total)

            result = finetune(model, handle.pair.processor, samples, method=method,
                              layers=layer_spec, lr=float(lr), epochs=epochs,
                              batch_size=batch_size, seed=int(seed), rho=float(rho),
                              progress=report, should_stop=should_stop)
            live[:] = result.losses
            models = [(label, model)]
            if tailor_after:
                models.append((f"Model Tailor on {label}",
                               self._tailor_trained(handle, model, label, calib, progress,
                                                    should_stop)))
            return TrainedModel(job_id="", label=label, method=method, settings=settings,
                                report=result.to_dict(), models=models, handle=handle,
                                seconds=time.perf_counter() - start)

        job_ = self.runner.submit(session.id, "finetune", job, label=f"fine-tune: {label}",
                                  lane=handle.lane)
        session.live_losses[job_.id] = live
        return job_

    def _tailor_trained(self, handle: PairHandle, model, label: str, examples: list[Example],
                        progress, should_stop):
        """Model Tailor's merge of a model fine-tuned here into the base (a new copy)."""
        import copy

        from tailor_ui.engine import run_method
        from tailor_ui.pair import Pair
        from tailor_ui.patch import apply_patch

        with handle.lock:
            progress("Model Tailor on the fine-tuned model: calibration data", 0, 1)
            batches = self._batches(handle, examples, "builtin")
            pair = Pair(base=handle.pair.base, finetuned=[model], processor=handle.pair.processor,
                        base_id=handle.pair.base_id, finetuned_ids=[label])
            result = run_method(pair, default_settings(), [batches], progress=progress,
                                should_stop=should_stop)
            tailored = copy.deepcopy(handle.pair.base)
        apply_patch(tailored, result.patch)
        return tailored

    def finetune_losses(self, session: Session, job_id: str) -> list[float]:
        """The losses of a fine-tuning job so far (all of them once it is done)."""
        trained = session.trained.get(job_id)
        if trained is not None:
            return trained.losses
        return list(session.live_losses.get(job_id, []))

    # -- export ---------------------------------------------------------------------------

    def export(self, session: Session, job_id: str | None, what: str, *,
               timeout: float = 600) -> Path:
        """The file for one of the session's merges: patch, report or model (zip)."""
        self.sync(session, "tailor")
        run = session.run(job_id) if job_id else session.latest_run()
        if run is None:
            raise UserError("run a merge first (Tailor tab)")
        if what == "patch":
            return run.patch_file
        if what == "report":
            return run.report_file
        if what != "model":
            raise UserError(f"unknown export {what!r}: patch, report or model")
        if run.model_zip is not None and run.model_zip.is_file():
            return run.model_zip
        handle = run.handle

        def job(progress, should_stop):
            folder = run.patch_file.parent
            target = folder / "tailored-model.zip"
            # the folder is only the zip's source: a scratch folder, gone however the job ends
            with tempfile.TemporaryDirectory(prefix=".model-", dir=folder) as scratch:
                model_dir = Path(scratch)
                progress("writing the tailored model", 0, 2)
                with handle.patched(run.get_patch()) as model:
                    model.save_pretrained(model_dir, max_shard_size="2GB")
                handle.pair.processor.save_pretrained(model_dir)
                (model_dir / "tailor_report.json").write_text(
                    json.dumps(_jsonable(run.report), indent=2), encoding="utf-8")
                if should_stop():
                    return None
                progress("zipping", 1, 2)
                with atomic_path(target) as tmp:
                    zip_folder(model_dir, tmp, "tailored-model")
            return target

        # filed here, not in the job: on ZeroGPU the job runs in a fork (gpu.py)
        run.model_zip = self._run_and_wait(session, "export", job, f"export model of {run.label}",
                                           handle.lane, timeout)
        return run.model_zip


# -- helpers ----------------------------------------------------------------------------


def load_demo_handle(demo_dir: Path | None, device: str, lane: str) -> PairHandle:
    """The demo pair with its calibration and evaluation sets, ready to share."""
    from tailor_ui.pair import load_pair, summarize

    if demo_dir is None:
        raise UserError("no demo pair configured")
    demo_dir = Path(demo_dir)
    if not (demo_dir / "base" / "config.json").is_file() or not (demo_dir / "finetuned" / "config.json").is_file():
        raise UserError(f"the demo pair is not built ({demo_dir.name}/base and finetuned are missing): "
                        "run `python -m tailor_ui demo build`")
    pair = load_pair(str(demo_dir / "base"), str(demo_dir / "finetuned"), device=device)
    pair.base_id, pair.finetuned_ids = "demo/base", ["demo/finetuned"]
    calibration: tuple[Example, ...] = ()
    if (demo_dir / "target_calib.jsonl").is_file():
        calibration = tuple(read_examples(demo_dir / "target_calib.jsonl", check_images=False))
    sets = demo_sets(demo_dir)
    return PairHandle(pair=pair, label="built-in demo pair (shapes world, mini-LLaVA)", shared=True,
                      lane=lane, summary=summarize(pair.base, pair.finetuned[0]),
                      calibration=calibration, eval_sets=tuple(sets),
                      examples=tuple(_examples(sets)))


def demo_sets(demo_dir: Path | None) -> list[EvalSpec]:
    """The demo's evaluation sets that exist on disk (images are checked when used)."""
    sets = []
    for name, (task, role) in DEMO_SETS.items():
        path = Path(demo_dir) / f"{name}_eval.jsonl" if demo_dir else None
        if path is not None and path.is_file():
            sets.append(EvalSpec(name=name, task=task, role=role,
                                 examples=tuple(read_examples(path, check_images=False))))
    return sets


def _examples(sets: Sequence[EvalSpec]) -> list[tuple[str, str]]:
    rows = []
    for spec in sets:
        for ex in spec.examples[: 2 if spec.task == "caption" else 3]:
            rows.append((str(ex.image), ex.question))
    return rows


def demo_examples(demo_dir: Path | None) -> list[tuple[str, str]]:
    """(image path, question) pairs for the Compare tab; empty when there is no demo."""
    try:
        return _examples(demo_sets(demo_dir))
    except UserError:
        return []


def quick_table(handle: PairHandle, references: dict[str, dict[str, float]],
                merged: dict[str, float]) -> pd.DataFrame:
    rows = [{"model": name, **scores} for name, scores in references.items()]
    rows.append({"model": "This merge", **merged})
    table = pd.DataFrame(rows)
    base, tuned = references["Pre-trained"], references["Fine-tuned"]
    originals = [s.name for s in handle.eval_sets if s.role == "original"]
    targets = [s.name for s in handle.eval_sets if s.role == "target"]

    def retention(row: pd.Series, names: list[str], ref: dict[str, float]) -> float:
        ratios = [row[n] / ref[n] for n in names if ref.get(n)]
        return float(sum(ratios) / len(ratios)) if ratios else float("nan")

    table["original retention"] = [retention(r, originals, base) for _, r in table.iterrows()]
    table["target retention"] = [retention(r, targets, tuned) for _, r in table.iterrows()]
    return table


def compare_runs(session: Session, handle: PairHandle, limit: int = 4) -> list[TailorRun]:
    """The latest merge of each method (newest first), or the start-up merge."""
    seen, runs = set(), []
    for run in reversed(list(session.runs.values())):
        if run.handle is not handle:
            continue
        method = run.settings.get("method")
        if method not in seen:
            seen.add(method)
            runs.append(run)
    if not runs and handle.default_run is not None:
        runs.append(replace(handle.default_run, label=f"{handle.default_run.label} (default)"))
    # Model Tailor first: it is the "tailored" column
    runs.sort(key=lambda r: r.settings.get("method") != "tailor")
    return runs[:limit]


def trained_rows(handle: PairHandle, table: pd.DataFrame, trained, original, target, n: int,
                 progress, should_stop) -> pd.DataFrame:
    """The sweep's table with a row per model fine-tuned in the session, scored on the same
    sets and examples (retention and H-score recomputed against the same references)."""
    from tailor_ui.control import Cancelled
    from tailor_ui.evaluation.evaluate import evaluate
    from tailor_ui.evaluation.sweep import _summarize, changed_fraction, score_column

    rows = []
    sets = [*original, *target]
    for i, (method, name, model) in enumerate(trained):
        row = {"kind": "trained", "setting": name, "keep": None, "alpha": None, "lam": None,
               "method": ("tailor-ft" if name.startswith("Model Tailor on ")
                          else FINETUNE_METHOD_NAMES.get(method, method)),
               "patch_fraction": changed_fraction(handle.pair.base, model),
               "linear_fraction": None, "seconds": math.nan}
        seconds = 0.0
        for s in sets:
            if should_stop():
                raise Cancelled
            progress(f"evaluating {name} on {s.name}", i, len(trained))
            result = evaluate(model, handle.pair.processor, s.examples, s.task,
                              batch_size=max(n, 1), max_new_tokens=s.max_new_tokens)
            row[score_column(s.name)] = result.score
            seconds += result.seconds
        row["eval_seconds"] = seconds
        rows.append(row)
    return _summarize(pd.concat([table, pd.DataFrame(rows)], ignore_index=True), original, target)


def sweep_settings(methods: Sequence[str], keeps: Sequence[float], lams: Sequence[float], *,
                   alpha: float = 0.8, hessians: str = "one-pass", scope: str = "block",
                   compensate: bool = True) -> list:
    from tailor_ui.settings import Settings

    if not methods:
        raise UserError("choose at least one method for the sweep")
    grid = []
    for method in methods:
        if method in ("wise_ft", "task_arithmetic"):
            if not lams:
                raise UserError(f"{method} needs at least one λ value")
            grid += [Settings(method=method, lam=float(lam)) for lam in lams]
        else:
            if not keeps:
                raise UserError(f"{method} needs at least one keep value")
            for keep in keeps:
                extra = {"alpha": alpha, "hessians": hessians, "scope": scope,
                         "compensate": compensate} if method == "tailor" else {}
                grid.append(Settings(method=method, keep=float(keep), **extra))
    if len(grid) > MAX_SWEEP_SETTINGS:
        raise UserError(f"{len(grid)} settings is too many for one sweep (at most {MAX_SWEEP_SETTINGS})")
    return grid


def parse_numbers(text: str | Sequence[float] | None, name: str, *, low: float = 0.0,
                  high: float = 1.0) -> list[float]:
    """'0.05, 0.1 0.2' -> [0.05, 0.1, 0.2], each checked to lie in [low, high]."""
    if text is None:
        return []
    if not isinstance(text, str):
        values = [float(v) for v in text]
    else:
        values = []
        for part in text.replace(";", ",").replace(" ", ",").split(","):
            if not part.strip():
                continue
            try:
                values.append(float(part))
            except ValueError:
                raise UserError(f"{name}: {part.strip()!r} is not a number") from None
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise UserError(f"{name}: {bad[0]} is outside [{low:g}, {high:g}]")
    return list(dict.fromkeys(values))


def import_examples(files: Sequence[str], folder: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> Path:
    """Bring an uploaded data set (a .zip, or a JSONL with its images) into `folder`.

    Images are matched to the JSONL's `image` fields by their relative path or, failing
    that, by file name, so uploading `data.jsonl` with `img1.png`, `img2.png` works.
    Returns the path of the JSONL to read (every problem is a `UserError`); it keeps the
    uploaded file's name and line numbers, so that read_examples' messages point into it.
    """
    paths = [Path(f) for f in files if f]
    total = sum(p.stat().st_size for p in paths if p.is_file())
    if total > max_bytes:
        raise UserError(f"the upload is too large ({total / 2**20:.1f} MB; at most "
                        f"{max_bytes / 2**20:g} MB)")
    zips = [p for p in paths if p.suffix.lower() == ".zip"]
    if zips:
        _extract_zip(zips[0], folder, max_bytes)
        found = sorted(folder.rglob("*.jsonl"))
        if not found:
            raise UserError(f"{zips[0].name} holds no .jsonl file")
        return found[0]
    jsonl = [p for p in paths if p.suffix.lower() == ".jsonl"]
    if len(jsonl) != 1:
        raise UserError("upload exactly one .jsonl file with its images (or one .zip)")
    images = {p.name: p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES}
    source, lines = jsonl[0], []
    for lineno, line in enumerate(source.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as exc:
            raise UserError(f"{source.name} line {lineno}: not valid JSON ({exc.msg})") from None
        if isinstance(row, dict) and isinstance(row.get("image"), str) and row["image"]:
            name = Path(row["image"]).name
            if name not in images:
                raise UserError(f"{source.name} line {lineno}: image not found: {row['image']} "
                                "(it was not uploaded)")
            shutil.copyfile(images[name], folder / name)
            line = json.dumps({**row, "image": name})
        lines.append(line)  # every line, blank ones too: line numbers stay the user's
    target = folder / source.name
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return target


def _extract_zip(path: Path, folder: Path, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
    root = folder.resolve()
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if sum(m.file_size for m in members) > max_bytes:
                raise UserError(f"{path.name} unpacks to more than {max_bytes / 2**20:g} MB")
            for member in members:
                target = (root / member.filename).resolve()
                if not target.is_relative_to(root):
                    raise UserError(f"{path.name}: {member.filename} would leave the upload folder")
                if member.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise UserError(f"{path.name} is not a readable zip file") from None


def zip_folder(folder: Path, target: Path, prefix: str) -> None:
    """Weights do not compress: store them, deflate the small text files."""
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                compress = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                archive.write(path, f"{prefix}/{path.relative_to(folder).as_posix()}",
                              compress_type=compress)


def _split_models(text: str) -> list[str]:
    return [s.strip() for s in (text or "").replace("\n", ",").split(",") if s.strip()]


def _digest(items: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for item in items:
        path = Path(item)
        digest.update(path.name.encode())
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:12]


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def env_config(workdir: Path | None = None) -> StudioConfig:
    """The configuration from MTS_* environment variables (see app.py)."""
    import tempfile

    env = os.environ
    roots = [Path(p).expanduser() for p in env.get("MTS_MODEL_ROOTS", "").split(os.pathsep) if p]
    demo = env.get("MTS_DEMO_DIR")
    return StudioConfig(
        workdir=Path(workdir or env.get("MTS_WORKDIR") or tempfile.mkdtemp(prefix="model-tailor-studio-")),
        demo_dir=Path(demo) if demo else DEMO_DIR,
        device=env.get("MTS_DEVICE", "auto"),
        model_roots=roots or [ROOT / "assets", ROOT / "models"],
        max_user_pairs=int(env.get("MTS_MAX_USER_PAIRS", "2")),
        calib_examples=int(env.get("MTS_CALIB_EXAMPLES", "64")),
        quick_examples=int(env.get("MTS_QUICK_EXAMPLES", "16")),
        max_upload_mb=int(env.get("MTS_MAX_UPLOAD_MB", "512")),
        warm_up=env.get("MTS_WARM_UP", "1") not in ("0", "false", "no"),
    )

