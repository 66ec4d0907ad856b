"""What a visitor sees before doing anything, and what a wrong input answers: the
Forgetting tab's shipped sweep, Compare's first example with its answers, the demo's
example images only on the demo pair, and a clear message for a non-image."""

from __future__ import annotations

import time
import uuid

import gradio as gr
import pytest

from conftest import request_for
from tailor_ui.app.jobs import DONE
from tailor_ui.app.ui.blocks import App


@pytest.fixture(scope="module")
def ui(studio):
    """The tabs built, not launched: their handlers and polls called directly."""
    ui = App(studio)
    ui.build()
    return ui


def new_session(studio):
    return studio.session(f"test-{uuid.uuid4().hex[:8]}")


def skipped(output) -> bool:
    return isinstance(output, dict) and output == gr.skip()


def test_forgetting_shows_the_shipped_sweep_until_the_visitors_own(ui, studio):
    session = new_session(studio)
    progress, source, tradeoff, keep, retention, heatmap, table, csv = ui.forgetting.poll(session)
    assert "**precomputed**" in source
    assert ("python -m tailor_ui sweep \\\n  --base assets/demo/base \\\n  --finetuned "
            "assets/demo/finetuned") in source
    assert "--out bench/results/demo_sweep_spatial.csv" in source
    assert "(precomputed)" in tradeoff.layout.title.text
    assert {"Model Tailor (paper) alpha=0.8", "Magnitude patch"} <= {t.name for t in tradeoff.data}
    assert len(table) == 34 and csv is None
    assert all(map(skipped, ui.forgetting.poll(session)[1:]))  # sent once
    session.demo_story = "counting"  # another story: its own shipped sweep
    assert "counting/finetuned" in ui.forgetting.poll(session)[1]
    job_id, _ = ui.forgetting.run(["magnitude"], "0.1", "", 0.8, 4, None,
                                   request=request_for(session.id))
    assert studio.runner.wait(job_id, session.id, 300).status == DONE
    source = ui.forgetting.poll(session)[1]
    assert source.startswith(f"Showing your sweep `{job_id}`")


def test_compare_opens_on_an_example_with_every_answer(ui, studio):
    session = new_session(studio)
    handle = studio.handle_for(session)
    deadline = time.time() + 120
    while skipped((outputs := ui.compare.poll(session, handle))[-1]):
        assert time.time() < deadline, "the first example's answers never came"
        time.sleep(0.2)
    image, mode, question, references, base, finetuned, tailored, table = outputs[-8:]
    target = next(s for s in handle.eval_sets if s.role == "target").examples[0]
    assert image == str(target.image) and question == target.question and mode == "question"
    assert references.startswith("**Reference answers:**") and target.answers[0] in references
    assert base and finetuned and tailored
    assert list(table["model"]) == ["Pre-trained", "Fine-tuned", "warm-up (default)"]
    # sent once; a second visitor gets the same answers without another job
    assert skipped(ui.compare.poll(session, handle)[-1])
    other = new_session(studio)
    assert ui.compare.poll(other, handle)[-4:-1] == [base, finetuned, tailored]


def test_the_demos_example_images_are_offered_only_on_the_demo_pair(ui, studio):
    session = new_session(studio)
    handle = studio.handle_for(session)
    assert ui.compare.poll(session, handle)[1]["visible"] is True
    session.use_demo = False  # an own pair: the demo's images are not its examples
    assert ui.compare.poll(session, None)[1]["visible"] is False


def test_compare_refuses_a_non_image_with_a_message(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    text = tmp_path / "notes.png"  # named like an image, but text
    text.write_text("not an image")
    with pytest.raises(AppError, match="Image: not an image this server can read"):
        client.predict(handle_file(str(text)), "caption", "", api_name="/compare")


def test_empty_tables_show_their_column_names(ui):
    for table in (ui.forgetting.table, ui.tailor.history, ui.tailor.quick):
        headers = table.value["headers"]
        assert headers and headers[:3] != ["1", "2", "3"], table.elem_id
    assert isinstance(ui.forgetting.table, gr.Dataframe)


def test_a_greyed_out_continual_button_says_why(ui):
    update = ui.finetune.method_changed("dowser")[3]
    assert update["interactive"] is False
    assert update["value"] == ("Run the continual sequence (not with Model-Dowser (sparse): choose "
                               "Full fine-tuning, EMA (fixed β) or LLaCA (adaptive EMA))")
    assert ui.finetune.method_changed("llaca")[3] == {"__type__": "update", "interactive": True,
                                                       "value": "Run the continual sequence"}


def test_the_counting_story_hints_at_a_larger_keep():
    from tailor_ui.app.ui.models import story_text

    counting = story_text("counting")
    assert ("balances best at **Model Tailor keep=0.2 alpha=0.8 compensation=anchored**: 89% of the "
            "original skills kept, 90% of the new skill's gain") in counting
    assert "The Tailor tab starts at keep 0.1, which keeps less of the new skill: try keep 0.2." in counting
    assert "try keep" not in story_text("spatial")  # its best balance is the default keep
