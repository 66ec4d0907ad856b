"""Assemble the tabs into one Gradio app; a timer polls each visitor's jobs.

Named API endpoints (for `gradio_client`): /load_demo, /load_pair, /add_eval_set,
/remove_eval_set, /eval_example, /tailor, /cancel_tailor,
/find_settings, /use_best_settings, /compare, /sweep, /cancel_sweep, /sweep_result, /finetune,
/cancel_finetune, /export_patch, /export_report, /export_model, /export_adapter, and the job endpoints
/job_status, /wait_job, /cancel_job, /history.
Plain HTTP: GET /healthz (Studio.health as JSON) for container health checks.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from tailor_ui.app.ui.common import history_table, job_result_summary, session_id, user_errors
from tailor_ui.app.ui.compare import CompareTab
from tailor_ui.app.ui.export import ExportTab
from tailor_ui.app.ui.finetune import FinetuneTab
from tailor_ui.app.ui.forgetting import ForgettingTab
from tailor_ui.app.ui.models import ModelsTab
from tailor_ui.app.service.config import ROOT
from tailor_ui.app.service.studio import Studio

log = logging.getLogger(__name__)
CSS_FILE = ROOT / "assets" / "style.css"
MAX_THREADS = 256
# Gradio's queue rebuilds a pandas table of its last 10,000 events after every event, for a
# monitoring page this app leaves off: 21 % of the server's CPU samples while 100 visitors
# came (py-spy). Read when a Blocks is made; values set in the environment win.
QUIET_QUEUE_ENV = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": str(2**62), "GRADIO_ANALYTICS_MAX_EVENTS": "100"}
POLL_SECONDS = 1.0  # the page's first poll interval; later ones follow Studio.poll_seconds

INTRO = ("# Model Tailor Studio\n"
         "Fine-tuning taught a multimodal model a new skill and made it forget old ones. "
         "**Model Tailor** (ICML 2024) keeps the pre-trained weights almost everywhere and takes "
         "a small, compensated *patch* from the fine-tuned model. Pick a pair, tailor it, compare "
         "the answers and measure the forgetting.")


class App:
    """The tabs of one dashboard and the handlers that span them (polling, job API)."""

    def __init__(self, studio: Studio) -> None:
        from tailor_ui.app.ui.tailor import TailorTab

        self.studio = studio
        self.models = ModelsTab(studio)
        self.tailor = TailorTab(studio)
        self.compare = CompareTab(studio)
        self.forgetting = ForgettingTab(studio)
        self.finetune = FinetuneTab(studio)
        self.export = ExportTab(studio)

    # -- polling -----------------------------------------------------------------------

    def poll(self, request: gr.Request) -> list:
        """Everything that changed since this page's last poll (gr.skip() for the rest)."""
        try:
            session = self.studio.session(session_id(request))
            self.studio.sync(session, "tailor")
            self.studio.sync(session, "sweep")
            handle, _ = self.models.current(session)
            outputs = [*self.models.poll(session), *self.tailor.poll(session, handle),
                       *self.forgetting.poll(session), *self.export.poll(session, handle),
                       *self.finetune.poll(session), *self.compare.poll(session, handle),
                       *self.models.evalsets.poll(session), self.poll_interval(session)]
            self.studio.warm_gate.set()  # a first page is up: the start-up merge may use the CPU now
            return outputs
        except Exception:  # polling must never pop an error every second
            log.exception("poll failed")
            return [gr.skip()] * len(self.outputs)

    def poll_interval(self, session) -> Any:
        """The timer's next interval when it changes: as soon as the session's jobs will
        have news (their retry_after), slower when it has none."""
        seconds = self.studio.poll_seconds(session)
        if session.sent.get("timer", POLL_SECONDS) == seconds:
            return gr.skip()
        session.sent["timer"] = seconds
        return seconds

    def unload(self, request: gr.Request) -> None:
        try:
            self.studio.end_session(session_id(request))
        except Exception:
            log.exception("ending a session failed")

    # -- job API (also usable from the page's job id boxes) ------------------------------------

    @user_errors
    def job_status(self, job_id: str, request: gr.Request) -> dict:
        """State of one of your jobs: status, stage, progress (0-1), error, timings, result."""
        job = self.studio.runner.get(job_id, session_id(request))
        return job_result_summary(job)

    @user_errors
    def wait_job(self, job_id: str, timeout_s: float, request: gr.Request) -> dict:
        """Wait until one of your jobs ends (at most timeout_s seconds); returns its state."""
        sid = session_id(request)
        job = self.studio.runner.wait(job_id, sid, max(0.0, min(float(timeout_s or 0), 600.0)))
        return job_result_summary(job)

    @user_errors
    def cancel_job(self, job_id: str, request: gr.Request) -> dict:
        """Cancel one of your jobs (a running one stops at its next layer or block)."""
        return job_result_summary(self.studio.runner.cancel(job_id, session_id(request)))

    @user_errors
    def history(self, request: gr.Request) -> list:
        """Your jobs, newest first."""
        table = history_table(self.studio.runner.history(session_id(request)))
        return table.to_dict(orient="records")

    # -- layout ----------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        for name, value in QUIET_QUEUE_ENV.items():
            os.environ.setdefault(name, value)
        with gr.Blocks(title="Model Tailor Studio") as demo:
            gr.Markdown(INTRO, elem_id="intro")
            self.pair_status = gr.Markdown(self.models.initial_status(), elem_id="pair-status")
            with gr.Tabs(elem_id="tabs"):
                for label, key in (("Models", "models"), ("Tailor", "tailor"), ("Fine-tune", "finetune"),
                                   ("Compare", "compare"), ("Forgetting", "forgetting"), ("Export", "export")):
                    with gr.Tab(label, id=key, elem_id=f"tab-{key}"):
                        getattr(self, key).render()
            self.outputs = [*self.models.poll_outputs(self.pair_status), *self.tailor.poll_outputs(),
                            *self.forgetting.poll_outputs(), *self.export.poll_outputs(),
                            *self.finetune.poll_outputs(), *self.compare.poll_outputs(),
                            *self.models.evalsets.poll_outputs()]
            timer = gr.Timer(POLL_SECONDS)
            self.outputs.append(timer)
            timer.tick(self.poll, None, self.outputs, api_visibility="private", show_progress="hidden",
                       concurrency_limit=None, trigger_mode="always_last")
            demo.load(self.poll, None, self.outputs, api_visibility="private", show_progress="hidden",
                      concurrency_limit=None)
            demo.unload(self.unload)
            gr.api(self.job_status, api_name="job_status", concurrency_limit=None)
            gr.api(self.wait_job, api_name="wait_job", concurrency_limit=None)
            gr.api(self.cancel_job, api_name="cancel_job", concurrency_limit=None)
            gr.api(self.history, api_name="history", concurrency_limit=None)
        self.blocks = demo
        return demo


def build_app(studio: Studio) -> gr.Blocks:
    return App(studio).build()


def launch_options(studio: Studio) -> dict[str, Any]:
    """What `launch()` needs besides host and port: CSS (Gradio 6 takes it at launch) and
    the folders the app may serve files from (session files, demo images)."""
    allowed = []
    workdir = Path(studio.config.workdir).resolve()
    if not workdir.is_relative_to(Path(tempfile.gettempdir()).resolve()):
        # Gradio copies files under the temp folder into its cache by itself; a workdir elsewhere
        # must be allowed explicitly (session folders are named by unguessable session hashes)
        allowed.append(str(workdir))
    if studio.config.demo_dir is not None:
        allowed.append(str(Path(studio.config.demo_dir)))
    css = CSS_FILE.read_text(encoding="utf-8") if CSS_FILE.is_file() else None
    return {"css": css, "allowed_paths": allowed,
            "max_file_size": studio.config.max_upload_mb * 2**20,
            "theme": gr.themes.Soft(primary_hue="orange"),
            # a compare or an export holds a thread while its job waits in the queue: enough
            # threads that a hundred visitors waiting never keep a new one's first call out
            "max_threads": MAX_THREADS,
            # launch() hands app_kwargs to its FastAPI app: routes given here exist from the
            # server's first request on
            "app_kwargs": {"routes": [health_route(studio)]}}


def health_route(studio: Studio):
    """GET /healthz. Async, so it runs on the event loop and answers even when every
    worker thread is busy (long /wait_job calls hold threads)."""
    from fastapi.routing import APIRoute

    async def healthz() -> dict[str, Any]:
        return studio.health()

    return APIRoute("/healthz", healthz, methods=["GET"], include_in_schema=False)
