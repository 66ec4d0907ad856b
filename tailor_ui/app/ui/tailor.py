"""Tailor tab: choose a method and its knobs, run it as a background job, see the patch."""

from __future__ import annotations

import inspect
import logging
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr
import pandas as pd

from tailor_ui.app import plots
from tailor_ui.errors import UserError
from tailor_ui.methods import REGISTRY
from tailor_ui.evaluation import search
from tailor_ui.evaluation.sweep import LAMBDA_RANGE, format_numbers, parse_numbers
from tailor_ui.app.session import PairHandle, SearchRun, TailorRun
from tailor_ui.app.ui.common import (Number, Slider, Tab, cancel_button, cancel_unfinished, changed, fmt_table,
                                 history_table, job_signature, latest_progress, percent, progress_html,
                                 public_text, queued, session_id, user_errors)
from tailor_ui.app.ui.models import changed_modules
from tailor_ui.app.service.config import default_settings
from tailor_ui.app.service.evalsets import pair_sets
from tailor_ui.app.service.tailor import (NO_CALIBRATION, default_compensation, has_anchor, pair_calibration,
                                     sweep_compensations)
from tailor_ui.settings import KNOBS, Settings, choices, method_problem, reads, value_type

log = logging.getLogger(__name__)
FIND_IDLE = "Press Find settings: the search runs in the background."
# the knobs the tab has a control for, in declaration order
SHOWN = [name for name, spec in KNOBS.items() if spec.dashboard]


def build_settings(method: str, knobs: Mapping[str, Any], modules: list[str] | None = None,
                   modules_regex: str = "") -> Settings:
    """Widget values -> engine Settings (which validates them): of `knobs` (by name) only
    those the method reads, since the others are other methods' controls."""
    if method_problem(method):
        raise UserError(method_problem(method))
    pattern = (modules_regex or "").strip() or None
    if pattern is None and modules:
        pattern = r"\.(?:" + "|".join(re.escape(m) for m in modules) + r")$"
    read = {name: value_type(name)(value) for name, value in knobs.items()
            if name in SHOWN and reads(method, name) and value is not None}
    return default_settings(method=method, modules=pattern, **read)


def knob_control(name: str, method: str) -> gr.components.Component:
    """The control of one knob, from its declaration: a checkbox, a choice of its words, a
    slider or a number box; shown where `method` reads it."""
    spec, start = KNOBS[name], default_settings(method=method)
    value = getattr(start, name)
    if value is None:  # a knob whose default is the method's (λ)
        value = REGISTRY[method].defaults.get(name, spec.slider[0] if spec.slider else 0)
    common = dict(label=spec.label, info=spec.help, elem_id="tailor-" + name.replace("_", "-"),
                  visible=reads(method, name))
    if value_type(name) is bool:
        return gr.Checkbox(value, **common)
    if choices(name):
        words = [(f"{w}: {spec.words[w]}" if w in spec.words else w, w) for w in choices(name)]
        return gr.Radio(words, value=str(value), **common)
    if spec.slider is not None:
        low, high, step = spec.slider
        return Slider(low, high, value=value, step=step, **common)
    return Number(value, precision=0 if value_type(name) is int else None, **common)


def endpoint(fn: Callable, names: list[str]) -> Callable:
    """`fn(request=…, **values)` as a Gradio handler taking one argument per input, in
    `names`' order; its signature names them (what API clients see)."""
    def handler(*args):
        *values, request = args
        return fn(request=request, **dict(zip(names, values)))

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    handler.__signature__ = inspect.Signature(
        [inspect.Parameter(n, positional) for n in names]
        + [inspect.Parameter("request", positional, default=None, annotation=gr.Request)])
    handler.__annotations__ = {"request": gr.Request}
    return handler


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
        if row["target retention"] < LITTLE_OF_THE_TARGET and reads(run.settings.get("method"), "keep"):
            lines.append("*This patch keeps little of the new skill: try a larger patch size (keep).*")
    elif run.quick is None:
        lines.append("*No quick check: this pair has no evaluation sets. Add them in the Models tab "
                     "(Evaluation sets) to score each merge on a few examples.*")
    return "\n\n".join(lines)


def calibration_markdown(handle: PairHandle, sets) -> str:
    """Where the pair's own calibration data comes from, or how to give it some."""
    try:
        examples, _, where = pair_calibration(handle, sets)
    except UserError as exc:  # a single target example: nothing to keep apart
        return f"*Calibration: {exc}*"
    return f"*Calibrates on {where}.*" if examples else f"*Calibration: {NO_CALIBRATION}, or upload one.*"


def search_markdown(run: SearchRun | None) -> str:
    """The best candidate of a search, and which examples scored it."""
    if run is None:
        return ("*Which patch should you use? Find settings tries Model Tailor's keep x alpha x "
                "compensation and each chosen baseline on its own axis, calibrating on part of the "
                "target-task data and scoring every candidate on the rest (the new skill) and on "
                "the original tasks.*")
    best = run.result.best_row
    used = "; ".join(f"{name}: {what}" for name, what in run.result.used.items())
    return (f"**Best:** {best['setting']} · original skills kept {100 * best['original_retention']:.0f}% "
            f"· target gain kept {100 * best['target_gain']:.0f}% · h {best['h']:.3f} "
            f"({len(run.result.front)} on the front, {run.seconds:.0f} s)\n\n*Scored on {used}."
            + (f" One held-out answer moves a target gain by up to {run.result.gain_step:.2f}: read "
               "closer candidates as ties." if not math.isnan(run.result.gain_step) else "")
            + "*")


class TailorTab(Tab):
    # -- handlers ----------------------------------------------------------------------

    def _submit(self, session, values: Mapping[str, Any], supersede: bool = False):
        settings = build_settings(values["method"], values, values.get("modules"),
                                  values.get("modules_regex", ""))
        return self.studio.submit_tailor(session, settings, calib_source=values["calib_source"],
                                         calib_files=values.get("calib_files") or None,
                                         calib_examples=int(values["calib_examples"]),
                                         supersede=supersede)

    @user_errors
    def run(self, request: gr.Request = None, **values: Any):
        """Queue a merge with these settings (the method, its knobs by name, the module
        picker and regex, the calibration source, files and example count; a knob left out
        takes the dashboard's default); returns its job id and progress."""
        session = self.studio.session(session_id(request))
        return queued(session, "tailor", self._submit(session, values))

    def rerun(self, auto: bool, request: gr.Request = None, **values: Any):
        """A slider was released: after a first run (the visitor's, or the start-up merge of
        the demo pair) merge again with the new value; an unfinished earlier merge of the
        session is superseded. With one-pass Hessians this re-thresholds cached scores."""
        try:
            session = self.studio.session(session_id(request))
            handle = self.studio.handle_for(session)
            if not auto or (session.latest_run(handle) is None and handle.default_run is None):
                return gr.skip(), gr.skip()
            job = self._submit(session, values, supersede=True)
        except Exception as exc:  # a slider move never pops an error: the Run button does
            if not isinstance(exc, UserError):
                log.exception("re-running a merge after a slider move failed")
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
    def find(self, methods: list[str] | None, keeps: str, alphas: str, lams: str,
             compensations: list[str] | None, examples: float, holdout: float, calib_source: str,
             calib_files: list[str] | None, calib_examples: float, request: gr.Request = None):
        """Queue a search of which patch to use; returns its job id and progress."""
        session = self.studio.session(session_id(request))
        job = self.studio.submit_search(
            session, parse_numbers(keeps, "keep"), parse_numbers(alphas, "alpha"),
            {"compensation": list(compensations or [])}, methods=list(methods or []),
            lams=parse_numbers(lams, "λ", *LAMBDA_RANGE), examples=int(examples),
            holdout=float(holdout), calib_source=calib_source, calib_files=calib_files or None,
            calib_examples=int(calib_examples))
        return queued(session, "search", job)

    cancel_search = cancel_button("search")

    @user_errors
    def use_best(self, request: gr.Request = None) -> dict:
        """Set the merge widgets to the best settings of the session's latest search."""
        session = self.studio.session(session_id(request))
        self.studio.sync(session, "search")
        run = session.latest_search()
        if run is None:
            raise gr.Error("no finished search yet: press Find settings first")
        best = run.result.best
        # the method's summary and knobs come with it (a method set here fires no `input`)
        shown = dict(zip([*self.knobs.values(), self.method_info], self.method_changed(best.method)))
        return {**shown, self.method: best.method,
                **{control: gr.update(value=getattr(best, name), visible=reads(best.method, name))
                   for name, control in self.knobs.items() if getattr(best, name) is not None}}

    def search_poll(self, session) -> list:
        self.studio.sync(session, "search")
        out = [latest_progress(self.studio.runner, session, "search", FIND_IDLE)]
        run = session.latest_search()
        if changed(session, "search-result", run.job_id if run else None):
            return out + [plots.settings_search(run.result.table if run else None), search_markdown(run)]
        return out + [gr.skip()] * 2

    def method_changed(self, method: str) -> list:
        """Show the method's knobs and hide the others; a knob whose default is the method's
        own (λ) takes it."""
        info = REGISTRY.get(method)
        if info is None:
            return [gr.skip()] * (len(self.knobs) + 1)
        return [gr.update(visible=reads(method, name),
                          **({"value": info.defaults[name]} if name in info.defaults else {}))
                for name in self.knobs] + [f"*{info.summary}*"]

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
        targets = tuple((s.name, len(s.examples)) for s in sets if s.role == "target")
        if handle is not None and changed(session, "tailor-calib", (id(handle), targets)):
            out.append(calibration_markdown(handle, sets))
        else:
            out.append(gr.skip())
        every = runner.history(session.id)
        if changed(session, "job-history", tuple(job_signature(j) for j in every)):
            out.append(history_table(every))
        else:
            out.append(gr.skip())
        return out + self.search_poll(session)

    def poll_outputs(self) -> list:
        return [self.progress, self.result, self.quick, self.heatmap, self.modules, self.knobs["compensation"],
                self.find_compensation, self.calib_info, self.history,
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
                with gr.Row():
                    self.find_button = gr.Button("Find settings", elem_id="tailor-find")
                    self.find_cancel = gr.Button("Cancel search", variant="stop",
                                                 elem_id="tailor-find-cancel")
                self._search_controls()
            with gr.Column(scale=2):
                self._outputs()
                self._search_outputs()
        self.history = gr.Dataframe(history_table([]), label="Your jobs", interactive=False,
                                    elem_id="job-history", wrap=True, max_height=300)
        self._wire()

    def _merge_controls(self) -> None:
        choices = [(info.label, name) for name, info in REGISTRY.items()]
        self.method = gr.Dropdown(choices, value=Settings.method, label="Method", elem_id="tailor-method")
        self.method_info = gr.Markdown(f"*{REGISTRY[Settings.method].summary}*",
                                       elem_id="tailor-method-info")
        self.knobs = {name: knob_control(name, Settings.method) for name in SHOWN
                      if not KNOBS[name].advanced}
        self.auto = gr.Checkbox(True, label="Re-run when a slider is released",
                                elem_id="tailor-auto")
        self.modules = gr.Dropdown([], value=[], multiselect=True, label="Modules",
                                   info="empty: every linear layer fine-tuning changed",
                                   elem_id="tailor-modules")

    def _calibration_controls(self) -> None:
        with gr.Accordion("Calibration data (target task)", open=False):
            self.calib_source = gr.Radio([("the pair's own (its built-in set, or your target sets of the "
                                           "Models tab)", "builtin"),
                                          ("upload JSONL + images, or a .zip", "upload")],
                                         value="builtin", label="Calibration set",
                                         elem_id="tailor-calib-source")
            self.calib_info = gr.Markdown(elem_id="tailor-calib-info")
            self.calib_files = gr.File(file_count="multiple", type="filepath",
                                       label="JSONL ({image, question, answers} per line) with its images",
                                       elem_id="tailor-calib-files")
            self.calib_n = Slider(8, 512, value=self.studio.config.calib_examples, step=8,
                                  label="Calibration examples", elem_id="tailor-calib-n")

    def _advanced_controls(self) -> None:
        with gr.Accordion("Advanced", open=False):
            self.knobs.update({name: knob_control(name, Settings.method) for name in SHOWN
                               if KNOBS[name].advanced})
            self.modules_regex = gr.Textbox(label=KNOBS["modules"].label + " (overrides the picker)",
                                            placeholder=r"language_model\.layers\.(2|3)\.",
                                            elem_id="tailor-modules-regex")

    def _search_controls(self) -> None:
        with gr.Accordion("Find settings: the grid", open=False):
            self.find_methods = gr.CheckboxGroup([(info.label, name) for name, info in REGISTRY.items()],
                                                 value=list(search.DEFAULT_METHODS), label="Methods",
                                                 elem_id="tailor-find-methods")
            self.find_keeps = gr.Textbox(format_numbers(search.SEARCH_GRID["keep"]), label="Patch sizes (keep)",
                                         elem_id="tailor-find-keeps")
            self.find_alphas = gr.Textbox(format_numbers(search.SEARCH_GRID["alpha"]),
                                          label="Fusion weights (alpha)",
                                          elem_id="tailor-find-alphas")
            self.find_lams = gr.Textbox(format_numbers(search.SEARCH_GRID["lam"]), label="λ values (WiSE-FT)",
                                        elem_id="tailor-find-lams")
            # the pair's defaults (anchored where it has an anchor set) arrive with the first poll
            self.find_compensation = gr.CheckboxGroup(["exact", "greedy", "anchored"],
                                                      value=Settings.default_compensations(False, search=True),
                                                      label="Compensation forms",
                                                      elem_id="tailor-find-compensation")
            self.find_n = Slider(4, 150, value=search.DEFAULT_LIMIT, step=4,
                                 label="Examples per original-task set",
                                 elem_id="tailor-find-n")
            self.find_holdout = Slider(0.1, 0.5, value=search.DEFAULT_HOLDOUT, step=0.05,
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
        components = {"method": self.method, **self.knobs, "modules": self.modules,
                      "modules_regex": self.modules_regex, "calib_source": self.calib_source,
                      "calib_files": self.calib_files, "calib_examples": self.calib_n}
        names, inputs = list(components), list(components.values())
        self.run_button.click(endpoint(self.run, names), inputs, [self.job_id, self.progress],
                              api_name="tailor", concurrency_limit=None)
        for slider in (c for c in self.knobs.values() if isinstance(c, gr.Slider)):
            slider.release(endpoint(self.rerun, ["auto", *names]), [self.auto, *inputs],
                           [self.job_id, self.progress], api_visibility="private",
                           concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")
        self.cancel_button.click(self.cancel, [self.job_id], [self.progress], api_name="cancel_tailor",
                                 concurrency_limit=None)
        self.method.input(self.method_changed, [self.method], [*self.knobs.values(), self.method_info],
                           api_visibility="private", queue=False)
        self.find_button.click(self.find, [self.find_methods, self.find_keeps, self.find_alphas,
                                           self.find_lams, self.find_compensation, self.find_n,
                                           self.find_holdout, self.calib_source, self.calib_files,
                                           self.calib_n],
                               [self.find_job_id, self.find_progress], api_name="find_settings",
                               concurrency_limit=None)
        self.find_cancel.click(self.cancel_search, [self.find_job_id], [self.find_progress],
                               api_name="cancel_find_settings", concurrency_limit=None)
        self.use_best_button.click(self.use_best, None, [self.method, self.method_info, *self.knobs.values()],
                                   api_name="use_best_settings", concurrency_limit=None)