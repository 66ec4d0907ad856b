"""Fine-tune tab: train a copy of the base model (full, Model-Dowser, LLaCA or EMA) on the
demo's target task as a background job, watch its loss, then see it in Compare and in the
Forgetting sweep next to the post-hoc methods."""

from __future__ import annotations

import gradio as gr

from tailor_ui import plots
from tailor_ui.session import TrainedModel
from tailor_ui.ui.common import (Number, Slider, Tab, cancel_html, changed, job_signature,
                                 progress_html, queued, session_id, user_errors)
from tailor_ui.training.registry import TRAINING_METHODS

METHOD_CHOICES = [(cls.label, name) for name, cls in TRAINING_METHODS.items()]
INTRO = ("Fine-tune a **copy** of the pre-trained model on the demo story's target task (freshly "
         "drawn shapes-world scenes — not the evaluation or calibration sets). The result joins "
         "**Compare** and the **Forgetting** sweep next to the post-hoc methods, so you can see how "
         "much each training method forgets.")


def method_info(method: str) -> str:
    cls = TRAINING_METHODS[method]
    return f"*{cls.label}: {cls.about}*"


IDLE = "Press Fine-tune: training runs in the background."


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
            examples: float, tailor_after: bool, request: gr.Request):
        """Queue a fine-tuning run of a copy of the base model on the demo's target task;
        returns its job id and progress."""
        session = self.studio.session(session_id(request))
        job = self.studio.submit_finetune(
            session, method, examples=int(examples), lr=float(lr), epochs=int(epochs),
            layers=(layers or "").strip() or None, rho=float(rho), tailor_after=bool(tailor_after))
        return queued(session, "finetune", job)

    @user_errors
    def cancel(self, job_id: str, request: gr.Request):
        """Cancel a fine-tuning run: the given one if unfinished, else the latest unfinished."""
        return cancel_html(self.studio.runner, session_id(request), "finetune", job_id)

    @staticmethod
    def method_changed(method: str):
        return gr.update(interactive="rho" in TRAINING_METHODS[method].options), method_info(method)

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
        return out

    def poll_outputs(self) -> list:
        return [self.progress, self.loss_plot, self.result]

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
                self.lr = Number(1e-3, label="Learning rate", minimum=1e-7, maximum=1.0,
                                    elem_id="finetune-lr")
                self.epochs = Slider(1, 10, value=1, step=1, label="Epochs",
                                        elem_id="finetune-epochs")
                self.layers = gr.Textbox("", label="Layers",
                                         placeholder="empty = last half; 2 = last two; 1,3; all",
                                         elem_id="finetune-layers")
                self.examples = Slider(8, 512, value=32, step=8, label="Training examples",
                                          info="a few dozen train in seconds on a CPU",
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
        inputs = [self.method, self.rho, self.lr, self.epochs, self.layers, self.examples,
                  self.tailor_after]
        self.run_button.click(self.run, inputs, [self.job_id, self.progress], api_name="finetune",
                              concurrency_limit=None)
        self.cancel_button.click(self.cancel, [self.job_id], [self.progress],
                                 api_name="cancel_finetune", concurrency_limit=None)
        self.method.change(self.method_changed, [self.method], [self.rho, self.method_info],
                           api_visibility="private", queue=False)
