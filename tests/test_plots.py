"""Plotly figures from the engine's tables: the numbers they show, and empty inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

from tailor_ui.app import plots
from tailor_ui.pair import summarize


class TinyMLLM(torch.nn.Module):
    """Parameter names laid out like an MLLM's: a vision layer, a projector, two decoder layers."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
            [torch.nn.ModuleDict({"fc1": torch.nn.Linear(4, 4)})])})
        self.multi_modal_projector = torch.nn.ModuleDict({"linear_1": torch.nn.Linear(4, 4)})
        self.language_model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(
            [torch.nn.ModuleDict({"q_proj": torch.nn.Linear(4, 4, bias=False),
                                  "down_proj": torch.nn.Linear(4, 4, bias=False),
                                  "norm": torch.nn.LayerNorm(4)}) for _ in range(2)])})


def test_change_map_shows_relative_change_per_module_and_layer():
    torch.manual_seed(0)
    base, tuned = TinyMLLM(), TinyMLLM()
    tuned.load_state_dict(base.state_dict())
    with torch.no_grad():
        tuned.language_model["layers"][1]["q_proj"].weight.mul_(1.5)  # relative change 0.5
    fig = plots.change_map(summarize(base, tuned))
    heat = fig.data[0]
    assert isinstance(heat, go.Heatmap)
    assert list(heat.x) == ["visi 0", "bridge", "lang 0", "lang 1"]  # vision, bridge, language
    grid = pd.DataFrame(heat.z, index=list(heat.y), columns=list(heat.x))
    assert grid.loc["q_proj", "lang 1"] == pytest.approx(0.5, rel=1e-5)
    assert grid.loc["q_proj", "lang 0"] == 0.0
    assert math.isnan(grid.loc["q_proj", "visi 0"])  # no such module there
    assert "norm" not in grid.index  # linear weights only
    assert list(heat.y).index("q_proj") < list(heat.y).index("down_proj")  # attention first
    fig.to_json()


def test_patch_map_shows_the_kept_fraction():
    report = {"tensors": {
        "model.language_model.layers.2.self_attn.q_proj.weight": {"kept": 10, "numel": 100, "layer": 2},
        "model.language_model.layers.3.self_attn.q_proj.weight": {"kept": 30, "numel": 100, "layer": 3},
        "model.language_model.layers.3.mlp.down_proj.weight": {"kept": 5, "numel": 200, "layer": 3},
        "model.language_model.layers.3.input_layernorm.weight": {"kept": 4, "numel": 4, "layer": 3},
    }}
    fig = plots.patch_map(report, "Model Tailor keep=0.1")
    heat = fig.data[0]
    grid = pd.DataFrame(heat.z, index=list(heat.y), columns=list(heat.x))
    assert grid.loc["q_proj", "lang 2"] == pytest.approx(0.1)
    assert grid.loc["q_proj", "lang 3"] == pytest.approx(0.3)
    assert grid.loc["down_proj", "lang 3"] == pytest.approx(0.025)
    assert "input_layernorm" not in grid.index
    assert "keep=0.1" in fig.layout.title.text


def sweep_table() -> pd.DataFrame:
    rows = [
        {"kind": "base", "method": "base", "setting": "base", "keep": 0.0, "lam": None,
         "original": 2.0, "target": 0.0},
        {"kind": "finetuned", "method": "finetuned", "setting": "ft", "keep": 1.0, "lam": None,
         "original": 1.0, "target": 0.8},
        {"kind": "merged", "method": "tailor", "setting": "Model Tailor keep=0.1", "keep": 0.1,
         "lam": None, "original": 1.9, "target": 0.78},
        {"kind": "merged", "method": "tailor", "setting": "Model Tailor keep=0.05", "keep": 0.05,
         "lam": None, "original": 1.95, "target": 0.7},
        {"kind": "merged", "method": "magnitude", "setting": "Magnitude keep=0.1", "keep": 0.1,
         "lam": None, "original": 1.8, "target": 0.5},
        {"kind": "merged", "method": "wise_ft", "setting": "WiSE-FT lam=0.5", "keep": np.nan,
         "lam": 0.5, "original": 1.5, "target": 0.6},
    ]
    table = pd.DataFrame(rows)
    table["original_retention"] = table["original"] / 2.0
    table["target_retention"] = table["target"] / 0.8
    table["target_gain"] = table["target"] / 0.8  # the base scores 0 on the target
    return table


def test_tradeoff_has_a_trace_per_method_and_the_frontier():
    fig = plots.tradeoff(sweep_table())
    names = [t.name for t in fig.data]
    assert names[0] == "frontier"
    # one line per method and fixed settings, named by the setting label without the swept knob
    assert set(names[1:]) == {"Pre-trained", "Fine-tuned", "Model Tailor (paper)", "Magnitude", "WiSE-FT"}
    tailor = next(t for t in fig.data if t.name == "Model Tailor (paper)")
    assert list(tailor.x) == [0.975, 0.95]  # ordered by keep; retention, not raw score
    assert list(tailor.y) == pytest.approx([0.875, 0.975])
    frontier = fig.data[0]
    # among the merges, magnitude and WiSE-FT are beaten on both axes by Model Tailor
    assert list(frontier.x) == [0.95, 0.975]
    fig.to_json()


def test_each_compensation_form_of_model_tailor_is_its_own_named_curve():
    table = sweep_table()
    extra = table[table["method"] == "tailor"].copy()
    anchored, exact = extra.copy(), extra.copy()
    anchored["setting"] = anchored["setting"] + " alpha=0.8 compensation=anchored anchor_weight=1.0"
    exact["setting"] = exact["setting"] + " alpha=0.8 compensation=exact"
    fig = plots.tradeoff(pd.concat([table, anchored, exact], ignore_index=True))
    lines = {t.name: t.line.dash for t in fig.data if t.mode == "lines+markers"}
    assert lines == {"Model Tailor (paper)": "solid", "Magnitude": "solid", "WiSE-FT": "solid",
                     "Model Tailor + anchored compensation alpha=0.8 anchor_weight=1.0": "dashdot",
                     "Model Tailor + exact compensation alpha=0.8": "dash"}
    colours = {t.name: t.line.color for t in fig.data if t.name.startswith("Model Tailor")}
    assert len(set(colours.values())) == 3  # one per compensation form


def test_scores_vs_keep_and_retention():
    table = sweep_table()
    fig = plots.scores_vs_keep(table)
    traces = [t for t in fig.data if t.name == "Model Tailor (paper)"]
    assert len(traces) == 2  # original and target panels
    assert list(traces[0].x) == [0.05, 0.1] and list(traces[1].y) == [0.7, 0.78]
    assert not any(t.name == "WiSE-FT" for t in fig.data)  # no keep knob
    assert len(fig.layout.shapes) == 4  # pre-trained and fine-tuned reference lines per panel
    bars = plots.retention_bars(table)
    assert [b.name for b in bars.data] == ["original tasks (vs base)", "target task (vs fine-tuned)"]
    assert "base" not in list(bars.data[0].y)
    assert bars.data[1].x[list(bars.data[1].y).index("Model Tailor keep=0.1")] == pytest.approx(97.5)


@pytest.mark.parametrize("make", [plots.change_map, plots.patch_map, plots.tradeoff,
                                  plots.scores_vs_keep, plots.retention_bars])
def test_empty_inputs_give_a_message_not_an_error(make):
    for empty in (None, pd.DataFrame()) if make is not plots.patch_map else (None, {}):
        fig = make(empty)
        assert fig.layout.annotations and fig.layout.annotations[0].text
        fig.to_json()


def test_loss_curve_points_smoothing_and_empty():
    fig = plots.loss_curve([2.0, 1.5, 1.2, 1.0])
    assert isinstance(fig, go.Figure)
    assert list(fig.data[0].x) == [1, 2, 3, 4] and list(fig.data[0].y) == [2.0, 1.5, 1.2, 1.0]
    assert len(fig.data) == 2 and fig.data[1].y[-1] == pytest.approx(1.1)  # mean of the last 2
    long = plots.loss_curve(np.linspace(3, 1, 100))
    assert long.data[0].mode == "lines" and len(long.data[1].y) == 100
    assert plots.loss_curve([1.0]).data[0].y == (1.0,)
    for empty in (None, [], [math.nan]):
        fig = plots.loss_curve(empty)
        assert not fig.data and "start a fine-tuning run" in fig.layout.annotations[0].text


def test_tradeoff_without_a_target_gain_plots_target_retention():
    """On a few examples the fine-tune may not beat the base on its target: no gain to keep,
    so the target retention stands in and the axis says so."""
    table = sweep_table()
    table["target_gain"] = np.nan
    fig = plots.tradeoff(table)
    tailor = next(t for t in fig.data if t.name == "Model Tailor (paper)")
    assert list(tailor.y) == pytest.approx([0.875, 0.975])  # target / 0.8, the fine-tuned score
    assert "no gain to keep" in fig.layout.yaxis.title.text
    empty = plots.tradeoff(table[table["kind"] != "merged"])  # references only: no front
    assert "frontier" not in {t.name for t in empty.data}


def test_a_model_scoring_zero_gives_a_reason_not_an_empty_plot():
    """The pre-trained model scores 0 on the original sets, the fine-tuned on the target:
    no share is defined, and each plot says which model's zero is why."""
    table = sweep_table()
    table["original_retention"] = np.nan
    table["target_retention"] = np.nan
    table["target_gain"] = np.nan
    trade = plots.tradeoff(table)
    assert not trade.data
    message = trade.layout.annotations[0].text
    assert "pre-trained model scores 0 on every original-task set" in message
    assert "fine-tuned model scores 0 on every target set" in message
    bars = plots.retention_bars(table)
    assert "pre-trained model scores 0" in bars.layout.annotations[0].text
    some = sweep_table()
    some.loc[some["method"] == "magnitude", "original_retention"] = np.nan  # one row undefined
    bars = plots.retention_bars(some)
    row = list(bars.data[0].y).index("Magnitude keep=0.1")
    assert bars.data[0].x[row] == 0 and bars.data[0].text[row] == "n/a: the pre-trained model scores 0"


def test_a_patch_map_with_one_share_everywhere_says_why():
    report = {"tensors": {
        f"model.language_model.layers.{i}.self_attn.{m}.weight": {"kept": 10, "numel": 100, "layer": i}
        for i in (2, 3) for m in ("q_proj", "k_proj")}}
    fig = plots.patch_map(report, "Model Tailor keep=0.1")
    assert "every weight keeps 10.00% of its entries" in fig.layout.title.text
    report["tensors"]["model.language_model.layers.2.self_attn.q_proj.weight"]["kept"] = 30
    assert "every weight keeps" not in plots.patch_map(report).layout.title.text


def test_the_quick_check_line_says_why_a_share_is_missing():
    from types import SimpleNamespace

    from tailor_ui.app.ui.tailor import result_markdown

    quick = pd.DataFrame([{"model": "This merge", "original retention": np.nan, "target retention": 0.5}])
    report = {"patch_entries": 10, "linear_fraction": 0.1, "selected_linears": 2, "model_fraction": 0.01,
              "timings_s": {"total": 1.0}}
    run = SimpleNamespace(report=report, label="x", job_id="job-1", seconds=1.0, quick=quick,
                          settings={"method": "tailor", "keep": 0.1})
    text = result_markdown(run)
    assert "nan" not in text and "n/a (the pre-trained model scores 0 on them)" in text
    assert "target skill kept 50%" in text and "larger patch size" not in text
    quick["target retention"] = 0.17  # the counting story's default: a larger keep is hinted
    assert "keeps little of the new skill: try a larger patch size (keep)" in result_markdown(run)
    run.settings = {"method": "wise_ft", "lam": 0.3}  # no keep to raise
    assert "larger patch size" not in result_markdown(run)
