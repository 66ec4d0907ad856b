"""LLaCA / EMA (docs/methods.md#llaca) and the continual run (#metrics): formulas on hand-made numbers,
the tracker on hand-made gradients, training integration and the metrics table."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from tailor_ui.demo import world
from families import tiny_demo_model as tiny

from tailor_ui.errors import UserError
from tailor_ui.demo.tasks import shapes_samples, shapes_sequence
from tailor_ui.training.continual import acc_column, continual_metrics, run_continual, summary
from tailor_ui.training.finetune import finetune
from tailor_ui.training.llaca import (CODE_FALLBACK, PAPER_FALLBACK, EMATracker, code_weight,
                                      live_weight, paper_beta)


# ------------------------------------------------------------------ pure formulas

def test_code_weight_inside_unit_interval():
    assert code_weight(0.04, 1.0, 2.0) == pytest.approx(0.01 * 2 / 0.08)  # 0.25
    assert code_weight(10.0, 0.0, 4.0) == pytest.approx(0.00025)


@pytest.mark.parametrize("a, b, c", [
    (0.0, 1.0, 2.0),  # a·c = 0 (θ = θ*)
    (3.0, 1.0, 0.0),  # a·c = 0 (gradient unchanged)
    (0.01, 1.0, 1.0),  # w = 2 ≥ 1
    (0.02, 0.0, 0.5),  # w = 1 exactly: outside the open interval
    (-4.0, 1.0, 2.0),  # negative
    (4.0, -3.0, 2.0),  # negative numerator
    (math.inf, 1.0, 1.0),
    (math.nan, 1.0, 1.0),
])
def test_code_weight_fallback(a, b, c):
    assert code_weight(a, b, c) == CODE_FALLBACK == 0.001


def test_paper_beta_and_fallback():
    assert paper_beta(1.0, 4.0, 1.0) == pytest.approx(0.5)  # (1 + 1)/(4·1)
    assert paper_beta(0.5, 3.0, 1.0) == pytest.approx(0.5)
    for args in [(1.0, 0.0, 2.0), (1.0, 2.0, 0.0), (1.0, 1.0, 1.0), (3.0, 2.0, 2.0),
                 (1.0, -4.0, 1.0), (-3.0, 4.0, 1.0), (1.0, math.nan, 1.0)]:
        assert paper_beta(*args) == PAPER_FALLBACK == 0.99


def test_live_weight_forms():
    assert live_weight("code", 0.04, 1.0, 2.0) == pytest.approx(0.25)
    assert live_weight("paper", 4.0, 1.0, 1.0) == pytest.approx(1 - 0.5)
    assert live_weight("fixed", 4.0, 1.0, 1.0, beta=0.9) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        live_weight("nope", 1.0, 1.0, 1.0)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the tracker

def _steps(form: str, beta: float = 0.99) -> tuple[EMATracker, torch.nn.Parameter]:
    """Hand-made optimizer steps on θ* = θ0 = 0; this takes step 1, `_second_step` step 2:
    step 1: θ = [1, −1], g = [0.5, −0.5] → a = 2, b = 1, c = ‖g − 0‖₁ = 1;
    step 2: θ = [2, −2], g = [0.25, 0.25] → a = ‖θ − θ*₁‖₁, b = 0.5, c = 1."""
    p = torch.nn.Parameter(torch.zeros(2))
    tracker = EMATracker([("w", p)], form=form, beta=beta)  # type: ignore[arg-type]
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, -1.0]))
    p.grad = torch.tensor([0.5, -0.5])
    tracker.update()
    return tracker, p


def _second_step(tracker: EMATracker, p: torch.nn.Parameter, w1: float) -> tuple[torch.Tensor, float]:
    """Check the EMA after step 1 (the form fell back to weight `w1` on θ1), take step 2;
    returns that first EMA θ*₁ and a = ‖θ2 − θ*₁‖₁."""
    first = (1 - w1) * torch.zeros(2) + w1 * torch.tensor([1.0, -1.0])
    assert torch.allclose(tracker.ema["w"], first)
    with torch.no_grad():
        p.copy_(torch.tensor([2.0, -2.0]))
    p.grad = torch.tensor([0.25, 0.25])
    tracker.update()
    return first, float((torch.tensor([2.0, -2.0]) - first).abs().sum())


def test_tracker_code_form_by_hand():
    tracker, p = _steps("code")
    # step 1: no previous gradient → fallback 0.001, as the authors' code
    first, a = _second_step(tracker, p, 0.001)
    w = 0.01 * (1 + 0.5) / (a * 1.0)  # c = |0.25 − 0.5| + |0.25 + 0.5| = 1
    assert 0 < w < 1
    expected = (1 - w) * first + w * torch.tensor([2.0, -2.0])
    assert torch.allclose(tracker.ema["w"], expected, atol=1e-7)
    stats = tracker.stats()
    assert stats["steps"] == 2 and stats["fallback_fraction"] == pytest.approx(0.5)
    assert stats["mean_live_weight"] == pytest.approx((0.001 + w) / 2)
    tracker.swap_in()
    assert torch.equal(p.detach(), expected.to(p.dtype)) or torch.allclose(p.detach(), expected)


def test_tracker_paper_form_by_hand():
    tracker, p = _steps("paper")
    # step 1: β = (1 + 1)/(2·1) = 1 → fallback 0.99
    first, a = _second_step(tracker, p, 0.01)
    beta = (0.5 + 1) / (a * 1.0)
    assert 0 < beta < 1
    assert torch.allclose(tracker.ema["w"], beta * first + (1 - beta) * torch.tensor([2.0, -2.0]))


def test_tracker_fixed_form():
    tracker, _ = _steps("fixed", beta=0.75)
    assert torch.allclose(tracker.ema["w"], 0.25 * torch.tensor([1.0, -1.0]))


def test_tracker_previous_gradient_is_a_copy():
    """Clearing or reusing the live gradient must not change the remembered one."""
    tracker, p = _steps("code")
    p.grad.zero_()
    assert torch.equal(tracker.grad_prev["w"], torch.tensor([0.5, -0.5]))


# ------------------------------------------------------------------ in training

def test_ema_extremes_match_full_and_unchanged():
    """β = 0 follows the live weights exactly (= plain training); β = 1 never moves."""
    samples = world.generate("count", 16, 0)
    base, processor = tiny()
    full, follow, frozen = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    options = dict(batch_size=8, lr=1e-3, epochs=1, seed=3)
    finetune(full, processor, samples, method="full", **options)
    finetune(follow, processor, samples, method="ema", ema_beta=0.0, **options)
    report = finetune(frozen, processor, samples, method="ema", ema_beta=1.0, **options)
    assert report.extra["ema"]["form"] == "fixed"
    for (name, a), b, c, d in zip(base.named_parameters(), full.parameters(),
                                  follow.parameters(), frozen.parameters()):
        assert torch.equal(b, c), name
        assert torch.equal(a, d), name


@pytest.mark.parametrize("form", ["code", "paper"])
def test_llaca_training_swaps_in_ema(form):
    samples = world.generate("count", 16, 0)
    base, processor = tiny()
    full, model = copy.deepcopy(base), copy.deepcopy(base)
    finetune(full, processor, samples, method="full", batch_size=8, lr=1e-3)
    report = finetune(model, processor, samples, method="llaca", llaca_form=form, batch_size=8,
                      lr=1e-3)
    ema = report.extra["ema"]
    assert ema["form"] == form and ema["steps"] == 2 and 0 < ema["mean_live_weight"] < 1
    moved = [n for (n, a), b in zip(base.named_parameters(), model.parameters())
             if not torch.equal(a, b)]
    assert moved and all(".layers.1." in n and "language_model" in n for n in moved)
    q = "model.language_model.layers.1.self_attn.q_proj.weight"
    # the EMA lags behind plain training: closer to the base than the fully trained weights
    lag = (model.get_parameter(q) - base.get_parameter(q)).abs().sum()
    assert 0 < lag < (full.get_parameter(q) - base.get_parameter(q)).abs().sum()


def test_bad_llaca_options():
    model, processor = tiny()
    samples = world.generate("count", 4, 0)
    with pytest.raises(UserError, match="LLaCA form"):
        finetune(model, processor, samples, method="llaca", llaca_form="fixed")
    with pytest.raises(UserError, match="beta"):
        finetune(model, processor, samples, method="ema", ema_beta=1.5)


# ------------------------------------------------------------------ continual

def test_spatial_questions_follow_the_scene():
    scene = world.Scene("gray", (world.Shape("circle", "red", "small", 10, 30, 4),
                                 world.Shape("square", "blue", "large", 45, 30, 8)))
    pairs = world.spatial_pairs(scene)
    assert ("what shape is on the left?", "circle") in pairs
    assert ("what colour is the shape on the right?", "blue") in pairs
    assert world.spatial_pairs(world.Scene("gray", scene.shapes[:1])) == []
    vocab = set(world.vocabulary()) | {"?"}
    for task in ("colour", "count", "spatial"):
        for s in shapes_samples(task, 30, 0, 0):
            assert set(s.question.replace("?", " ?").split()) <= vocab
            assert len(set(s.answers)) == 1


def test_metrics_formulas_by_hand():
    import pandas as pd

    table = pd.DataFrame({"stage": [0, 1, 2, 3],
                          "acc:a": [0.1, 0.8, 0.5, 0.4],
                          "acc:b": [0.0, 0.2, 0.9, 0.3],
                          "acc:c": [0.0, 0.1, 0.1, 0.7]})
    average, forgetting = continual_metrics(table, ["a", "b", "c"])
    assert math.isnan(average[0]) and math.isnan(forgetting[0]) and math.isnan(forgetting[1])
    assert average[1:] == pytest.approx([0.8, (0.5 + 0.9) / 2, (0.4 + 0.3 + 0.7) / 3])
    assert forgetting[2] == pytest.approx(0.8 - 0.5)
    assert forgetting[3] == pytest.approx(((0.8 - 0.4) + (0.9 - 0.3)) / 2)


def test_short_continual_run_table(tmp_path):
    model, processor = tiny()
    tasks = shapes_sequence(tmp_path, ("colour", "count", "spatial"), n_train=16, n_eval=6)
    table = run_continual(model, processor, tasks, method="llaca", batch_size=8, lr=1e-3,
                          max_new_tokens=3)
    names = [t.name for t in tasks]
    assert list(table["stage"]) == [0, 1, 2, 3]
    assert list(table["after"]) == ["base", *names]
    assert set(acc_column(n) for n in names) <= set(table.columns)
    acc = table[[acc_column(n) for n in names]].to_numpy()
    assert ((acc >= 0) & (acc <= 1)).all()
    last = table.iloc[-1]
    # consistent with the table itself
    assert last["average"] == pytest.approx(acc[3].mean())
    best = acc[1:3, :2].max(axis=0)
    assert last["forgetting"] == pytest.approx((best - acc[3, :2]).mean())
    assert table.iloc[2]["forgetting"] == pytest.approx(acc[1, 0] - acc[2, 0])
    assert summary(table) == {"average": pytest.approx(last["average"]),
                              "forgetting": pytest.approx(last["forgetting"])}
    assert (table["train_seconds"].iloc[1:] > 0).all()
    assert (tmp_path / "count_eval.jsonl").is_file()


def test_continual_rejects_bad_input(tmp_path):
    model, processor = tiny()
    with pytest.raises(UserError, match="a continual run trains with full, ema, llaca, not 'dowser'"):
        run_continual(model, processor, [], method="dowser")
    with pytest.raises(UserError, match="at least one task"):
        run_continual(model, processor, [], method="ema")
    with pytest.raises(UserError, match="only once"):
        shapes_sequence(tmp_path, ("count", "count"))


def test_lag_ratio_and_mean_form():
    """The lag is ‖θ − θ*‖ / ‖θ − θ₀‖; the adaptive forms fall back on a task's first step."""
    p = torch.nn.Parameter(torch.zeros(4))
    tracker = EMATracker([("w", p)], form="fixed", beta=0.75)
    with torch.no_grad():
        p.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
    p.grad = torch.zeros(4)
    tracker.update()  # θ* = 0.25·θ → lag |θ − θ*| = 3, moved 4
    assert tracker.lag_ratio() == pytest.approx(0.75)
    means = EMATracker([("w", p)], form="mean")
    p.grad = torch.full((4,), 2.0)
    with torch.no_grad():
        p.add_(1.0)
    means.update()  # no previous gradient yet: the fallback, as the authors' code
    assert means.stats()["fallback_fraction"] == 1.0
    summed = EMATracker([("w", torch.nn.Parameter(torch.zeros(4)))], form="code")
    assert live_weight("code", 4.0, 4.0, 4.0) == pytest.approx(0.01 * 5 / 16)
    assert math.isnan(summed.lag_ratio())  # nothing moved yet
