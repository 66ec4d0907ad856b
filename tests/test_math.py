"""The per-tensor math of Model Tailor and the baselines, checked against their definitions."""

import pytest
import torch

from tailor_ui.methods import baselines
from tailor_ui.methods.selection import column_blocks, global_threshold, keep_mask, zscore_rows_in_blocks
from tailor_ui.methods.tailor import (compensate, inverse_hessian_factor,
                                      merge_without_compensation, tensor_scores)


def layer(rows=24, cols=300, tokens=900, seed=0):
    """A pre-trained weight, a fine-tuned one, calibration inputs and their Hessian."""
    g = torch.Generator().manual_seed(seed)
    w_pre = torch.randn(rows, cols, generator=g)
    w_ft = w_pre + 0.1 * torch.randn(rows, cols, generator=g)
    # strongly correlated inputs (low effective rank), as real activations are; with
    # isotropic inputs there is nothing for compensation to exploit
    basis = torch.randn(cols // 4, cols, generator=g)
    x = torch.randn(tokens, cols // 4, generator=g) @ basis + 0.1 * torch.randn(tokens, cols, generator=g)
    hessian = 2 * x.T @ x / tokens
    return w_pre, w_ft, x, hessian


@pytest.mark.parametrize("scope", ["block", "row", "tensor"])
@pytest.mark.parametrize("keep", [0.0, 0.03, 0.1, 0.5, 1.0])
def test_keep_mask_keeps_exactly_round_keep_per_group(scope, keep):
    scores = torch.randn(10, 300)
    mask = keep_mask(scores, keep, scope, block_size=128)
    if scope == "tensor":
        groups = [mask.reshape(-1)]
    elif scope == "row":
        groups = list(mask)
    else:
        groups = [mask[:, a:b].reshape(-1) for a, b in column_blocks(300, 128)]
    for group in groups:
        assert int(group.sum()) == round(keep * group.numel())


def test_keep_mask_keeps_the_highest_scores():
    scores = torch.arange(20.0).reshape(2, 10)
    mask = keep_mask(scores, 0.3, "row")
    assert mask[0].nonzero().flatten().tolist() == [7, 8, 9]
    assert mask[1].nonzero().flatten().tolist() == [7, 8, 9]


def test_global_threshold_selects_keep_of_all_tensors():
    scores = [torch.randn(5, 40), torch.randn(7, 30) + 1.0]
    t = global_threshold(scores, 0.2)
    kept = sum(int((s >= t).sum()) for s in scores)
    assert kept == round(0.2 * (200 + 210))
    # the shifted tensor gets more than its share: the ranking really is model-wide
    assert int((scores[1] >= t).sum()) > int((scores[0] >= t).sum())


def test_zscore_per_row_block_has_zero_mean_unit_std():
    x = torch.randn(6, 300) * 5 + 3
    z = zscore_rows_in_blocks(x, 128)
    for a, b in column_blocks(300, 128):
        seg = z[:, a:b]
        assert torch.allclose(seg.mean(dim=1), torch.zeros(6), atol=1e-5)
        assert torch.allclose(seg.std(dim=1, unbiased=False), torch.ones(6), atol=1e-5)
    assert torch.equal(zscore_rows_in_blocks(torch.ones(2, 10), 4), torch.zeros(2, 10))


def test_inverse_hessian_factor_is_cholesky_of_damped_inverse():
    _, _, _, h = layer(rows=4, cols=50)
    h[3, :] = 0
    h[:, 3] = 0  # a dead input column
    factor = inverse_hessian_factor(h, damp=0.01).double()
    fixed = h.double().clone()
    fixed[3, 3] = 1.0
    fixed += 0.01 * torch.diag(fixed).mean() * torch.eye(50, dtype=torch.float64)
    assert torch.allclose(factor.T @ factor, torch.linalg.inv(fixed), rtol=1e-4, atol=1e-6)
    assert torch.equal(factor, torch.triu(factor))


def test_scores_follow_their_formulas():
    w_pre, w_ft, _, h = layer(rows=3, cols=130)
    factor = inverse_hessian_factor(h)
    s = tensor_scores(w_pre, w_ft, factor, "change", 128)
    d = torch.diag(factor)
    expected_sens = (w_ft - w_pre) ** 2 / d**2
    assert torch.allclose(s.sensitivity_z, zscore_rows_in_blocks(expected_sens, 128), atol=1e-4)
    assert torch.allclose(s.salience_z, zscore_rows_in_blocks((w_ft - w_pre).abs(), 128), atol=1e-5)
    authors = tensor_scores(w_pre, w_ft, factor, "weight", 128)
    assert torch.allclose(authors.sensitivity_z, zscore_rows_in_blocks(w_ft**2 / d**2, 128), atol=1e-4)
    assert torch.allclose(s.importance(1.0), s.salience_z)
    assert torch.allclose(s.importance(0.0), s.sensitivity_z)
    assert torch.allclose(s.importance(0.8), 0.8 * s.salience_z + 0.2 * s.sensitivity_z)


@pytest.mark.parametrize("sign", ["obs", "released"])
def test_compensation_reverts_exactly_and_only_patch_carries_it(sign):
    w_pre, w_ft, _, h = layer()
    factor = inverse_hessian_factor(h)
    keep = keep_mask(torch.rand(w_ft.shape), 0.1, "block")
    new = compensate(w_pre, w_ft, keep, factor, sign)
    assert torch.equal(new[~keep], w_pre[~keep])
    assert not torch.equal(new[keep], w_ft[keep])  # the patch was decorated


@pytest.mark.parametrize("sign", ["obs", "released"])
@pytest.mark.parametrize("block_size", [1, 7, 128])
def test_lazy_batches_equal_the_plain_column_by_column_update(sign, block_size):
    """SparseGPT's lazy batches reorder the arithmetic, not the result: each column in turn
    takes its target, and its scaled error moves every later column along the factor's row."""
    w_pre, w_ft, _, h = layer(rows=37, cols=300)
    factor = inverse_hessian_factor(h)
    keep = torch.rand(w_ft.shape, generator=torch.Generator().manual_seed(1)) < 0.2
    step = 1.0 if sign == "obs" else -1.0
    w = w_ft.double().clone()
    f = factor.double()
    for j in range(w.shape[1]):
        target = torch.where(keep[:, j], w[:, j], w_pre[:, j].double())
        err = (w[:, j] - target) / f[j, j]
        w[:, j:] -= step * torch.outer(err, f[j, j:])
        w[:, j] = target
    new = compensate(w_pre, w_ft, keep, factor, sign, block_size)
    assert torch.allclose(new.double(), w, rtol=1e-4, atol=1e-4)
    assert torch.equal(new[~keep], w_pre[~keep])


def test_keep_all_gives_finetuned_and_keep_none_gives_base():
    w_pre, w_ft, _, h = layer()
    factor = inverse_hessian_factor(h)
    everything = torch.ones_like(w_ft, dtype=torch.bool)
    assert torch.equal(compensate(w_pre, w_ft, everything, factor), w_ft)
    assert torch.equal(compensate(w_pre, w_ft, ~everything, factor), w_pre)
    assert torch.equal(merge_without_compensation(w_pre, w_ft, everything), w_ft)
    assert torch.equal(merge_without_compensation(w_pre, w_ft, ~everything), w_pre)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("keep, gain", [(0.1, 1.0), (0.3, 0.9)])
def test_obs_compensation_lowers_output_error_against_finetuned(seed, keep, gain):
    """Greedy column-wise OBS can only push error onto later columns, so its gain shrinks
    as the patch does (about 4 % at keep 0.1 on these layers, 20 % at 0.3); it must
    still beat no compensation, and the released code's sign must do worse."""
    w_pre, w_ft, x, h = layer(seed=seed)
    factor = inverse_hessian_factor(h, damp=0.01)
    scores = tensor_scores(w_pre, w_ft, factor)
    keep_entries = keep_mask(scores.importance(0.8), keep, "block")

    def error(w):
        return float(((w - w_ft) @ x.T).square().sum())

    plain = error(merge_without_compensation(w_pre, w_ft, keep_entries))
    obs = error(compensate(w_pre, w_ft, keep_entries, factor, "obs"))
    released = error(compensate(w_pre, w_ft, keep_entries, factor, "released"))
    assert obs < gain * plain
    assert released > obs


def test_magnitude_keeps_largest_changes():
    w_pre = torch.zeros(1, 5)
    tau = torch.tensor([[0.1, -3.0, 0.2, 2.0, -0.05]])
    out = baselines.magnitude(w_pre, w_pre + tau, keep=0.4, scope="tensor")
    assert out.tolist() == [[0.0, -3.0, 0.0, 2.0, 0.0]]


def test_wise_ft_and_task_arithmetic_match_formulas():
    w_pre = torch.tensor([1.0, 2.0])
    w_ft = torch.tensor([3.0, -2.0])
    assert torch.allclose(baselines.wise_ft(w_pre, w_ft - w_pre, 0.25), 0.75 * w_pre + 0.25 * w_ft)
    taus = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, -1.0])]
    assert baselines.task_arithmetic(w_pre, taus, 2.0).tolist() == [4.0, 0.0]


def test_ties_trims_elects_and_averages_agreeing_entries():
    w_pre = torch.zeros(4)
    tau1 = torch.tensor([1.0, -2.0, 3.0, 0.1])
    tau2 = torch.tensor([-3.0, -1.0, 1.0, 0.2])
    # keep 0.75: tau1 → [1, -2, 3, 0]; tau2 → [-3, -1, 1, 0]
    # signs by mass: [-, -, +, 0]; agreeing means: [-3, -1.5, 2, 0]
    out = baselines.ties(w_pre, [tau1, tau2], keep=0.75, lam=1.0)
    assert out.tolist() == [-3.0, -1.5, 2.0, 0.0]
    assert baselines.ties(w_pre, [tau1, tau2], keep=0.75, lam=0.5).tolist() == [-1.5, -0.75, 1.0, 0.0]


def test_dare_drops_and_rescales_reproducibly():
    w_pre = torch.zeros(100, 100)
    tau = torch.ones(100, 100)
    out = baselines.dare(w_pre, tau, drop=0.9, seed=3, name="x")
    survivors = out != 0
    assert torch.allclose(out[survivors], torch.full_like(out[survivors], 10.0))
    assert abs(survivors.float().mean().item() - 0.1) < 0.02
    assert torch.equal(out, baselines.dare(w_pre, tau, drop=0.9, seed=3, name="x"))
    assert not torch.equal(out, baselines.dare(w_pre, tau, drop=0.9, seed=4, name="x"))
    assert not torch.equal(out, baselines.dare(w_pre, tau, drop=0.9, seed=3, name="y"))
    with pytest.raises(ValueError):
        baselines.dare(w_pre, tau, drop=1.0, seed=0, name="x")
