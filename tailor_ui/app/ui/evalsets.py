"""Evaluation sets panel (Models tab, under the pair): add a set from an upload or a
`datasets` data set, see the sets the pair is scored on, remove one of yours."""

from __future__ import annotations

import gradio as gr

from tailor_ui.evaluation.sets import ROLES
from tailor_ui.app.ui.common import Tab, changed, session_id, user_errors

ROLE_LABELS = {"anchor": "anchor (original-task calibration for anchored Model Tailor, not scored)"}

FORMAT = ("Sets score every merge: the quick check (Tailor), the sweep (Forgetting), Find settings "
          "and Compare's examples. **Original** sets hold skills the base model had, **target** "
          "sets what fine-tuning taught; **anchor** sets are other examples of the original skills, "
          "which anchored Model Tailor holds the base to (never scored). Upload a JSONL with its "
          "images, or a zip of both, one example a line: "
          "`{\"image\": \"img/1.png\", \"question\": \"what is on the left?\", "
          "\"answers\": [\"a red circle\"]}` (a caption set has no question) — or name a `datasets` "
          "folder on the server or a hub id, its split (`test`, `test[:200]`) and columns "
          "(`image=img, question=q, answers=refs`).")
TASK_CHOICES = [("VQA (questions)", "vqa"), ("Captioning", "caption"), ("From the rows", "auto")]


class EvalSetsPanel(Tab):
    def _result(self, session):
        table = self.studio.eval_sets_table(session)
        mine = [s.name for s in session.eval_sets]
        session.sent["evalsets"] = self._signature(session)
        return table, gr.update(choices=mine, value=None)

    @user_errors
    def add(self, files, dataset: str, split: str, columns: str, name: str, role: str, task: str,
            request: gr.Request):
        """Add an evaluation set (uploaded files, or a datasets folder / hub id); returns the
        table of the pair's sets."""
        session = self.studio.session(session_id(request))
        files = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in (files or [])]
        self.studio.add_eval_set(session, role=role or "original",
                                 task=None if task in (None, "", "auto") else task, name=name or "",
                                 files=files, dataset=dataset or "", split=split or "test",
                                 columns=columns or "")
        return (*self._result(session), None)

    @user_errors
    def remove(self, name: str, request: gr.Request):
        """Remove one of your evaluation sets; returns the table of the pair's sets."""
        session = self.studio.session(session_id(request))
        self.studio.remove_eval_set(session, name or "")
        return self._result(session)

    def _signature(self, session) -> tuple:
        handle = session.own if not session.use_demo else session.demo_story
        return id(handle), tuple(s.name for s in session.eval_sets)

    def poll(self, session) -> list:
        """The table again when the pair or the visitor's sets changed."""
        if not changed(session, "evalsets", self._signature(session)):
            return [gr.skip(), gr.skip()]
        return list(self._result(session))

    def poll_outputs(self) -> list:
        return [self.table, self.remove_choice]

    def render(self) -> None:
        with gr.Accordion("Evaluation sets", open=True, elem_id="evalsets"):
            gr.Markdown(FORMAT, elem_id="evalsets-format")
            with gr.Row():
                with gr.Column(scale=1, min_width=260):
                    self.files = gr.File(label="JSONL + images, or a zip", file_count="multiple",
                                         file_types=[".jsonl", ".zip", "image"], elem_id="evalsets-files")
                with gr.Column(scale=1, min_width=260):
                    self.dataset = gr.Textbox(label="…or a datasets folder / hub id",
                                              placeholder="owner/name or my-sets/chartqa",
                                              elem_id="evalsets-dataset")
                    with gr.Row():
                        self.split = gr.Textbox("test", label="split", elem_id="evalsets-split")
                        self.columns = gr.Textbox(label="columns", elem_id="evalsets-columns",
                                                  placeholder="image=image, question=question, answers=answers")
                with gr.Column(scale=1, min_width=220):
                    self.name = gr.Textbox(label="Name (optional)", elem_id="evalsets-name",
                                           placeholder="from the file or folder")
                    self.role = gr.Radio([(ROLE_LABELS.get(r, r), r) for r in ROLES], value="original",
                                         label="Role", elem_id="evalsets-role")
                    self.task = gr.Radio(TASK_CHOICES, value="vqa", label="Task", elem_id="evalsets-task")
                    self.add_button = gr.Button("Add set", variant="primary", elem_id="evalsets-add")
            self.table = gr.Dataframe(headers=["name", "role", "task", "examples", "source"],
                                      label="Sets this pair is scored on", interactive=False,
                                      elem_id="evalsets-table", wrap=True)
            with gr.Row():
                self.remove_choice = gr.Dropdown([], label="Your set to remove", scale=3,
                                                 allow_custom_value=True,  # checked by the service
                                                 elem_id="evalsets-remove-name")
                self.remove_button = gr.Button("Remove", size="sm", scale=1, elem_id="evalsets-remove")
        self.add_button.click(self.add, [self.files, self.dataset, self.split, self.columns, self.name,
                                         self.role, self.task],
                              [self.table, self.remove_choice, self.files], api_name="add_eval_set",
                              concurrency_limit=None).failure(
            # refused files would stay in the box and be sent again with the next upload
            lambda: None, None, [self.files], api_visibility="private", queue=False)
        self.remove_button.click(self.remove, [self.remove_choice], [self.table, self.remove_choice],
                                 api_name="remove_eval_set", concurrency_limit=None)
