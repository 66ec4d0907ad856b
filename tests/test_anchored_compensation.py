"""Anchored compensation: exact compensation that also holds the base's outputs on
original-task inputs, against direct least squares of its stacked objective, against plain
exact compensation, and through the engine, the CLI's checks and the demo's anchor set."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest
import torch

from conftest import DEMO
from families import llava_batches, patched_weight
from tailor_ui.calibration import collect_hessians
from tailor_ui.cli import main
from tailor_ui.engine import run_method, selected_linears
from tailor_ui.errors import UserError
from tailor_ui.methods.exact import anchored_problem, compensate_exact
from tailor_ui.settings import Settings
from test_exact_compensation import correlated_layer, hessian_of, mixed_mask, objective

def compensate_anchored(w_pre, w_ft, keep, h_target, h_original, weight, damp=0.01, dtype=torch.float64):
    """Exact compensation on the anchored problem (what the engine runs for a given mask)."""
    target, combined = anchored_problem(w_pre, w_ft, h_target, h_original, weight, damp)
    return compensate_exact(w_pre, target, keep, combined, 0.0, dtype=dtype)


def anchored_objective(w, w_pre, w_ft, h_target, h_original, weight):
    return objective(w, w_ft, h_target) + weight * objective(w, w_pre, h_original)


def stacked_lstsq(w_pre, w_ft, keep, x_target, x_original, weight):
    """Row by row: min ‖X_t(w − w_ft)ᵀ‖²·2/n_t + μ‖X_o(w − w_pre)ᵀ‖²·2/n_o, w[R] = W_pre[R],
    as one least-squares problem in the kept entries' change e (w = W_pre + e on K)."""
    a_t = x_target * (2 / x_target.shape[0]) ** 0.5
    a_o = x_original * (2 * weight / x_original.shape[0]) ** 0.5
    out = w_pre.clone()
    for r in range(w_ft.shape[0]):
        k = keep[r]
        if not k.any():
            continue
        design = torch.cat([a_t[:, k], a_o[:, k]])
        rhs = torch.cat([a_t @ (w_ft[r] - w_pre[r]), torch.zeros(a_o.shape[0], dtype=a_o.dtype)])
        out[r, k] = w_pre[r, k] + torch.linalg.lstsq(design, rhs.unsqueeze(1)).solution.squeeze(1)
    return out


@pytest.mark.parametrize("weight", [0.3, 1.0, 5.0])
@pytest.mark.parametrize("seed", range(3))
def test_anchored_matches_direct_least_squares_of_the_stacked_objective(seed, weight):
    w_pre, w_ft, x_target = correlated_layer(rows=12, cols=32, tokens=160, seed=seed)
    _, _, x_original = correlated_layer(rows=12, cols=32, tokens=120, seed=seed + 10)
    keep = mixed_mask(12, 32, seed)
    got, info = compensate_anchored(w_pre, w_ft, keep, hessian_of(x_target), hessian_of(x_original),
                                    weight, damp=0.0)
    want = stacked_lstsq(w_pre, w_ft, keep, x_target, x_original, weight)
    assert info.method == "exact"
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
    assert torch.equal(got[~keep], w_pre[~keep])  # reverted entries exactly at the base


@pytest.mark.parametrize("seed", range(3))
def test_anchoring_trades_target_fidelity_for_original_outputs(seed):
    """Exact compensation is best on the target term alone, anchored on the sum; the anchor
    brings back less of the fine-tuned change on original inputs, the more the heavier."""
    w_pre, w_ft, x_target = correlated_layer(rows=16, cols=48, tokens=200, seed=seed)
    _, _, x_original = correlated_layer(rows=16, cols=48, tokens=200, seed=seed + 20)
    h_t, h_o = hessian_of(x_target), hessian_of(x_original)
    keep = mixed_mask(16, 48, seed)
    exact = compensate_exact(w_pre, w_ft, keep, h_t, 0.01, dtype=torch.float64)[0]
    drift = [objective(exact, w_pre, h_o)]
    for weight in (0.5, 2.0, 8.0):
        anchored = compensate_anchored(w_pre, w_ft, keep, h_t, h_o, weight, 0.01)[0]
        assert objective(exact, w_ft, h_t) <= objective(anchored, w_ft, h_t) * (1 + 1e-9)
        assert (anchored_objective(anchored, w_pre, w_ft, h_t, h_o, weight)
                <= anchored_objective(exact, w_pre, w_ft, h_t, h_o, weight) * (1 + 1e-9))
        drift.append(objective(anchored, w_pre, h_o))
    assert drift == sorted(drift, reverse=True) and drift[-1] < 0.5 * drift[0]


def test_a_vanishing_anchor_is_exact_compensation():
    w_pre, w_ft, x = correlated_layer(rows=10, cols=24, tokens=100, seed=4)
    keep = mixed_mask(10, 24, 4)
    h = hessian_of(x)
    exact = compensate_exact(w_pre, w_ft, keep, h, 0.01, dtype=torch.float64)[0]
    anchored = compensate_anchored(w_pre, w_ft, keep, h, hessian_of(x[:50]), 1e-9, 0.01)[0]
    torch.testing.assert_close(anchored, exact, rtol=1e-6, atol=1e-8)


def test_anchored_problem_keeps_the_fine_tuned_weights_when_the_anchor_has_no_say():
    """With H_o = 0 the target weights c are W_ft itself: nothing pulls them to the base."""
    w_pre, w_ft, x = correlated_layer(rows=6, cols=16, tokens=80, seed=5)
    target, combined = anchored_problem(w_pre, w_ft, hessian_of(x), torch.zeros(16, 16, dtype=x.dtype), 1.0, 0.0)
    torch.testing.assert_close(target, w_ft, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(combined.double(), hessian_of(x), rtol=1e-6, atol=1e-6)


# -- through the engine ------------------------------------------------------------------

@pytest.fixture(scope="module")
def anchor(decoder_pair):
    return llava_batches(decoder_pair.base.config, 2, seed=7)


def test_engine_runs_model_tailor_on_the_anchored_problem_on_every_layer(decoder_pair, decoder_batches,
                                                                        anchor):
    """On every linear the patch holds round(keep·entries) of each 128-column block, and its
    values minimise the anchored objective for that mask: the objective's gradient
    (w − W_ft)·H_d + μ·(w − W_pre)·H_o, H_d = H + 1 % of mean(diag H)·I, vanishes on every kept
    entry (where the fine-tuned values, uncompensated, leave it far from zero)."""
    s = Settings(keep=0.1, hessians="one-pass", compensation="anchored", anchor_weight=2.0)
    result = run_method(decoder_pair, s, [decoder_batches], anchor=anchor)
    linears = selected_linears(decoder_pair)
    h_t = collect_hessians(decoder_pair.finetuned[0], linears, decoder_batches)
    h_o = collect_hessians(decoder_pair.finetuned[0], linears, anchor)
    for name in linears:
        w_pre = decoder_pair.base.get_parameter(f"{name}.weight").detach().double()
        w_ft = decoder_pair.finetuned[0].get_parameter(f"{name}.weight").detach().double()
        got = patched_weight(decoder_pair, result.patch, name).double()
        kept = got != w_pre
        for i1 in range(0, w_pre.shape[1], 128):
            block = kept[:, i1:i1 + 128]
            assert int(block.sum()) == round(0.1 * block.numel()), name
        h = h_t[name].double()
        assert bool((torch.diag(h) > 0).all())  # no dead column: the damping is all there is
        damped = h + 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)

        def gradient(w):
            return (w - w_ft) @ damped + 2.0 * (w - w_pre) @ h_o[name].double()

        uncompensated = gradient(torch.where(kept, w_ft, w_pre))[kept].abs().max()
        assert gradient(got)[kept].abs().max() < 1e-3 * uncompensated, name
    assert result.report["exact_fallbacks"] == 0


def test_engine_reuses_scores_only_for_the_same_anchor_and_weight(decoder_pair, decoder_batches, anchor):
    s = Settings(keep=0.1, hessians="one-pass", compensation="anchored")
    run_method(decoder_pair, s, [decoder_batches], anchor=anchor)
    again = run_method(decoder_pair, replace(s, keep=0.05), [decoder_batches], anchor=anchor)
    other = run_method(decoder_pair, s, [decoder_batches],
                       anchor=llava_batches(decoder_pair.base.config, 2, seed=8))
    heavier = run_method(decoder_pair, replace(s, anchor_weight=3.0), [decoder_batches], anchor=anchor)
    assert again.report["score_cache"]["misses"] == 0
    assert other.report["score_cache"]["hits"] == 0 and heavier.report["score_cache"]["hits"] == 0


def test_anchored_compensation_without_original_data_is_refused(decoder_pair, decoder_batches):
    with pytest.raises(UserError, match="original-task calibration data"):
        run_method(decoder_pair, Settings(compensation="anchored"), [decoder_batches])


@pytest.mark.parametrize("weight", [0.0, -1.0, 1e4])
def test_anchor_weight_is_checked(weight):
    with pytest.raises(UserError, match="anchor weight"):
        Settings(compensation="anchored", anchor_weight=weight)


def test_anchored_goes_with_the_mask_first_order():
    with pytest.raises(UserError, match="SparseGPT mask order"):
        Settings(compensation="anchored", order="sparsegpt")


# -- the command line and the demo's anchor set ------------------------------------------------

def _tailor_args(tmp_path, *extra):
    return ["tailor", "--base", str(DEMO / "base"), "--finetuned", str(DEMO / "finetuned"),
            "--calib", str(DEMO / "target_calib.jsonl"), "--calib-limit", "16", "--out",
            str(tmp_path / "out"), *extra]


@pytest.mark.parametrize("extra, message", [
    (["--compensation", "anchored"], "needs original-task calibration data: pass --anchor"),
    (["--compensation", "exact", "--anchor", str(DEMO / "original_calib.jsonl")],
     "--anchor is read only by --compensation anchored"),
    (["--compensation", "anchored", "--anchor", str(DEMO / "nothing.jsonl")], "data file not found"),
    (["--method", "magnitude", "--anchor", str(DEMO / "original_calib.jsonl")], "read only by Model Tailor"),
    (["--compensation", "anchored", "--anchor", str(DEMO / "original_calib.jsonl"), "--anchor-weight", "0"],
     "anchor weight must be above 0"),
])
def test_cli_refuses_an_anchor_that_does_not_fit_in_one_line(tmp_path, capsys, extra, message):
    code = main(_tailor_args(tmp_path, *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_tailor_and_sweep_run_anchored_compensation(tmp_path, capsys):
    anchor = ["--anchor", str(DEMO / "original_calib.jsonl"), "--keep", "0.1", "--hessians", "one-pass"]
    assert main(_tailor_args(tmp_path, *anchor)) == 0  # --anchor alone: anchored compensation
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["compensation"] == "anchored" and report["exact_fallbacks"] == 0
    capsys.readouterr()
    table = tmp_path / "table.csv"
    code = main(["sweep", "--base", str(DEMO / "base"), "--finetuned", str(DEMO / "finetuned"),
                 "--calib", str(DEMO / "target_calib.jsonl"), "--calib-limit", "16",
                 "--original", str(DEMO / "vqa_eval.jsonl"), "--target", str(DEMO / "target_eval.jsonl"),
                 "--methods", "tailor", "--compensation", "exact,anchored", "--anchor-weight", "0.5,2",
                 "--anchor", str(DEMO / "original_calib.jsonl"), "--keep", "0.1", "--hessians", "one-pass",
                 "--limit", "4", "--out", str(table)])
    assert code == 0, capsys.readouterr().err
    merged = pd.read_csv(table).query("kind == 'merged'")
    assert list(merged["setting"]) == [
        "Model Tailor keep=0.1 alpha=0.8 compensation=exact hessians=one-pass",
        "Model Tailor keep=0.1 alpha=0.8 compensation=anchored anchor_weight=0.5 hessians=one-pass",
        "Model Tailor keep=0.1 alpha=0.8 compensation=anchored anchor_weight=2.0 hessians=one-pass"]


def test_the_demo_ships_the_original_skills_calibration_set_the_build_writes(tmp_path):
    """Half captions (empty question), half attribute questions, drawn from the build's
    calibration stream (not the evaluation sets'), byte for byte what `demo build` writes."""
    from tailor_ui.demo import world
    from tailor_ui.demo.build import CALIB_STREAM, ORIGINAL, Recipe, _write_split
    from tailor_ui.demo.sets import DEMO_DIR, ORIGINAL_CALIB, demo_anchor

    anchor = demo_anchor(DEMO_DIR)
    half = Recipe().calib_size // 2
    assert len(anchor) == 2 * half and sum(not ex.question for ex in anchor) == half
    samples = [s for task in ORIGINAL for s in world.generate(task, half, 0, CALIB_STREAM)]
    _write_split(tmp_path, ORIGINAL_CALIB, samples)
    name = f"{ORIGINAL_CALIB}.jsonl"
    assert (tmp_path / name).read_bytes() == (DEMO_DIR / name).read_bytes()
    for image in sorted((tmp_path / "images" / ORIGINAL_CALIB).iterdir()):
        assert image.read_bytes() == (DEMO_DIR / "images" / ORIGINAL_CALIB / image.name).read_bytes()
