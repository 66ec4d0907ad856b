"""Model Tailor beyond the paper: exact compensation and SparseGPT's mask order.

Exact compensation. With d = w − w_ft for one output row, the layer-output error against
the fine-tuned layer is d H dᵀ. Reverting fixes d_R = −Δ_R on the reverted columns R; the
kept columns K are free, and the gradient 2(H_KK d_K + H_KR d_R) = 0 gives

    d_K = H_KK⁻¹ H_KR Δ_R                                        (kept form, |K|×|K|)

or, with G = H⁻¹, the equivalent multi-weight OBS update

    d = G[:, R] G_RR⁻¹ d_R                                       (reverted form, |R|×|R|).

The greedy column loop (`tailor.compensate`) can only move columns to the right of a
reverted entry; this solves for all kept entries at once, so it is never worse on d H dᵀ.
Each row takes the smaller of the two systems; rows of similar size are solved together
in one batched Cholesky call on systems padded with the identity, in chunks whose
estimated memory stays under a budget.

Anchored compensation. Reproducing the fine-tuned layer on target inputs also brings the
fine-tuned change back on original-task inputs wherever the two share directions, and
that change is the forgetting (docs/results.md#findings). With
H_o the Hessian of original-task inputs and a weight μ, the anchored objective

    (w − w_ft) H (w − w_ft)ᵀ + μ (w − w_pre) H_o (w − w_pre)ᵀ

equals (w − c) A (w − c)ᵀ up to a constant, with A = H + μ H_o and c = w_pre + Δ H A⁻¹
(Δ = w_ft − w_pre, per row): Model Tailor's problem with c in the fine-tuned weights' place
and A in the Hessian's (`anchored_problem`). The engine scores, selects and compensates
(`compensate_exact`) on it; μ → 0 gives back the plain problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from tailor_ui.methods.selection import column_blocks, keep_mask
from tailor_ui.methods.tailor import (Sensitivity, Sign, compensate, compensate_block, damped_hessian,
                                      inverse_hessian_factor, tensor_scores)

DEFAULT_SOLVE_BYTES = 1 << 30


@dataclass(frozen=True)
class CompensationInfo:
    """How a weight was compensated: `exact`, or `greedy` when one row's system alone
    would not fit the memory budget (`reason` says why)."""

    method: Literal["exact", "greedy"]
    chunks: int = 0
    largest_chunk_bytes: int = 0
    reason: str = ""


def solve_bytes(rows: int, size: int, cols: int, dtype: torch.dtype = torch.float32) -> int:
    """Estimated bytes of one batched solve of `rows` padded systems of `size` unknowns in a
    weight of `cols` columns: the gathered matrices and their Cholesky factors (size² each),
    right-hand sides and solutions (size), and the row-wide temporaries (cols)."""
    item = torch.empty((), dtype=dtype).element_size()
    return rows * item * (2 * size * size + 3 * size + 4 * cols)


def compensate_exact(w_pre: torch.Tensor, w_ft: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor,
                     damp: float = 0.01, max_bytes: int = DEFAULT_SOLVE_BYTES,
                     dtype: torch.dtype = torch.float32,
                     block_size: int = 128) -> tuple[torch.Tensor, CompensationInfo]:
    """The least-squares patch: reverted entries at W_pre, kept entries minimising the
    layer-output error (w − w_ft) H (w − w_ft)ᵀ row by row, H damped as for the greedy loop.

    Works on the weight's device in `dtype`. `max_bytes` bounds each batched solve (see
    `solve_bytes`); H, and G = H⁻¹ when some row keeps more than half its entries, come on
    top (cols² in float64 and in `dtype`). Falls back to the greedy loop (`block_size`
    columns per lazy batch, the OBS sign) when a single row's system exceeds `max_bytes`.
    """
    device = w_ft.device
    pre, ft, keep = w_pre.to(device, dtype), w_ft.to(device, dtype), keep.to(device)
    cols = ft.shape[1]
    kept = keep.sum(dim=1)
    kept_form = kept <= cols - kept
    sizes = torch.where(kept_form, kept, cols - kept)
    largest = int(sizes.max()) if sizes.numel() else 0
    if solve_bytes(1, largest, cols, dtype) > max_bytes:
        reason = (f"one row's system ({largest} unknowns, {solve_bytes(1, largest, cols, dtype)} bytes) "
                  f"exceeds the budget of {max_bytes} bytes")
        factor = inverse_hessian_factor(hessian.to(device), damp)
        return compensate(w_pre.to(device), w_ft.to(device), keep, factor, "obs", block_size), \
            CompensationInfo("greedy", reason=reason)
    h64 = damped_hessian(hessian.to(device), damp)
    out = torch.where(keep, ft, pre)
    chunks, peak = 0, 0
    for use_kept in (True, False):
        rows = torch.nonzero(kept_form == use_kept).flatten()
        if rows.numel() == 0:
            continue
        matrix64 = h64 if use_kept else torch.cholesky_inverse(torch.linalg.cholesky(h64))
        matrices = (matrix64.to(dtype), matrix64)
        for chunk, size in _chunks(rows, sizes, cols, max_bytes, dtype):
            chunks += 1
            peak = max(peak, solve_bytes(chunk.numel(), size, cols, dtype))
            out[chunk] += _chunk_correction(pre[chunk], ft[chunk], keep[chunk], matrices, size, use_kept)
    out = torch.where(keep, out, pre)  # reverted entries exactly W_pre, whatever the rounding
    return out, CompensationInfo("exact", chunks, peak)


def anchored_problem(w_pre: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor,
                     anchor_hessian: torch.Tensor, weight: float, damp: float = 0.01
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, A) of the anchored objective (module docstring), with the target Hessian damped
    as exact compensation damps it (so a vanishing μ gives exact compensation back): A is
    positive definite and needs no more damping. c is solved in float64."""
    damped = damped_hessian(hessian, damp)
    combined = damped + weight * anchor_hessian.to(hessian.device).double()
    lower = torch.linalg.cholesky(combined)
    delta = (w_ft.double() - w_pre.double()).to(hessian.device)
    # rows of Δ H A⁻¹: solve A xᵀ = H Δᵀ (A and H symmetric)
    shift = torch.cholesky_solve(damped @ delta.T, lower).T
    return (w_pre.double().to(hessian.device) + shift).to(w_ft.dtype), combined.to(hessian.dtype)


def _chunks(rows: torch.Tensor, sizes: torch.Tensor, cols: int, max_bytes: int,
            dtype: torch.dtype) -> list[tuple[torch.Tensor, int]]:
    """Rows sorted by system size (largest first) and cut so each chunk, padded to its
    first row's size, fits `max_bytes` and wastes little on padding (its rows have at
    least 3/4 of that size); rows with nothing to solve are left out."""
    row_sizes = sizes[rows]
    order = torch.argsort(row_sizes, descending=True, stable=True)
    rows, row_sizes = rows[order], row_sizes[order].tolist()
    out, start = [], 0
    while start < len(row_sizes) and row_sizes[start] > 0:
        size = row_sizes[start]
        limit = min(start + max(1, max_bytes // solve_bytes(1, size, cols, dtype)), len(row_sizes))
        stop = start + 1
        while stop < limit and 4 * row_sizes[stop] >= 3 * size:
            stop += 1
        out.append((rows[start:stop], size))
        start = stop
    return out


def _chunk_correction(pre: torch.Tensor, ft: torch.Tensor, keep: torch.Tensor,
                      matrices: tuple[torch.Tensor, torch.Tensor], size: int,
                      use_kept: bool) -> torch.Tensor:
    """d_K scattered into the rows (kept form, matrices H), or G[:, R] y (reverted form,
    matrices G); `matrices` holds the matrix in the weights' dtype and in float64."""
    delta = ft - pre
    matrix = matrices[0]
    chosen = keep if use_kept else ~keep
    # the chosen columns first, in order: their positions, padded to `size`
    index = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :size]
    valid = torch.arange(size, device=keep.device).unsqueeze(0) < chosen.sum(dim=1, keepdim=True)

    def systems_in(source: torch.Tensor, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The padded systems: the chosen block of `source`, the identity on the padding."""
        i, v = index[rows], valid[rows].to(source.dtype)
        systems = source[i.unsqueeze(2), i.unsqueeze(1)]  # broadcast: no n·size² index
        systems *= v.unsqueeze(2)
        systems *= v.unsqueeze(1)
        systems.diagonal(dim1=1, dim2=2).add_(1 - v)
        return systems

    if use_kept:
        rhs = ((delta * ~keep) @ matrix).gather(1, index)  # H_KR Δ_R
    else:
        rhs = -delta.gather(1, index)  # d_R = −Δ_R
    # zero right-hand sides on the padding give exactly zero solutions there
    solution = _solve_spd(systems_in(matrix), torch.where(valid, rhs, 0.0),
                          lambda failed: systems_in(matrices[1], failed))
    full = torch.zeros_like(delta).scatter_add_(1, index, solution)
    return full if use_kept else full @ matrix


def _solve_spd(systems: torch.Tensor, rhs: torch.Tensor,
               systems64: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Batched Cholesky solve; the systems that fail in their dtype (too ill-conditioned
    for float32) are rebuilt from the float64 matrix by `systems64` and solved again."""
    lower, info = torch.linalg.cholesky_ex(systems)
    solution = torch.cholesky_solve(rhs.unsqueeze(-1), lower).squeeze(-1)
    failed = info != 0
    if failed.any():
        lower64, info64 = torch.linalg.cholesky_ex(systems64(failed))
        if (info64 != 0).any():
            raise ValueError("a kept-entry system is not positive definite even in float64; "
                             "raise the damping")
        redo = torch.cholesky_solve(rhs[failed].double().unsqueeze(-1), lower64).squeeze(-1)
        solution[failed] = redo.to(solution.dtype)
    return solution


BlockScorer = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
"""Scores of columns i1..i2 from (W_pre block, current weight block, i1, i2)."""


def tailor_block_scorer(factor: torch.Tensor, alpha: float,
                        sensitivity: Sensitivity = "change") -> BlockScorer:
    """Model Tailor's fused importance of one column block, from the weight as it stands."""
    def score(pre: torch.Tensor, w: torch.Tensor, i1: int, i2: int) -> torch.Tensor:
        return tensor_scores(pre, w, factor[i1:i2, i1:i2], sensitivity, i2 - i1).importance(alpha)
    return score


def compensate_in_sparsegpt_order(w_pre: torch.Tensor, w_ft: torch.Tensor, factor: torch.Tensor,
                                  score: BlockScorer, keep: float, sign: Sign = "obs",
                                  block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's order: each block's mask (the top `keep` of the block's entries, as the
    `block` scope) is chosen from the weights after the earlier blocks were compensated,
    then that block is compensated. Returns the weight and the mask it chose."""
    w = w_ft.float().clone()
    pre = w_pre.float()
    mask = torch.zeros(w.shape, dtype=torch.bool, device=w.device)
    for i1, i2 in column_blocks(w.shape[1], block_size):
        mask[:, i1:i2] = keep_mask(score(pre[:, i1:i2], w[:, i1:i2], i1, i2), keep, "tensor")
        compensate_block(w, pre, mask, factor, i1, i2, sign)
    return w, mask
