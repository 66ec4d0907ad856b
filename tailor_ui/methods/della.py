"""DELLA (Deep et al., 2024, "DELLA-Merging"): MagPrune, then TIES's sign election and
disjoint merge, scaled by λ.

MagPrune drops entries of each task vector at random with a probability that falls with
magnitude: in every row the entries are ranked by |τ| and their keep probabilities spread
evenly over the window [keep − ε/2, keep + ε/2], the smallest entry at the bottom, the
largest at the top (so the mean keep probability is `keep`). A kept entry is rescaled by
1/(its keep probability), so the pruned τ equals τ in expectation. Knobs as mergekit names
them: `density` is `keep`, `epsilon` the window, `lambda` the scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tailor_ui.methods.baselines import disjoint_mean, tensor_seed
from tailor_ui.methods.method import Knobs, Method, task_vectors


def keep_probabilities(tau: torch.Tensor, keep: float, epsilon: float) -> torch.Tensor:
    """Per entry, keep + ε·(rank/(n − 1) − 1/2), rank 0 for the row's smallest |τ|
    (ties by position). 1-D tensors are one row; a row of one entry keeps with `keep`."""
    rows = tau.reshape(1, -1) if tau.dim() <= 1 else tau.reshape(tau.shape[0], -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=tau.device).expand_as(order))
    spread = ranks.float() / (n - 1) - 0.5 if n > 1 else torch.zeros(rows.shape, device=tau.device)
    return (keep + epsilon * spread).reshape(tau.shape)


def magprune(tau: torch.Tensor, keep: float, epsilon: float, seed: int) -> torch.Tensor:
    """τ with entries dropped by `keep_probabilities` and the kept ones rescaled by 1/p."""
    probs = keep_probabilities(tau, keep, epsilon)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    survive = torch.rand(tau.shape, generator=gen).to(tau.device) < probs
    return torch.where(survive, tau.float() / probs, 0.0)


def della(w_pre: torch.Tensor, taus: Sequence[torch.Tensor], keep: float, epsilon: float, lam: float,
          seed: int, name: str) -> torch.Tensor:
    """W_pre + λ·(disjoint mean of the MagPruned τ_t); model t draws with its own seed."""
    pruned = torch.stack([magprune(t, keep, epsilon, tensor_seed(f"{name}#{i}", seed))
                          for i, t in enumerate(taus)])
    return w_pre.float() + lam * disjoint_mean(pruned)


def _merge(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    return della(base, task_vectors(base, tuned), s.keep, s.epsilon, s.effective_lambda, s.seed, name)


def _check(s: Knobs) -> list[str]:
    if s.keep - s.epsilon / 2 <= 0.0 or s.keep + s.epsilon / 2 > 1.0:
        return [f"DELLA's keep probabilities keep ± epsilon/2 must lie in (0, 1], "
                f"got keep={s.keep}, epsilon={s.epsilon}"]
    return []


METHOD = Method("DELLA", "MagPrune τ (drop by magnitude rank, rescale), elect sign, disjoint mean, λ",
                _merge, knobs=("keep", "epsilon", "lam", "seed"), defaults={"lam": 1.0},
                multi_task_native=True, temporaries=6, check=_check)
