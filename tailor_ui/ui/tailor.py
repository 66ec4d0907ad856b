"""Tailor tab: choose a method and its knobs, run it as a background job, see the patch."""

from __future__ import annotations

import re

import gradio as gr
import pandas as pd

from tailor_ui import plots
from tailor_ui.methods import REGISTRY
from tailor_ui.evaluation.sweep import parse_numbers
from tailor_ui.methods.selection import SCOPES
from tailor_ui.session import PairHandle, SearchRun, TailorRun
from tailor_ui.ui.common import (Slider, Tab, cancel_unfinished, changed, fmt_table, history_table,
                                 job_signature, latest_progress, progress_html, public_text, queued,
                                 percent, session_id, user_errors)
from tailor_ui.ui.models import changed_modules
from tailor_ui.service.config import default_settings
from tailor_ui.service.evalsets import pair_sets
from tailor_ui.service.tailor import default_compensation, has_anchor, sweep_compensations
from tailor_ui.settings import Settings

LAMBDA_LABEL = f"λ ({', '.join(m.label for m in REGISTRY.values() if 'lam' in m.knobs)})"
FIND_IDLE = "Press Find settings: the search runs in the background."
SCOPE_INFO = {"block": "per 128-column block (authors' code)", "row": "per output row",
              "tensor": "per weight matrix", "global": "across the whole model"}


def _reads(method: str, knob: str) -> bool:
    return method in REGISTRY and knob in REGISTRY[method].knobs


def build_settings(method: str, keep: float, alpha: float, scope: str, compensate: bool,
                   modules: list[str] | None, lam: float | None, hessians: str = "one-pass",
                   sign: str = "obs", sensitivity: str = "change", others: str = "finetuned",
                   modules_regex: str = "", compensation: str | None = None,
                   order: str = "mask-first", budget: str = "uniform"):
    """Widget values -> engine Settings (which validates them)."""
    pattern = (modules_regex or "").strip() or None
    if pattern is None and modules:
        pattern = r"\.(?:" + "|".join(re.escape(m) for m in modules) + r")$"
    lam_value = float(lam) if _reads(method, "lam") and lam is not None else None
    return default_settings(method=method, keep=float(keep), alpha=float(alpha), scope=scope,
                            compensate=bool(compensate), sign=sign, sensitivity=sensitivity,
                            hessians=hessians, modules=pattern, others=others, lam=lam_value,
                            compensation=compensation or Settings.compensation, order=order,
                            budget=budget)


LITTLE_OF_THE_TARGET = 0.5  # a quick check's target retention below which a larger keep is hinted


def result_markdown(run: TailorRun | None, default: bool = False) -> str:
    if run is None:
        return "*Run a merge to see its patch here.*"
    r = run.report
    timings = r.get("timings_s", {})
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if k != "total" and v >= 0.01)
    title = f"### {run.label}" + (" — start-up merge with the default settings" if default
                                  else f" — `{run.job_id}`")
    lines = [title,
             f"**Patch:** {r['patch_entries']:,} entries · {100 * r['linear_fraction']:.2f}% of the "
             f"{r['selected_linears']} selected linear weights · {100 * r['model_fraction']:.2f}% of "
             f"the model",
             f"**Time:** {run.seconds:.2f} s in all (merge {timings.get('total', 0):.2f} s"
             + (f": {parts}" if parts else "") + ")"]
    if run.quick is not None and "This merge" in set(run.quick["model"]):
        row = run.quick[run.quick["model"] == "This merge"].iloc[0]
        lines.append(f"**Quick check:** original skills kept "
                     f"{percent(row['original retention'], 'n/a (the pre-trained model scores 0 on them)')}"
                     " · target skill kept "
                     f"{percent(row['target retention'], 'n/a (the fine-tuned model scores 0 on it)')}"
                     " (few examples; run a "
                     "sweep in *Forgetting* for the full picture)")
        if row["target retention"] < LITTLE_OF_THE_TARGET and _reads(run.settings.get("method"), "keep"):
            lines.append("*This patch keeps little of the new skill: try a larger patch size (keep).*")
    elif run.quick is None:
        lines.append("*No quick check: this pair has no evaluation sets. Add them in the Models tab "
                     "(Evaluation sets) to score each merge on a few examples.*")
    return "\n\n".join(lines)


def search_markdown(run: SearchRun | None) -> str:
    """The best candidate of a search, and which examples scored it."""
    if run is None:
        return ("*Find settings tries every keep x alpha x compensation of the grid below on part "
                "of the calibration set and scores each on the rest (the new skill) and on the "
                "original tasks.*")
    best = run.result.best_row
    used = "; ".join(f"{name}: {what}" for name, what in run.result.used.items())
    return (f"**Best:** {best['setting']} · original skills kept {100 * best['original_retention']:.0f}% "
            f"· target gain kept {100 * best['target_gain']:.0f}% · h {best['h']:.3f} "
            f"({len(run.result.front)} on the front, {run.seconds:.0f} s)\n\n*Scored on {used}.*")


class TailorTab(Tab):
    # -- handlers ----------------------------------------------------------------------

    @user_errors
    def run(self, method: str, keep: float, alpha: float, scope: str, compensate: bool,
            modules: list[str] | None, lam: float, hessians: str, sign: str, sensitivity: str,
            others: str, modules_regex: str, calib_source: str, calib_files: list[str] | None,
            calib_examples: float, compensation: str | None = None, order: str = "mask-first",
            budget: str = "uniform", request: gr.Request = None):
        """Queue a merge with these settings; returns its job id and progress."""
        session = self.studio.session(session_id(request))
        settings = build_settings(method, keep, alpha, scope, compensate, modules, lam, hessians,
                                  sign, sensitivity, others, modules_regex, compensation, order, budget)
        job = self.studio.submit_tailor(session, settings, calib_source=calib_source,
                                        calib_files=calib_files or None,
                                        calib_examples=int(calib_examples))
        return queued(session, "tailor", job)

    def rerun(self, auto: bool, method: str, keep: float, alpha: float, scope: str,
              compensate: bool, modules: list[str] | None, lam: float, hessians: str, sign: str,
              sensitivity: str, others: str, modules_regex: str, calib_source: str,
              calib_files: list[str] | None, calib_examples: float, compensation: str | None = None,
              order: str = "mask-first", budget: str = "uniform", request: gr.Request = None):
        """A slider was released: after a first run (the visitor's, or the start-up merge of
        the demo pair) merge again with the new value; an unfinished earlier merge of the
        session is superseded. With one-pass Hessians this re-thresholds cached scores."""
        try:
            session = self.studio.session(session_id(request))
            handle = self.studio.handle_for(session)
            if not auto or (session.latest_run(handle) is None and handle.default_run is None):
                return gr.skip(), gr.skip()
            settings = build_settings(method, keep, alpha, scope, compensate, modules, lam,
                                      hessians, sign, sensitivity, others, modules_regex,
                                      compensation, order, budget)
            job = self.studio.submit_tailor(session, settings, calib_source=calib_source,
                                            calib_files=calib_files or None,
                                            calib_examples=int(calib_examples), supersede=True)
        except Exception as exc:  # a slider move never pops an error: the Run button does
            gr.Warning(public_text(str(exc)))
            return gr.skip(), gr.skip()
        return queued(session, "tailor", job)

    @user_errors
    def cancel(self, job_id: str, request: gr.Request):
        """Cancel a merge: the given one if it is still unfinished, else this session's
        latest unfinished merge."""
        sid = session_id(request)
        cancelled = cancel_unfinished(self.studio.runner, sid, "tailor", job_id)
        if cancelled is None and (job_id or "").strip():
            return progress_html(self.studio.runner.get(job_id, sid))
        return progress_html(cancelled, "Nothing to cancel.")

    @user_errors
    def find(self, keeps: str, alphas: str, compensations: list[str] | None, examples: float,
             holdout: float, calib_source: str, calib_files: list[str] | None, calib_examples: float,
             request: gr.Request = None):
        """Queue a search of Model Tailor's settings; returns its job id and progress."""
        session = self.studio.session(session_id(request))
        job = self.studio.submit_search(
            session, parse_numbers(keeps, "keep"), parse_numbers(alphas, "alpha"),
            {"compensation": list(compensations or [])}, examples=int(examples),
            holdout=float(holdout), calib_source=calib_source, calib_files=calib_files or None,
            calib_examples=int(calib_examples))
        return queued(session, "search", job)

    @user_errors
    def use_best(self, request: gr.Request = None) -> tuple:
        """Set the merge widgets to the best settings of the session's latest search."""
        session = self.studio.session(session_id(request))
        self.studio.sync(session, "search")
        run = session.latest_search()
        if run is None:
            raise gr.Error("no finished search yet: press Find settings first")
        best = run.result.best
        return (best.method, best.keep, best.alpha, best.scope, best.compensate, best.compensation,
                best.order, best.budget, best.hessians)

    def search_poll(self, session) -> list:
        self.studio.sync(session, "search")
        out = [latest_progress(self.studio.runner, session, "search", FIND_IDLE)]
        run = session.latest_search()
        if changed(session, "search-result", run.job_id if run else None):
            return out + [plots.settings_search(run.result.table if run else None), search_markdown(run)]
        return out + [gr.skip()] * 2

    @staticmethod
    def method_changed(method: str):
        info = REGISTRY.get(method)
        lam = info.defaults.get("lam", 1.0) if info else 1.0
        return (gr.update(value=lam, interactive=_reads(method, "lam")), f"*{info.summary}*" if info else "")

    # -- polling ---------------------------------------------------------------------------

    def poll(self, session, handle: PairHandle | None) -> list:
        runner = self.studio.runner
        out = [latest_progress(runner, session, "tailor", "Press Run: the merge runs in the background.")]
        run = session.latest_run(handle) if handle is not None else None
        default = run is None and handle is not None and handle.default_run is not None
        if default:
            run = handle.default_run
        signature = (id(handle), run.job_id if run else None, id(run))
        if changed(session, "tailor-result", signature):
            out += [result_markdown(run, default),
                    fmt_table(run.quick) if run is not None and run.quick is not None else pd.DataFrame(),
                    plots.patch_map(run.report if run else None, run.label if run else "",
                                   run.handle.summary if run else None)]
        else:
            out += [gr.skip()] * 3
        if handle is not None and changed(session, "tailor-modules", id(handle)):
            out.append(gr.update(choices=changed_modules(handle), value=[]))
        else:
            out.append(gr.skip())
        sets = pair_sets(session, handle) if handle is not None else ()
        if handle is not None and changed(session, "tailor-forms", (id(handle), has_anchor(handle, sets))):
            # the pair's defaults, again when an anchor set comes or goes
            out += [gr.update(value=default_compensation(handle, sets)),
                    gr.update(value=sweep_compensations(handle, sets, search=True))]
        else:
            out += [gr.skip()] * 2
        every = runner.history(session.id)
        if changed(session, "job-history", tuple(job_signature(j) for j in every)):
            out.append(history_table(every))
        else:
            out.append(gr.skip())
        return out + self.search_poll(session)

    def poll_outputs(self) -> list:
        return [self.progress, self.result, self.quick, self.heatmap, self.modules, self.compensation,
                self.find_compensation, self.history,
                self.find_progress, self.find_plot, self.find_best]

    # -- layout ----------------------------------------------------------------------------

    def render(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                self._merge_controls()
                self._calibration_controls()
                self._advanced_controls()
                with gr.Row():
                    self.run_button = gr.Button("Run", variant="primary", elem_id="tailor-run")
                    self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="tailor-cancel")
                self.find_button = gr.Button("Find settings", elem_id="tailor-find")
                self._search_controls()
            with gr.Column(scale=2):
                self._outputs()
                self._search_outputs()
        self.history = gr.Dataframe(history_table([]), label="Your jobs", interactive=False,
                                    elem_id="job-history", wrap=True, max_height=300)
        self._wire()

    def _merge_controls(self) -> None:
        choices = [(info.label, name) for name, info in REGISTRY.items()]
        self.method = gr.Dropdown(choices, value="tailor", label="Method", elem_id="tailor-method")
        self.method_info = gr.Markdown(f"*{REGISTRY['tailor'].summary}*", elem_id="tailor-method-info")
        self.keep = Slider(0.01, 1.0, value=0.10, step=0.01, label="Patch size (keep)",
                           info="fraction of the changed weights taken from the fine-tuned model",
                           elem_id="tailor-keep")
        self.alpha = Slider(0.0, 1.0, value=0.8, step=0.05, label="Fusion weight (alpha)",
                            info="salience vs sensitivity (Model Tailor)", elem_id="tailor-alpha")
        self.auto = gr.Checkbox(True, label="Re-run when a slider is released",
                                elem_id="tailor-auto")
        self.scope = gr.Radio([(f"{s}: {SCOPE_INFO.get(s, s)}", s) for s in SCOPES], value="block",
                              label="Threshold scope", elem_id="tailor-scope")
        self.compensate = gr.Checkbox(True, label="Compensate the patch (OBS decoration)",
                                      elem_id="tailor-compensate")
        self.compensation = gr.Radio(
            [("exact: least squares per row, given the patch", "exact"),
             ("greedy: SparseGPT's column loop (the paper's)", "greedy"),
             ("anchored: patch and least squares of an objective that also holds the base's "
              "outputs on original-task examples (the pair's built-in set)", "anchored")],
            value=Settings.compensation, label="Compensation", elem_id="tailor-compensation")
        self.modules = gr.Dropdown([], value=[], multiselect=True, label="Modules",
                                   info="empty: every linear layer fine-tuning changed",
                                   elem_id="tailor-modules")
        self.lam = Slider(0.0, 2.0, value=1.0, step=0.05, label=LAMBDA_LABEL,
                          interactive=False, elem_id="tailor-lam")

    def _calibration_controls(self) -> None:
        with gr.Accordion("Calibration data (target task)", open=False):
            self.calib_source = gr.Radio([("built-in (demo target set)", "builtin"),
                                          ("upload JSONL + images, or a .zip", "upload")],
                                         value="builtin", label="Calibration set",
                                         elem_id="tailor-calib-source")
            self.calib_files = gr.File(file_count="multiple", type="filepath",
                                       label="JSONL ({image, question, answers} per line) with its images",
                                       elem_id="tailor-calib-files")
            self.calib_n = Slider(8, 512, value=self.studio.config.calib_examples, step=8,
                                  label="Calibration examples", elem_id="tailor-calib-n")

    def _advanced_controls(self) -> None:
        with gr.Accordion("Advanced", open=False):
            self.hessians = gr.Radio(
                [("one pass (slider moves re-threshold cached scores: fast)", "one-pass"),
                 ("sequential (authors' order; every change recomputes)", "sequential")],
                value="one-pass", label="Hessians", elem_id="tailor-hessians")
            self.sign = gr.Radio([("OBS (subtract; default)", "obs"), ("released code (add)", "released")],
                                 value="obs", label="Compensation sign (greedy)", elem_id="tailor-sign")
            self.order = gr.Radio([("mask first (paper)", "mask-first"),
                                   ("SparseGPT's: each block's mask after the earlier blocks", "sparsegpt")],
                                  value="mask-first", label="Mask order (greedy, block scope)",
                                  elem_id="tailor-order")
            self.budget = gr.Radio([("uniform: keep in every layer", "uniform"),
                                    ("per layer: by each layer's share of the fused score", "per-layer")],
                                   value="uniform", label="Patch budget", elem_id="tailor-budget")
            self.sensitivity = gr.Radio([("change (W_ft − W_pre)", "change"), ("weight (W_ft)", "weight")],
                                        value="change", label="Sensitivity form",
                                        elem_id="tailor-sensitivity")
            self.others = gr.Radio([("keep fine-tuned", "finetuned"), ("revert to base", "base"),
                                    ("merge like linears", "linear")], value="finetuned",
                                   label="Other tensors (norms, biases, embeddings)",
                                   elem_id="tailor-others")
            self.modules_regex = gr.Textbox(label="Module regex (overrides the picker)",
                                            placeholder=r"language_model\.layers\.(2|3)\.",
                                            elem_id="tailor-modules-regex")

    def _search_controls(self) -> None:
        with gr.Accordion("Find settings: the grid", open=False):
            self.find_keeps = gr.Textbox("0.02, 0.05, 0.1", label="Patch sizes (keep)",
                                         elem_id="tailor-find-keeps")
            self.find_alphas = gr.Textbox("0.5, 0.8, 1.0", label="Fusion weights (alpha)",
                                          elem_id="tailor-find-alphas")
            # the pair's defaults (anchored where it has an anchor set) arrive with the first poll
            self.find_compensation = gr.CheckboxGroup(["exact", "greedy", "anchored"],
                                                      value=Settings.default_compensations(False, search=True),
                                                      label="Compensation forms",
                                                      elem_id="tailor-find-compensation")
            self.find_n = Slider(4, 150, value=16, step=4, label="Examples per original-task set",
                                 elem_id="tailor-find-n")
            self.find_holdout = Slider(0.1, 0.5, value=0.25, step=0.05,
                                       label="Calibration share held out to score the new skill",
                                       elem_id="tailor-find-holdout")

    def _search_outputs(self) -> None:
        self.find_job_id = gr.Textbox(label="Search job id", interactive=False,
                                      elem_id="tailor-find-job-id")
        self.find_progress = gr.HTML(progress_html(None, FIND_IDLE), elem_id="tailor-find-progress")
        self.find_best = gr.Markdown(search_markdown(None), elem_id="tailor-find-best")
        self.find_plot = gr.Plot(plots.settings_search(None), elem_id="tailor-find-plot",
                                 show_label=False)
        self.use_best_button = gr.Button("Use the best settings", size="sm", elem_id="tailor-find-use")

    def _outputs(self) -> None:
        self.job_id = gr.Textbox(label="Job id", interactive=False, elem_id="tailor-job-id")
        self.progress = gr.HTML(progress_html(None, "Press Run: the merge runs in the background."),
                                elem_id="tailor-progress")
        self.result = gr.Markdown(result_markdown(None), elem_id="tailor-result")
        self.quick = gr.Dataframe(headers=["model", "original retention", "target retention"],
                                  label="Quick check (scores on a few examples per task)",
                                  interactive=False, elem_id="tailor-quick")
        self.heatmap = gr.Plot(plots.patch_map(None), elem_id="tailor-heatmap", show_label=False)

    def _wire(self) -> None:
        inputs = [self.method, self.keep, self.alpha, self.scope, self.compensate, self.modules,
                  self.lam, self.hessians, self.sign, self.sensitivity, self.others,
                  self.modules_regex, self.calib_source, self.calib_files, self.calib_n,
                  self.compensation, self.order, self.budget]
        self.run_button.click(self.run, inputs, [self.job_id, self.progress], api_name="tailor",
                              concurrency_limit=None)
        for slider in (self.keep, self.alpha, self.lam):
            slider.release(self.rerun, [self.auto, *inputs], [self.job_id, self.progress],
                           api_visibility="private", concurrency_limit=None, show_progress="hidden",
                           trigger_mode="always_last")
        self.cancel_button.click(self.cancel, [self.job_id], [self.progress], api_name="cancel_tailor",
                                 concurrency_limit=None)
        self.method.change(self.method_changed, [self.method], [self.lam, self.method_info],
                           api_visibility="private", queue=False)
        self.find_button.click(self.find, [self.find_keeps, self.find_alphas, self.find_compensation,
                                           self.find_n, self.find_holdout, self.calib_source,
                                           self.calib_files, self.calib_n],
                               [self.find_job_id, self.find_progress], api_name="find_settings",
                               concurrency_limit=None)
        self.use_best_button.click(self.use_best, None,
                                   [self.method, self.keep, self.alpha, self.scope, self.compensate,
                                    self.compensation, self.order, self.budget, self.hessians],
                                   api_name="use_best_settings", concurrency_limit=None)