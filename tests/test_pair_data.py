"""One place for a pair's data: sets a visitor adds once in the Models tab serve every tab
by role, on a tiny pair of their own with no built-in data. A target set calibrates Model
Tailor (the Tailor tab, the sweep) and gives Find settings its fit and held-out shares; an
anchor set gives anchored compensation its original-task examples; nothing is uploaded twice.

The sets' answers are the models' own: the target set's are the fine-tuned model's answers
(what "fine-tuning taught"), the original set's the base's, so the fine-tune gains on the
target task and loses on the original one, and a search has something to find."""

from __future__ import annotations

import uuid

import gradio as gr
import pytest
from PIL import Image

from conftest import request_for
from test_own_sets import bare, finished, own_session  # noqa: F401 (bare: a fixture)
from tailor_ui.data import Example, write_examples
from tailor_ui.app.jobs import DONE


@pytest.fixture(scope="module")
def own_sets(tmp_path_factory, disk_pair) -> dict[str, list[str]]:
    """Upload files (JSONL + images) per role: target (12 examples), original and anchor (6)."""
    from tailor_ui.evaluation.generate import generate_answers
    from tailor_ui.pair import load_pair

    root = tmp_path_factory.mktemp("pair-data")
    pair = load_pair(str(disk_pair / "base"), str(disk_pair / "ft"))
    plan = {"target": (pair.finetuned[0], "what colour is it?", 12),
            "original": (pair.base, "how many shapes are there?", 6),
            "anchor": (pair.base, "how many shapes are there?", 6)}
    files = {}
    for k, (role, (model, question, n)) in enumerate(plan.items()):
        names = [f"{role}-{i}.png" for i in range(n)]
        for i, name in enumerate(names):
            colour = ((37 * i + 90 * k) % 256, 255 - 19 * i, (70 * i) % 256)
            Image.new("RGB", (32, 32), colour).save(root / name)
        answers = generate_answers(model.eval(), pair.processor,
                                   [Example(root / name, question, ("-",)) for name in names])
        write_examples(root / f"{role}.jsonl", [{"image": name, "question": question, "answers": [a]}
                                                for name, a in zip(names, answers)])
        files[role] = [str(root / f"{role}.jsonl"), *(str(root / name) for name in names)]
    return files


NAMES = {"target": "colours", "original": "counts", "anchor": "counts-kept"}  # "target" is the demo's


def add_sets_once(studio, session, own_sets) -> None:
    for role, files in own_sets.items():
        studio.add_eval_set(session, role=role, task="vqa", name=NAMES[role], files=files)


def test_sets_added_once_serve_tailor_find_settings_and_the_sweep(bare, disk_pair, own_sets):
    from tailor_ui.evaluation import search
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.evalsets import pair_sets
    from tailor_ui.evaluation.search import split_examples
    from tailor_ui.app.service.tailor import (default_compensation, pair_calibration, scored_sets,
                                          sweep_compensations)

    session = own_session(bare, disk_pair)
    handle = bare.handle_for(session)
    assert not handle.calibration and not handle.anchor  # a pair of one's own: no data of its own
    add_sets_once(bare, session, own_sets)
    sets = pair_sets(session, handle)
    examples, _, where = pair_calibration(handle, sets)
    assert len(examples) == 9 and where == ("9 of the 12 examples of your target set 'colours' (Models tab); "
                                            "the other 3 are kept apart to score on")
    # the share kept apart is what every merge's target score and Find settings' held-out use
    kept_apart = next(s for s in scored_sets(handle, sets, True) if s.role == "target").examples
    _, held = split_examples(pair_calibration(handle, sets, keep_apart=False)[0], search.DEFAULT_HOLDOUT)
    assert list(kept_apart) == held and not set(kept_apart) & set(examples)
    assert scored_sets(handle, sets, False) == sets  # a merge calibrated elsewhere: the whole set

    # the Tailor tab's defaults: the pair's own data, anchored where it has an anchor set
    settings = default_settings(compensation=default_compensation(handle, sets), keep=0.2)
    run = finished(bare, session, bare.submit_tailor(session, settings))
    assert run.report["settings"]["compensation"] == "anchored" and run.report["patch_entries"] > 0
    assert run.report["calibration"]["source"].startswith("target:")
    assert run.report["calibration"]["examples"] == bare.config.calib_examples
    assert {"counts", "colours"} <= set(run.quick.columns) and "counts-kept" not in run.quick.columns

    # Find settings: every default method, on the held-out share of the same target set
    forms = sweep_compensations(handle, sets, search=True)
    result = finished(bare, session, bare.submit_search(
        session, search.SEARCH_GRID["keep"], search.SEARCH_GRID["alpha"], {"compensation": forms},
        methods=search.DEFAULT_METHODS, lams=search.SEARCH_GRID["lam"], examples=4)).result
    assert set(result.candidates["method"]) == set(search.DEFAULT_METHODS)
    assert result.used["held-out"].startswith("3 of 12 target-task examples")
    tuned = result.table[result.table["kind"] == "finetuned"].iloc[0]
    assert tuned["target_gain"] == pytest.approx(1.0) and tuned["original_retention"] < 1
    assert result.best_row["h"] == result.candidates["h"].max()

    # a sweep with no upload: Model Tailor calibrates on the target set, every set scored
    table = finished(bare, session, bare.submit_sweep(session, ["tailor", "magnitude"], [0.2], [],
                                                      examples=4)).table
    assert list(table["method"])[-2:] == ["tailor", "magnitude"]
    assert {"score:counts", "score:colours"} <= set(table.columns) and "score:counts-kept" not in table


def test_a_pair_without_target_data_says_where_to_add_it(bare, disk_pair, own_sets, tmp_path):
    from tailor_ui.errors import UserError
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.evalsets import pair_sets
    from tailor_ui.app.ui.tailor import calibration_markdown

    session = own_session(bare, disk_pair)
    with pytest.raises(UserError, match="no target-task data to calibrate on: add a set of the new "
                                        "skill with the role 'target' in the Models tab"):
        bare.submit_tailor(session, default_settings(compensation="greedy"))
    bare.add_eval_set(session, role="original", task="vqa", name="counts", files=own_sets["original"])
    with pytest.raises(UserError, match="no target-task data"):
        bare.submit_search(session, [0.1], [0.8], {"compensation": ["greedy"]})
    # an upload still works where the pair has none
    job = bare.submit_tailor(session, default_settings(compensation="greedy"), calib_source="upload",
                             calib_files=own_sets["target"])
    assert finished(bare, session, job).report["calibration"]["source"].startswith("upload:")
    # one target example cannot both calibrate and be kept apart to score on
    (tmp_path / "one.jsonl").write_text(open(own_sets["target"][0]).readline())
    bare.add_eval_set(session, role="target", task="vqa", name="one",
                      files=[str(tmp_path / "one.jsonl"), own_sets["target"][1]])
    with pytest.raises(UserError, match="1 target-task example\\(s\\) cannot be split"):
        bare.submit_tailor(session, default_settings(compensation="greedy"))
    handle = bare.handle_for(session)
    assert "cannot be split" in calibration_markdown(handle, pair_sets(session, handle))


def test_the_tailor_tab_says_where_its_calibration_comes_from(bare, disk_pair, own_sets, studio):
    from tailor_ui.app.ui.blocks import App

    app = App(bare)
    app.build()
    tab = app.tailor
    request = request_for(f"own-{uuid.uuid4().hex[:6]}")
    session = bare.session(request.session_hash)
    job = bare.submit_load(session, str(disk_pair / "base"), str(disk_pair / "ft"))
    assert bare.runner.wait(job.id, session.id, 120).status == DONE

    def shown() -> dict:
        return dict(zip(tab.poll_outputs(), tab.poll(session, bare.handle_for(session))))

    assert "no target-task data" in shown()[tab.calib_info]
    add_sets_once(bare, session, own_sets)
    first = shown()
    assert "9 of the 12 examples of your target set 'colours'" in first[tab.calib_info]
    assert first[tab.knobs["compensation"]]["value"] == "anchored"
    assert shown()[tab.calib_info] == gr.skip()  # sent once
    # the demo pair: its built-in set, whatever the visitor added
    demo = studio.session(f"demo-{uuid.uuid4().hex[:6]}")
    demo_tab = App(studio)
    demo_tab.build()
    text = dict(zip(demo_tab.tailor.poll_outputs(),
                    demo_tab.tailor.poll(demo, studio.handle_for(demo))))[demo_tab.tailor.calib_info]
    assert "the pair's built-in target-task set (128)" in text
