"""Evaluation sets a visitor brings, on a pair of their own with no demo at all: the
services (add, list, remove, used by the sweep, the quick check, Find settings and
Compare), the launched app's API, and a browser that loads the pair, uploads an original
and a target set and sees the Forgetting sweep's plots."""

from __future__ import annotations

import re
import shutil
import uuid
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from conftest import MAX_UPLOAD_MB, free_port
from tailor_ui.data import write_examples
from tailor_ui.errors import UserError
from tailor_ui.app.jobs import DONE

COLOURS = {"red": (210, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 210), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> Path:
    """original.jsonl with its images (a colour question), and target.zip (a caption set)."""
    root = tmp_path_factory.mktemp("own-sets")
    for name, colour in COLOURS.items():
        Image.new("RGB", (32, 32), colour).save(root / f"{name}.png")
    write_examples(root / "original.jsonl", [{"image": f"{n}.png", "question": "what colour is it?",
                                              "answers": [n]} for n in COLOURS])
    write_examples(root / "target.jsonl", [{"image": f"{n}.png", "answers": [f"a {n} square"]}
                                           for n in COLOURS])
    with zipfile.ZipFile(root / "target.zip", "w") as archive:
        archive.write(root / "target.jsonl", "target.jsonl")
        for name in COLOURS:
            archive.write(root / f"{name}.png", f"{name}.png")
    return root


def original_files(sets: Path) -> list[str]:
    return [str(sets / "original.jsonl"), *(str(sets / f"{n}.png") for n in COLOURS)]


@pytest.fixture(scope="module")
def bare(tmp_path_factory, model_root, disk_pair):
    """A Studio without a demo pair: visitors can only load their own."""
    from tailor_ui.app.service.studio import Studio, StudioConfig

    root = tmp_path_factory.mktemp("bare")
    studio = Studio(StudioConfig(workdir=root / "work", demo_dir=None, device="cpu",
                                 model_roots=[model_root], calib_examples=6, quick_examples=2,
                                 max_upload_mb=MAX_UPLOAD_MB, max_user_pairs=8))
    studio.start(background=False)
    assert studio.demo is None
    yield studio
    studio.close()


def own_session(studio, disk_pair):
    """A new session that loaded the tiny pair."""
    session = studio.session(f"own-{uuid.uuid4().hex[:8]}")
    job = studio.submit_load(session, str(disk_pair / "base"), str(disk_pair / "ft"))
    assert studio.runner.wait(job.id, session.id, 120).status == DONE, job.error
    return session


def finished(studio, session, job, timeout=300):
    job = studio.runner.wait(job.id, session.id, timeout)
    assert job.status == DONE, job.error
    studio.record(session, job)
    return job.result


def test_a_pair_without_sets_says_how_to_add_them(bare, disk_pair):
    from tailor_ui.app.service.config import default_settings

    session = own_session(bare, disk_pair)
    with pytest.raises(UserError, match="The sweep needs original-task and target-task evaluation "
                                        "sets .*no original-task or target-task set. Add evaluation "
                                        "sets in the Models tab"):
        bare.submit_sweep(session, ["magnitude"], [0.1], [])
    with pytest.raises(UserError, match="Find settings needs original-task evaluation sets"):
        bare.submit_search(session, [0.1], [0.8], {})
    run = finished(bare, session, bare.submit_tailor(session, default_settings(method="magnitude")))
    assert run.quick is None  # no sets: nothing to check, and the Tailor tab says how to add them
    with pytest.raises(UserError, match="upload a JSONL file"):
        bare.add_eval_set(session, role="original", task="vqa", files=[])


def test_added_sets_are_listed_used_by_every_tab_and_removed(bare, disk_pair, sets):
    from tailor_ui.app.service.config import default_settings

    session = own_session(bare, disk_pair)
    bare.add_eval_set(session, role="original", task="vqa", files=original_files(sets))
    table = bare.add_eval_set(session, role="target", task=None, files=[str(sets / "target.zip")])
    assert table.to_dict("records") == [
        {"name": "original", "role": "original", "task": "vqa", "examples": 4, "source": "original.jsonl"},
        {"name": "target-2", "role": "target", "task": "caption", "examples": 4, "source": "target.zip"}]
    with pytest.raises(UserError, match="already a set named 'original'"):
        bare.add_eval_set(session, role="target", task="vqa", name="original", files=original_files(sets))
    with pytest.raises(UserError, match="target.jsonl line 1: a vqa row needs a question"):
        bare.add_eval_set(session, role="original", task="vqa", name="broken",
                          files=[str(sets / "target.jsonl"), *original_files(sets)[1:]])
    assert len(session.eval_sets) == 2  # refused sets are not kept

    sweep = finished(bare, session, bare.submit_sweep(session, ["magnitude", "wise_ft"], [0.1], [0.5],
                                                      examples=2))
    assert list(sweep.table["kind"]) == ["base", "finetuned", "majority", "merged", "merged"]
    assert {"score:original", "score:target-2"} <= set(sweep.table.columns)
    assert sweep.table["score:target-2"].notna().all()
    run = finished(bare, session, bare.submit_tailor(session, default_settings(method="magnitude")))
    assert list(run.quick["model"]) == ["Pre-trained", "Fine-tuned", "This merge"]
    assert {"original", "target-2"} <= set(run.quick.columns)
    image, question, answers = bare.eval_example(session, "original", 2)
    assert Path(image).read_bytes() == (sets / "green.png").read_bytes()
    assert (question, answers) == ("what colour is it?", ["green"])
    with pytest.raises(UserError, match="original has examples 1 to 4"):
        bare.eval_example(session, "original", 5)

    folder = next(p for p in Path(image).parents if p.parent == session.folder)
    table = bare.remove_eval_set(session, "original")
    assert list(table["name"]) == ["target-2"] and not folder.exists()
    kept = [p for p in session.folder.iterdir() if p.name.startswith("evalset-")]
    assert len(kept) == 1 and any(kept[0] in e.image.parents for e in session.eval_sets[0].examples)
    with pytest.raises(UserError, match="no evaluation set named 'original'"):
        bare.remove_eval_set(session, "original")
    with pytest.raises(UserError, match="no original-task set"):
        bare.submit_sweep(session, ["magnitude"], [0.1], [])


def test_an_anchor_set_lets_an_own_pair_use_anchored_model_tailor(bare, disk_pair, sets):
    """A pair without a built-in anchor set: anchored Model Tailor is refused, saying how to
    add one; a visitor's set of role 'anchor' makes it the default and is never scored."""
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.evalsets import pair_sets
    from tailor_ui.app.service.tailor import default_compensation, sweep_compensations

    session = own_session(bare, disk_pair)
    handle = bare.handle_for(session)
    calibration = dict(calib_source="upload", calib_files=[str(disk_pair / "calib.jsonl"),
                                                           *map(str, sorted((disk_pair / "img").iterdir()))])
    anchored = default_settings(compensation="anchored", keep=0.2)
    assert default_compensation(handle, pair_sets(session, handle)) == "greedy"
    with pytest.raises(UserError, match="role 'anchor'"):
        bare.submit_tailor(session, anchored, **calibration)
    bare.add_eval_set(session, role="anchor", task="vqa", name="keep", files=original_files(sets))
    bare.add_eval_set(session, role="original", task="vqa", files=original_files(sets))
    sets_now = pair_sets(session, handle)
    assert default_compensation(handle, sets_now) == "anchored"
    assert sweep_compensations(handle, sets_now) == ["greedy", "anchored"]
    run = finished(bare, session, bare.submit_tailor(session, anchored, **calibration))
    assert run.report["settings"]["compensation"] == "anchored" and run.report["patch_entries"] > 0
    assert list(run.quick.columns).count("keep") == 0 and "original" in run.quick.columns


def test_a_datasets_set_from_an_allowed_folder(bare, disk_pair, model_root, tmp_path):
    import datasets

    images = [Image.new("RGB", (32, 32), c) for c in COLOURS.values()]
    data = datasets.Dataset.from_dict({"img": images, "q": ["what colour is it?"] * 4,
                                       "refs": list(COLOURS)}).cast_column("img", datasets.Image())
    data.save_to_disk(model_root / "colour-set")
    (tmp_path / "elsewhere").mkdir()
    data.save_to_disk(tmp_path / "elsewhere" / "colour-set")
    session = own_session(bare, disk_pair)
    table = bare.add_eval_set(session, role="original", task="vqa", dataset="colour-set",
                              columns="image=img, question=q, answers=refs")
    assert table.to_dict("records")[0] == {"name": "colour-set", "role": "original", "task": "vqa",
                                           "examples": 4, "source": "colour-set (test)"}
    assert session.eval_sets[0].examples[3].answers == ("white",)
    with pytest.raises(UserError, match="outside the allowed folders"):
        bare.add_eval_set(session, role="original", task="vqa", dataset=str(tmp_path / "elsewhere" / "colour-set"))
    with pytest.raises(UserError, match="unknown question column 'question'"):
        bare.add_eval_set(session, role="target", task="vqa", dataset="colour-set", name="x",
                          columns="image=img, question=question, answers=refs")
    with pytest.raises(UserError, match="not both"):
        bare.add_eval_set(session, role="target", task="vqa", dataset="colour-set",
                          files=original_files(tmp_path))
    shutil.rmtree(model_root / "colour-set")


def test_a_visitor_adds_a_set_to_the_shared_demo_pair(studio, sets):
    """The demo's built-in sets keep working; a visitor's set joins them for that visitor only."""
    from tailor_ui.app.service.config import default_settings

    alice, bob = studio.session(f"alice-{uuid.uuid4().hex[:6]}"), studio.session(f"bob-{uuid.uuid4().hex[:6]}")
    with pytest.raises(UserError, match="already a set named 'target'"):
        studio.add_eval_set(alice, role="target", task="vqa", name="target", files=original_files(sets))
    table = studio.add_eval_set(alice, role="original", task="vqa", name="colours", files=original_files(sets))
    assert list(table["name"]) == ["caption", "vqa", "target", "colours"]
    assert list(studio.eval_sets_table(bob)["name"]) == ["caption", "vqa", "target"]
    run = finished(studio, alice, studio.submit_tailor(alice, default_settings(keep=0.1)))
    assert {"caption", "vqa", "target", "colours"} <= set(run.quick.columns)
    assert any(key.startswith("colours#") for key in studio.demo.reference_scores["Pre-trained"])
    with pytest.raises(UserError, match="built-in set of this pair"):
        studio.remove_eval_set(alice, "caption")
    # a second target set: the demo's one fine-tuned model is the reference on both
    studio.add_eval_set(alice, role="target", task="caption", name="squares", files=[str(sets / "target.zip")])
    table = finished(studio, alice, studio.submit_sweep(alice, ["magnitude"], [0.1], [], examples=4)).table
    assert {"retention:target", "retention:squares", "retention:colours"} <= set(table.columns)
    assert table.loc[table["kind"] == "finetuned", "target_retention"].item() == pytest.approx(1.0)


# -- the launched app: its API, and a browser -------------------------------------------------


@pytest.fixture(scope="module")
def bare_app(bare):
    from tailor_ui.app.ui import lean_import

    lean_import.prepare()
    from tailor_ui.app.ui.blocks import App, launch_options

    app = App(bare)
    blocks = app.build()
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                              quiet=True, **launch_options(bare))
    app.url = url.rstrip("/") + "/"
    yield app
    blocks.close()


def test_api_load_add_sets_and_sweep_with_an_uploaded_calibration(bare_app, disk_pair, sets, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(bare_app.url, verbose=False, download_files=str(tmp_path))
    job_id, _ = client.predict(str(disk_pair / "base"), str(disk_pair / "ft"), "float32", "cpu",
                               api_name="/load_pair")
    assert client.predict(job_id, 120, api_name="/wait_job")["status"] == "done"
    with pytest.raises(AppError, match="Add evaluation sets in the Models tab"):
        client.predict(["magnitude"], "0.1", "0.5", 0.8, 4, None, api_name="/sweep")
    files = [handle_file(f) for f in original_files(sets)]
    client.predict(files, "", "test", "", "", "original", "vqa", api_name="/add_eval_set")
    table, _, _ = client.predict([handle_file(str(sets / "target.zip"))], "", "test", "", "", "target",
                                 "auto", api_name="/add_eval_set")
    assert [row[:4] for row in table["data"]] == [["original", "original", "vqa", 4],
                                                  ["target-2", "target", "caption", 4]]
    calibration = [handle_file(str(disk_pair / "calib.jsonl")),
                   *(handle_file(str(p)) for p in sorted((disk_pair / "img").iterdir()))]
    sweep_id, _ = client.predict(["tailor", "magnitude"], "0.1", "0.5", 0.8, 4, calibration,
                                 api_name="/sweep")
    info = client.predict(sweep_id, 300, api_name="/wait_job")
    assert info["status"] == "done", info
    assert info["result"]["rows"] == 3 + 2 and "score:target-2" in info["result"]["columns"]
    _, csv_path = client.predict(sweep_id, api_name="/sweep_result")
    frame = pd.read_csv(csv_path)
    assert list(frame["method"])[-2:] == ["tailor", "magnitude"]
    image, mode, question, references = client.predict("original", 3, api_name="/eval_example")
    assert (mode, question) == ("question", "what colour is it?") and "blue" in references
    table, _ = client.predict("original", api_name="/remove_eval_set")
    assert [row[0] for row in table["data"]] == ["target-2"]


def test_browser_loads_a_pair_uploads_sets_and_sees_the_sweep(browser, bare_app, disk_pair, sets,
                                                              screenshots):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    try:
        page.goto(bare_app.url)
        expect(page.locator("#pair-status")).to_contain_text("demo", timeout=60_000)  # none here
        page.locator("#models-base textarea").fill(str(disk_pair / "base"))
        page.locator("#models-finetuned textarea").fill(str(disk_pair / "ft"))
        page.locator("#models-load").click()
        expect(page.locator("#pair-status")).to_contain_text("Pair:", timeout=120_000)

        def add_set(files: list[str], role: str, task: str, name: str) -> None:
            page.locator("#evalsets-files input[type=file]").set_input_files(files)
            # the file's cell, by its accessible name: Gradio splits the name's stem and
            # extension into two spans, whose text reads "target .zip" on some renders
            expect(page.locator("#evalsets-files").get_by_role("cell", name=Path(files[0]).name)).to_be_visible()
            page.locator("#evalsets-role").get_by_text(role, exact=True).click()
            page.locator("#evalsets-task").get_by_text(task).click()
            page.locator("#evalsets-add").click()
            expect(page.locator("#evalsets-table")).to_contain_text(name)

        add_set(original_files(sets), "original", "VQA", "original")
        add_set([str(sets / "target.zip")], "target", "Captioning", "target-2")
        page.screenshot(path=screenshots / "own-sets-models.png", full_page=True)
        page.get_by_role("tab", name="Forgetting").click()
        page.locator("#sweep-methods").get_by_text("Model Tailor").click()  # no calibration: untick
        page.locator("#sweep-keeps textarea").fill("0.1")
        page.locator("#sweep-lams textarea").fill("0.5")
        box = page.locator("#sweep-n input[type=number]")
        box.fill("4")
        box.press("Tab")
        page.locator("#sweep-run").click()
        progress = page.locator("#sweep-progress .mts-progress")
        expect(progress).to_have_attribute("data-job", re.compile(r"^job-"))
        expect(progress).to_have_attribute("data-status", "done", timeout=180_000)
        for elem_id in ("sweep-tradeoff", "sweep-keep", "sweep-retention", "sweep-heatmap"):
            expect(page.locator(f"#{elem_id} .js-plotly-plot")).to_be_visible()
        expect(page.locator("#sweep-table")).to_contain_text("magnitude")
        expect(page.locator("#sweep-table")).to_contain_text("target-2")
        page.screenshot(path=screenshots / "own-sets-forgetting.png", full_page=True)
    finally:
        context.close()


# -- the command line ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_dataset(sets):
    import datasets

    folder = sets / "colour-set"
    if not folder.exists():
        images = [Image.new("RGB", (32, 32), c) for c in COLOURS.values()]
        datasets.Dataset.from_dict({"img": images, "q": ["what colour is it?"] * 4, "refs": list(COLOURS)}
                                   ).cast_column("img", datasets.Image()).save_to_disk(folder)
    return folder


def test_cli_sweep_and_eval_take_sets_by_role_from_jsonl_zip_and_datasets(disk_pair, sets, colour_dataset,
                                                                          tmp_path, capsys):
    import json

    from tailor_ui.cli import main

    model = ["--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft")]
    out = tmp_path / "table.csv"
    assert main(["sweep", *model, "--original-set", f"{sets / 'original.jsonl'}:vqa",
                 "--original-set", str(colour_dataset), "--columns", "image=img,question=q,answers=refs",
                 "--target-set", f"{sets / 'target.zip'}:caption", "--methods", "magnitude", "--keep", "0.2",
                 "--limit", "2", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table["method"]) == ["base", "finetuned", "majority", "magnitude"]
    assert {"score:original", "score:colour-set", "score:target"} <= set(table.columns)
    results = tmp_path / "eval.json"
    assert main(["eval", "--model", str(disk_pair / "base"), "--original-set", str(colour_dataset),
                 "--columns", "image=img,question=q,answers=refs", "--split", "test[:3]",
                 "--target-set", str(sets / "target.zip"), "--max-new-tokens", "3", "--out", str(results)]) == 0
    scored = json.loads(results.read_text())
    assert {name: (r["role"], r["task"], r["n"]) for name, r in scored.items()} == {
        "colour-set": ("original", "vqa", 3), "target": ("target", "caption", 4)}
    capsys.readouterr()


@pytest.mark.parametrize("sets_args, message", [
    (["--original-set", "{sets}/none.jsonl", "--target-set", "{sets}/target.zip"], "none.jsonl: not found"),
    (["--original-set", "{sets}/target.jsonl:vqa", "--target-set", "{sets}/target.zip"],
     "target.jsonl line 1: a vqa row needs a question"),
    (["--original-set", "{sets}/colour-set", "--target-set", "{sets}/target.zip"], "unknown image column 'image'"),
    (["--original-set", "{sets}/target.jsonl", "--target-set", "{sets}/target.zip"],
     "two sets are named 'target'"),
    (["--original-set", "{sets}/original.jsonl"], "the following arguments are required: --target-set"),
])
def test_cli_refuses_bad_sets_in_one_line_before_loading(disk_pair, sets, colour_dataset, tmp_path, capsys,
                                                         sets_args, message):
    from tailor_ui.cli import main

    code = main(["sweep", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--methods", "magnitude", *[a.format(sets=sets) for a in sets_args], "--out",
                 str(tmp_path / "t.csv")]) if "required" not in message else None
    if code is None:
        with pytest.raises(SystemExit) as exit_:
            main(["sweep", "--base", "b", "--finetuned", "f", "--methods", "magnitude",
                  *[a.format(sets=sets) for a in sets_args], "--out", str(tmp_path / "t.csv")])
        code = exit_.value.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "t.csv").exists()
