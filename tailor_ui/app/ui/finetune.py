"""Fine-tune tab: train a copy of the base model (full, Model-Dowser, its random-mask
control, LLaCA or EMA) on the demo's target task as a background job, watch its loss, then
see it in Compare and in the Forgetting sweep next to the post-hoc methods; or run the
shapes world's continual sequence and watch each task's accuracy across the stages."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from tailor_ui.app import plots
from tailor_ui.demo.tasks import DEFAULT_SEQUENCE
from tailor_ui.app.service.finetune import METHOD_DEFAULTS
from tailor_ui.training.continual import ContinualMethod
from tailor_ui.app.session import TrainedModel
from tailor_ui.app.ui.common import (Number, Slider, Tab, cancel_button, changed, job_signature,
                                 latest_progress, progress_html, queued, session_id, user_errors)
from tailor_ui.training.registry import TRAINING_METHODS

METHOD_CHOICES = [(cls.label, name) for name, cls in TRAINING_METHODS.items()]
INTRO = ("Fine-tune a **copy** of the pre-trained model on the demo story's target task (freshly "
         "drawn shapes-world scenes — not the evaluation or calibration sets). The result joins "
         "**Compare** and the **Forgetting** sweep next to the post-hoc methods, so you can see how "
         "much each training method forgets.")


def method_info(method: str) -> str:
    cls = TRAINING_METHODS[method]
    return f"*{cls.label}: {cls.about}*"


def continual_button(method: str) -> dict:
    """The continual button, offered where the method has a continual form; greyed out, its
    label says why."""
    if method in set(ContinualMethod):
        return gr.update(interactive=True, value=CONTINUAL_BUTTON)
    *others, last = [TRAINING_METHODS[m].label for m in ContinualMethod]
    label = TRAINING_METHODS[method].label
    return gr.update(interactive=False,
                     value=f"{CONTINUAL_BUTTON} (not with {label}: choose {', '.join(others)} or {last})")


CONTINUAL_BUTTON = "Run the continual sequence"
IDLE = "Press Fine-tune: training runs in the background."
CONTINUAL = (f"**Continual:** the same method and settings on {' → '.join(DEFAULT_SEQUENCE)} "
             "questions, one after another (the number of examples is per task; full fine-tuning "
             "runs as plain sequential tuning). Each task's accuracy after every stage shows what "
             "the later tasks made the model forget.")


def result_markdown(trained: TrainedModel | None) -> str:
    if trained is None:
        return ("*The trained model appears in **Compare** (its answers) and in **Forgetting** "
                "(a row of the next sweep).*")
    r = trained.report
    losses = r.get("losses") or []
    lines = [f"### {trained.label} — `{trained.job_id}`",
             f"**Trained:** layers {', '.join(map(str, r.get('layers', [])))} · "
             f"{r.get('trainable_entries', 0):,} entries allowed to change "
             f"({100 * r.get('trainable_fraction', 0.0):.2f}% of the model) · {r.get('steps', 0)} steps",
             f"**Loss:** {losses[0]:.3f} → {losses[-1]:.3f}" if losses else "**Loss:** –",
             f"**Time:** {trained.seconds:.1f} s",
             "**Models added:** " + ", ".join(f"*{name}*" for name, _ in trained.models)
             + " — see Compare, and run a sweep in Forgetting to score them."]
    return "\n\n".join(lines)


class FinetuneTab(Tab):
    # -- handlers ----------------------------------------------------------------------

    @user_errors
    def run(self, method: str, rho: float, lr: float, epochs: float, layers: str,
            examples: float, tailor_after: bool, beta: float = 0.99, request: gr.Request = None):
        """Queue a fine-tuning run of a copy of the base model on the demo's target task;
        returns its job id and progress."""
        session = self.studio.session(session_id(request))
        job = self.studio.submit_finetune(
            session, method, examples=int(examples), lr=float(lr), epochs=int(epochs),
            layers=(layers or "").strip() or None, rho=float(rho), tailor_after=bool(tailor_after),
            ema_beta=float(beta))
        return queued(session, "finetune", job)

    @user_errors
    def run_continual(self, method: str, lr: float, epochs: float, layers: str, examples: float,
                      beta: float = 0.99, request: gr.Request = None):
        """Queue a continual run (the shapes world's task sequence) with the chosen method."""
        session = self.studio.session(session_id(request))
        job = self.studio.submit_continual(
            session, method, examples=int(examples), lr=float(lr), epochs=int(epochs),
            layers=(layers or "").strip() or None, ema_beta=float(beta))
        return queued(session, "continual", job)

    cancel = cancel_button("finetune")
    cancel_continual = cancel_button("continual")

    @staticmethod
    def method_changed(method: str):
        """The method's own knobs become editable, every knob takes the method's default
        (the demo sweep's), and the continual button is offered where the method has a
        continual form."""
        options, defaults = TRAINING_METHODS[method].options, METHOD_DEFAULTS.get(method, {})
        return (gr.update(interactive="rho" in options, **({"value": defaults["rho"]} if "rho" in defaults else {})),
                gr.update(value=defaults.get("lr", 1e-3)),
                gr.update(interactive="ema_beta" in options,
                          **({"value": defaults["ema_beta"]} if "ema_beta" in defaults else {})),
                continual_button(method), method_info(method))

    # -- polling ---------------------------------------------------------------------------

    def poll(self, session) -> list:
        """Progress bar, live loss curve and the result of the session's latest run."""
        self.studio.sync(session, "finetune")
        jobs = self.studio.runner.history(session.id, "finetune")
        job = jobs[0] if jobs else None
        out = [progress_html(job, IDLE) if changed(session, "finetune-progress", job_signature(job))
               else gr.skip()]
        losses = self.studio.finetune_losses(session, job.id) if job else []
        title = f"Training loss — {job.label.removeprefix('fine-tune: ')}" if job else "Training loss"
        out.append(plots.loss_curve(losses, title)
                   if changed(session, "finetune-loss", (job.id if job else None, len(losses),
                                                         job.status if job else None))
                   else gr.skip())
        trained = session.trained.get(job.id) if job else None
        out.append(result_markdown(trained)
                   if changed(session, "finetune-result", trained.job_id if trained else None)
                   else gr.skip())
        out.append(latest_progress(self.studio.runner, session, "continual", ""))
        continual = self.studio.runner.history(session.id, "continual")
        done = next((j for j in continual if isinstance(j.result, pd.DataFrame)), None)
        out.append(plots.continual_accuracy(done.result, f"Continual — {done.label.removeprefix('continual: ')}")
                   if done is not None and changed(session, "continual-plot", done.id) else gr.skip())
        return out

    def poll_outputs(self) -> list:
        return [self.progress, self.loss_plot, self.result, self.continual_progress,
                self.continual_plot]

    # -- layout ----------------------------------------------------------------------------

    def render(self) -> None:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                self.method = gr.Radio(METHOD_CHOICES, value="full", label="Method",
                                       elem_id="finetune-method")
                self.method_info = gr.Markdown(method_info("full"),
                                               elem_id="finetune-method-info")
                self.rho = Slider(0.01, 1.0, value=0.1, step=0.01, interactive=False,
                                     label="ρ (Model-Dowser: trainable fraction per matrix)",
                                     elem_id="finetune-rho")
                self.lr = Number(METHOD_DEFAULTS["full"]["lr"], label="Learning rate",
                                 minimum=1e-7, maximum=1.0, elem_id="finetune-lr")
                self.beta = Number(0.99, label="β (EMA: weight the average keeps per step)",
                                   minimum=0.0, maximum=1.0, interactive=False,
                                   elem_id="finetune-beta")
                self.epochs = Slider(1, 10, value=1, step=1, label="Epochs",
                                        elem_id="finetune-epochs")
                self.layers = gr.Textbox("", label="Layers",
                                         placeholder="empty = last half; 2 = last two; 1,3; all",
                                         elem_id="finetune-layers")
                self.examples = Slider(8, 512, value=32, step=8, label="Training examples",
                                          # bench/finetune_seconds.py, 2 shared CPU cores
                                          info="on the demo, 32 take about 1 s (Model-Dowser 2–9 s); "
                                               "512 take 9–13 s "
                                               "(Model-Dowser 34 s)",
                                          elem_id="finetune-n")
                self.tailor_after = gr.Checkbox(False, label="Also run Model Tailor on the result "
                                                "(default settings)", elem_id="finetune-tailor")
                with gr.Row():
                    self.run_button = gr.Button("Fine-tune", variant="primary", elem_id="finetune-run")
                    self.cancel_button = gr.Button("Cancel", variant="stop", elem_id="finetune-cancel")
            with gr.Column(scale=2):
                self.job_id = gr.Textbox(label="Job id", interactive=False, elem_id="finetune-job-id")
                self.progress = gr.HTML(progress_html(None, IDLE), elem_id="finetune-progress")
                self.loss_plot = gr.Plot(plots.loss_curve(None), elem_id="finetune-loss",
                                         show_label=False)
                self.result = gr.Markdown(result_markdown(None), elem_id="finetune-result")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                gr.Markdown(CONTINUAL)
                with gr.Row():
                    self.continual_button = gr.Button(CONTINUAL_BUTTON, elem_id="finetune-continual")
                    self.continual_cancel = gr.Button("Cancel", variant="stop",
                                                      elem_id="finetune-continual-cancel")
            with gr.Column(scale=2):
                self.continual_job = gr.Textbox(label="Continual job id", interactive=False,
                                                elem_id="finetune-continual-job-id")
                self.continual_progress = gr.HTML("", elem_id="finetune-continual-progress")
                self.continual_plot = gr.Plot(plots.continual_accuracy(None),
                                              elem_id="finetune-continual-plot", show_label=False)
        self.continual_button.click(
            self.run_continual, [self.method, self.lr, self.epochs, self.layers, self.examples,
                                 self.beta],
            [self.continual_job, self.continual_progress], api_name="finetune_continual",
            concurrency_limit=None)
        inputs = [self.method, self.rho, self.lr, self.epochs, self.layers, self.examples,
                  self.tailor_after, self.beta]
        self.run_button.click(self.run, inputs, [self.job_id, self.progress], api_name="finetune",
                              concurrency_limit=None)
        self.cancel_button.click(self.cancel, [self.job_id], [self.progress],
                                 api_name="cancel_finetune", concurrency_limit=None)
        self.continual_cancel.click(self.cancel_continual, [self.continual_job], [self.continual_progress],
                                    api_name="cancel_continual", concurrency_limit=None)
        self.method.change(self.method_changed, [self.method],
                           [self.rho, self.lr, self.beta, self.continual_button, self.method_info],
                           api_visibility="private", queue=False)
