"""Plotly figures from the engine's pandas tables and reports (no Gradio here).

- `change_map(summary)`: how much fine-tuning moved each linear layer (module x layer);
- `patch_map(report)`: where a patch lives (fraction of entries kept, module x layer);
- `tradeoff(table)`: original-task vs target-task score of every method and setting;
- `scores_vs_keep(table)`: both scores against the patch size;
- `retention_bars(table)`: retention of the original and the target skills per setting;
- `settings_search(table)`: Find settings' candidates, original retention vs target gain;
- `loss_curve(losses)`: the training loss of a fine-tuning run, one point per step.

Every function accepts an empty input and returns a figure saying what to do instead.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from tailor_ui.methods import REGISTRY
from tailor_ui.names import component, layer_index, module_kind

HEIGHT = 380
WIDE_HEIGHT = 460  # the sweep's plots: a full row each, their legend beside them
# Model Tailor's curves by compensation form (the paper's greedy loop: solid, COLOURS["tailor"])
LINE_DASHES = {"exact": "dash", "anchored": "dashdot"}
FORM_COLOURS = {"exact": "#ff9896", "anchored": "#7b0d0d"}
COLOURS = {"tailor": "#d62728", "magnitude": "#1f77b4", "wise_ft": "#2ca02c",
           "task_arithmetic": "#9467bd", "ties": "#ff7f0e", "dare": "#8c564b",
           "base": "#444444", "finetuned": "#17becf", "majority": "#b0b0b0",
           # models fine-tuned in the dashboard (Fine-tune tab)
           "full-ft": "#e377c2", "dowser": "#bcbd22", "random-mask": "#dbdb8d", "llaca": "#7f7f7f",
           "ema": "#aec7e8"}
_COMPONENT_ORDER = {"vision": 0, "bridge": 1, "language": 2}
_MODULE_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "qkv", "gate_proj", "up_proj",
                 "down_proj", "fc1", "fc2", "linear_1", "linear_2"]


@functools.lru_cache(maxsize=1)
def template() -> go.layout.Template:
    """A light white theme. Plotly's built-in templates are deep-copied into every figure
    (tens of milliseconds each, most of the dashboard's figure cost); this one is tiny."""
    axis = {"gridcolor": "#ebebeb", "zerolinecolor": "#d9d9d9", "linecolor": "#bbb",
            "automargin": True}
    return go.layout.Template(layout={
        "paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"color": "#2a3f5f"},
        "xaxis": axis, "yaxis": axis, "hoverlabel": {"align": "left"},
        "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3"]})


def _figure() -> go.Figure:
    return go.Figure(layout={"template": template()})


def method_label(method: str) -> str:
    if method in REGISTRY:
        return REGISTRY[method].label
    return {"base": "Pre-trained", "finetuned": "Fine-tuned", "majority": "Majority answer"}.get(method, method)


def empty_figure(message: str, title: str = "") -> go.Figure:
    fig = _figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#777"})
    fig.update_layout(title=title, height=HEIGHT, xaxis={"visible": False},
                      yaxis={"visible": False})
    return fig


def _column(comp: str, layer: float | int | None) -> tuple[int, float, str]:
    """Sort key and label of a heatmap column: component, then layer number."""
    if layer is None or (isinstance(layer, float) and math.isnan(layer)):
        return (_COMPONENT_ORDER.get(comp, 3), math.inf, comp if comp == "bridge" else f"{comp[:4]} other")
    return (_COMPONENT_ORDER.get(comp, 3), float(layer), f"{comp[:4]} {int(layer)}")


def module_rank(module: str) -> tuple[int, str]:
    return (_MODULE_ORDER.index(module) if module in _MODULE_ORDER else len(_MODULE_ORDER), module)


def _heatmap(cells: pd.DataFrame, value: str, hover: str, title: str, colorbar: str,
             zmax: float | None = None) -> go.Figure:
    """cells: one row per (module, column key) with `value` and a hover text column."""
    columns = sorted(set(cells["col"]))
    modules = sorted(set(cells["module"]), key=module_rank)
    labels = [c[2] for c in columns]
    grid = cells.pivot_table(index="module", columns="col", values=value, aggfunc="sum")
    grid = grid.reindex(index=modules, columns=columns)
    texts = cells.pivot_table(index="module", columns="col", values=hover, aggfunc="first")
    texts = texts.reindex(index=modules, columns=columns)
    fig = _figure()
    fig.add_trace(go.Heatmap(
        z=grid.values, x=labels, y=modules, text=texts.fillna("").values,
        hovertemplate="%{y} · %{x}<br>%{text}<extra></extra>", colorscale="Reds",
        zmin=0, zmax=zmax, colorbar={"title": {"text": colorbar}}, xgap=1, ygap=1))
    fig.update_layout(title=title, height=HEIGHT, 
                      xaxis={"title": "layer", "type": "category"},
                      yaxis={"title": "module", "type": "category", "autorange": "reversed"},
                      margin={"l": 90, "r": 20, "t": 50, "b": 60})
    return fig


def change_map(summary: pd.DataFrame | None) -> go.Figure:
    """Relative change ‖W_ft − W_pre‖ / ‖W_pre‖ of every linear weight, module x layer."""
    title = "What fine-tuning changed (linear layers)"
    if summary is None or summary.empty:
        return empty_figure("load a pair to see what fine-tuning changed", title)
    linear = summary[summary["linear"] & summary["name"].str.endswith(".weight")].copy()
    if linear.empty:
        return empty_figure("the pair has no linear layers", title)
    linear["col"] = [_column(c, l) for c, l in zip(linear["component"], linear["layer"])]
    linear["base_sq"] = linear["base_norm"] ** 2
    linear["delta_sq"] = linear["delta_norm"] ** 2
    cells = (linear.groupby(["module", "col"], sort=False)
             .agg(delta_sq=("delta_sq", "sum"), base_sq=("base_sq", "sum"),
                  changed=("changed", "sum"), numel=("numel", "sum"))
             .reset_index())
    cells["relative"] = (cells["delta_sq"] ** 0.5) / (cells["base_sq"] ** 0.5).where(cells["base_sq"] > 0)
    cells["relative"] = cells["relative"].fillna(0.0)
    cells["hover"] = [f"relative change {r:.4f}<br>{c:,} of {n:,} entries changed"
                      for r, c, n in zip(cells["relative"], cells["changed"], cells["numel"])]
    return _heatmap(cells, "relative", "hover", title, "‖Δ‖/‖W‖")


def patch_map(report: Mapping | None, label: str = "",
              summary: pd.DataFrame | None = None) -> go.Figure:
    """Fraction of each linear weight's entries the patch takes from the fine-tuned model.

    Linear weights are told apart by the pair's `summary` when given; otherwise norm
    weights are recognised by name (the report does not carry shapes).
    """
    title = "Where the patch lives" + (f": {label}" if label else "")
    tensors = (report or {}).get("tensors") or {}
    if not tensors:
        return empty_figure("run a merge to see where its patch lives", title)
    linear = set(summary.loc[summary["linear"], "name"]) if summary is not None else None
    rows = []
    for name, info in tensors.items():
        if not name.endswith(".weight"):
            continue
        if linear is not None and name not in linear:
            continue
        if linear is None and "norm" in module_kind(name).lower():
            continue
        layer = info.get("layer", layer_index(name))
        rows.append({"module": module_kind(name), "col": _column(component(name), layer),
                     "kept": info["kept"], "numel": info["numel"]})
    if not rows:
        return empty_figure("the patch holds no linear weights", title)
    cells = (pd.DataFrame(rows).groupby(["module", "col"], sort=False)[["kept", "numel"]]
             .sum().reset_index())
    cells["fraction"] = cells["kept"] / cells["numel"].clip(lower=1)
    cells["hover"] = [f"{100 * f:.2f}% kept ({k:,} of {n:,})"
                      for f, k, n in zip(cells["fraction"], cells["kept"], cells["numel"])]
    low, high = cells["fraction"].min(), cells["fraction"].max()
    if high - low <= 1e-3 * max(high, 1e-12):
        # a scope that thresholds each block, row or tensor on its own keeps the same share
        # everywhere: one colour is the true map, and the title says why
        title += (f"<br><sup>every weight keeps {100 * high:.2f}% of its entries: this scope "
                  "thresholds each block, row or tensor on its own (global scope lets them differ)</sup>")
    return _heatmap(cells, "fraction", "hover", title, "kept", zmax=max(high, 1e-9))


def _check_sweep(table: pd.DataFrame | None) -> bool:
    return table is not None and not table.empty and {"original", "target", "method"} <= set(table.columns)


# the trade-off's axes: shares, so CIDEr-D's 0-10 scale does not drown VQA's 0-1, and the
# target counts only what fine-tuning added over the base; where it added nothing on these
# examples (a small sample) there is no gain to keep, and the target retention stands in
TRADEOFF_AXES = ("original_retention", "target_gain")
TRADEOFF_TITLES = {"target_gain": "target gain kept<br>(score − base) / (fine-tuned − base)",
                   "target_retention": "target retention (score / fine-tuned)<br>no gain to keep here"}


def _pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both axes, by increasing x."""
    from tailor_ui.evaluation.search import pareto_front

    return points[pareto_front(points, x, y)].sort_values(x)


def _series(table: pd.DataFrame) -> pd.Series:
    """A line per method and fixed settings: the setting label without the swept knob, Model
    Tailor's named by its compensation ("(paper)": SparseGPT's greedy loop)."""
    names = table["setting"].str.replace(r" (?:keep|lam|drop)=\S+", "", regex=True)
    tailor = table["method"] == "tailor"
    names[tailor] = names[tailor].map(_tailor_series)
    return names


def _form(series: str) -> str | None:
    return next((form for form in LINE_DASHES if f"+ {form} compensation" in series), None)


def _dash(series: str) -> str:
    return LINE_DASHES.get(_form(series), "solid")


def _colour(method: str, series: str) -> str | None:
    return FORM_COLOURS.get(_form(series), COLOURS.get(method))


def _tailor_series(name: str) -> str:
    form = re.search(r" compensation=(\w+)", name)
    if form is None or form.group(1) == "greedy":
        return name.replace(" compensation=greedy", "").replace("Model Tailor", "Model Tailor (paper)", 1)
    named = f"Model Tailor + {form.group(1)} compensation"
    return name.replace(form.group(0), "").replace("Model Tailor", named, 1)


def no_ratio_message(table: pd.DataFrame, *columns: str) -> str:
    """Why a share cannot be drawn: the reference model it divides by scored 0."""
    why = {"original_retention": "the pre-trained model scores 0 on every original-task set",
           "target_retention": "the fine-tuned model scores 0 on every target set",
           "target_gain": "the fine-tuned model scores no better than the pre-trained on the target"}
    reasons = [why[c] for c in columns if c in why and table[c].isna().all()]
    return ("nothing to draw: " + "; ".join(reasons or ["no row has both shares"])
            + ",<br>so there is no share to keep (the table shows the raw scores)")


def tradeoff(table: pd.DataFrame | None) -> go.Figure:
    """Original retention against the share of the target gain kept: up and right is better."""
    title = "Trade-off: original skills kept vs new skill kept"
    if not _check_sweep(table) or not set(TRADEOFF_AXES) <= set(table.columns):
        return empty_figure("run a sweep to see the trade-off", title)
    fig = _figure()
    x, y = TRADEOFF_AXES
    if table[y].notna().sum() <= 1:  # only the fine-tuned row, or none
        y = "target_retention"
    data = table.dropna(subset=[x, y])
    if data.empty:
        return empty_figure(no_ratio_message(table, x, y), title)
    front = _pareto(data[data["kind"] == "merged"] if "kind" in data else data, x, y)
    if len(front) > 1:
        fig.add_trace(go.Scatter(x=front[x], y=front[y], mode="lines",
                                 name="frontier", line={"color": "#bbb", "dash": "dot", "width": 2},
                                 hoverinfo="skip"))
    for (method, series), group in data.groupby([data["method"], _series(data)], sort=False):
        sort_by = "keep" if group["keep"].notna().any() else "lam"
        group = group.sort_values(sort_by) if sort_by in group else group
        reference = method in ("base", "finetuned", "majority")
        fig.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="markers" if reference else "lines+markers",
            name=method_label(method) if reference else series, text=group["setting"],
            marker={"size": 16 if reference else 9, "color": _colour(method, series),
                    "symbol": "star" if reference else "circle"},
            line={"dash": _dash(series), "color": _colour(method, series)},
            hovertemplate="%{text}<br>original retention %{x:.3f}<br>target gain %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title, height=WIDE_HEIGHT,
                      xaxis={"title": "original retention (mean over sets of score / base)"},
                      yaxis={"title": TRADEOFF_TITLES[y]})
    return fig


def scores_vs_keep(table: pd.DataFrame | None) -> go.Figure:
    """Both scores against the patch size (methods with a keep knob)."""
    title = "Scores against patch size"
    if not _check_sweep(table):
        return empty_figure("run a sweep to see scores against patch size", title)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("original tasks", "target task"),
                        horizontal_spacing=0.12, figure=_figure())
    merged = table[(table["kind"] == "merged") & table["keep"].notna()] if "kind" in table else table
    for col, score in enumerate(("original", "target"), start=1):
        for (method, series), group in merged.groupby([merged["method"], _series(merged)], sort=False):
            group = group.sort_values("keep")
            name = series if method == "tailor" else method_label(method)
            fig.add_trace(go.Scatter(
                x=group["keep"], y=group[score], mode="lines+markers", name=name,
                legendgroup=name, showlegend=col == 1, text=group["setting"],
                marker={"color": _colour(method, series)},
                line={"color": _colour(method, series), "dash": _dash(series)},
                hovertemplate="%{text}<br>keep %{x:.3g}<br>score %{y:.3f}<extra></extra>"),
                row=1, col=col)
        # reference lines after the traces: plotly leaves empty subplots without them
        # labels at opposite ends, so two close lines' labels do not overlap
        for kind, dash, position in (("base", "dash", "top left"), ("finetuned", "dot", "bottom right")):
            ref = table[table["method"] == kind]
            if not ref.empty:
                fig.add_hline(y=float(ref[score].mean()), line={"dash": dash, "color": COLOURS[kind]},
                              annotation_text=method_label(kind), annotation_position=position,
                              row=1, col=col, exclude_empty_subplots=False)
        fig.update_xaxes(title_text="patch size (keep)", row=1, col=col)
    fig.update_layout(title=title, height=WIDE_HEIGHT)
    return fig


def retention_bars(table: pd.DataFrame | None) -> go.Figure:
    """How much of each skill every setting keeps: original vs the base, target vs fine-tuned
    (horizontal bars, so long setting names stay readable)."""
    title = "Retention (100% = as good as the reference model)"
    if not _check_sweep(table) or "original_retention" not in table:
        return empty_figure("run a sweep to see retention", title)
    rows = table[table["kind"] != "base"] if "kind" in table else table
    if rows[["original_retention", "target_retention"]].isna().all().all():
        return empty_figure(no_ratio_message(rows, "original_retention", "target_retention"), title)
    labels = list(rows["setting"])
    fig = _figure()
    for column, name, colour, reference in (
            ("original_retention", "original tasks (vs base)", "#1f77b4", "the pre-trained model"),
            ("target_retention", "target task (vs fine-tuned)", "#d62728", "the fine-tuned model")):
        values = 100 * rows[column]
        # a share of a 0 score is undefined: say so where the bar would be
        fig.add_trace(go.Bar(y=labels, x=values.fillna(0), orientation="h", name=name, marker_color=colour,
                             text=["" if v == v else f"n/a: {reference} scores 0" for v in values],
                             textposition="outside", cliponaxis=False,
                             hovertemplate="%{y}<br>%{x:.1f}%<extra></extra>"))
    fig.add_vline(x=100, line={"dash": "dash", "color": "#777"})
    fig.update_layout(title=title, height=max(HEIGHT, 120 + 34 * len(labels)), 
                      barmode="group", xaxis={"title": "retention (%)"},
                      yaxis={"automargin": True, "autorange": "reversed", "type": "category"})
    return fig


def settings_search(table: pd.DataFrame | None) -> go.Figure:
    """Find settings: each candidate's original retention against its target gain, a
    colour per method (those on the Pareto front ringed and joined), the best (highest
    harmonic mean) starred and named, base and fine-tuned as references at (1, 0) and
    (their retention, 1)."""
    title = "Find settings: original skills kept vs new skill kept"
    if table is None or table.empty or "front" not in table:
        return empty_figure("press Find settings to see the candidates", title)
    fig = _figure()
    candidates = table[table["kind"] == "merged"]
    hover = "%{text}<br>original retention %{x:.3f}<br>target gain %{y:.3f}<extra></extra>"
    front = candidates[candidates["front"]].sort_values("original_retention")
    fig.add_trace(go.Scatter(x=front["original_retention"], y=front["target_gain"], mode="lines",
                             name="front", line={"color": "#555555", "dash": "dot"}, hoverinfo="skip"))
    best = candidates[candidates["best"]]  # exactly one (evaluation.search.rank)
    groups = [(method_label(m), rows, {"size": [11 if f else 8 for f in rows["front"]],
                                        "color": COLOURS.get(m, "#9ca3af"),
                                        "line": {"width": [2 if f else 0 for f in rows["front"]],
                                                 "color": "#222222"}})
              for m, rows in candidates.groupby("method", sort=False)]
    for name, rows, marker in (
            *groups,
            (f"best: {best['setting'].iloc[0]}", best,
             {"size": 20, "color": COLOURS.get(best["method"].iloc[0], "#9ca3af"), "symbol": "star",
              "line": {"width": 1.5, "color": "#222222"}}),
            *((method_label(kind), table[table["kind"] == kind],
               {"size": 14, "color": COLOURS[kind], "symbol": "diamond"}) for kind in ("base", "finetuned"))):
        text = [f"{s}<br>h {h:.3f}" if h == h else s for s, h in zip(rows["setting"], rows["h"])]
        fig.add_trace(go.Scatter(x=rows["original_retention"], y=rows["target_gain"], mode="markers",
                                 name=name, text=text, marker=marker, hovertemplate=hover))
    # a legend row per few methods: below the axis title, on a taller figure
    fig.update_layout(title=title, height=HEIGHT + 80,
                      legend={"orientation": "h", "yanchor": "top", "y": -0.25},
                      xaxis={"title": "original retention (score / base)"},
                      yaxis={"title": "target gain ((score − base) / (fine-tuned − base))"})
    return fig


def loss_curve(losses, title: str = "Training loss") -> go.Figure:
    """The loss of each optimizer step, with a moving average once there are enough steps."""
    values = [float(v) for v in (losses if losses is not None else []) if v is not None and math.isfinite(float(v))]
    if not values:
        return empty_figure("start a fine-tuning run to see its loss", title)
    steps = list(range(1, len(values) + 1))
    fig = _figure()
    fig.add_trace(go.Scatter(x=steps, y=values, mode="lines+markers" if len(values) <= 60 else "lines",
                             name="loss", line={"color": "#1f77b4", "width": 1.5},
                             marker={"size": 5},
                             hovertemplate="step %{x}<br>loss %{y:.4f}<extra></extra>"))
    window = max(2, len(values) // 10)
    if len(values) >= 2 * window and window > 1:
        smooth = pd.Series(values).rolling(window, min_periods=1).mean()
        fig.add_trace(go.Scatter(x=steps, y=smooth, mode="lines", name=f"mean of {window}",
                                 line={"color": "#d62728", "width": 2.5}, hoverinfo="skip"))
    fig.update_layout(title=title, height=HEIGHT,
                      xaxis={"title": "optimizer step", **({"dtick": 1} if len(values) <= 20 else {})},
                      yaxis={"title": "loss"}, legend={"orientation": "h", "y": 1.08})
    return fig


def continual_accuracy(table: pd.DataFrame | None, title: str = "Continual: accuracy per task") -> go.Figure:
    """Each task's accuracy after every stage of a continual run (`run_continual`'s table):
    a line per task, the stage's task on the x axis, so forgetting shows as a line falling."""
    columns = [c for c in (table.columns if table is not None else []) if c.startswith("acc:")]
    if table is None or table.empty or not columns:
        return empty_figure("run a continual sequence to see each task's accuracy", title)
    fig = _figure()
    stages = [("before" if s == 0 else f"after {a}") for s, a in zip(table["stage"], table["after"])]
    for column in columns:
        fig.add_trace(go.Scatter(x=stages, y=table[column], mode="lines+markers",
                                 name=column.removeprefix("acc:"), marker={"size": 8},
                                 hovertemplate="%{x}<br>accuracy %{y:.3f}<extra></extra>"))
    last = table.iloc[-1]
    if "average" in table and math.isfinite(float(last["average"])):
        title += (f" — average {float(last['average']):.3f}, forgetting "
                  f"{float(last['forgetting']):.3f}" if math.isfinite(float(last["forgetting"]))
                  else f" — average {float(last['average']):.3f}")
    fig.update_layout(title=title, height=HEIGHT, xaxis={"title": "stage"},
                      yaxis={"title": "accuracy", "range": [0, 1.05]},
                      legend={"orientation": "h", "y": 1.08})
    return fig
