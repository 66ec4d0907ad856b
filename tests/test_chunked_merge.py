"""TIES and DARE run chunk by chunk (`Method.chunks`), so a streamed merge holds no
whole-tensor float32 temporary: the chunked values equal the whole-tensor ones bit for bit,
on tensors whose size no chunk divides, and TIES's top-k cut keeps exactly round(keep·n)
entries of each task vector, ties at the cut taken in flat order."""

from __future__ import annotations

import pytest
import torch

from tailor_ui.methods import baselines
from tailor_ui.methods.selection import keep_mask, magnitude_bits, top_k_chunk_mask, top_k_cut
from tailor_ui.routing import merged_chunks, route_tensor
from tailor_ui.settings import Settings


def _pair(models: int, shape=(37, 29), seed=0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp16 weights with fp16 fine-tunes: |τ| takes few distinct values, so ties abound."""
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=gen) * 0.02).half()
    tuned = [(base.float() + torch.randn(shape, generator=gen) * 0.002).half() for _ in range(models)]
    tuned[0].view(-1)[:50] = base.view(-1)[:50]  # some entries unchanged: |τ| = 0
    return base, tuned


def _chunked_mask(x: torch.Tensor, k: int, step: int) -> torch.Tensor:
    flat = x.reshape(-1)
    cut, ties = top_k_cut(lambda: (magnitude_bits(flat[i:i + step]) for i in range(0, flat.numel(), step)), k)
    parts = []
    for i in range(0, flat.numel(), step):
        mask, ties = top_k_chunk_mask(magnitude_bits(flat[i:i + step]), cut, ties)
        parts.append(mask)
    return torch.cat(parts)


@pytest.mark.parametrize("step", [1, 7, 100, 1073, 5000])
@pytest.mark.parametrize("keep", [1 / 1073, 0.2, 0.5, 1.0])
def test_top_k_cut_keeps_the_k_largest_with_ties_in_flat_order(step, keep):
    base, (ft,) = _pair(1)
    tau = (ft.float() - base.float()).reshape(-1)  # 1073 entries
    k = round(keep * tau.numel())
    mask = _chunked_mask(tau, k, step)
    assert int(mask.sum()) == k
    kept, dropped = tau.abs()[mask], tau.abs()[~mask]
    cut = kept.min()
    assert dropped.numel() == 0 or bool((dropped <= cut).all())
    at_cut = torch.nonzero(tau.abs() == cut).flatten()
    taken = mask[at_cut]
    assert taken.any() and bool(taken[: int(taken.sum())].all())  # the first ties in order
    assert torch.equal(mask, _chunked_mask(tau, k, tau.numel()))  # chunks change nothing


def test_top_k_cut_agrees_with_topk_where_no_values_tie():
    x = torch.randperm(5000).float() - 2500.0  # distinct magnitudes except ±v pairs
    x = x + torch.linspace(0, 0.25, 5000)
    for keep in (0.01, 0.3, 0.99):
        k = round(keep * x.numel())
        assert torch.equal(_chunked_mask(x, k, 333), keep_mask(x.abs(), keep, "tensor"))


@pytest.mark.parametrize("models", [1, 2, 3])
@pytest.mark.parametrize("keep", [0.0, 0.2, 1.0])
def test_ties_by_chunks_equals_the_whole_tensor_bit_for_bit(models, keep):
    base, tuned = _pair(models)
    whole = baselines.ties(base, [t.float() - base.float() for t in tuned], keep, 0.7)
    for step in (64, 1000, 1073, 4096):
        chunks = list(baselines.ties_chunks(base, tuned, keep, 0.7, step))
        assert [c.numel() for c in chunks[:-1]] == [step] * (len(chunks) - 1)
        assert torch.equal(torch.cat(chunks).view(torch.int32), whole.reshape(-1).view(torch.int32))


def test_ties_matches_the_topk_definition_where_no_values_tie():
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(40, 30, generator=gen)
    taus = [torch.randn(40, 30, generator=gen) for _ in range(2)]
    trimmed = torch.stack([torch.where(keep_mask(t.abs(), 0.3, "tensor"), t, 0.0) for t in taus])
    assert torch.equal(baselines.ties(base, taus, 0.3, 1.0), base + baselines.disjoint_mean(trimmed))


def test_dare_by_chunks_equals_the_whole_tensor_bit_for_bit():
    base, (ft,) = _pair(1)
    whole = baselines.dare(base, ft.float() - base.float(), 0.8, 5, "w")
    for step in (1, 64, 1000, 1073, 4096):
        chunks = torch.cat(list(baselines.dare_chunks(base, ft, 0.8, 5, "w", step)))
        assert torch.equal(chunks.view(torch.int32), whole.reshape(-1).view(torch.int32))
    assert 0.7 < float((whole == base.float()).float().mean()) < 0.9  # ~80 % dropped


@pytest.mark.parametrize("settings, models", [(Settings(method="ties", keep=0.2, lam=0.9), 3),
                                              (Settings(method="ties", keep=0.5), 1),
                                              (Settings(method="dare", keep=0.3, seed=2), 1),
                                              (Settings(method="dare", keep=0.3, overlap="mean"), 2)])
def test_routed_chunks_equal_the_whole_tensor_merge(settings, models):
    """What the streamed merge writes (chunks, taken in order and written over the base as
    they come) is what the in-memory merge computes on the whole tensor."""
    base, tuned = _pair(models, shape=(61, 47))
    whole = route_tensor("m.weight", base, tuned, settings, selected=True)
    out = base.clone()
    chunks = merged_chunks("m.weight", out, tuned, settings, True, chunk_elems=500)
    for start, values in chunks:
        assert values.numel() == min(500, base.numel() - start)
        out.view(-1)[start:start + values.numel()] = values  # overwrites the base as it goes
    assert torch.equal(out.view(torch.int16), whole.view(torch.int16))


@pytest.mark.parametrize("models", [1, 2, 3, 4, 5, 6])
def test_sum_models_is_the_stacked_sum_bit_for_bit(models):
    gen = torch.Generator().manual_seed(models)
    values = [torch.randn(262147, generator=gen) * 10.0 ** torch.randint(-4, 5, (262147,), generator=gen)
              for _ in range(models)]
    for v in values:
        v[::7] = -0.0
    expected = torch.stack(values).sum(dim=0)
    assert torch.equal(baselines.sum_models(values).view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_task_arithmetic_shortcuts_are_the_stacked_formula(lam):
    """One task vector and λ = 1 skip the sum and the product; signed zeros included."""
    base = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.5, -2.0, 0.0]).half()
    ft = torch.tensor([-0.0, 0.0, 0.0, -0.0, 1.5, 3.0, float("nan")]).half()
    tau = ft.float() - base.float()
    expected = (base.float() + lam * torch.stack([tau]).sum(dim=0)).half()
    got = baselines.task_arithmetic(base, [tau], lam).half()
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
