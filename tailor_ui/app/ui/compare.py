"""Compare tab: one image, one prompt, every model's answer side by side."""

from __future__ import annotations

import logging

import gradio as gr
import pandas as pd

from tailor_ui.errors import UserError
from tailor_ui.app.jobs import CANCELLED, DONE, FAILED
from tailor_ui.app.service import compare as compare_
from tailor_ui.app.ui.common import Number, Tab, changed, named_errors, session_id, user_errors
from tailor_ui.demo.sets import demo_examples

log = logging.getLogger(__name__)

MODES = [("Caption the image", "caption"), ("Ask a question", "question")]


FIRST_OPEN = "compare-first-open"  # the owner of the jobs answering the first example


def references_text(answers: list[str]) -> str:
    return "**Reference answers:** " + " | ".join(dict.fromkeys(answers))


class CompareTab(Tab):
    examples: gr.Examples | None = None

    def __init__(self, studio) -> None:
        super().__init__(studio)
        self.first_jobs: dict[int, object] = {}  # pair handle id -> its first example's job

    @user_errors
    def compare(self, image, mode: str, question: str, request: gr.Request):
        """Answers of the pre-trained, fine-tuned and tailored models (and any other merge
        of this session): three text boxes and a table of all."""
        question = (question or "").strip()
        if mode == "question" and not question:
            raise UserError("type a question, or choose 'Caption the image'")
        session = self.studio.session(session_id(request))
        answers = self.studio.compare(session, image, question if mode == "question" else "")
        return self.shown(answers, self.studio.handle_for(session))

    @staticmethod
    def shown(answers: list[tuple[str, str]], handle) -> tuple:
        """The pre-trained, fine-tuned and tailored answers and the table of all."""
        fine_tuned = [a for name, a in answers if name.startswith("Fine-tuned")]
        merges = answers[1 + len(handle.pair.finetuned):]
        tailored = merges[0][1] if merges else "(run a merge in the Tailor tab)"
        table = pd.DataFrame(answers, columns=["model", "answer"])
        return answers[0][1], fine_tuned[0] if fine_tuned else "", tailored, table

    @user_errors
    def pick(self, name: str, number: float, request: gr.Request):
        """Example `number` of one of the pair's evaluation sets: image, task, question and
        its reference answers."""
        if not name:
            raise UserError("choose an evaluation set (add your own in the Models tab)")
        session = self.studio.session(session_id(request))
        image, question, answers = self.studio.eval_example(session, name, int(number or 1))
        return image, "question" if question else "caption", question, references_text(answers)

    def poll(self, session, handle) -> list:
        """The set picker's choices (the pair's sets) when they changed, the demo's example
        images only on the demo pair, and the first example with its answers on first open."""
        names = [] if handle is None else [s.name for s in (*handle.eval_sets, *session.eval_sets)]
        out = [gr.update(choices=names) if changed(session, "compare-sets", names) else gr.skip()]
        if self.examples is not None:
            demo = session.use_demo
            out.append(gr.update(visible=demo) if changed(session, "compare-examples", demo) else gr.skip())
        return out + self.first_open(session, handle)

    def first_open(self, session, handle) -> list:
        """Compare opens on the demo pair's first target example with every model's answers
        (computed once per pair, after its start-up merge) until the visitor compares."""
        skip = [gr.skip()] * 8
        if (handle is None or not session.use_demo or handle.default_run is None
                or session.sent.get("compare-first") == id(handle)
                or self.studio.runner.history(session.id, "compare")):
            return skip
        example = compare_.first_example(handle)
        job = self.first_jobs.get(id(handle))
        if example is None or (job is not None and job.status in (FAILED, CANCELLED)):
            session.sent["compare-first"] = id(handle)
            return skip
        if job is None:
            job = self.studio.runner.submit(
                FIRST_OPEN, "compare", lambda progress, _stop: compare_.first_answers(handle, 32, progress),
                label="Compare's first example", lane=handle.lane)
            self.first_jobs[id(handle)] = job
        if job.status != DONE:
            return skip
        session.sent["compare-first"] = id(handle)
        image, question, references = example
        return [image, "question" if question else "caption", question, references_text(references),
                *self.shown(job.result, handle)]

    def poll_outputs(self) -> list:
        return [self.set_choice, *([self.examples.dataset] if self.examples is not None else []),
                self.image, self.mode, self.question, self.references, self.base, self.finetuned,
                self.tailored, self.table]

    def trained_answer(self, table, request: gr.Request) -> str:
        """The answer of the session's latest model fine-tuned in the Fine-tune tab, read from
        the comparison table (a follow-up step, so /compare keeps its four outputs)."""
        try:
            session = self.studio.session(session_id(request))
            self.studio.sync(session, "finetune")
            trained = session.trained_for(self.studio.handle_for(session))
        except UserError:  # no pair (yet): nothing to show beside the comparison
            return ""
        if not trained:
            return "(fine-tune a model in the Fine-tune tab)"
        rows = table.values.tolist() if isinstance(table, pd.DataFrame) else (
            table.get("data", []) if isinstance(table, dict) else table or [])
        answers = {str(r[0]): str(r[1]) for r in rows if len(r) >= 2}
        return answers.get(trained[-1].label, "(press Compare)")

    def render(self) -> None:
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                self.image = named_errors(
                    gr.Image(type="pil", label="Image", sources=["upload", "clipboard"], height=260,
                             elem_id="compare-image"),
                    unreadable="not an image this server can read; upload a PNG, JPEG or WebP file")
                self.mode = gr.Radio(MODES, value="caption", label="Task", elem_id="compare-mode")
                self.question = gr.Textbox(label="Question", placeholder="what shape is on the left?",
                                           elem_id="compare-question")
                self.button = gr.Button("Compare", variant="primary", elem_id="compare-run")
                with gr.Group():
                    with gr.Row():
                        # choices come with polling; a name typed or sent by an API client is
                        # checked by the service
                        self.set_choice = gr.Dropdown([], label="…or an example of an evaluation set",
                                                      allow_custom_value=True, scale=3,
                                                      elem_id="compare-set")
                        self.set_number = Number(1, label="example", precision=0, minimum=1, scale=1,
                                                 elem_id="compare-set-n")
                    self.pick_button = gr.Button("Compare on this example", elem_id="compare-pick")
                self.references = gr.Markdown(elem_id="compare-references")
            with gr.Column(scale=2):
                with gr.Row(equal_height=True):
                    self.base = gr.Textbox(label="Pre-trained", lines=3, interactive=False,
                                           elem_id="compare-base")
                    self.finetuned = gr.Textbox(label="Fine-tuned", lines=3, interactive=False,
                                                elem_id="compare-finetuned")
                    self.tailored = gr.Textbox(label="Tailored (your latest Model Tailor merge)", lines=3,
                                               interactive=False,
                                               elem_id="compare-tailored")
                    self.trained = gr.Textbox(label="Fine-tuned here (your latest Fine-tune run)",
                                              lines=3, interactive=False, elem_id="compare-trained")
                self.table = gr.Dataframe(headers=["model", "answer"], label="Every model",
                                          interactive=False, wrap=True, elem_id="compare-table")
        outputs = [self.base, self.finetuned, self.tailored, self.table]
        self.button.click(self.compare, [self.image, self.mode, self.question], outputs,
                          api_name="compare", concurrency_limit=None)
        self.pick_button.click(self.pick, [self.set_choice, self.set_number],
                               [self.image, self.mode, self.question, self.references],
                               api_name="eval_example", concurrency_limit=None).success(
            self.compare, [self.image, self.mode, self.question], outputs, api_visibility="private",
            concurrency_limit=None)
        # on the table's change, not chained to the button: a clicked example fills it too
        self.table.change(self.trained_answer, [self.table], [self.trained], api_visibility="private",
                          queue=False)
        rows = demo_examples(self.studio.config.demo_dir)
        if rows:
            self.examples = gr.Examples([[path, "caption" if not q else "question", q] for path, q in rows],
                        [self.image, self.mode, self.question], outputs, fn=self.compare,
                        run_on_click=True, cache_examples=False, examples_per_page=12,
                        label="Examples (click one)", elem_id="compare-examples",
                        api_visibility="private")
            # the reference answers shown belong to the example picked before
            self.examples.dataset.click(lambda: "", None, [self.references], api_visibility="private",
                                        queue=False)
