"""Find settings: the held-out split, the Pareto front and the best-h choice on hand-made
tables; the search end to end on the demo pair (library, command line, dashboard).

The end-to-end tests assert what holds for any built demo (references, formulas, order of
patch sizes, the model left as it came), not the demo's answers or scores."""

from __future__ import annotations

import math
import shlex
import uuid
from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from conftest import DEMO, request_for
from tailor_ui.cli import _settings, build_parser, main
from tailor_ui.data import Example
from tailor_ui.errors import UserError
from tailor_ui.evaluation.search import (HELDOUT, _check_gain, _check_retention, balance,
                                         candidate_grid, find_settings, pareto_front, rank,
                                         split_examples)
from tailor_ui.app.jobs import DONE
from tailor_ui.app.session import PairHandle
from tailor_ui.settings import Settings
from tailor_ui.app.ui.common import job_result_summary


def examples(n: int) -> list[Example]:
    return [Example(image=Path(f"{i}.png"), question="q", answers=("a",)) for i in range(n)]


# -- the split ----------------------------------------------------------------------------

def test_split_is_seeded_disjoint_complete_and_keeps_the_order():
    data = examples(20)
    fit, held = split_examples(data, 0.25, seed=3)
    assert len(held) == 5 and len(fit) == 15
    assert sorted(fit + held, key=lambda e: e.image.name) == sorted(data, key=lambda e: e.image.name)
    assert not set(fit) & set(held)
    assert fit == sorted(fit, key=data.index) and held == sorted(held, key=data.index)
    assert split_examples(data, 0.25, seed=3) == (fit, held)  # deterministic
    assert len({tuple(e.image.name for e in split_examples(data, 0.25, seed=s)[1]) for s in range(5)}) > 1
    assert len(split_examples(examples(3), 0.01)[1]) == 1  # at least one held out


@pytest.mark.parametrize("n, holdout, message", [(1, 0.25, "cannot be split"), (2, 0.9, "cannot be split"),
                                                 (10, 0.0, "strictly between"), (10, 1.0, "strictly between")])
def test_split_refuses_what_it_cannot_split(n, holdout, message):
    with pytest.raises(UserError, match=message):
        split_examples(examples(n), holdout)


# -- the grid, the front, the best ------------------------------------------------------------

def test_candidate_grid_skips_options_that_do_not_go_together():
    grid = candidate_grid([0.05, 0.1], [0.8], {"compensation": ["exact", "greedy"],
                                               "order": ["mask-first", "sparsegpt"]})
    # the SparseGPT order only with greedy compensation: 3 combinations x 2 keeps
    assert len(grid) == 6 and all(s.hessians == "one-pass" and s.method == "tailor" for s in grid)
    assert not any(s.order == "sparsegpt" and s.compensation == "exact" for s in grid)
    with pytest.raises(UserError, match="goes together"):
        candidate_grid([0.1], [0.8], {"compensation": ["exact"], "order": ["sparsegpt"]})
    with pytest.raises(UserError, match="cannot vary 'damp'"):
        candidate_grid([0.1], [0.8], {"damp": ["0.1"]})
    with pytest.raises(UserError, match="unknown compensation form"):
        candidate_grid([0.1], [0.8], {"compensation": ["fast"]})
    with pytest.raises(UserError, match="keep"):
        candidate_grid([], [0.8], {})


def test_pareto_front_of_a_hand_made_table():
    table = pd.DataFrame({"x": [1.0, 0.5, 0.9, 0.2, 0.9, math.nan, 0.5],
                          "y": [0.0, 0.9, 0.5, 0.2, 0.5, 2.0, 0.8]},
                         index=list("abcdefg"))
    front = pareto_front(table, "x", "y")
    # d is beaten by all, g by b; c and e tie (both stay); f has no x (never on the front)
    assert list(table.index[front]) == ["a", "b", "c", "e"]


def hand_table() -> pd.DataFrame:
    rows = [("base", 1.0, 0.0, 0.0), ("finetuned", 0.4, 1.0, 0.3),
            ("merged", 0.9, 0.6, 0.01), ("merged", 0.6, 0.9, 0.02), ("merged", 0.6, 0.9, 0.01),
            ("merged", 1.0, -0.5, 0.005), ("merged", 0.5, 0.5, 0.03)]
    return pd.DataFrame(rows, columns=["kind", "original_retention", "target_gain", "patch_fraction"])


def test_rank_scores_h_marks_the_front_and_the_best_with_ties_to_the_smaller_patch():
    table = rank(hand_table())
    merged = table["kind"] == "merged"
    assert table.loc[~merged, "h"].isna().all() and not table.loc[~merged, ["front", "best"]].any().any()
    assert table.loc[2, "h"] == pytest.approx(2 * 0.9 * 0.6 / 1.5)
    assert table.loc[5, "h"] == 0.0  # worse than the base on the target: no gain kept, h 0
    assert math.isnan(balance(0.5, math.nan))
    assert list(table.index[table["front"]]) == [2, 3, 4, 5]  # 6 is beaten by 3
    # rows 2, 3 and 4 tie on h (0.72): the smaller patch wins (2 and 4), then the first row
    assert table.loc[2, "h"] == table.loc[3, "h"] == table.loc[4, "h"] == table["h"].max()
    assert list(table.index[table["best"]]) == [2]
    bigger = hand_table()
    bigger.loc[2, "patch_fraction"] = 0.015
    assert list(rank(bigger).index[rank(bigger)["best"]]) == [4]


def test_a_search_with_nothing_to_rank_is_refused():
    with pytest.raises(UserError, match=r"does not beat the base on the held-out.*\(0.500 vs 0.500\)"):
        _check_gain(0.5, 0.5)
    _check_gain(0.5, 0.6)
    table = pd.DataFrame([{"kind": "base", "original_retention": math.nan},
                          {"kind": "finetuned", "original_retention": 0.5}])
    with pytest.raises(UserError, match="scores 0 on every original-task set"):
        _check_retention(table)


# -- end to end on the demo pair ----------------------------------------------------------------

def test_find_settings_on_the_demo_pair(studio):
    from tailor_ui.app.service.search import original_sets

    handle, n = studio.demo, 4
    original = original_sets(handle.eval_sets)
    calibration = list(handle.calibration[:16])
    before = {k: p.detach().clone() for k, p in handle.pair.base.named_parameters()}
    with handle.lock:
        result = find_settings(handle.pair, calibration, original, keeps=(0.02, 0.5), alphas=(0.8,),
                               options={"compensation": ["greedy"]}, holdout=0.5, limit=n)
    for name, p in handle.pair.base.named_parameters():
        assert torch.equal(p, before[name]), name  # every candidate was reverted
    table = result.table
    assert list(table["kind"]) == ["base", "finetuned", "majority", "merged", "merged"]
    base, tuned = table.iloc[0], table.iloc[1]
    assert base["original_retention"] == pytest.approx(1.0) and base["target_gain"] == pytest.approx(0.0)
    assert tuned["target_gain"] == pytest.approx(1.0)
    candidates = result.candidates
    small, large = candidates.iloc[0], candidates.iloc[1]
    assert small["patch_fraction"] < large["patch_fraction"]
    for _, row in candidates.iterrows():
        assert row["h"] == pytest.approx(balance(row["original_retention"], row["target_gain"]))
    assert candidates["front"].any() and candidates["best"].sum() == 1
    assert result.best_row["h"] == candidates["h"].max()
    assert (result.best.keep, result.best.alpha) == (result.best_row["keep"], result.best_row["alpha"])
    assert [s.keep for s in result.settings] == [0.02, 0.5]
    assert all(f"first {n} of {len(s.examples)}" == result.used[s.name] for s in original)
    assert result.used[HELDOUT].startswith("8 of 16")
    gained = tuned[f"score:{HELDOUT}"] - base[f"score:{HELDOUT}"]  # VQA accuracy on 8 examples
    assert result.gain_step == pytest.approx(1 / (8 * gained))


def test_cli_find_settings_prints_a_tailor_command_that_parses(tmp_path, capsys):
    command = ["find-settings", "--base", str(DEMO / "base"), "--finetuned", str(DEMO / "finetuned"),
               "--calib", str(DEMO / "target_calib.jsonl"), "--original", str(DEMO / "caption_eval.jsonl"),
               f"{DEMO / 'vqa_eval.jsonl'}:vqa", "--methods", "tailor", "--keep", "0.05,0.5",
               "--alpha", "0.8",
               "--compensation", "greedy", "--limit", "4", "--calib-limit", "16", "--holdout", "0.5"]
    out, loaded = tmp_path / "candidates.csv", tmp_path / "loaded.csv"
    assert main([*command, "--in-memory", "--out", str(loaded)]) == 0
    capsys.readouterr()
    code = main([*command, "--out", str(out)])  # the fine-tuned model read lazily
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = pd.read_csv(out)
    timings = ["seconds", "eval_seconds"]
    pd.testing.assert_frame_equal(table.drop(columns=timings), pd.read_csv(loaded).drop(columns=timings))
    assert list(table["kind"]) == ["base", "finetuned", "majority", "merged", "merged"]
    assert table["best"].sum() == 1 and {"h", "front", "original_retention", "target_gain"} <= set(table)
    assert "caption_eval: first 4 of" in printed and "held-out: 8 of 16" in printed
    command = printed.strip().splitlines()[-1].strip()
    words = shlex.split(command)
    assert words[:4] == ["python", "-m", "tailor_ui", "tailor"]
    args = build_parser().parse_args(words[3:])
    best = table[table["best"]].iloc[0]
    assert (args.keep, args.alpha, args.hessians) == (best["keep"], best["alpha"], "one-pass")
    assert args.compensation == "greedy"
    # the command rebuilds the very settings the search scored, and nothing it does not read
    assert _settings(args, args.method) == Settings(keep=best["keep"], alpha=best["alpha"],
                                                    hessians="one-pass", compensation="greedy")


def test_cli_find_settings_searches_the_baselines_and_prints_the_best_ones_command(tmp_path, capsys):
    out = tmp_path / "candidates.csv"
    code = main(["find-settings", "--base", str(DEMO / "base"), "--finetuned", str(DEMO / "finetuned"),
                 "--calib", str(DEMO / "target_calib.jsonl"), "--original", str(DEMO / "caption_eval.jsonl"),
                 "--methods", "magnitude,dare,wise_ft", "--keep", "0.1", "--lam", "0.25,0.5", "--limit", "4",
                 "--calib-limit", "16", "--holdout", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    table = pd.read_csv(out)
    assert list(table.loc[table["kind"] == "merged", "setting"]) == [
        "Magnitude patch keep=0.1", "DARE drop=0.9", "WiSE-FT lam=0.25", "WiSE-FT lam=0.5"]
    best = table[table["best"]].iloc[0]
    args = build_parser().parse_args(shlex.split(printed.strip().splitlines()[-1].strip())[3:])
    assert args.method == best["method"] and "--calib" not in printed.splitlines()[-1]
    knob = "lam" if best["method"] == "wise_ft" else "keep"  # DARE's keep: 1 - its drop
    assert getattr(args, knob) == pytest.approx(best[knob])


@pytest.mark.parametrize("extra, message", [
    (["--holdout", "1.5"], "strictly between 0 and 1"),
    (["--calib-limit", "1"], "cannot be split"),
    (["--compensation", "fast"], "unknown compensation form 'fast'"),
    (["--keep", "0.1,x"], "'x' is not a number"),
    (["--methods", "tailor,nope"], "unknown method 'nope'"),
    (["--methods", "wise_ft", "--lam", ""], "wise_ft needs at least one λ value"),
])
def test_cli_find_settings_refuses_bad_input_in_one_line(tmp_path, capsys, extra, message):
    code = main(["find-settings", "--base", str(DEMO / "base"), "--finetuned", str(DEMO / "finetuned"),
                 "--calib", str(DEMO / "target_calib.jsonl"), "--original",
                 str(DEMO / "caption_eval.jsonl"), "--out", str(tmp_path / "t.csv"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert not (tmp_path / "t.csv").exists()


# -- the dashboard ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(studio):
    from tailor_ui.app.ui.blocks import App

    app = App(studio)
    app.build()
    return app


def find_inputs(**overrides):
    values = dict(methods=["tailor"], keeps="0.05, 0.5", alphas="0.8", lams="", compensations=["greedy"],
                  examples=4, holdout=0.5, calib_source="builtin", calib_files=None, calib_examples=16)
    return {**values, **overrides}


def test_find_settings_on_the_tailor_tab(app):
    request = request_for(f"test-{uuid.uuid4().hex[:8]}")
    job_id, html = app.tailor.find(**find_inputs(), request=request)
    assert job_id.startswith("job-") and "mts-progress" in html
    job = app.studio.runner.wait(job_id, request.session_hash, 180)
    assert job.status == DONE, job.error
    session = app.studio.session(request.session_hash)
    progress, figure, markdown = app.tailor.search_poll(session)
    assert 'data-status="done"' in progress and "**Best:**" in markdown
    assert f"moves a target gain by up to {session.latest_search().result.gain_step:.2f}" in markdown
    assert isinstance(figure, go.Figure)
    traces = {t.name: t for t in figure.data}
    run = session.latest_search()
    best = run.result.best_row
    assert list(traces[f"best: {best['setting']}"].x) == [best["original_retention"]]
    assert len(traces["Model Tailor"].x) == 2
    assert app.tailor.search_poll(session)[1:] == [gr.skip(), gr.skip()]  # sent once
    shown = app.tailor.use_best(request=request)
    knobs = app.tailor.knobs
    method = shown[app.tailor.method]
    keep, alpha, compensation, hessians = (shown[knobs[name]]["value"]
                                           for name in ("keep", "alpha", "compensation", "hessians"))
    assert (method, keep, alpha, compensation, hessians) == ("tailor", best["keep"], best["alpha"],
                                                            "greedy", "one-pass")
    summary = job_result_summary(job)["result"]
    assert summary["candidates"] == 2 and summary["best"]["keep"] == keep
    assert run.csv_file.is_file() and len(pd.read_csv(run.csv_file)) == 5  # with the majority row


def test_find_settings_refuses_what_it_cannot_search(app, studio):
    request = request_for(f"test-{uuid.uuid4().hex[:8]}")
    with pytest.raises(gr.Error, match="no finished search"):
        app.tailor.use_best(request=request)
    with pytest.raises(gr.Error, match="'x' is not a number"):
        app.tailor.find(**find_inputs(keeps="0.1, x"), request=request)
    with pytest.raises(gr.Error, match="strictly between 0 and 1"):
        app.tailor.find(**find_inputs(holdout=1.0), request=request)
    with pytest.raises(gr.Error, match="at least one calibration example"):
        app.tailor.find(**find_inputs(calib_examples=0), request=request)
    with pytest.raises(gr.Error, match="25 candidates is too many for one search \\(at most 24\\)"):
        app.tailor.find(**find_inputs(methods=["tailor", "wise_ft"], keeps="0.02, 0.05, 0.1, 0.2",
                                      alphas="0.5, 0.8, 1.0", lams="0.5", compensations=["exact", "greedy"]),
                        request=request)
    session = app.studio.session(request.session_hash)
    demo = studio.demo  # the same models, without evaluation sets
    session.own = PairHandle(pair=demo.pair, label="no sets", shared=False, lane=demo.lane,
                             summary=demo.summary, calibration=demo.calibration)
    session.use_demo = False
    with pytest.raises(gr.Error, match="original-task evaluation sets"):
        app.tailor.find(**find_inputs(), request=request)
    assert not app.studio.runner.history(session.id, "search")
