"""Models tab: use the demo pair or load your own; see what fine-tuning changed."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from tailor_ui.app import plots
from tailor_ui.errors import UserError
from tailor_ui.pair import DTYPES
from tailor_ui.app.session import PairHandle
from tailor_ui.demo.sets import DEFAULT_STORY, STORIES
from tailor_ui.app.ui.common import (Tab, changed, job_signature, progress_html, public_text, session_id,
                                 user_errors)
from tailor_ui.app.ui.evalsets import EvalSetsPanel
from tailor_ui.app.service.config import default_settings
from tailor_ui.app.service.studio import Studio
from tailor_ui.app.service.sweep import keep_hint, shipped_sweep

DTYPE_CHOICES = [d for d in DTYPES if len(d) > 4]  # float32, bfloat16, float16
LOADING_DEMO = "Loading the demo pair…"


def _millions(n: float) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e5 else f"{int(n):,}"


def _layers(values: pd.Series) -> str:
    layers = sorted({int(v) for v in values.dropna()})
    if not layers:
        return ""
    runs, start, prev = [], layers[0], layers[0]
    for v in layers[1:] + [None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(f"{start}" if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(runs)


def summary_markdown(handle: PairHandle) -> str:
    """Parameters, and which modules fine-tuning changed, in a few lines."""
    df = handle.summary
    total = int(df["numel"].sum())
    by_component = df.groupby("component")["numel"].sum()
    changed_rows = df[df["changed"] > 0]
    entries = int(changed_rows["changed"].sum())
    lines = [f"### {handle.label}",
             f"- **Parameters:** {_millions(total)} in {len(df)} tensors ("
             + ", ".join(f"{c} {_millions(n)}" for c, n in by_component.items()) + ")",
             f"- **Changed by fine-tuning:** {len(changed_rows)} tensors, {entries:,} entries "
             f"({100 * entries / max(total, 1):.1f}% of the model)"]
    for comp, group in changed_rows.groupby("component"):
        modules = ", ".join(sorted(set(group["module"]), key=plots.module_rank))
        where = _layers(group["layer"])
        lines.append(f"- **{comp}** {where}: {modules}")
    untouched = sorted(set(df["component"]) - set(changed_rows["component"]))
    if untouched:
        lines.append(f"- **Unchanged:** {', '.join(untouched)}")
    if len(handle.pair.finetuned) > 1:
        lines.append(f"- {len(handle.pair.finetuned)} fine-tuned models; the summary shows the first")
    return "\n".join(lines)


def changed_table(handle: PairHandle) -> pd.DataFrame:
    """One row per (component, layer, module) that fine-tuning changed."""
    df = handle.summary
    rows = df[df["changed"] > 0].copy()
    if rows.empty:
        return pd.DataFrame(columns=["component", "layer", "module", "tensors", "changed entries",
                                     "changed %", "relative change"])
    rows["layer"] = rows["layer"].astype("Int64")
    rows["delta_sq"], rows["base_sq"] = rows["delta_norm"] ** 2, rows["base_norm"] ** 2
    out = (rows.groupby(["component", "layer", "module"], dropna=False)
           .agg(tensors=("name", "count"), changed=("changed", "sum"), numel=("numel", "sum"),
                delta_sq=("delta_sq", "sum"), base_sq=("base_sq", "sum"))
           .reset_index())
    out["changed %"] = (100 * out["changed"] / out["numel"]).round(2)
    out["relative change"] = (out["delta_sq"] ** 0.5 / out["base_sq"].where(out["base_sq"] > 0) ** 0.5).round(5)
    out = out.rename(columns={"changed": "changed entries"})
    return out[["component", "layer", "module", "tensors", "changed entries", "changed %",
                "relative change"]]


def changed_modules(handle: PairHandle) -> list[str]:
    """Module kinds (q_proj, fc1…) of the linear weights fine-tuning changed."""
    df = handle.summary
    rows = df[(df["changed"] > 0) & df["linear"]]
    return sorted(set(rows["module"]), key=plots.module_rank)


def _summary_signature(handle: PairHandle | None, why: str) -> object:
    """What the summary, chart and table show: a pair, or the line saying why there is none."""
    return id(handle) if handle is not None else why


INTRO = ("The **built-in demo** is a miniature LLaVA trained on a world of coloured shapes: the "
         "base model captions and answers questions about attributes. It comes with two fine-tunes "
         "that forget in two different ways — pick one. Or load your own pre-trained and "
         "fine-tuned model (hub id `owner/name` or a local folder).")


def story_text(story: str) -> str:
    if story not in STORIES:
        return ""
    shipped = shipped_sweep(story)
    hint = keep_hint(shipped.table, default_settings().keep) if shipped is not None else ""
    return f"*The fine-tuned model was {STORIES[story].about}*" + (f"\n\n{hint}" if hint else "")


SUMMARIES_KEPT = 8  # pairs whose summary stays drawn (the demo's stories, recent visitors' pairs)


class ModelsTab(Tab):
    def __init__(self, studio: Studio) -> None:
        super().__init__(studio)
        self.evalsets = EvalSetsPanel(studio)  # beside the pair: the sets it is scored on
        # the pair every page is first served with (app.py builds the page once the demo
        # has loaded, or after MTS_DEMO_WAIT with none); one snapshot for status and summary
        self.first_pair: PairHandle | None = studio.demo
        # what such a page shows before its first poll, as poll's signatures (see _as_served)
        self.served = {"models-progress": job_signature(None), "pair-status": self.initial_status(),
                       "models-summary": _summary_signature(self.first_pair, LOADING_DEMO)}
        self._summaries: dict[tuple, tuple] = {}  # pair handle's key → what `_summary` shows

    # -- handlers ----------------------------------------------------------------------

    @user_errors
    def use_demo(self, story: str = DEFAULT_STORY, request: gr.Request = None):
        """Switch this session to the built-in demo pair of the given story; returns its summary."""
        session = self.studio.session(session_id(request))
        handle = self.studio.use_demo(session, story or DEFAULT_STORY)
        session.sent["models-summary"] = id(handle)
        return self._summary(handle)

    @user_errors
    def load(self, base: str, finetuned: str, dtype: str, device: str, request: gr.Request):
        """Queue loading a base and a fine-tuned model; returns the job id."""
        session = self.studio.session(session_id(request))
        job = self.studio.submit_load(session, base or "", finetuned or "", dtype or "float32",
                                      device or "cpu")
        return job.id, progress_html(job)

    def _summary(self, handle: PairHandle):
        """The pair's summary, change map and table: made once per pair (every visitor of
        the demo opens with it: a hundred arriving at once would each redraw it)."""
        shown = self._summaries.get(handle.key)
        if shown is None:
            shown = summary_markdown(handle), plots.change_map(handle.summary), changed_table(handle)
            self._summaries = {**dict(list(self._summaries.items())[-(SUMMARIES_KEPT - 1):]),
                               handle.key: shown}
        return shown

    # -- polling ---------------------------------------------------------------------------

    def current(self, session) -> tuple[PairHandle | None, str]:
        """The session's pair, or a line saying why there is none yet."""
        try:
            if session.own is None and not session.use_demo:
                loading = self.studio.runner.active(session.id, "load")
                if loading:
                    return None, "Loading your models…"
                return None, "No pair loaded: load your models or use the demo pair."
            if not self.studio.demo_ready.is_set() and (session.use_demo or session.own is None):
                return None, LOADING_DEMO
            return self.studio.handle_for(session), ""
        except UserError as exc:
            return None, public_text(str(exc))

    def _status(self, handle: PairHandle | None, why: str) -> str:
        if handle is None:
            return f"⏳ {why}" if "Loading" in why else f"⚠️ {why}"
        status = f"**Pair:** {handle.label} · {len(handle.pair.finetuned)} fine-tuned · device {handle.lane}"
        if handle.shared and self.studio.demo_seconds is not None:
            status += f" · ready (loaded in {self.studio.demo_seconds:.1f} s)"
        return status

    def initial_status(self) -> str:
        """The pair status as the page is first served: every visitor starts on the demo
        pair, so the first page shows it at once instead of after its first poll (a second
        on a busy CPU)."""
        demo = self.first_pair
        return self._status(demo, "") if demo is not None else self._status(None, LOADING_DEMO)

    def initial_summary(self) -> tuple:
        """Summary, chart and table as the page is first served (see initial_status)."""
        if self.first_pair is None:
            return f"*{LOADING_DEMO}*", plots.change_map(None), None
        return self._summary(self.first_pair)

    def _as_served(self, session) -> None:
        """Record a new page's first content as sent, so its first poll sends only what
        differs: not the demo's summary again (a chart rebuilt and redrawn per visitor)."""
        for key, signature in self.served.items():
            session.sent.setdefault(key, signature)

    def poll(self, session) -> list:
        self._as_served(session)
        handle, why = self.current(session)
        jobs = self.studio.runner.history(session.id, "load")
        job = jobs[0] if jobs else None
        out = [progress_html(job, "Loading runs in the background; its progress shows here.")
               if changed(session, "models-progress", job_signature(job)) else gr.skip()]
        status = self._status(handle, why)
        out.append(status if changed(session, "pair-status", status) else gr.skip())
        if changed(session, "models-summary", _summary_signature(handle, why)):
            if handle is None:
                out += [f"*{why}*", plots.change_map(None), pd.DataFrame()]
            else:
                out += list(self._summary(handle))
        else:
            out += [gr.skip()] * 3
        return out

    # -- layout ----------------------------------------------------------------------------

    def render(self) -> None:
        studio = self.studio
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                self.story = gr.Radio([(story.title, name) for name, story in STORIES.items()],
                                      value=DEFAULT_STORY, label="Demo story", elem_id="models-story")
                self.story_info = gr.Markdown(story_text(DEFAULT_STORY), elem_id="models-story-info")
                self.demo_button = gr.Button("Use the demo pair", variant="primary",
                                             elem_id="models-use-demo")
                with gr.Group():
                    self.base = gr.Textbox(label="Pre-trained (base) model", elem_id="models-base",
                                           placeholder="llava-hf/llava-1.5-7b-hf or /models/base")
                    self.finetuned = gr.Textbox(label="Fine-tuned model(s), comma-separated",
                                                elem_id="models-finetuned",
                                                placeholder="you/llava-1.5-7b-counting")
                    with gr.Row():
                        self.dtype = gr.Dropdown(DTYPE_CHOICES, value="float32" if not studio.has_gpu
                                                 else "bfloat16", label="dtype", elem_id="models-dtype")
                        devices = ["cpu", "cuda", "auto"] if studio.has_gpu else ["cpu"]
                        self.device = gr.Dropdown(devices, value=devices[1] if studio.has_gpu else "cpu",
                                                  label="device", elem_id="models-device")
                    self.load_button = gr.Button("Load pair", elem_id="models-load")
                self.job_id = gr.Textbox(label="Load job id", interactive=False, elem_id="models-job-id")
                self.progress = gr.HTML(progress_html(None, "Loading runs in the background; its "
                                                            "progress shows here."),
                                        elem_id="models-progress")
            summary, plot, table = self.initial_summary()
            with gr.Column(scale=2):
                self.summary = gr.Markdown(summary, elem_id="models-summary")
                self.plot = gr.Plot(plot, elem_id="models-change-plot", show_label=False)
        self.table = gr.Dataframe(table, label="What fine-tuning changed, per layer and module",
                                  interactive=False, elem_id="models-table", wrap=True, max_height=320)
        self.evalsets.render()

        self.demo_button.click(self.use_demo, [self.story], [self.summary, self.plot, self.table],
                               api_name="load_demo", concurrency_limit=None)
        self.story.change(story_text, [self.story], [self.story_info], api_visibility="private",
                          queue=False)
        self.load_button.click(self.load, [self.base, self.finetuned, self.dtype, self.device],
                               [self.job_id, self.progress], api_name="load_pair",
                               concurrency_limit=None)

    def poll_outputs(self, pair_status) -> list:
        return [self.progress, pair_status, self.summary, self.plot, self.table]
