"""The data-free baselines of METHODS.md §2, each on one tensor.

Every function takes the pre-trained tensor and one or more task vectors τ = W_ft − W_pre
and returns the merged tensor in float32; the caller casts it to the model's dtype.
"""

from __future__ import annotations

import hashlib

import torch

from tailor_ui.methods.selection import Scope, keep_mask


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
    return w_pre.float() + lam * torch.stack([t.float() for t in taus]).sum(dim=0)


def ties(w_pre: torch.Tensor, taus: list[torch.Tensor], keep: float, lam: float) -> torch.Tensor:
    """TIES: trim each τ to its top-`keep` by magnitude, elect a sign per entry by total
    mass, average the surviving entries that agree with it, scale by λ."""
    trimmed = torch.stack([torch.where(keep_mask(t.abs(), keep, "tensor"), t.float(), 0.0)
                           for t in taus])
    return w_pre.float() + lam * disjoint_mean(trimmed)


def disjoint_mean(sparse: torch.Tensor) -> torch.Tensor:
    """TIES's sign election and disjoint merge of stacked sparse task vectors: per entry,
    the sign of the total mass wins and the nonzero entries that agree with it are averaged."""
    elected = torch.sign(sparse.sum(dim=0))
    agree = (torch.sign(sparse) == elected) & (sparse != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return torch.where(agree, sparse, 0.0).sum(dim=0) / count


def tensor_seed(name: str, seed: int) -> int:
    """A per-tensor seed, stable across runs and processes (Python's hash() is not)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def dare(w_pre: torch.Tensor, tau: torch.Tensor, drop: float, seed: int, name: str) -> torch.Tensor:
    """Drop a random fraction `drop` of τ and rescale the rest by 1/(1 − drop)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"the DARE drop rate must be in [0, 1), got {drop}")
    gen = torch.Generator(device="cpu").manual_seed(tensor_seed(name, seed))
    survive = torch.rand(tau.shape, generator=gen) >= drop
    return w_pre.float() + torch.where(survive.to(tau.device), tau.float() / (1.0 - drop), 0.0)
