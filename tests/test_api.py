"""The launched app driven headless through gradio_client: load, tailor, compare, sweep,
export; the downloaded patch applies to a freshly loaded base model."""

from __future__ import annotations

import json
import time
import zipfile

import pandas as pd
import pytest
import torch
from gradio_client import Client, handle_file

from conftest import DEMO, tailor, wait
from tailor_ui.patch import apply_patch, load_patch

ENDPOINTS = {"/load_demo", "/load_pair", "/tailor", "/cancel_tailor", "/compare", "/sweep",
             "/cancel_sweep", "/sweep_result", "/export_patch", "/export_report", "/export_model",
             "/job_status", "/wait_job", "/cancel_job", "/history"}


def test_named_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert ENDPOINTS <= set(api["named_endpoints"])


def test_headless_session_load_tailor_compare_sweep_export(client, studio, tmp_path):
    markdown, _plot, table = client.predict(api_name="/load_demo")
    assert "Parameters" in markdown and table["data"]

    start = time.perf_counter()
    first = wait(client, tailor(client, keep=0.1))
    first_seconds = time.perf_counter() - start
    assert first["result"]["patch_entries"] > 0 and first_seconds < 30
    start = time.perf_counter()
    second = wait(client, tailor(client, keep=0.2))  # re-threshold: cached scores
    assert time.perf_counter() - start < 20
    assert "calibration" not in second["result"]["timings_s"]
    assert second["result"]["patch_entries"] > first["result"]["patch_entries"]
    status = client.predict(first["id"], api_name="/job_status")
    assert status["status"] == "done" and status["progress"] == 1.0

    image, question = next((p, q) for p, q in studio.demo.examples if "target_eval" in p)
    base, tuned, tailored, every = client.predict(handle_file(image), "question", question,
                                                  api_name="/compare")
    assert base and tuned and tailored
    assert [row[0] for row in every["data"]][:3] == ["Pre-trained", "Fine-tuned",
                                                    "Model Tailor keep=0.2 alpha=0.8"]

    sweep_id, _ = client.predict(["tailor", "wise_ft"], "0.05, 0.1", "0.5", 0.8, 4, api_name="/sweep")
    info = wait(client, sweep_id, 180)
    # base, fine-tuned, majority answer; Model Tailor's paper and anchored forms x 2 keeps, WiSE-FT
    assert info["result"]["rows"] == 3 + 5
    shown, csv_path = client.predict(sweep_id, api_name="/sweep_result")
    frame = pd.read_csv(csv_path)
    assert len(frame) == 8 and {"original", "target", "h_score"} <= set(frame.columns)
    assert len(shown["data"]) == 8

    patch = load_patch(client.predict(second["id"], api_name="/export_patch"))
    report = json.loads(open(client.predict(second["id"], api_name="/export_report")).read())
    assert patch.num_entries == report["patch_entries"] == second["result"]["patch_entries"]
    # the patch applies to a freshly loaded base model and reproduces the tailored answer
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tailor_ui.evaluation.generate import answer_one
    from PIL import Image

    model = AutoModelForImageTextToText.from_pretrained(DEMO / "base")
    processor = AutoProcessor.from_pretrained(DEMO / "base")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_patch(model, patch)
    differing = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert 0 < differing <= patch.num_entries
    assert answer_one(model, processor, Image.open(image).convert("RGB"), question) == tailored

    zipped = client.predict(second["id"], api_name="/export_model")
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(tmp_path)
    exported = AutoModelForImageTextToText.from_pretrained(tmp_path / "tailored-model")
    patched = dict(model.named_parameters())
    assert all(torch.equal(p, patched[n]) for n, p in exported.named_parameters())

    kinds = [row["kind"] for row in client.predict(api_name="/history")]
    assert kinds.count("tailor") == 2 and "sweep" in kinds and "compare" in kinds


def test_two_clients_do_not_see_each_other(app):
    alice, bob = Client(app.url, verbose=False), Client(app.url, verbose=False)
    job_id = tailor(alice, keep=0.07)
    wait(alice, job_id)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="no job"):
        bob.predict(job_id, api_name="/job_status")
    with pytest.raises(AppError, match="no finished merge"):
        bob.predict(job_id, api_name="/export_patch")
    assert bob.predict(api_name="/history") == []
    # bob has no merge of his own: Export serves the pair's start-up merge
    assert load_patch(bob.predict("", api_name="/export_patch")).num_entries == \
        app.studio.demo.default_run.report["patch_entries"]


def test_cancel_through_the_api(client, studio):
    import threading

    release = threading.Event()
    job_id = tailor(client, keep=0.33)
    # hold the lane so the merge is still waiting when the cancel arrives
    studio.runner.submit("someone-else", "tailor", lambda p, s: release.wait(10), lane=studio.demo.lane,
                         in_worker=False)
    second = tailor(client, keep=0.34)
    info = client.predict(second, api_name="/cancel_job")
    release.set()
    assert info["status"] == "cancelled"
    assert client.predict(job_id, 60, api_name="/wait_job")["status"] == "done"
    assert client.predict(second, 5, api_name="/wait_job")["status"] == "cancelled"


def test_user_errors_reach_the_client(client):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="not a valid regex"):
        tailor(client, modules_regex="(unclosed")
    with pytest.raises(AppError, match="greater than maximum"):  # Gradio checks slider bounds
        tailor(client, keep=3.0)
    with pytest.raises(AppError, match="neither an existing folder nor a hub id"):
        client.predict("no such model", "x", "float32", "cpu", api_name="/load_pair")
