"""`compensate` against closed-form OBS answers on tiny layers (docs/methods.md#greedy).

The references here are written plainly: explicit inverses of Hessian submatrices, one
column at a time, no Cholesky factor and no lazy batches.
"""

from __future__ import annotations

import pytest
import torch

from tailor_ui.methods.tailor import compensate, merge_without_compensation


def tiny_layer(rows: int, cols: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
    hessian = 2 * x.T @ x / x.shape[0] + 0.1 * torch.eye(cols, dtype=torch.float64)
    w_pre = torch.randn(rows, cols, generator=g)
    w_ft = w_pre + 0.5 * torch.randn(rows, cols, generator=g)
    return w_pre, w_ft, hessian


def factor_of(hessian: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of H⁻¹ that `compensate` takes (no damping here)."""
    return torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True).float()


def sequential_obs(w_pre, w_ft, keep, hessian):
    """Column j in order: a reverted entry goes to W_pre and the columns j.. (those not yet
    visited) move by the OBS step −(w_j − pre_j)/[H_r⁻¹]_00 · H_r⁻¹[0, :], where H_r is
    H restricted to columns j.. and inverted explicitly."""
    w = w_ft.double().clone()
    pre = w_pre.double()
    for j in range(w.shape[1]):
        inv = torch.linalg.inv(hessian[j:, j:])
        for r in range(w.shape[0]):
            if not keep[r, j]:
                w[r, j:] -= (w[r, j] - pre[r, j]) / inv[0, 0] * inv[0, :]
                w[r, j] = pre[r, j]
    return w


def output_error(w, w_ft, hessian):
    """trace((W − W_ft) H (W − W_ft)ᵀ): the layer's squared output error on the inputs."""
    d = w.double() - w_ft.double()
    return torch.trace(d @ hessian @ d.T).item()


@pytest.mark.parametrize("rows", [1, 3])
def test_one_reverted_first_column_takes_the_obs_update_with_the_full_inverse(rows):
    w_pre, w_ft, hessian = tiny_layer(rows, 6, seed=rows)
    keep = torch.ones(rows, 6, dtype=torch.bool)
    keep[-1, 0] = False  # the last row reverts its first entry; other rows keep everything
    new = compensate(w_pre, w_ft, keep, factor_of(hessian))
    inv = torch.linalg.inv(hessian)
    delta_q = (w_ft - w_pre)[-1, 0].double()
    expected = w_ft.double().clone()
    expected[-1] -= delta_q / inv[0, 0] * inv[:, 0]
    torch.testing.assert_close(new.double(), expected, atol=1e-5, rtol=1e-5)
    assert new[-1, 0] == w_pre[-1, 0]
    assert torch.equal(new[:-1], w_ft[:-1])
    # optimal: the output-error gradient H(w − w_ft) vanishes on every free column
    gradient = (new[-1].double() - w_ft[-1].double()) @ hessian
    assert gradient[1:].abs().max() < 1e-4 < gradient[0].abs()


def test_one_reverted_later_column_compensates_only_the_columns_after_it():
    w_pre, w_ft, hessian = tiny_layer(2, 7, seed=5)
    q = 3
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, q] = False
    new = compensate(w_pre, w_ft, keep, factor_of(hessian))
    inv = torch.linalg.inv(hessian[q:, q:])  # earlier columns were already visited: fixed
    expected = w_ft.double().clone()
    expected[0, q:] -= (w_ft - w_pre)[0, q].double() / inv[0, 0] * inv[:, 0]
    torch.testing.assert_close(new.double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(new[0, :q], w_ft[0, :q]) and torch.equal(new[1], w_ft[1])
    # the full-inverse update would have moved the earlier columns too: a different answer
    full = torch.linalg.inv(hessian)
    assert (full[:q, q].abs() > 1e-3).any()


@pytest.mark.parametrize("block_size", [128, 4, 1])
def test_several_reverted_columns_match_sequential_obs_by_explicit_inverses(block_size):
    w_pre, w_ft, hessian = tiny_layer(5, 10, seed=11)
    keep = torch.rand(5, 10, generator=torch.Generator().manual_seed(3)) < 0.4
    new = compensate(w_pre, w_ft, keep, factor_of(hessian), block_size=block_size)
    expected = sequential_obs(w_pre, w_ft, keep, hessian)
    torch.testing.assert_close(new.double(), expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(new[~keep], w_pre[~keep])
    plain = merge_without_compensation(w_pre, w_ft, keep)
    released = compensate(w_pre, w_ft, keep, factor_of(hessian), "released", block_size)
    obs_error = output_error(new, w_ft, hessian)
    assert obs_error < output_error(plain, w_ft, hessian) < output_error(released, w_ft, hessian)
