"""The dashboard's handlers called directly (no server): every tab on the demo pair."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import sys
import threading
import uuid
import weakref
import zipfile

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
from PIL import Image

from conftest import DEMO, ROOT, request_for
from tailor_ui.control import Cancelled
from tailor_ui.errors import UserError
from tailor_ui.app.jobs import CANCELLED, DONE, FAILED
from tailor_ui.patch import apply_patch, load_patch, revert_patch
from tailor_ui.app.ui.blocks import App
from tailor_ui.data import import_examples
from tailor_ui.evaluation.sweep import parse_numbers, sweep_grid
from tailor_ui.app.service.config import default_settings
from tailor_ui.app.ui.tailor import build_settings
from tailor_ui.app.ui import models as models_tab
from tailor_ui.app.service import compare as compare_service


@pytest.fixture(scope="module")
def app(studio):
    app = App(studio)
    app.build()  # handlers need the components only for polling; build once
    return app


def new_request():
    return request_for(f"test-{uuid.uuid4().hex[:8]}")


def tailor_inputs(**overrides):
    # the Tailor tab's values on the demo pair (compensation: the pair's default, anchored)
    values = dict(method="tailor", keep=0.1, alpha=0.8, scope="block", compensate=True, modules=[],
                  lam=1.0, hessians="one-pass", sign="obs", sensitivity="change", others="finetuned",
                  modules_regex="", calib_source="builtin", calib_files=None, calib_examples=32,
                  compensation="anchored")
    values.update(overrides)
    return values


def run_tailor(app, request, **overrides):
    job_id, html = app.tailor.run(**tailor_inputs(**overrides), request=request)
    assert job_id.startswith("job-") and "mts-progress" in html
    job = app.studio.runner.wait(job_id, request.session_hash, 120)
    assert job.status == DONE, job.error
    return job


def base_state(studio):
    return {n: p.detach().clone() for n, p in studio.demo.pair.base.named_parameters()}


def assert_base_unchanged(studio, before):
    for name, param in studio.demo.pair.base.named_parameters():
        assert torch.equal(param, before[name]), name


# -- Models ------------------------------------------------------------------------------

def test_demo_pair_summary(app):
    markdown, fig, table = app.models.use_demo(request=new_request())
    assert "Parameters" in markdown and "Changed by fine-tuning" in markdown
    assert "language" in markdown and "Unchanged:** bridge, vision" in markdown
    assert isinstance(fig, go.Figure) and isinstance(fig.data[0], go.Heatmap)
    assert set(table["component"]) == {"language"} and table["changed entries"].gt(0).all()


def test_each_demo_story_is_its_own_fine_tune_of_the_shared_base(app):
    """The Models tab's story picker: the counting story loads when first asked for, shares
    nothing with the default story but the base checkpoint, and brings its own target sets;
    the Fine-tune tab then trains on that story's task."""
    request = new_request()
    session = app.studio.session(request.session_hash)
    spatial = app.studio.handle_for(session)
    markdown, _fig, _table = app.models.use_demo("counting", request=request)
    counting = app.studio.handle_for(session)
    assert session.demo_story == "counting" and counting is not spatial and counting.shared
    assert counting.pair.finetuned_ids == ["demo/counting/finetuned"] and "counting" in counting.label.lower()
    target = {s.name: s for s in counting.eval_sets}["target"]
    assert all(ex.question.startswith("how many") for ex in target.examples)
    assert {s.name for s in spatial.eval_sets} == {s.name for s in counting.eval_sets}
    assert app.studio.demo_handle("counting") is counting  # loaded once, then shared
    assert app.models.use_demo("spatial", request=request) and app.studio.handle_for(session) is spatial
    with pytest.raises(gr.Error, match="unknown demo story 'nope'"):
        app.models.use_demo("nope", request=request)
    assert "count" in models_tab.story_text("counting") and models_tab.story_text("nope") == ""


def test_load_a_pair_in_the_background_and_refuse_outside_folders(app, tmp_path):
    request = new_request()
    job_id, _ = app.models.load(str(DEMO / "base"), str(DEMO / "finetuned"), "float32", "cpu",
                                request=request)
    job = app.studio.runner.wait(job_id, request.session_hash, 120)
    assert job.status == DONE, job.error
    session = app.studio.session(request.session_hash)
    assert session.own is not None and not session.own.shared
    assert app.studio.handle_for(session) is session.own
    assert session.own.pair.base is not app.studio.demo.pair.base  # the visitor's own copy
    outputs = app.models.poll(session)
    assert "base" in outputs[1] and "finetuned" in outputs[1]  # pair status names the folders
    # an own pair has no start-up merge: a slider release waits for a first run
    assert app.tailor.rerun(True, **tailor_inputs(keep=0.3), request=request) == (gr.skip(), gr.skip())
    with pytest.raises(gr.Error, match="outside the allowed folders"):
        app.models.load("/etc", str(DEMO / "finetuned"), "float32", "cpu", request=request)
    with pytest.raises(gr.Error, match="neither an existing folder nor a hub id"):
        app.models.load("not a model", "x", "float32", "cpu", request=request)
    with pytest.raises(gr.Error, match="no GPU"):
        if not app.studio.has_gpu:
            app.models.load(str(DEMO / "base"), str(DEMO / "finetuned"), "float32", "cuda",
                            request=request)
        else:
            raise gr.Error("no GPU (skipped: this machine has one)")
    own = weakref.ref(session.own.pair.base)
    run_tailor(app, request, method="magnitude")  # a merge on the own pair references it
    app.models.use_demo(request=request)
    assert session.own is None and app.studio.handle_for(session) is app.studio.demo
    assert not session.runs  # merges of the released pair go with it
    gc.collect()
    assert own() is None  # nothing keeps the visitor's models in memory


def test_loading_a_mismatched_pair_fails_as_a_job(app):
    broken = app.studio.config.model_roots[-1] / f"broken-{uuid.uuid4().hex[:6]}"  # an allowed folder
    shutil.copytree(DEMO / "base", broken)
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["num_hidden_layers"] = 2
    (broken / "config.json").write_text(json.dumps(config))
    request = new_request()
    job_id, _ = app.models.load(str(DEMO / "base"), str(broken), "float32", "cpu", request=request)
    job = app.studio.runner.wait(job_id, request.session_hash, 120)
    assert job.status == FAILED and "do not match" in job.error


# -- Tailor ------------------------------------------------------------------------------

def test_tailor_job_then_slider_rethreshold_is_fast_and_cached(app):
    studio, request = app.studio, new_request()
    before = base_state(studio)
    first = run_tailor(app, request, keep=0.1)
    run = first.result
    assert run.report["patch_entries"] > 0
    assert 0.09 < run.report["linear_fraction"] < 0.11
    assert run.patch_file.is_file() and run.report_file.is_file()
    assert run.quick is not None and list(run.quick["model"]) == ["Pre-trained", "Fine-tuned", "This merge"]
    # a slider release after the first run re-thresholds cached scores: no calibration pass
    job_id, _ = app.tailor.rerun(True, **tailor_inputs(keep=0.2), request=request)
    second = studio.runner.wait(job_id, request.session_hash, 60)
    assert second.status == DONE
    report = second.result.report
    assert report["score_cache"] == {"hits": report["selected_linears"], "misses": 0}
    assert "calibration" not in report["timings_s"]
    assert second.result.report["patch_entries"] > run.report["patch_entries"]
    session = studio.session(request.session_hash)
    assert list(session.runs) == [first.id, second.id]
    assert_base_unchanged(studio, before)


def test_slider_release_reruns_from_the_start_up_merge_unless_switched_off(app):
    request = new_request()
    assert app.tailor.rerun(False, **tailor_inputs(keep=0.3), request=request) == (gr.skip(), gr.skip())
    # the demo pair's start-up merge counts as a first run: a new visitor's slider works at once
    job_id, _ = app.tailor.rerun(True, **tailor_inputs(keep=0.3), request=request)
    job = app.studio.runner.wait(job_id, request.session_hash, 60)
    assert job.status == DONE and job.result.report["score_cache"]["misses"] == 0 \
        < job.result.report["score_cache"]["hits"]
    # a newer release supersedes an unfinished one
    release = threading.Event()
    app.studio.runner.submit(request.session_hash, "sweep", lambda p, s: release.wait(10),
                             lane=app.studio.demo.lane, in_worker=False)
    older, _ = app.tailor.rerun(True, **tailor_inputs(keep=0.31), request=request)
    newer, _ = app.tailor.rerun(True, **tailor_inputs(keep=0.32), request=request)
    release.set()
    assert app.studio.runner.wait(older, request.session_hash, 30).status == CANCELLED
    assert app.studio.runner.wait(newer, request.session_hash, 30).status == DONE


def test_every_method_runs_from_the_tab(app):
    request = new_request()
    for method in ("tailor", "magnitude", "wise_ft", "task_arithmetic", "ties", "dare"):
        job = run_tailor(app, request, method=method, keep=0.2, lam=0.5)
        assert job.result.report["patch_entries"] > 0, method
        assert job.result.settings["method"] == method
    runs = list(app.studio.session(request.session_hash).runs.values())
    assert runs[-1].settings["method"] == "dare" and runs[-1].settings["lam"] is None
    # Model Tailor's patch stays in memory only while it is among the latest merges; a
    # data-free merge writes its patch as it goes and holds none: each is read from its file
    assert runs[0].settings["method"] == "tailor" and all(r.patch is None for r in runs)
    assert all(r.get_patch().num_entries == r.report["patch_entries"] for r in runs)


def test_module_picker_and_bad_settings(app):
    settings = build_settings("tailor", dict(keep=0.1, alpha=0.8, scope="row", compensate=True, lam=1.0),
                              ["q_proj", "v_proj"])
    assert settings.modules == r"\.(?:q_proj|v_proj)$" and settings.hessians == "one-pass"
    request = new_request()
    job = run_tailor(app, request, modules=["q_proj"])
    summary = app.studio.demo.summary
    changed_q = summary[(summary["module"] == "q_proj") & (summary["changed"] > 0) & summary["linear"]]
    assert job.result.report["selected_linears"] == len(changed_q) > 0
    with pytest.raises(gr.Error, match="not a valid regex"):
        app.tailor.run(**tailor_inputs(modules_regex="(unclosed"), request=request)
    with pytest.raises(gr.Error, match="keep must be between 0 and 1"):
        app.tailor.run(**tailor_inputs(keep=1.5), request=request)
    with pytest.raises(gr.Error, match="upload a calibration JSONL"):
        app.tailor.run(**tailor_inputs(calib_source="upload"), request=request)
    # problems found by the engine end the job with the message
    job_id, _ = app.tailor.run(**tailor_inputs(modules_regex="vision_tower"), request=request)
    job = app.studio.runner.wait(job_id, request.session_hash, 60)
    assert job.status == FAILED and "no changed linear layer matches" in job.error


def test_cancel_stops_a_merge_within_one_block_and_leaves_the_base_intact(studio):
    """The engine checks should_stop between blocks; the runner's progress raises on cancel."""
    from tailor_ui.engine import run_method

    handle, owner = studio.demo, "cancel-test"
    before = base_state(studio)
    batches = studio._batches(handle, list(handle.calibration[:32]), "builtin")
    settings = default_settings(hessians="sequential", keep=0.37)  # not cached: a full run
    calls_after_cancel = []
    holder = {}

    def fn(progress, should_stop):
        def spy(stage, done, total):
            if holder.get("cancelled"):
                calls_after_cancel.append(stage)
            progress(stage, done, total)
            if not holder.get("cancelled"):
                holder["cancelled"] = True
                studio.runner.cancel(holder["job"].id, owner)

        with handle.lock:
            return run_method(handle.pair, settings, [batches], progress=spy, should_stop=should_stop)

    # in this process: the spy cancels through the test's runner
    holder["job"] = studio.runner.submit(owner, "tailor", fn, lane=handle.lane, in_worker=False)
    job = studio.runner.wait(holder["job"].id, owner, 60)
    assert job.status == CANCELLED
    assert len(calls_after_cancel) <= 1  # stopped at the next check
    assert_base_unchanged(studio, before)


def test_cancel_button_cancels_the_sessions_queued_merge(app):
    studio, request = app.studio, new_request()
    release = threading.Event()
    blocker = studio.runner.submit(request.session_hash, "tailor", lambda p, s: release.wait(10),
                                   lane=studio.demo.lane, in_worker=False)
    job_id, _ = app.tailor.run(**tailor_inputs(keep=0.42), request=request)
    html = app.tailor.cancel(job_id, request=request)
    assert 'data-status="cancelled"' in html
    release.set()
    assert studio.runner.wait(blocker.id, request.session_hash, 10).status == DONE
    assert studio.runner.get(job_id, request.session_hash).status == CANCELLED
    assert "Nothing to cancel" in app.tailor.cancel("", request=request)


def test_uploaded_calibration_set(app, tmp_path):
    examples = [json.loads(line) for line in (DEMO / "target_calib.jsonl").read_text().splitlines()[:8]]
    upload = tmp_path / "upload"
    upload.mkdir()
    files = []
    for row in examples:
        src = DEMO / row["image"]
        shutil.copy(src, upload / src.name)
        files.append(str(upload / src.name))
    (upload / "count.jsonl").write_text("".join(json.dumps(r) + "\n" for r in examples))
    files.append(str(upload / "count.jsonl"))
    request = new_request()
    job = run_tailor(app, request, calib_source="upload", calib_files=files, calib_examples=8)
    assert job.result.report["calibration"]["examples"] == 8
    assert job.result.report["calibration"]["source"].startswith("upload:")
    with pytest.raises(gr.Error, match="was not uploaded"):
        app.tailor.run(**tailor_inputs(calib_source="upload", calib_files=[files[-1]]), request=request)


def test_import_examples_refuses_unsafe_zips(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("../outside.jsonl", "{}\n")
    (tmp_path / "dest").mkdir()
    with pytest.raises(UserError, match="would leave the upload folder"):
        import_examples([str(archive)], tmp_path / "dest")
    assert not (tmp_path / "outside.jsonl").exists()
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        import_examples([str(tmp_path / "bad.zip")], tmp_path / "dest")
    with pytest.raises(UserError, match="exactly one .jsonl"):
        import_examples([], tmp_path / "dest")


def test_number_lists_and_sweep_grids():
    assert parse_numbers("0.05, 0.1 0.2;0.1", "keep") == [0.05, 0.1, 0.2]
    with pytest.raises(UserError, match="'abc' is not a number"):
        parse_numbers("0.1, abc", "keep")
    with pytest.raises(UserError, match="outside"):
        parse_numbers("1.5", "keep")
    grid = sweep_grid(["tailor", "wise_ft"], {"keep": [0.05, 0.1], "lam": [0.5], "alpha": [0.8]})
    assert [(s.method, s.keep, s.lam) for s in grid] == [("tailor", 0.05, None), ("tailor", 0.1, None),
                                                         ("wise_ft", 0.1, 0.5)]
    with pytest.raises(UserError, match="too many"):
        sweep_grid(["tailor", "magnitude", "ties", "dare"], {"keep": [i / 100 for i in range(1, 8)], "alpha": [0.8]},
                   limit=24)
    with pytest.raises(UserError, match="at least one method"):
        sweep_grid([], {"keep": [0.1], "lam": [0.5]})


# -- Compare -----------------------------------------------------------------------------

def test_compare_side_by_side(app):
    request = new_request()
    image_path, question = next((p, q) for p, q in app.studio.demo.examples if "target_eval" in p)
    image = Image.open(image_path).convert("RGB")
    # before any merge of its own, the session sees the start-up merge
    base, tuned, tailored, table = app.compare.compare(image, "question", question, request=request)
    assert list(table["model"])[:2] == ["Pre-trained", "Fine-tuned"]
    assert table["model"].iloc[2].endswith("(default)")
    run_tailor(app, request, keep=0.15)
    run_tailor(app, request, method="magnitude", keep=0.15)
    base, tuned, tailored, table = app.compare.compare(image, "question", question, request=request)
    assert all(isinstance(a, str) and a for a in (base, tuned, tailored))
    assert list(table["model"]) == ["Pre-trained", "Fine-tuned",
                                    "Model Tailor keep=0.15 alpha=0.8 compensation=anchored",
                                    "Magnitude patch keep=0.15"]
    assert table["answer"].iloc[2] == tailored
    caption = app.compare.compare(image, "caption", "ignored", request=request)
    assert len(caption[0].split()) > 2  # the base model captions
    with pytest.raises(gr.Error, match="pick an example image"):
        app.compare.compare(None, "caption", "", request=request)
    with pytest.raises(gr.Error, match="type a question"):
        app.compare.compare(image, "question", "  ", request=request)


def test_a_compare_whose_worker_is_killed_fails_at_once_with_the_kill_message(app, monkeypatch):
    """A compare computes in a worker process, as a polled job does: killed there, it fails
    at once with the worker's message, which bench/load_soak.py counts as a kill (`KILLED`)
    and not as an error (a soak once killed a second worker for want of that)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from load_soak import KILLED

    server = os.getpid()

    def killed(*_args):
        assert os.getpid() != server, "the compare ran in the server's process"
        os.kill(os.getpid(), signal.SIGKILL)

    monkeypatch.setattr(compare_service, "answers", killed)
    image_path, question = app.studio.demo.examples[0]
    image, request = Image.open(image_path).convert("RGB"), new_request()
    with pytest.raises(gr.Error) as error:
        app.compare.compare(image, "question", question or "what is it?", request=request)
    assert KILLED in str(error.value) and "run it again" in str(error.value)
    monkeypatch.undo()  # the next compare gets a fresh worker
    assert all(app.compare.compare(image, "question", question or "what is it?", request=request)[:3])


# -- Forgetting -----------------------------------------------------------------------------

def test_sweep_job_figures_and_csv(app):
    request = new_request()
    job_id, _ = app.forgetting.run(["tailor", "magnitude"], "0.05, 0.2", "0.5", 0.8, 4, request=request)
    job = app.studio.runner.wait(job_id, request.session_hash, 180)
    assert job.status == DONE, job.error
    session = app.studio.session(request.session_hash)
    outputs = app.forgetting.poll(session)
    source, tradeoff, by_keep, retention, heatmap, table, csv = outputs[1:]
    assert source.startswith(f"Showing your sweep `{job_id}`")
    assert all(isinstance(f, go.Figure) and f.data for f in (tradeoff, by_keep, retention, heatmap))
    names = {t.name for t in tradeoff.data}
    assert {"Magnitude patch", "Pre-trained", "Majority answer"} <= names
    # the demo has an original-task calibration set: the paper's loop and anchored compensation
    assert {"Model Tailor (paper) alpha=0.8", "Model Tailor + anchored compensation alpha=0.8"} <= names
    assert isinstance(heatmap.data[0], go.Heatmap)
    assert len(table) == 3 + 6  # base, fine-tuned, majority answer, 6 merges
    saved = pd.read_csv(csv)
    assert list(saved["method"]) == ["base", "finetuned", "majority", *["tailor"] * 4, "magnitude",
                                     "magnitude"]
    assert [s.split(" hessians")[0] for s in saved["setting"][3:7]] == [
        "Model Tailor keep=0.05 alpha=0.8", "Model Tailor keep=0.2 alpha=0.8",
        "Model Tailor keep=0.05 alpha=0.8 compensation=anchored", "Model Tailor keep=0.2 alpha=0.8 compensation=anchored"]
    assert {"original_retention", "target_retention", "h_score"} <= set(saved.columns)
    shown, path = app.forgetting.result(job_id, request=request)
    assert path == csv and len(shown) == 9
    assert app.forgetting.poll(session) == [gr.skip()] * 8  # nothing new to send
    with pytest.raises(gr.Error, match="is not a number"):
        app.forgetting.run(["tailor"], "0.1, x", "0.5", 0.8, 4, request=request)


def test_sweep_can_be_cancelled(app):
    request = new_request()
    job_id, _ = app.forgetting.run(["tailor", "magnitude", "dare"], "0.03, 0.06, 0.09", "0.5", 0.8, 40,
                                   request=request)
    job = app.studio.runner.get(job_id, request.session_hash)
    for _ in range(600):
        if job.status == "running" and job.total:
            break
        threading.Event().wait(0.02)
    html = app.forgetting.cancel(job_id, request=request)
    assert 'data-status="' in html
    job = app.studio.runner.wait(job_id, request.session_hash, 60)
    assert job.status == CANCELLED
    assert app.studio.session(request.session_hash).latest_sweep() is None


# -- Export ------------------------------------------------------------------------------------

def test_export_patch_report_and_model(app, tmp_path):
    studio, request = app.studio, new_request()
    with pytest.raises(gr.Error, match="no finished merge 'job-none'"):
        app.export.patch("job-none", request=request)
    job = run_tailor(app, request, keep=0.12)
    patch = load_patch(app.export.patch(job.id, request=request))
    assert patch.num_entries == job.result.patch.num_entries
    report = json.loads(open(app.export.report("", request=request)).read())
    assert report["patch_entries"] == patch.num_entries and report["settings"]["keep"] == 0.12
    zipped = app.export.model(job.id, request=request)
    with zipfile.ZipFile(zipped) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path)
    assert {"tailored-model/config.json", "tailored-model/model.safetensors"} <= names
    saved = json.loads((tmp_path / "tailored-model" / "tailor_report.json").read_text())
    from tailor_ui.checkpoint import Checkpoint

    assert saved["tensors_checked"] == len(Checkpoint(tmp_path / "tailored-model").tensors) > 0
    from transformers import AutoModelForImageTextToText

    tailored = AutoModelForImageTextToText.from_pretrained(tmp_path / "tailored-model")
    base = studio.demo.pair.base
    applied = apply_patch(base, patch)
    try:
        expected = dict(base.named_parameters())
        for name, param in tailored.named_parameters():
            assert torch.equal(param, expected[name]), name
    finally:
        revert_patch(base, applied)
    assert app.export.model(job.id, request=request) == zipped  # built once
    session = studio.session(request.session_hash)
    outputs = app.export.poll(session, studio.handle_for(session))
    assert [value for _, value in outputs[0]["choices"]] == [job.id, "start-up"]


# -- Sessions and polling -------------------------------------------------------------------

def test_sessions_are_isolated(app):
    alice, bob = new_request(), new_request()
    job = run_tailor(app, alice, keep=0.11)
    for call in (lambda: app.job_status(job.id, request=bob),
                 lambda: app.export.patch(job.id, request=bob),
                 lambda: app.tailor.cancel(job.id, request=bob)):
        with pytest.raises(gr.Error, match=f"no (job|finished merge) '{job.id}'"):
            call()
    assert app.history(request=bob) == []
    assert app.job_status(job.id, request=alice)["status"] == DONE
    a, b = app.studio.session(alice.session_hash), app.studio.session(bob.session_hash)
    assert a.folder != b.folder and not b.runs
    app.unload(request=alice)
    assert not a.folder.exists() and app.studio.sessions.peek(alice.session_hash) is None


def test_poll_sends_what_differs_from_the_served_page_then_only_changes(app):
    request = new_request()
    assert "ready" in app.pair_status.value  # the page as served already shows the demo pair
    first = app.poll(request=request)
    assert len(first) == len(app.outputs)
    # progress, pair status, summary, chart and table: already on the page, not sent again
    assert first[:5] == [gr.skip()] * 5
    # the other tabs' first state (a table or figure in there must not be compared with ==)
    assert any(not (isinstance(value, dict) and value == gr.skip()) for value in first[5:])
    again = app.poll(request=request)
    assert all(value == gr.skip() for value in again)
    job = run_tailor(app, request, keep=0.13)
    after = app.poll(request=request)
    assert after != again and job.id in after[5]  # the Tailor tab's progress bar


def test_a_page_served_before_the_demo_loaded_gets_it_with_a_poll(tmp_path):
    from tailor_ui.app.service.studio import Studio, StudioConfig

    studio = Studio(StudioConfig(workdir=tmp_path / "work", demo_dir=DEMO, warm_up=False))
    try:
        app = App(studio)
        app.build()  # as app.py does after MTS_DEMO_WAIT: the page says the pair is loading
        assert "Loading the demo pair" in app.pair_status.value
        request = new_request()
        loading = app.poll(request=request)
        assert loading[1:5] == [gr.skip()] * 4
        studio.start(background=False)
        ready = app.poll(request=request)
        assert "ready" in ready[1] and "Changed by fine-tuning" in ready[2]
        assert isinstance(ready[3], go.Figure) and not ready[4].empty
    finally:
        studio.close()


def test_failed_job_shows_its_message(app):
    request = new_request()
    job = app.studio.runner.submit(request.session_hash, "tailor",
                                   lambda p, s: (_ for _ in ()).throw(UserError("calibration never reached")),
                                   lane=app.studio.demo.lane)
    app.studio.runner.wait(job.id, request.session_hash, 10)
    info = app.job_status(job.id, request=request)
    assert info["status"] == FAILED and info["error"] == "calibration never reached"
    outputs = app.tailor.poll(app.studio.session(request.session_hash), app.studio.demo)
    assert 'data-status="failed"' in outputs[0] and "calibration never reached" in outputs[0]


def test_cancelled_exception_type_is_the_engines():
    from tailor_ui.app import jobs

    assert jobs.Cancelled is Cancelled


def test_without_a_demo_pair_the_app_still_serves(tmp_path):
    from tailor_ui.app.service.studio import Studio, StudioConfig

    studio = Studio(StudioConfig(workdir=tmp_path / "work", demo_dir=tmp_path / "missing"))
    studio.start(background=False)
    try:
        assert studio.demo is None and "not built" in studio.demo_error
        app = App(studio)
        app.build()
        request = new_request()
        outputs = app.poll(request=request)
        assert "not built" in outputs[1]  # the pair status says why
        with pytest.raises(gr.Error, match="not built"):
            app.tailor.run(**tailor_inputs(), request=request)
        with pytest.raises(gr.Error, match="not built"):
            app.models.use_demo(request=request)
    finally:
        studio.close()


def test_filing_a_merge_once_survives_the_session_pruning_old_ones(studio):
    """More merges than a session keeps: the oldest is pruned with its files, and later
    polls (sync) must not file it again, which would prune a kept one and delete its files."""
    from tailor_ui.app.session import TailorRun

    session = studio.session(f"prune-{uuid.uuid4().hex}")

    def merge(i):
        def job(progress, should_stop):
            folder = session.folder / f"run-{i}"
            folder.mkdir(parents=True)
            (folder / "patch.safetensors").write_bytes(b"patch")
            return TailorRun(job_id="", label=f"merge {i}", settings={}, patch=None, report={},
                             handle=studio.demo, patch_file=folder / "patch.safetensors")
        return job

    jobs = []
    for i in range(14):  # the session keeps 12
        jobs.append(studio.runner.submit(session.id, "tailor", merge(i), label=f"merge {i}"))
        studio.runner.wait(jobs[-1].id, session.id, timeout=30)
    for _ in range(2):
        studio.sync(session, "tailor")
    kept = [j.id for j in jobs[2:]]
    assert list(session.runs) == kept
    assert all(session.runs[j].patch_file.is_file() for j in kept)
    assert not (session.folder / "run-0").exists() and not (session.folder / "run-1").exists()


@pytest.mark.parametrize("tab, kind, button", [
    ("tailor", "tailor", "cancel"), ("tailor", "search", "cancel_search"), ("forgetting", "sweep", "cancel"),
    ("finetune", "finetune", "cancel"), ("finetune", "continual", "cancel_continual")])
def test_cancel_buttons_stop_the_given_or_latest_unfinished_job(app, studio, tab, kind, button):
    cancel = getattr(getattr(app, tab), button)
    request = new_request()
    sid = request.session_hash
    assert 'data-status="idle"' in cancel("", request) and "Nothing to cancel." in cancel("", request)

    def wait_for_cancel(progress, should_stop):
        while not should_stop():
            threading.Event().wait(0.01)
        return None

    job = studio.runner.submit(sid, kind, wait_for_cancel, label="waits")
    assert f'data-job="{job.id}"' in cancel("", request)  # none given: the latest unfinished
    assert studio.runner.wait(job.id, sid, timeout=30).status == CANCELLED
    again = studio.runner.submit(sid, kind, wait_for_cancel, label="waits")
    assert f'data-job="{again.id}"' in cancel(f" {again.id} ", request)
    assert studio.runner.wait(again.id, sid, timeout=30).status == CANCELLED
    finished = cancel(job.id, request)  # a finished job given, nothing running
    if kind == "tailor":  # the merge's Cancel shows that job's state
        assert f'data-job="{job.id}"' in finished and 'data-status="cancelled"' in finished
    else:
        assert "Nothing to cancel." in finished


def test_anchored_compensation_runs_on_the_demo_and_is_refused_without_an_anchor_set(app):
    """The demo pair ships its original skills' calibration set; a pair without one gets
    exact or greedy compensation, and a clear refusal when it asks for anchored."""
    import dataclasses

    from tailor_ui.app.service import tailor as tailor_service

    request = new_request()
    # a page on the demo pair is told the pair's defaults once: anchored, and in the search
    outputs = app.tailor.poll(app.studio.session(request.session_hash), app.studio.demo)
    assert outputs[5]["value"] == "anchored" and outputs[6]["value"] == ["exact", "greedy", "anchored"]
    assert app.tailor.poll(app.studio.session(request.session_hash), app.studio.demo)[5:7] == [gr.skip()] * 2
    job = run_tailor(app, request, compensation="anchored")
    assert job.result.report["settings"]["compensation"] == "anchored"
    assert job.result.report["exact_fallbacks"] == 0
    demo = app.studio.demo
    assert len(demo.anchor) == 128 and tailor_service.default_compensation(demo) == "anchored"
    bare = dataclasses.replace(demo, anchor=())
    assert tailor_service.default_compensation(bare) == "greedy"
    assert tailor_service.sweep_compensations(bare, search=True) == ["exact", "greedy"]
    with pytest.raises(UserError, match="role 'anchor'"):
        tailor_service.anchor_examples(bare, True)
    assert tailor_service.anchor_examples(bare, False) == []
