"""The data-free baselines of docs/methods.md#baselines, each on one tensor.

Every function takes the pre-trained tensor and one or more task vectors τ = W_ft − W_pre
and returns the merged tensor in float32; the caller casts it to the model's dtype.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence

import torch

from tailor_ui.methods.selection import (Scope, keep_mask, magnitude_bits, top_k_chunk_mask,
                                       top_k_cut)

_IN_ORDER = 4  # models torch's sum over a stacked dimension adds one after another (checked)


def magnitude(w_pre: torch.Tensor, w_ft: torch.Tensor, keep: float, scope: Scope = "tensor",
              block_size: int = 128) -> torch.Tensor:
    """Keep the top `keep` fraction of |τ| (Model Tailor without sensitivity or compensation).

    Kept entries take W_ft itself, not W_pre + τ, so they are bit-exact."""
    mask = keep_mask((w_ft.float() - w_pre.float()).abs(), keep, scope, block_size)
    return torch.where(mask, w_ft.float(), w_pre.float())


def wise_ft(w_pre: torch.Tensor, tau: torch.Tensor, lam: float) -> torch.Tensor:
    """(1 − λ)·W_pre + λ·W_ft, written as W_pre + λ·τ."""
    return w_pre.float() + lam * tau.float()


def task_arithmetic(w_pre: torch.Tensor, taus: list[torch.Tensor], lam: float) -> torch.Tensor:
    """W_pre + λ·Σ τ_t."""
    taus = [t.float() for t in taus]
    # One τ is its own sum: the sum's +0.0 + τ differs from τ only where τ = -0.0, which
    # only (-0.0) − (+0.0) gives, and there W_pre = +0.0 gives +0.0 either way. λ = 1
    # multiplies exactly. Each op skipped is one pass less over a chunk.
    total = taus[0] if len(taus) == 1 else sum_models(taus)
    return w_pre.float() + (total if lam == 1.0 else lam * total)


def sum_models(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ over models entry by entry, bit for bit `torch.stack(values).sum(dim=0)`: for up to
    `_IN_ORDER` models that reduction adds them in order from +0.0, which plain adds repeat
    without the stacked copy (a reduction over a short dimension is also slower than adds)."""
    if len(values) > _IN_ORDER:
        return torch.stack(list(values)).sum(dim=0)
    total = values[0] + 0.0  # -0.0 becomes +0.0, as in the reduction
    for v in values[1:]:
        total = total + v
    return total


def ties(w_pre: torch.Tensor, taus: list[torch.Tensor], keep: float, lam: float) -> torch.Tensor:
    """TIES: trim each τ to its top-`keep` by magnitude, elect a sign per entry by total
    mass, average the surviving entries that agree with it, scale by λ."""
    n = w_pre.numel()
    flat_pre, flat_taus = w_pre.reshape(-1), [t.reshape(-1) for t in taus]
    chunks = _ties_chunks(lambda i, j: flat_pre[i:j].float(), lambda m, i, j: flat_taus[m][i:j].float(),
                          len(taus), n, keep, lam, max(n, 1))
    return next(chunks).reshape(w_pre.shape) if n else w_pre.float()


def ties_chunks(w_pre: torch.Tensor, w_ft: Sequence[torch.Tensor], keep: float, lam: float,
                step: int) -> Iterator[torch.Tensor]:
    """`ties` over the flat fine-tuned values, `step` entries at a time, in order: each τ's
    top-k cut is found walking τ chunk by chunk, so no whole-tensor temporary is made;
    bit for bit the same values."""
    flat_pre, flats = w_pre.reshape(-1), [t.reshape(-1) for t in w_ft]

    def tau(m: int, i: int, j: int) -> torch.Tensor:
        return flats[m][i:j].float() - flat_pre[i:j].float()

    return _ties_chunks(lambda i, j: flat_pre[i:j].float(), tau, len(flats), w_pre.numel(), keep, lam, step)


def _ties_chunks(pre: Callable[[int, int], torch.Tensor], tau: Callable[[int, int, int], torch.Tensor],
                 models: int, n: int, keep: float, lam: float, step: int) -> Iterator[torch.Tensor]:
    """TIES's merged values of entries [i, i + step) in turn, from the base's and each
    model's τ over any range. The trim keeps exactly round(keep·n) entries of each τ: all
    above the k-th largest |τ|, and of those equal to it the first in flat order."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    k = round(keep * n)
    cuts = [list(top_k_cut(lambda m=m: (magnitude_bits(tau(m, i, i + step)) for i in range(0, n, step)), k))
            if k else None for m in range(models)]
    return _ties_merged(pre, tau, cuts, n, lam, step)


def _ties_merged(pre: Callable[[int, int], torch.Tensor], tau: Callable[[int, int, int], torch.Tensor],
                 cuts: list[list[int] | None], n: int, lam: float, step: int) -> Iterator[torch.Tensor]:
    models = len(cuts)
    for i in range(0, n, step):
        trimmed = []
        for m in range(models):
            t = tau(m, i, i + step)
            if cuts[m] is None:
                trimmed.append(torch.zeros_like(t))
                continue
            mask, cuts[m][1] = top_k_chunk_mask(magnitude_bits(t), *cuts[m])
            trimmed.append(torch.where(mask, t, 0.0))
        yield pre(i, i + step) + lam * disjoint_mean(trimmed)


def disjoint_mean(sparse: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES's sign election and disjoint merge of sparse task vectors (stacked, or a list):
    per entry, the sign of the total mass wins and the nonzero entries that agree with it
    are averaged."""
    rows = list(sparse)
    elected = torch.sign(sum_models(rows))
    agree = [(torch.sign(r) == elected) & (r != 0) for r in rows]
    count = agree[0].float()  # whole numbers: any order of adding them is exact
    for a in agree[1:]:
        count += a
    return sum_models([torch.where(a, r, 0.0) for a, r in zip(agree, rows)]) / count.clamp_(min=1)


def tensor_seed(name: str, seed: int) -> int:
    """A per-tensor seed, stable across runs and processes (Python's hash() is not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def dare(w_pre: torch.Tensor, tau: torch.Tensor, drop: float, seed: int, name: str) -> torch.Tensor:
    """Drop a random fraction `drop` of τ and rescale the rest by 1/(1 − drop)."""
    n = w_pre.numel()
    flat_pre, flat_tau = w_pre.reshape(-1), tau.reshape(-1)
    chunks = _dare_chunks(lambda i, j: flat_pre[i:j].float(), lambda i, j: flat_tau[i:j].float(), n,
                          drop, seed, name, max(n, 1))
    return next(chunks).reshape(w_pre.shape) if n else w_pre.float()


def dare_chunks(w_pre: torch.Tensor, w_ft: torch.Tensor, drop: float, seed: int, name: str,
                step: int) -> Iterator[torch.Tensor]:
    """`dare` over the flat fine-tuned values, `step` entries at a time, in order: the mask
    is drawn from one generator chunk after chunk, the same draws as for the whole tensor
    (the CPU generator fills a tensor serially), so the values are bit for bit the same."""
    flat_pre, flat_ft = w_pre.reshape(-1), w_ft.reshape(-1)
    return _dare_chunks(lambda i, j: flat_pre[i:j].float(),
                        lambda i, j: flat_ft[i:j].float() - flat_pre[i:j].float(),
                        w_pre.numel(), drop, seed, name, step)


def _dare_chunks(pre: Callable[[int, int], torch.Tensor], tau: Callable[[int, int], torch.Tensor], n: int,
                 drop: float, seed: int, name: str, step: int) -> Iterator[torch.Tensor]:
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"the DARE drop rate must be in [0, 1), got {drop}")
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(name, seed))
    return _dare_merged(pre, tau, n, drop, gen, step)


def _dare_merged(pre: Callable[[int, int], torch.Tensor], tau: Callable[[int, int], torch.Tensor], n: int,
                 drop: float, gen: torch.Generator, step: int) -> Iterator[torch.Tensor]:
    for i in range(0, n, step):
        t = tau(i, i + step)
        survive = torch.rand(t.numel(), generator=gen) >= drop
        yield pre(i, i + step) + torch.where(survive.to(t.device), t / (1.0 - drop), 0.0)
