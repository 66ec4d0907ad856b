"""Model Breadcrumbs (Davari & Belilovsky, 2023): per layer, mask out both the largest
outliers and the smallest entries of each task vector, keep the band between, and add
the masked task vectors to the base scaled by λ.

Knobs as mergekit names them: `density` is `keep` (the fraction of entries kept) and
`gamma` the fraction of largest-magnitude entries removed; the smallest 1 − keep − gamma
go too. The paper's defaults drop the top 1% (γ = 0.01).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tailor_ui.methods.method import Knobs, Method, task_vectors


def band_mask(tau: torch.Tensor, keep: float, gamma: float) -> torch.Tensor:
    """The entries of rank round(gamma·n) … round((gamma + keep)·n) − 1 by decreasing |τ|
    (ties broken by position, so the mask is exact and deterministic)."""
    n = tau.numel()
    first, last = round(gamma * n), min(round((gamma + keep) * n), n)
    order = torch.argsort(tau.abs().reshape(-1), descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[first:last]] = True
    return mask.reshape(tau.shape)


def breadcrumbs(w_pre: torch.Tensor, taus: Sequence[torch.Tensor], keep: float, gamma: float,
                lam: float) -> torch.Tensor:
    """W_pre + λ·Σ_t (τ_t masked to its band)."""
    masked = [torch.where(band_mask(t, keep, gamma), t.float(), 0.0) for t in taus]
    return w_pre.float() + lam * torch.stack(masked).sum(dim=0)


def _merge(base: torch.Tensor, tuned: Sequence[torch.Tensor], name: str, s: Knobs) -> torch.Tensor:
    return breadcrumbs(base, task_vectors(base, tuned), s.keep, s.gamma, s.effective_lambda)


def _check(s: Knobs) -> list[str]:
    if s.keep + s.gamma > 1.0:
        return [f"breadcrumbs keeps keep + gamma ≤ 1 of the entries, got {s.keep} + {s.gamma}"]
    return []


METHOD = Method("Model Breadcrumbs", "drop the top gamma and the smallest entries of τ, λ·Σ the band",
                _merge, knobs=("keep", "gamma", "lam"), defaults={"lam": 1.0},
                multi_task_native=True, temporaries=4, check=_check)
