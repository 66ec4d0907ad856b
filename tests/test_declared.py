"""Each knob is declared once (`tailor_ui.settings.KNOBS`) and each method names the knobs it
reads: the CLI's flags, the Tailor tab's controls, validation and sweep labels follow the
declarations, options a method does not read are refused, and a method registered at run
time shows up everywhere."""

from __future__ import annotations

from dataclasses import fields
from types import SimpleNamespace

import gradio as gr
import pytest
import torch

from test_sweep import pair, sets  # noqa: F401  (fixtures: a tiny pair and its sets)

from tailor_ui.cli import build_parser, main
from tailor_ui.errors import UserError
from tailor_ui.evaluation.sweep import setting_label, sweep, sweep_grid
from tailor_ui.methods import REGISTRY, Method
from tailor_ui.methods.method import task_vectors
from tailor_ui.settings import KNOBS, Compensation, Settings, choices, knob_problem, reads
from tailor_ui.app.ui.tailor import TailorTab, build_settings


def test_every_field_but_the_method_is_declared_and_every_word_described():
    assert set(KNOBS) == {f.name for f in fields(Settings)} - {"method"}
    for name, spec in KNOBS.items():
        if choices(name):  # the words come from the type; the declaration only describes them
            assert set(spec.words) == set(choices(name)), name
        else:
            assert not spec.words, name
    assert choices("compensation") == tuple(Compensation) == ("exact", "greedy", "anchored")
    assert choices("scope") == ("block", "row", "tensor", "global")


@pytest.mark.parametrize("name, value, problem", [
    ("keep", 1.5, "keep must be between 0 and 1, got 1.5"),
    ("keep", float("nan"), "keep must be between 0 and 1, got nan"),
    ("anchor_weight", 0.0, "anchor weight must be above 0 and at most 1000, got 0.0"),
    ("gamma", 1.0, "gamma must be at least 0 and below 1, got 1.0"),
    ("block_size", 0, "block size must be at least 1, got 0"),
    ("lam", 2.5, "λ must be between 0 and 2, got 2.5"),
    ("order", "random", "unknown mask order 'random' (choose from mask-first, sparsegpt)"),
])
def test_declared_ranges_and_words_validate(name, value, problem):
    assert knob_problem(name, value) == problem
    with pytest.raises(UserError, match=problem.split(",")[0].replace("(", r"\(")):
        Settings(**{name: value})


def test_bounds_admit_their_ends():
    assert knob_problem("keep", 0.0) is knob_problem("keep", 1.0) is None
    assert knob_problem("anchor_weight", 1000.0) is knob_problem("gamma", 0.0) is None
    assert knob_problem("lam", None) is None  # the method's own default


def test_a_compensation_word_becomes_the_enum_and_a_setting_stays_a_word():
    s = Settings(compensation="exact")
    assert s.compensation is Compensation.EXACT and s == Settings(compensation=Compensation.EXACT)
    assert s.to_dict()["compensation"] == "exact" and type(s.to_dict()["compensation"]) is str


@pytest.mark.parametrize("args, message", [
    (["tailor", "--method", "magnitude", "--alpha", "0.5"],
     "--alpha: not read by Magnitude patch (it reads --keep, --scope, --block-size)"),
    (["tailor", "--method", "wise_ft", "--no-compensate", "--seed", "3"],
     "--no-compensate, --seed: not read by WiSE-FT (it reads --lam)"),
    (["compare", "--image", "x.png", "--keep", "0.3"],
     "--keep: merge options go with --calib (which tailors on the fly)"),
    (["finetune", "--data", "d.jsonl", "--method", "llaca", "--rho", "0.5"],
     "--rho: not read by LLaCA (adaptive EMA) (it reads --llaca-form)"),
    (["finetune", "--data", "d.jsonl", "--method", "random_mask", "--probes", "3"],
     "--probes: not read by Random mask (sparse control) (it reads --rho)"),
])
def test_options_a_method_does_not_read_are_refused_with_one_line(args, message, tmp_path, capsys):
    command, rest = args[0], args[1:]
    out = [] if command == "compare" else ["--out", str(tmp_path / "out")]
    assert main([command, "--base", "b", *([] if command == "finetune" else ["--finetuned", "f"]),
                 *out, *rest]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_the_tab_passes_only_what_the_method_reads():
    shown = {"keep": 0.3, "alpha": 0.5, "gamma": 0.2, "lam": 0.7, "compensation": "exact",
             "block_size": 64.0}  # a number box gives a float
    s = build_settings("magnitude", shown)
    assert (s.keep, s.block_size, type(s.block_size)) == (0.3, 64, int)
    assert (s.alpha, s.gamma, s.lam, s.compensation) == (Settings.alpha, Settings.gamma, None,
                                                         Settings.compensation)


def _half_step(base: torch.Tensor, tuned, name: str, s) -> torch.Tensor:
    return base.float() + 0.5 * s.effective_lambda * task_vectors(base, tuned)[0]


@pytest.fixture
def half_step(monkeypatch):
    """A method registered at run time: its merge function and one registry line."""
    monkeypatch.setitem(REGISTRY, "half_step", Method(
        "Half step", "W_pre + λ/2·τ", _half_step, knobs=("lam", "gamma"), defaults={"lam": 0.6},
        sweep=("lam",), elementwise=True))
    return "half_step"


def test_a_method_added_at_run_time_is_in_the_cli_the_tab_and_a_sweep(half_step, pair, sets, capsys):
    # the CLI: a --method word, a reader of --lam and --gamma, and its knobs accepted
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    help_text = commands.choices["tailor"].format_help()
    assert "| half_step" in help_text
    assert help_text.count("half_step") == 3  # --method, --gamma's and --lam's readers
    assert main(["tailor", "--base", "b", "--finetuned", "f", "--out", "o", "--method", half_step,
                 "--keep", "0.2"]) == 2
    assert "--keep: not read by Half step (it reads --lam, --gamma)" in capsys.readouterr().err

    # the Tailor tab: in the method menu; choosing it shows its knobs (and only those), its λ
    tab = TailorTab(SimpleNamespace(config=SimpleNamespace(calib_examples=32)))
    with gr.Blocks():
        tab.render()
    assert (REGISTRY[half_step].label, half_step) in tab.method.choices
    updates = dict(zip([*tab.knobs, "info"], tab.method_changed(half_step)))
    assert updates["lam"]["visible"] and updates["lam"]["value"] == 0.6
    assert [name for name in tab.knobs if updates[name]["visible"]] == ["lam", "gamma", "others", "overlap"]
    assert updates["info"] == "*W_pre + λ/2·τ*"

    # a sweep: its grid over the knob it sweeps, rows labelled with what it reads
    grid = sweep_grid([half_step], {"lam": [0.5, 1.0], "keep": [0.1]})
    assert [setting_label(s) for s in grid] == ["Half step lam=0.5", "Half step lam=1"]
    original, target = sets
    table = sweep(pair, grid, original, target, None, batch_size=3)
    merged = table[table["kind"] == "merged"]
    assert list(merged["method"]) == [half_step] * 2 and list(merged["lam"]) == [0.5, 1.0]
    assert reads(half_step, "others") and not reads(half_step, "keep")


def test_streaming_leaves_the_thread_count_to_the_caller(disk_pair, tmp_path):
    from tailor_ui.stream import stream_merge

    seen = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        stream_merge(disk_pair / "base", [disk_pair / "ft"], Settings(method="wise_ft"), tmp_path / "m",
                     progress=lambda *_: seen.append(torch.get_num_threads()))
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}  # mid-run too: another lane may be computing
