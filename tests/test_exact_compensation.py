"""Exact compensation, SparseGPT's mask order and the per-layer budget, against direct
least squares, the greedy loop and their definitions."""

import pytest
import torch

from tailor_ui.methods.exact import (compensate_exact, compensate_in_sparsegpt_order, solve_bytes,
                                     tailor_block_scorer)
from tailor_ui.methods.selection import keep_mask, layer_keep_budget
from tailor_ui.methods.tailor import (compensate, damped_hessian, inverse_hessian_factor,
                                      merge_without_compensation, tensor_scores)


def correlated_layer(rows, cols, tokens, seed, dtype=torch.float64):
    """W_pre, W_ft and inputs X of low effective rank (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    w_pre = torch.randn(rows, cols, generator=g, dtype=dtype)
    w_ft = w_pre + 0.1 * torch.randn(rows, cols, generator=g, dtype=dtype)
    basis = torch.randn(max(cols // 4, 1), cols, generator=g, dtype=dtype)
    x = (torch.randn(tokens, basis.shape[0], generator=g, dtype=dtype) @ basis
         + 0.1 * torch.randn(tokens, cols, generator=g, dtype=dtype))
    return w_pre, w_ft, x


def hessian_of(x):
    return 2 * x.T @ x / x.shape[0]


def objective(w, w_ft, h):
    """Σ_r (w_r − w_ft,r) H (w_r − w_ft,r)ᵀ, in float64."""
    d = (w.double() - w_ft.double())
    return float(((d @ h.double()) * d).sum())


def mixed_mask(rows, cols, seed):
    """Rows with every keep fraction from none to all, so both solve forms and the empty
    systems are exercised."""
    g = torch.Generator().manual_seed(seed)
    fractions = torch.linspace(0, 1, rows)
    return torch.rand(rows, cols, generator=g) < fractions.unsqueeze(1)


def lstsq_patch(w_pre, w_ft, keep, x_aug):
    """Row by row: min ‖X (w − w_ft)ᵀ‖² with w[R] = W_pre[R], solved directly."""
    out = w_pre.clone()
    for r in range(w_ft.shape[0]):
        k, rev = keep[r], ~keep[r]
        d_rev = (w_pre[r] - w_ft[r])[rev]
        if k.any():
            target = -(x_aug[:, rev] @ d_rev)
            d_kept = torch.linalg.lstsq(x_aug[:, k], target.unsqueeze(1)).solution.squeeze(1)
            out[r, k] = w_ft[r, k] + d_kept
    return out


@pytest.mark.parametrize("damp", [0.0, 0.01])
@pytest.mark.parametrize("seed", range(3))
def test_exact_matches_direct_least_squares(seed, damp):
    w_pre, w_ft, x = correlated_layer(rows=14, cols=40, tokens=200, seed=seed)
    keep = mixed_mask(14, 40, seed)
    assert not keep[0].any() and keep[-1].all()
    h = hessian_of(x)
    # damping is ridge regression: stack √(damp·mean diag H)·I under √(2/n)·X
    ridge = (damp * torch.diag(h).mean()).sqrt() * torch.eye(40, dtype=x.dtype)
    x_aug = torch.cat([x * (2 / x.shape[0]) ** 0.5, ridge])
    new, info = compensate_exact(w_pre, w_ft, keep, h, damp=damp, dtype=torch.float64)
    assert info.method == "exact"
    torch.testing.assert_close(new, lstsq_patch(w_pre, w_ft, keep, x_aug), rtol=1e-9, atol=1e-9)
    assert torch.equal(new[~keep], w_pre[~keep])
    assert torch.equal(new[0], w_pre[0]) and torch.equal(new[-1], w_ft[-1])


def test_float32_solve_agrees_with_float64():
    w_pre, w_ft, x = correlated_layer(rows=20, cols=150, tokens=400, seed=3)
    keep = mixed_mask(20, 150, 3)
    h = hessian_of(x)
    new32, _ = compensate_exact(w_pre.float(), w_ft.float(), keep, h.float())
    new64, _ = compensate_exact(w_pre, w_ft, keep, h, dtype=torch.float64)
    assert new32.dtype == torch.float32
    torch.testing.assert_close(new32.double(), new64, rtol=1e-3, atol=1e-4)


def test_ill_conditioned_systems_are_redone_in_float64():
    """Collinear inputs with tiny damping: float32 Cholesky fails on some systems,
    which must then be solved in float64 rather than returned as NaN or garbage."""
    w_pre, w_ft, x = correlated_layer(rows=6, cols=60, tokens=300, seed=5)
    x[:, 1] = x[:, 0]
    h = hessian_of(x)
    keep = torch.ones(6, 60, dtype=torch.bool)
    keep[:, 2:40] = False  # rows solve the kept form, which holds both collinear columns
    lower, info = torch.linalg.cholesky_ex(damped_hessian(h, 1e-9).float()[keep[0]][:, keep[0]])
    assert int(info) != 0  # the premise: float32 alone cannot factor it
    new32, _ = compensate_exact(w_pre, w_ft, keep, h, damp=1e-9)
    new64, _ = compensate_exact(w_pre, w_ft, keep, h, damp=1e-9, dtype=torch.float64)
    assert torch.isfinite(new32).all()
    h_d = damped_hessian(h, 1e-9)
    assert objective(new32, w_ft, h_d) <= 1.01 * objective(new64, w_ft, h_d) + 1e-9


def test_exact_never_worse_than_greedy():
    g = torch.Generator().manual_seed(11)
    for case in range(25):
        rows = int(torch.randint(4, 16, (1,), generator=g))
        cols = int(torch.randint(10, 300, (1,), generator=g))
        keep_fraction = float(torch.rand(1, generator=g)) * 0.95 + 0.02
        scope = ("block", "row", "tensor")[case % 3]
        w_pre, w_ft, x = correlated_layer(rows, cols, tokens=2 * cols, seed=case)
        h = hessian_of(x)
        keep = keep_mask(torch.randn(rows, cols, generator=g), keep_fraction, scope)
        h_d = damped_hessian(h, 0.01)
        exact, _ = compensate_exact(w_pre, w_ft, keep, h, dtype=torch.float64)
        greedy = compensate(w_pre, w_ft, keep, inverse_hessian_factor(h))
        plain = merge_without_compensation(w_pre, w_ft, keep)
        e, gr, pl = (objective(w, w_ft, h_d) for w in (exact, greedy, plain))
        assert e <= gr * (1 + 1e-9) + 1e-12, (case, e, gr)
        assert e <= pl * (1 + 1e-9) + 1e-12


def test_chunked_equals_unchunked_and_budget_falls_back_to_greedy():
    w_pre, w_ft, x = correlated_layer(rows=30, cols=64, tokens=200, seed=7)
    keep = keep_mask(torch.randn(30, 64), 0.3, "row")  # 19 unknowns in every row
    h = hessian_of(x)
    f64 = torch.float64
    whole, info = compensate_exact(w_pre, w_ft, keep, h, dtype=f64)
    assert info.method == "exact" and info.chunks == 1
    budget = solve_bytes(3, 19, 64, f64)  # three rows at a time
    chunked, small = compensate_exact(w_pre, w_ft, keep, h, max_bytes=budget, dtype=f64)
    assert small.method == "exact" and small.chunks == 10 and small.largest_chunk_bytes <= budget
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    fallback, why = compensate_exact(w_pre, w_ft, keep, h, max_bytes=solve_bytes(1, 19, 64) - 1)
    assert why.method == "greedy" and "budget" in why.reason
    assert torch.equal(fallback, compensate(w_pre, w_ft, keep, inverse_hessian_factor(h)))


def test_each_row_solves_its_smaller_system_and_chunks_follow_size_classes():
    """A row keeping 195 of 200 entries solves 5 unknowns (the reverted form), not 195;
    rows of very different sizes are not padded to one size."""
    w_pre, w_ft, x = correlated_layer(rows=4, cols=200, tokens=400, seed=8)
    keep = torch.zeros(4, 200, dtype=torch.bool)
    for row, kept in enumerate((80, 10, 79, 195)):
        keep[row, :kept] = True
    _, info = compensate_exact(w_pre, w_ft, keep, hessian_of(x), dtype=torch.float64)
    assert info.chunks == 3 and info.largest_chunk_bytes == solve_bytes(2, 80, 200, torch.float64)


def test_sparsegpt_order_with_fixed_scores_equals_mask_first():
    w_pre, w_ft, x = correlated_layer(rows=10, cols=300, tokens=600, seed=1, dtype=torch.float32)
    factor = inverse_hessian_factor(hessian_of(x))
    fixed = torch.randn(10, 300)
    new, mask = compensate_in_sparsegpt_order(w_pre, w_ft, factor, lambda p, w, a, b: fixed[:, a:b],
                                              keep=0.1, block_size=128)
    first = keep_mask(fixed, 0.1, "block", 128)
    assert torch.equal(mask, first)
    assert torch.equal(new, compensate(w_pre, w_ft, first, factor, "obs", 128))


def test_sparsegpt_order_rescoring_changes_later_blocks_only():
    w_pre, w_ft, x = correlated_layer(rows=10, cols=300, tokens=600, seed=2, dtype=torch.float32)
    factor = inverse_hessian_factor(hessian_of(x))
    scorer = tailor_block_scorer(factor, alpha=0.5)
    new, mask = compensate_in_sparsegpt_order(w_pre, w_ft, factor, scorer, keep=0.1, block_size=128)
    first = keep_mask(tensor_scores(w_pre, w_ft, factor, "change", 128).importance(0.5), 0.1, "block")
    assert torch.equal(mask[:, :128], first[:, :128])  # nothing compensated before block 0
    assert not torch.equal(mask[:, 128:], first[:, 128:])  # later blocks see the updates
    for a, b in ((0, 128), (128, 256), (256, 300)):
        assert int(mask[:, a:b].sum()) == round(0.1 * 10 * (b - a))
    assert torch.equal(new[~mask], w_pre[~mask])


def test_layer_budget_sums_to_target_in_proportion_to_score_mass():
    sizes = [100, 200, 100]
    fractions = layer_keep_budget([2.0, 200.0, 300.0], sizes, 0.2)
    counts = [f * n for f, n in zip(fractions, sizes)]
    assert sum(round(c) for c in counts) == round(0.2 * 400)
    assert counts == pytest.approx([80 * 2 / 502, 80 * 200 / 502, 80 * 300 / 502], abs=1)


def test_layer_budget_caps_full_layers_and_handles_extremes():
    masses, sizes = [1000.0, 50.0, 150.0], [10, 100, 100]
    fractions = layer_keep_budget(masses, sizes, 0.5)
    assert fractions[0] == 1.0  # its share would exceed its size; the rest goes to the others
    counts = [round(f * n) for f, n in zip(fractions, sizes)]
    assert sum(counts) == round(0.5 * 210)
    assert counts[2] == pytest.approx(3 * counts[1], abs=1)  # the rest shared 50 : 150
    assert layer_keep_budget(masses, sizes, 0.0) == [0.0, 0.0, 0.0]
    assert layer_keep_budget(masses, sizes, 1.0) == [1.0, 1.0, 1.0]
    assert layer_keep_budget([0.0, 0.0], [100, 50], 0.1) == [0.1, 0.1]  # no mass: uniform
    with pytest.raises(ValueError, match="keep must be in"):
        layer_keep_budget(masses, sizes, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        layer_keep_budget([-1.0, 1.0], [10, 10], 0.1)
