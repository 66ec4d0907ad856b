"""XᵀX summed over batches at about half a full product's multiply-adds.

XᵀX is symmetric, so only its upper triangle is computed: the columns are cut into near-equal
blocks of about `BLOCK` and block row [a, e) takes Xᵀ[a:e] · X[:, a:], the diagonal block
whole; `mirror_upper` copies the upper triangle down once the sums are complete. Summing
three batches of 664 rows on 2 threads, zeroed start and mirror included, takes 0.63 × the
time of `X.T @ X` at a 2048-wide input and 0.58 × at a 5632-wide one
(bench/results/gram_sums.json).

The entries equal the full product's bit for bit with the BLAS torch ships (MKL): each entry
is the same dot product over the rows, taken in the same order (tests/test_gram.py up to
2048 columns; bench/results/gram_sums_wide.json up to 18944). A block row of a handful of
rows goes to another kernel that sums in another order, which is why blocks are cut
near-equal rather than leaving a remainder.
"""

from __future__ import annotations

import torch

BLOCK = 512  # columns per block row: large enough to multiply at full speed


def block_bounds(width: int) -> list[int]:
    """Bounds of near-equal blocks of about `BLOCK` columns (one block below 1.5 × BLOCK)."""
    count = max(1, round(width / BLOCK))
    size, extra = divmod(width, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + size + (i < extra))
    return bounds


def add_gram_upper(acc: torch.Tensor, rows: torch.Tensor) -> None:
    """acc += rowsᵀ·rows on the upper triangle and the diagonal blocks (in place); the rest of
    `acc` is left as it was until `mirror_upper`."""
    cols = rows.T
    bounds = block_bounds(rows.shape[1])
    for a, e in zip(bounds, bounds[1:]):
        acc[a:e, a:].add_(cols[a:e] @ rows[:, a:])


def mirror_upper(acc: torch.Tensor) -> torch.Tensor:
    """Fill the blocks below the diagonal blocks from those above (in place; returns acc)."""
    bounds = block_bounds(acc.shape[0])
    for a, e in zip(bounds, bounds[1:]):
        acc[e:, a:e] = acc[a:e, e:].T
    return acc
