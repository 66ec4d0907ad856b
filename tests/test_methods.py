"""The method registry and the two methods added through it (Model Breadcrumbs, DELLA):
hand-computed masks, probabilities and rescale factors, DELLA's expectation, seeding, and
the same patch from `run_method` and `stream_merge`; and a method registered at run time
runs in both without any other file knowing it."""

from __future__ import annotations

import pytest
import torch

from families import build_llava, finetune_like
from tailor_ui.engine import run_method
from tailor_ui.errors import UserError
from tailor_ui.methods import REGISTRY, Method
from tailor_ui.methods.breadcrumbs import band_mask, breadcrumbs
from tailor_ui.methods.della import della, keep_probabilities, magprune
from tailor_ui.pair import load_pair
from tailor_ui.patch import Patch
from tailor_ui.settings import Settings
from tailor_ui.stream import stream_merge

TAU = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 1.0, -0.4, 0.6, 3.0])


# -- Model Breadcrumbs -------------------------------------------------------------------------

def test_breadcrumbs_keeps_the_band_below_the_top_gamma():
    # by |τ|: -5 (1), 3 (9) | 2 (3), 1 (6), 0.6 (8), -0.4 (7) | 0.3, -0.2, 0.1, 0.05
    assert band_mask(TAU, keep=0.4, gamma=0.2).nonzero().flatten().tolist() == [3, 6, 7, 8]
    assert band_mask(TAU, keep=0.3, gamma=0.0).nonzero().flatten().tolist() == [1, 3, 9]
    assert not band_mask(TAU, keep=0.0, gamma=0.1).any()


def test_breadcrumbs_sums_the_masked_task_vectors_times_lambda():
    base = torch.ones(4)
    taus = [torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.tensor([-1.0, 10.0, 0.5, 2.0])]
    # keep 2 of 4 after dropping the top 1: model 0 keeps 3, 2; model 1 keeps 2, -1
    got = breadcrumbs(base, taus, keep=0.5, gamma=0.25, lam=0.5)
    assert torch.equal(got, torch.tensor([1.0 - 0.5, 1.0 + 1.5, 1.0 + 1.0, 1.0 + 1.0]))


def test_breadcrumbs_rejects_more_than_all_entries():
    with pytest.raises(UserError, match="keep \\+ gamma"):
        Settings(method="breadcrumbs", keep=0.95, gamma=0.1)


# -- DELLA -------------------------------------------------------------------------------------

def test_della_keep_probabilities_rise_with_magnitude_rank_per_row():
    # |τ| ranks 0, 2, 1 → keep − ε/2, keep + ε/2, keep
    assert torch.allclose(keep_probabilities(torch.tensor([0.1, -0.5, 0.3]), 0.5, 0.2),
                          torch.tensor([0.4, 0.6, 0.5]))
    rows = torch.tensor([[3.0, 1.0, 2.0], [-1.0, 0.0, 5.0]])
    assert torch.allclose(keep_probabilities(rows, 0.5, 0.2),
                          torch.tensor([[0.6, 0.4, 0.5], [0.5, 0.4, 0.6]]))
    assert torch.equal(keep_probabilities(torch.tensor([[7.0]]), 0.3, 0.2), torch.tensor([[0.3]]))


def test_magprune_rescales_each_kept_entry_by_its_keep_probability():
    probs = keep_probabilities(TAU, 0.5, 0.4)
    pruned = magprune(TAU, 0.5, 0.4, seed=11)
    kept = pruned != 0
    assert 0 < kept.sum() < TAU.numel()
    assert torch.equal(pruned[kept], TAU[kept] / probs[kept])


def test_magprune_equals_tau_in_expectation():
    tau = TAU.reshape(2, 5)
    mean = torch.stack([magprune(tau, 0.5, 0.4, seed=s) for s in range(4000)]).mean(dim=0)
    # per entry the sd of the mean is |τ|·sqrt((1 − p)/p / 4000) ≤ 0.031·|τ|
    assert torch.allclose(mean, tau, rtol=0.15, atol=0.01), (mean, tau)


def test_della_draws_are_fixed_by_seed_and_tensor_name():
    base, taus = torch.zeros(10), [TAU, -TAU.flip(0)]
    first = della(base, taus, 0.5, 0.2, 1.0, seed=3, name="a.weight")
    assert torch.equal(first, della(base, taus, 0.5, 0.2, 1.0, seed=3, name="a.weight"))
    assert not torch.equal(first, della(base, taus, 0.5, 0.2, 1.0, seed=4, name="a.weight"))
    assert not torch.equal(first, della(base, taus, 0.5, 0.2, 1.0, seed=3, name="b.weight"))


def test_della_without_dropping_is_the_disjoint_mean_of_ties():
    taus = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([2.0, 1.0, -1.0])]
    # elected signs +, −, +: mean(1, 2), −2, 3
    got = della(torch.ones(3), taus, keep=1.0, epsilon=0.0, lam=0.5, seed=0, name="w")
    assert torch.equal(got, torch.tensor([1.75, 0.0, 2.5]))


def test_della_keep_window_must_stay_a_probability():
    with pytest.raises(UserError, match="epsilon"):
        Settings(method="della", keep=0.05, epsilon=0.2)


# -- through the engine and the streaming merge ---------------------------------------------------

@pytest.fixture(scope="module")
def disk_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    base = build_llava(seed=0)
    dirs = {"base": base, "ft_a": finetune_like(base, r"layers\.1\.", seed=1),
            "ft_b": finetune_like(base, r"mlp\.", seed=2)}
    for name, model in dirs.items():
        model.save_pretrained(root / name)
    return root


def _same_patch(a: Patch, b: Patch) -> None:
    assert set(a.tensors) == set(b.tensors) and a.tensors
    for name, tp in a.tensors.items():
        assert torch.equal(tp.index, b.tensors[name].index), name
        assert torch.equal(tp.values.view(torch.uint8), b.tensors[name].values.view(torch.uint8)), name


def _both(root, settings: Settings, n_models: int, tmp_path) -> tuple[Patch, Patch, object]:
    tuned = [root / "ft_a", root / "ft_b"][:n_models]
    streamed = Patch(tensors={})
    stream_merge(root / "base", tuned, settings, tmp_path / "out", chunk_elems=1000, patch=streamed)
    pair = load_pair(str(root / "base"), [str(t) for t in tuned])
    return run_method(pair, settings).patch, streamed, pair


@pytest.mark.parametrize("settings", [
    Settings(method="breadcrumbs", keep=0.3, gamma=0.05, lam=0.8, others="linear"),
    Settings(method="della", keep=0.4, epsilon=0.3, lam=1.2, seed=5)], ids=["breadcrumbs", "della"])
def test_new_methods_give_the_same_patch_in_memory_and_streamed(disk_pair, tmp_path, settings):
    in_memory, streamed, _ = _both(disk_pair, settings, 2, tmp_path)
    _same_patch(in_memory, streamed)
    assert in_memory.metadata["method"] == settings.method


def _negate(base, tuned, name, s):
    return base.float() - (tuned[0].float() - base.float())


def test_a_method_registered_at_run_time_runs_in_engine_and_stream(disk_pair, tmp_path, monkeypatch):
    """One Method and one registry entry are all a new method needs."""
    monkeypatch.setitem(REGISTRY, "negate", Method("Negate τ", "W_pre − τ", _negate, elementwise=True))
    settings = Settings(method="negate", others="base")
    in_memory, streamed, pair = _both(disk_pair, settings, 2, tmp_path)
    _same_patch(in_memory, streamed)
    name = "model.language_model.layers.1.mlp.down_proj.weight"
    base = pair.base_value(name)
    got = base.clone().reshape(-1)
    tp = in_memory.tensors[name]
    got[tp.index] = tp.values
    # per model, then united by the mean of the changes: −(τ_a + τ_b)/2 where both changed
    taus = [pair.finetuned_value(k, name, "cpu").float() - base.float() for k in range(2)]
    assert torch.allclose(got.reshape(base.shape), base - (taus[0] + taus[1]) / 2, atol=1e-6)


def test_the_sweep_grid_and_labels_follow_each_methods_knobs():
    from tailor_ui.evaluation.sweep import setting_label, sweep_grid

    grid = sweep_grid(["tailor", "wise_ft", "della"], {"keep": [0.1, 0.2], "alpha": [0.8], "lam": [0.5]},
                      calibrated={"hessians": ["one-pass"]})
    assert [(s.method, s.keep, s.lam, s.hessians) for s in grid] == [
        ("tailor", 0.1, None, "one-pass"), ("tailor", 0.2, None, "one-pass"),
        ("wise_ft", 0.1, 0.5, "sequential"), ("della", 0.1, None, "sequential"),
        ("della", 0.2, None, "sequential")]
    assert setting_label(grid[3]) == "DELLA keep=0.1 lam=1"
    assert setting_label(Settings(method="breadcrumbs", keep=0.2, gamma=0.05)) == \
        "Model Breadcrumbs keep=0.2 lam=1 gamma=0.05"
    with pytest.raises(UserError, match="needs at least one λ"):
        sweep_grid(["task_arithmetic"], {"keep": [0.1]})
