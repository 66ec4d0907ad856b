"""The Fine-tune tab's handlers on the demo pair: a tiny background run, its live loss
curve, and the trained model in Compare and in the Forgetting sweep."""

from __future__ import annotations

import uuid

import gradio as gr
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from conftest import request_for
from tailor_ui.app.jobs import CANCELLED, DONE
from tailor_ui.app.ui.blocks import App


@pytest.fixture(scope="module")
def ui(studio):
    """The handlers, called directly (conftest's `app` is the launched server)."""
    ui = App(studio)
    ui.build()
    return ui


def new_request():
    return request_for(f"test-ft-{uuid.uuid4().hex[:8]}")


def finetune_inputs(**overrides):
    values = dict(method="full", rho=0.1, lr=1e-3, epochs=1, layers="", examples=16,
                  tailor_after=False)
    values.update(overrides)
    return values


def test_finetune_job_loss_curve_compare_and_base_untouched(ui):
    studio = ui.studio
    before = {n: p.detach().clone() for n, p in studio.demo.pair.base.named_parameters()}
    request = new_request()
    job_id, html = ui.finetune.run(**finetune_inputs(), request=request)
    assert job_id.startswith("job-") and job_id in html
    job = studio.runner.wait(job_id, request.session_hash, 120)
    assert job.status == DONE, job.error
    session = studio.session(request.session_hash)
    progress, loss_fig, result, _, _ = ui.finetune.poll(session)
    assert f'data-status="{DONE}"' in progress
    assert isinstance(loss_fig, go.Figure) and len(loss_fig.data[0].y) == 2  # 16 examples / 8
    assert all(v > 0 for v in loss_fig.data[0].y)
    assert job_id in result and "Full fine-tuning" in result
    assert ui.finetune.poll(session) == [gr.skip()] * 5  # nothing new to send
    for name, param in studio.demo.pair.base.named_parameters():  # trained a copy
        assert torch.equal(param, before[name]), name
    trained = session.trained[job_id]
    [(label, patch)] = trained.patches()  # the trained model: its patch over the base, on disk
    assert label == trained.label and patch.path.is_relative_to(session.folder)
    with studio.demo.patched(patch) as model:
        assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())

    image_path, question = next((p, q) for p, q in studio.demo.examples if "target_eval" in p)
    image = Image.open(image_path).convert("RGB")
    base, tuned, tailored, table = ui.compare.compare(image, "question", question, request=request)
    assert list(table["model"])[:2] == ["Pre-trained", "Fine-tuned"]
    assert table["model"].iloc[-1] == trained.label
    answer = ui.compare.trained_answer(table, request=request)
    assert answer == table["answer"].iloc[-1] and isinstance(answer, str)


def test_finetune_joins_the_forgetting_sweep(ui):
    request = new_request()
    job_id, _ = ui.finetune.run(**finetune_inputs(method="dowser", rho=0.2, examples=8,
                                                  tailor_after=True), request=request)
    job = ui.studio.runner.wait(job_id, request.session_hash, 180)
    assert job.status == DONE, job.error
    session = ui.studio.session(request.session_hash)
    ui.finetune.poll(session)
    names = [name for name, _ in session.trained[job_id].models]
    assert names[1].startswith("Model Tailor on Model-Dowser")
    sweep_id, _ = ui.forgetting.run(["magnitude"], "0.1", "0.5", 0.8, 4, request=request)
    job = ui.studio.runner.wait(sweep_id, request.session_hash, 180)
    assert job.status == DONE, job.error
    table = ui.forgetting.poll(session)[6]
    assert list(table["method"]) == ["base", "finetuned", "majority", "magnitude", "dowser", "tailor-ft"]
    assert table["target_retention"].notna().all()


def test_bad_settings_and_cancel(ui):
    request = new_request()
    with pytest.raises(gr.Error, match="learning rate"):
        ui.finetune.run(**finetune_inputs(lr=-1.0), request=request)
    with pytest.raises(gr.Error, match="training examples"):
        ui.finetune.run(**finetune_inputs(examples=0), request=request)
    assert "Nothing to cancel" in ui.finetune.cancel("", request=request)
    job_id, _ = ui.finetune.run(**finetune_inputs(examples=64, epochs=3), request=request)
    html = ui.finetune.cancel(job_id, request=request)
    job = ui.studio.runner.wait(job_id, request.session_hash, 60)
    assert job.status == CANCELLED and job_id in html
    session = ui.studio.session(request.session_hash)
    assert job_id not in session.trained
    assert ui.studio.finetune_losses(session, job_id) == list(session.live_losses[job_id])


def test_finetune_endpoint_returns_the_job_id(client, studio):
    api = client.view_api(print_info=False, return_format="dict")
    assert {"/finetune", "/cancel_finetune"} <= set(api["named_endpoints"])
    job_id, progress = client.predict("full", 0.1, 1e-3, 1, "1", 8, False, api_name="/finetune")
    assert job_id.startswith("job-") and job_id in progress
    info = client.predict(job_id, 120, api_name="/wait_job")
    assert info["status"] == "done" and info["kind"] == "finetune", info
    result = info["result"]  # what was trained, and how the loss went, without the page
    assert result["method"] == "full" and result["layers"] and result["steps"] >= 1
    assert result["first_loss"] > 0 and result["last_loss"] > 0 and result["models"] == [result["label"]]


@pytest.mark.parametrize("args, words", [
    (("full", 0.1, 1e-3, 50, "1", 8, False), "Epochs: Value 50 is greater than maximum value 10"),
    (("full", 0.1, 5.0, 1, "1", 8, False), "Learning rate: Value 5"),
])
def test_finetune_endpoint_names_the_input_out_of_range(client, args, words):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=words):
        client.predict(*args, api_name="/finetune")


def test_method_defaults_and_the_continual_run(ui):
    from tailor_ui.app.service.finetune import METHOD_DEFAULTS

    rho, lr, beta, continual, info = ui.finetune.method_changed("random_mask")
    assert rho["interactive"] and rho["value"] == METHOD_DEFAULTS["random_mask"]["rho"]
    assert lr["value"] == METHOD_DEFAULTS["random_mask"]["lr"] and "Random mask" in info
    assert not beta["interactive"] and not continual["interactive"]  # no continual form
    rho, lr, beta, continual, _ = ui.finetune.method_changed("ema")
    assert beta["interactive"] and beta["value"] == 0.99 and continual["interactive"]
    request = new_request()
    with pytest.raises(gr.Error, match="continual run trains with"):
        ui.finetune.run_continual("dowser", 1e-3, 1, "", 8, request=request)
    job_id, _ = ui.finetune.run_continual("ema", 1e-3, 1, "", 8, 0.5, request=request)
    job = ui.studio.runner.wait(job_id, request.session_hash, 300)
    assert job.status == DONE, job.error
    table = job.result
    assert list(table["after"]) == ["base", "colour", "count", "spatial"]
    assert table["ema_lag"].iloc[1:].between(0, 1).all()  # β 0.5: the EMA trails, not frozen
    session = ui.studio.session(request.session_hash)
    figure = ui.finetune.poll(session)[4]
    assert [trace.name for trace in figure.data] == ["colour", "count", "spatial"]
    assert list(figure.data[0].y) == list(table["acc:colour"])


def test_a_session_keeps_its_last_three_trained_models_and_only_their_files(tmp_path):
    from tailor_ui.app.session import Session, TrainedModel

    session = Session("s", tmp_path)
    folders = []
    for i in range(5):
        folder = tmp_path / f"trained-{i}"
        folder.mkdir()
        (folder / "model-0.safetensors").write_bytes(b"patch")
        session.add_trained(TrainedModel(f"job-{i}", f"m{i}", "full", {}, {},
                                         [(f"m{i}", folder / "model-0.safetensors")], handle=None,
                                         folder=folder))
        folders.append(folder)
    assert list(session.trained) == ["job-2", "job-3", "job-4"]
    assert [f.exists() for f in folders] == [False, False, True, True, True]
