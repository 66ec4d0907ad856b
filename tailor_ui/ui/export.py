"""Export tab: the patch (safetensors), the report (JSON), the tailored model (zip)."""

from __future__ import annotations

import gradio as gr

from tailor_ui.service.export import ExportKind
from tailor_ui.ui.common import (Tab, changed, session_id, user_errors)


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
        """The tailored model as a save_pretrained folder, zipped (built on first request)."""
        return self._file(job_id, ExportKind.MODEL, request)

    @user_errors
    def adapter(self, job_id: str | None, request: gr.Request):
        """The patch as a PEFT LoRA adapter (rank-16 fit per changed linear; the fit's
        relative errors in adapter_fit.json), zipped."""
        return self._file(job_id, ExportKind.ADAPTER, request)

    def poll(self, session) -> list:
        runs = list(session.runs.values())[::-1]
        if not changed(session, "export-job", tuple(r.job_id for r in runs)):
            return [gr.skip(), gr.skip()]
        choices = [(f"{r.job_id} · {r.label}", r.job_id) for r in runs]
        info = "\n".join(f"- `{r.job_id}` {r.label}: {r.report['patch_entries']:,} entries "
                         f"({100 * r.report['model_fraction']:.2f}% of the model)" for r in runs)
        return [gr.update(choices=choices, value=choices[0][1] if choices else None),
                info or "*Run a merge in the Tailor tab; its files appear here.*"]

    def poll_outputs(self) -> list:
        return [self.job, self.info]

    def render(self) -> None:
        gr.Markdown("Files of this session's merges. The patch applies to the base model with "
                    "`python -m tailor_ui apply --base BASE --patch patch.safetensors --out DIR`.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                self.job = gr.Dropdown([], label="Merge", elem_id="export-job", allow_custom_value=True)
                with gr.Row():
                    self.patch_button = gr.Button("Patch (.safetensors)", elem_id="export-patch")
                    self.report_button = gr.Button("Report (.json)", elem_id="export-report")
                    self.model_button = gr.Button("Tailored model (.zip)", elem_id="export-model")
                    self.adapter_button = gr.Button("LoRA adapter, rank 16 (.zip)", elem_id="export-adapter")
                self.info = gr.Markdown("*Run a merge in the Tailor tab; its files appear here.*",
                                        elem_id="export-info")
            with gr.Column(scale=1):
                self.file = gr.File(label="Download", interactive=False, elem_id="export-file")
        for button, fn, name in ((self.patch_button, self.patch, "export_patch"),
                                 (self.report_button, self.report, "export_report"),
                                 (self.model_button, self.model, "export_model"),
                                 (self.adapter_button, self.adapter, "export_adapter")):
            button.click(fn, [self.job], [self.file], api_name=name, concurrency_limit=None)
