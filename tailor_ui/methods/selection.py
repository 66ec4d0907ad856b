"""Choosing which entries of a weight to keep: scores, z-scores and top-k thresholds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal, get_args

import torch

Scope = Literal["block", "row", "tensor", "global"]
SCOPES: tuple[Scope, ...] = get_args(Scope)


def column_blocks(cols: int, block_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + block_size, cols)) for i in range(0, cols, block_size)]


def zscore_rows_in_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Standardise each output row within each block of `block_size` input columns.

    Scores of different kinds (salience, sensitivity) only become comparable, and so
    fusable, on a common scale; a constant segment maps to zeros.
    """
    x = x.float()
    out = torch.empty_like(x)
    for i1, i2 in column_blocks(x.shape[1], block_size):
        seg = x[:, i1:i2]
        mean = seg.mean(dim=1, keepdim=True)
        std = seg.std(dim=1, keepdim=True, unbiased=False)
        out[:, i1:i2] = torch.where(std > 0, (seg - mean) / std.clamp(min=1e-30), 0.0)
    return out


def _top_k_mask(scores: torch.Tensor, keep: float) -> torch.Tensor:
    """Exactly round(keep · n) highest entries of a flat score vector."""
    k = round(keep * scores.numel())
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        mask[torch.topk(scores.reshape(-1), k, sorted=False).indices] = True
    return mask


def keep_mask(scores: torch.Tensor, keep: float, scope: Scope, block_size: int = 128) -> torch.Tensor:
    """Boolean mask of the entries to keep from the fine-tuned weight.

    `block`: the top `keep` of each block of `block_size` columns (all rows together), as
    in the authors' SparseGPT-style code; `row`: of each output row; `tensor`: of the
    whole tensor. `global` needs every tensor's scores at once: see `global_threshold`.
    1-D tensors have one row, so `row` and `block` apply to them as to a 1×n matrix.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    matrix = scores.reshape(1, -1) if scores.dim() == 1 else scores.reshape(scores.shape[0], -1)
    if scope == "tensor":
        return _top_k_mask(matrix, keep).reshape(scores.shape)
    mask = torch.zeros(matrix.shape, dtype=torch.bool, device=scores.device)
    if scope == "row":
        for r in range(matrix.shape[0]):
            mask[r] = _top_k_mask(matrix[r], keep)
    elif scope == "block":
        for i1, i2 in column_blocks(matrix.shape[1], block_size):
            mask[:, i1:i2] = _top_k_mask(matrix[:, i1:i2], keep).reshape(matrix.shape[0], i2 - i1)
    else:
        raise ValueError(f"scope {scope!r} is chosen across tensors, not within one")
    return mask.reshape(scores.shape)


def global_threshold(all_scores: list[torch.Tensor], keep: float) -> float:
    """The score above which the top `keep` of all entries of all tensors lie."""
    flat = torch.cat([s.reshape(-1).float().cpu() for s in all_scores])
    k = round(keep * flat.numel())
    if k <= 0:
        return float("inf")
    return float(torch.topk(flat, k, sorted=True).values[-1])


def layer_keep_budget(masses: Sequence[float], sizes: Sequence[int], keep: float) -> list[float]:
    """Per-layer keep fractions that share one patch budget by each layer's score mass.

    The model keeps round(keep · all entries) in total; layer l gets a share proportional
    to its mass (non-negative, comparable across layers: fused importances z-scored per
    row-block are not, as every block is centred). A layer's share above its size goes to
    the others (water-filling), so each fraction lies in [0, 1]; counts are whole numbers
    (largest remainders) and sum exactly to the total. Zero mass everywhere shares by size,
    i.e. uniformly.
    """
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    if any(m < 0 for m in masses):
        raise ValueError("layer masses must be non-negative")
    counts = _share_out(round(keep * sum(sizes)), list(masses), list(sizes))
    return [c / n if n else 0.0 for c, n in zip(counts, sizes)]


def _share_out(total: int, masses: list[float], sizes: list[int]) -> list[int]:
    """`total` split in proportion to `masses` (to `sizes` where the mass left is zero),
    no part above its size, in whole numbers."""
    capped: set[int] = set()
    while True:
        open_ = [i for i in range(len(sizes)) if i not in capped and sizes[i] > 0]
        rest = total - sum(sizes[i] for i in capped)
        weights = {i: masses[i] for i in open_}
        if sum(weights.values()) <= 0:
            weights = {i: float(sizes[i]) for i in open_}
        norm = sum(weights.values())
        share = {i: rest * weights[i] / norm for i in open_} if norm > 0 else {}
        over = [i for i in open_ if share[i] > sizes[i]]
        if not over:
            break
        capped.update(over)
    exact = [float(sizes[i]) if i in capped else share.get(i, 0.0) for i in range(len(sizes))]
    counts = [min(int(x), n) for x, n in zip(exact, sizes)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def magnitude_bits(x: torch.Tensor) -> torch.Tensor:
    """|x| (float32) as int32 bit patterns: for non-negative floats their order is the
    values' order, so a top-k cut can be found by counting bit prefixes."""
    return x.float().abs().view(torch.int32)


def top_k_cut(bit_chunks: Callable[[], Iterable[torch.Tensor]], k: int) -> tuple[int, int]:
    """Where the top `k` of many magnitudes lie, without holding them together: (cut,
    ties), the bits of the k-th largest (`magnitude_bits`) and how many entries equal to
    it are in the top k (the first ones in flat order). `bit_chunks()` yields the bits
    chunk by chunk, in order; it is walked twice (counting the high 16 bits, then the low
    16 bits of the high half-word the k-th falls in), so memory is one chunk's. k ≥ 1."""
    high = _histogram((c >> 16 for c in bit_chunks()), 1 << 15)
    h, above_high = _kth_bin(high, k)
    low = _histogram((c[(c >> 16) == h] & 0xFFFF for c in bit_chunks()), 1 << 16)
    lo, above_low = _kth_bin(low, k - above_high)
    return (h << 16) | lo, k - above_high - above_low


def _histogram(values: Iterable[torch.Tensor], bins: int) -> torch.Tensor:
    total = None
    for v in values:
        counts = torch.bincount(v.reshape(-1), minlength=bins)  # int32 bits: no int64 copy
        total = counts if total is None else total + counts
    return total if total is not None else torch.zeros(bins, dtype=torch.long)


def _kth_bin(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin the k-th largest value falls in, and how many values lie in higher bins."""
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, k))  # the first j with from_top[j] >= k
    b = counts.numel() - 1 - j
    return b, int(from_top[j]) - int(counts[b])


def top_k_chunk_mask(bits: torch.Tensor, cut: int, ties: int) -> tuple[torch.Tensor, int]:
    """Which entries of one chunk are in the top k given `top_k_cut`'s (cut, ties), and the
    ties left for the chunks after it (entries equal to the cut are taken in flat order)."""
    mask = bits > cut
    if ties > 0:
        equal = bits == cut
        count = int(equal.sum())
        if count <= ties:
            mask |= equal
        else:
            mask |= equal & (equal.reshape(-1).cumsum(0) <= ties).reshape(equal.shape)
        ties -= min(count, ties)
    return mask, ties
