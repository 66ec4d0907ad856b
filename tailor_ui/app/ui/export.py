"""Export tab: the patch (safetensors), the report (JSON), the tailored model and the LoRA
adapter (zips with model cards), and publishing the model or the patch to the Hub."""

from __future__ import annotations

import importlib.util
import os

import gradio as gr
from gradio.utils import get_space

from tailor_ui.model_card import Artifact
from tailor_ui.app.service import export as export_
from tailor_ui.app.service.export import ExportKind
from tailor_ui.app.service.config import settings_label
from tailor_ui.settings import Settings
from tailor_ui.app.ui.common import (Tab, changed, session_id, user_errors)

NO_MERGE = "*Run a merge in the Tailor tab; its files appear here.*"


def signs_in_on_the_hub() -> bool:
    """A Space with Hugging Face sign-in (`hf_oauth: true` in its README) and Gradio's OAuth
    extra (`gradio[oauth]`) installed: the tab shows Gradio's LoginButton instead of a token
    field (without either, the button cannot start and the app would not launch)."""
    return (get_space() is not None and bool(os.environ.get("OAUTH_CLIENT_ID"))
            and importlib.util.find_spec("authlib") is not None)


class ExportTab(Tab):
    def _file(self, job_id: str | None, what: ExportKind, request) -> str:
        session = self.studio.session(session_id(request))
        return str(self.studio.export(session, (job_id or "").strip() or None, what))

    @user_errors
    def patch(self, job_id: str | None, request: gr.Request):
        """The merge's patch: indices and values of the entries that differ from the base."""
        return self._file(job_id, ExportKind.PATCH, request)

    @user_errors
    def report(self, job_id: str | None, request: gr.Request):
        """The merge's report: settings, patch size per tensor, timings, quick check."""
        return self._file(job_id, ExportKind.REPORT, request)

    @user_errors
    def model(self, job_id: str | None, request: gr.Request):
        """The tailored model as a save_pretrained folder with its model card, zipped (built
        on first request)."""
        return self._file(job_id, ExportKind.MODEL, request)

    @user_errors
    def adapter(self, job_id: str | None, request: gr.Request):
        """The patch as a PEFT LoRA adapter (rank-16 fit per changed linear; the fit's
        relative errors in adapter_fit.json) with its model card, zipped."""
        return self._file(job_id, ExportKind.ADAPTER, request)

    @user_errors
    def push(self, job_id: str | None, what: str, repo_id: str, private: bool, token: str | None,
             request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> str:
        """Publish the tailored model, or the patch alone, with its model card to the Hub
        repository OWNER/NAME (created if missing), signed in or with a write token."""
        from tailor_ui.hub import check_repo_id, require_token

        how = ("sign in with Hugging Face above" if signs_in_on_the_hub()
               else "paste a token from huggingface.co/settings/tokens")
        token = require_token(oauth_token.token if oauth_token is not None else token, how)
        repo_id = check_repo_id(repo_id)
        artifact = Artifact(what)
        session = self.studio.session(session_id(request))
        job_id = (job_id or "").strip() or None
        # the model is published from its export zip (built once, as a job on the pair)
        zipped = self.studio.export(session, job_id, ExportKind.MODEL) if artifact is Artifact.MODEL else None
        self.studio.sync(session, "tailor")
        run = export_.find_run(session, self.studio.export_handle(session), job_id)
        url = export_.publish(run, artifact, repo_id, token, private=bool(private), zipped_model=zipped,
                              scores=export_.known_scores(session, run))
        return f"Published the {artifact.value} of {run.label} to [{repo_id}]({url})."

    def poll(self, session, handle) -> list:
        runs = export_.exportable_runs(session, handle)
        if not changed(session, "export-job", tuple((r.job_id, id(r)) for r in runs)):
            return [gr.skip(), gr.skip()]
        choices = [(f"{r.job_id} · {self._label(r)}", r.job_id) for r in runs]
        info = "\n".join(f"- `{r.job_id}` {self._label(r)}: {r.report['patch_entries']:,} entries "
                         f"({100 * r.report['model_fraction']:.2f}% of the model)" for r in runs)
        return [gr.update(choices=choices, value=choices[0][1] if choices else None), info or NO_MERGE]

    @staticmethod
    def _label(run) -> str:
        if run.job_id == export_.STARTUP:  # labelled "warm-up" where it ran
            return f"start-up merge with the default settings: {settings_label(Settings(**run.settings))}"
        return run.label

    def poll_outputs(self) -> list:
        return [self.job, self.info]

    def render(self) -> None:
        gr.Markdown("Files of this session's merges. The patch applies to the base model with "
                    "`python -m tailor_ui apply --base BASE --patch patch.safetensors --out DIR`. "
                    "The model and adapter zips carry a model card (README.md) with the settings, "
                    "the command that rebuilds them and their scores.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                self.job = gr.Dropdown([], label="Merge", elem_id="export-job", allow_custom_value=True)
                with gr.Row():
                    self.patch_button = gr.Button("Patch (.safetensors)", elem_id="export-patch")
                    self.report_button = gr.Button("Report (.json)", elem_id="export-report")
                    self.model_button = gr.Button("Tailored model (.zip)", elem_id="export-model")
                    self.adapter_button = gr.Button("LoRA adapter, rank 16 (.zip)", elem_id="export-adapter")
                self.info = gr.Markdown(NO_MERGE, elem_id="export-info")
            with gr.Column(scale=1):
                self.file = gr.File(label="Download", interactive=False, elem_id="export-file")
        with gr.Accordion("Push to the Hub", open=False, elem_id="export-hub"):
            hub_sign_in = signs_in_on_the_hub()
            if hub_sign_in:
                gr.LoginButton(elem_id="export-login")
            with gr.Row():
                self.repo = gr.Textbox(label="Repository", placeholder="your-name/tailored-model",
                                       elem_id="export-repo")
                # only sent to the Hub: never logged, never shown back
                self.token = gr.Textbox(label="Hugging Face token (write access)", type="password",
                                        visible=not hub_sign_in, elem_id="export-token")
            with gr.Row():
                self.what = gr.Radio([("Tailored model", Artifact.MODEL.value),
                                      ("Patch alone", Artifact.PATCH.value)], value=Artifact.MODEL.value,
                                     label="Publish", elem_id="export-what")
                self.private = gr.Checkbox(label="Private repository", value=False, elem_id="export-private")
            self.push_button = gr.Button("Push to the Hub", variant="primary", elem_id="export-push")
            self.pushed = gr.Markdown(elem_id="export-pushed")
        for button, fn, name in ((self.patch_button, self.patch, "export_patch"),
                                 (self.report_button, self.report, "export_report"),
                                 (self.model_button, self.model, "export_model"),
                                 (self.adapter_button, self.adapter, "export_adapter")):
            button.click(fn, [self.job], [self.file], api_name=name, concurrency_limit=None)
        self.push_button.click(self.push, [self.job, self.what, self.repo, self.private, self.token],
                               [self.pushed], api_name="export_push", concurrency_limit=None)
