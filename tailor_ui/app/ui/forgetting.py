"""Forgetting tab: sweep methods x settings, see the trade-off, download the table."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from tailor_ui.app import plots
from tailor_ui.methods import REGISTRY
from tailor_ui.app.session import SweepRun
from tailor_ui.app.ui.common import (Slider, Tab, cancel_button, changed, fmt_table, latest_progress,
                                 progress_html, queued, session_id, user_errors)
from tailor_ui.evaluation.sweep import LAMBDA_RANGE, parse_numbers
from tailor_ui.app.service.sweep import ShippedSweep, shipped_sweep

# the default sweep (bench/dashboard_sweep.py runs it): every baseline Model Tailor is judged
# against, on every example of the demo's sets (fewer is faster but one answer moves a score more)
DEFAULT_METHODS = ["tailor", "magnitude", "wise_ft", "ties", "dare"]
DEFAULT_KEEPS = "0.02, 0.05, 0.1, 0.2"
DEFAULT_LAMS = "0.3, 0.5, 0.7"
DEFAULT_ALPHA = 0.8
DEFAULT_EXAMPLES = 150
# the first columns of a forgetting table, shown before there is one
TABLE_HEADERS = ["kind", "method", "setting", "original", "target", "original_retention",
                 "target_retention", "target_gain", "h_score"]


def sweep_outputs(run: SweepRun | None) -> list:
    """Figures, table and CSV of a sweep (empty figures before the first one)."""
    return table_outputs(run.table if run is not None else None,
                         run.heatmap_report if run else None, run.heatmap_label if run else "",
                         str(run.csv_file) if run is not None else None)


def table_outputs(table: pd.DataFrame | None, report: dict | None = None, label: str = "",
                  csv: str | None = None, note: str = "") -> list:
    """Figures, table and CSV of a forgetting table; `note` follows each figure's title."""
    shown = None
    if table is not None:  # the one-pass Hessians are the dashboard's default: not worth a label
        shown = table.assign(setting=table["setting"].str.replace(" hessians=one-pass", "", regex=False))
    figures = [plots.tradeoff(shown), plots.scores_vs_keep(shown), plots.retention_bars(shown),
               plots.patch_map(report, label)]
    if note:
        for figure in figures[:3]:
            figure.update_layout(title_text=f"{figure.layout.title.text} {note}")
        if report is None:
            figures[3] = plots.empty_figure("a precomputed sweep keeps no patch: run a sweep to map "
                                            "where one of its settings' patch lives", "Where the patch lives")
    return [*figures, fmt_table(table) if table is not None else pd.DataFrame(columns=TABLE_HEADERS), csv]


def shown_source(run: SweepRun | None, shipped: ShippedSweep | None) -> str:
    """What the plots below show: the visitor's latest sweep, or the shipped one and the
    command that made it."""
    if run is not None:
        return f"Showing your sweep `{run.job_id}` ({run.seconds:.0f} s)."
    if shipped is not None:
        return ("Showing the **precomputed** sweep of this demo story (shipped in `bench/results`, "
                "every example of its sets; your own sweep replaces it), made by:\n\n"
                "```\n" + shipped.command.replace(" --", " \\\n  --") + "\n```")
    return ""


INTRO = ("Evaluates the pre-trained and fine-tuned models, the majority answer and every method x "
         "setting on the pair's evaluation sets: its original tasks and its target task (the "
         "demo's built-in sets, and any you add in the **Models** tab under *Evaluation sets*). "
         "Scores: CIDEr-D for captions, VQA accuracy for questions; retention per set, and "
         "the share of the fine-tune's gain each row keeps. Models you trained in the Fine-tune "
         "tab join the sweep as extra rows.")


class ForgettingTab(Tab):
    @user_errors
    def run(self, methods: list[str], keeps: str, lams: str, alpha: float, examples: float,
            calib_files: list | None = None, request: gr.Request = None):
        """Queue a sweep over methods x settings on the pair's evaluation sets; Model Tailor
        calibrates on the uploaded files, else on the pair's own (`service.tailor.pair_calibration`)."""
        session = self.studio.session(session_id(request))
        files = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (calib_files or [])]
        job = self.studio.submit_sweep(
            session, methods or [], parse_numbers(keeps, "keep"),
            parse_numbers(lams, "λ", *LAMBDA_RANGE), alpha=float(alpha), examples=int(examples),
            calib_source="upload" if files else "builtin", calib_files=files or None)
        return queued(session, "sweep", job)

    cancel = cancel_button("sweep")

    @user_errors
    def result(self, job_id: str, request: gr.Request):
        """The table and CSV of a finished sweep (the latest when no id is given)."""
        session = self.studio.session(session_id(request))
        self.studio.sync(session, "sweep")
        job_id = (job_id or "").strip()
        run = session.sweeps.get(job_id) if job_id else session.latest_sweep()
        if run is None:
            job = self.studio.runner.get(job_id, session.id) if job_id else None
            raise gr.Error(f"sweep {job_id} is {job.status}: {job.error or job.stage}" if job
                           else "no finished sweep in this session")
        return fmt_table(run.table), str(run.csv_file)

    def poll(self, session) -> list:
        out = [latest_progress(self.studio.runner, session, "sweep",
                               "Run a sweep: it evaluates every setting in the background.")]
        run = session.latest_sweep()
        shipped = shipped_sweep(session.demo_story) if run is None and session.use_demo else None
        key = run.job_id if run else ("shipped", session.demo_story) if shipped else None
        if changed(session, "sweep-result", key):
            out += [shown_source(run, shipped)]
            out += (sweep_outputs(run) if run is not None or shipped is None
                    else table_outputs(shipped.table, note="(precomputed)"))
        else:
            out += [gr.skip()] * 7
        return out

    def poll_outputs(self) -> list:
        return [self.progress, self.source, self.tradeoff, self.keep_plot, self.retention, self.heatmap,
                self.table, self.csv]

    def render(self) -> None:
        gr.Markdown(INTRO)
        with gr.Row():
            self.methods = gr.CheckboxGroup([(info.label, name) for name, info in REGISTRY.items()],
                                            value=DEFAULT_METHODS, label="Methods", scale=2,
                                            elem_id="sweep-methods")
            self.keeps = gr.Textbox(DEFAULT_KEEPS, label="Patch sizes (keep)",
                                    info="comma-separated, for the patch methods", scale=1,
                                    elem_id="sweep-keeps")
            self.lams = gr.Textbox(DEFAULT_LAMS, label="λ values", scale=1,
                                   info="for WiSE-FT and task arithmetic", elem_id="sweep-lams")
        with gr.Row():
            self.alpha = Slider(0.0, 1.0, value=DEFAULT_ALPHA, step=0.05, label="Fusion weight (alpha)",
                                   elem_id="sweep-alpha")
            self.examples = Slider(4, 150, value=DEFAULT_EXAMPLES, step=2, label="Examples per evaluation set",
                                      elem_id="sweep-n")
            self.calib = gr.File(label="Calibration for Model Tailor (optional: else the pair's own, its "
                                       "built-in set or your target sets of the Models tab): JSONL + "
                                       "images, or a zip", file_count="multiple",
                                 file_types=[".jsonl", ".zip", "image"], elem_id="sweep-calib", scale=2)
            with gr.Column(min_width=200):
                self.run_button = gr.Button("Run sweep", variant="primary", elem_id="sweep-run")
                self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="sweep-cancel")
        with gr.Row():
            self.job_id = gr.Textbox(label="Sweep job id", interactive=False, scale=1,
                                     elem_id="sweep-job-id")
            with gr.Column(scale=3):
                self.progress = gr.HTML(progress_html(None, "Run a sweep: it evaluates every setting "
                                                            "in the background."),
                                        elem_id="sweep-progress")
        self.source = gr.Markdown(elem_id="sweep-source")
        empty = sweep_outputs(None)
        # a full row each: a long legend beside half a row leaves the plot a strip
        self.tradeoff = gr.Plot(empty[0], elem_id="sweep-tradeoff", show_label=False)
        self.keep_plot = gr.Plot(empty[1], elem_id="sweep-keep", show_label=False)
        self.retention = gr.Plot(empty[2], elem_id="sweep-retention", show_label=False)
        self.heatmap = gr.Plot(empty[3], elem_id="sweep-heatmap", show_label=False)
        self.table = gr.Dataframe(empty[4], label="Forgetting table", interactive=False,
                                  elem_id="sweep-table", wrap=True, max_height=360)
        with gr.Row():
            self.csv = gr.DownloadButton("Download the table (CSV)", value=None, elem_id="sweep-csv")
            self.refresh = gr.Button("Show the result of the sweep job id above", size="sm",
                                     elem_id="sweep-show")
        self.run_button.click(self.run, [self.methods, self.keeps, self.lams, self.alpha, self.examples,
                                         self.calib],
                              [self.job_id, self.progress], api_name="sweep", concurrency_limit=None)
        self.cancel_button.click(self.cancel, [self.job_id], [self.progress], api_name="cancel_sweep",
                                 concurrency_limit=None)
        self.refresh.click(self.result, [self.job_id], [self.table, self.csv], api_name="sweep_result",
                           concurrency_limit=None)
