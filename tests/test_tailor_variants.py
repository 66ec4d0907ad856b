"""Model Tailor's variants through the engine: exact compensation, SparseGPT's mask order
and the per-layer patch budget, on a tiny LLaVA pair, checked against the per-layer math
of tailor_ui.methods run by hand on the same Hessians."""

from __future__ import annotations

import pytest
import torch

from families import patched_weight
from tailor_ui.calibration import collect_hessians
from tailor_ui.engine import run_method, selected_linears
from tailor_ui.errors import UserError
from tailor_ui.methods.exact import compensate_exact
from tailor_ui.methods.selection import keep_mask
from tailor_ui.methods.tailor import compensate, inverse_hessian_factor, tensor_scores
from tailor_ui.settings import Settings



@pytest.fixture(scope="module")
def pair(decoder_pair):
    return decoder_pair


@pytest.fixture(scope="module")
def batches(decoder_batches):
    return decoder_batches


def _by_hand(pair, batches, settings, solve):
    """Every selected linear tailored from one-pass Hessians of the fine-tuned model."""
    linears = selected_linears(pair)
    hessians = collect_hessians(pair.finetuned[0], linears, batches)
    out = {}
    for name in linears:
        w_pre = pair.base.get_parameter(f"{name}.weight").detach()
        w_ft = pair.finetuned[0].get_parameter(f"{name}.weight").detach()
        factor = inverse_hessian_factor(hessians[name], settings.damp)
        scores = tensor_scores(w_pre, w_ft, factor, settings.sensitivity, settings.block_size)
        mask = keep_mask(scores.importance(settings.alpha), settings.keep, settings.scope)
        out[name] = solve(w_pre, w_ft, mask, hessians[name], factor)
    return out


def _objective(w, w_ft, hessian):
    d = (w - w_ft).double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))


def test_exact_compensation_runs_the_least_squares_patch_on_every_layer(pair, batches):
    s = Settings(keep=0.1, hessians="one-pass", compensation="exact")
    result = run_method(pair, s, [batches])
    expected = _by_hand(pair, batches, s, lambda pre, ft, mask, h, _f: compensate_exact(pre, ft, mask, h, s.damp)[0])
    greedy = _by_hand(pair, batches, s, lambda pre, ft, mask, _h, f: compensate(pre, ft, mask, f))
    hessians = collect_hessians(pair.finetuned[0], list(expected), batches)
    for name, want in expected.items():
        got = patched_weight(pair, result.patch, name)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        w_ft = pair.finetuned[0].get_parameter(f"{name}.weight").detach()
        assert _objective(got, w_ft, hessians[name]) <= _objective(greedy[name], w_ft, hessians[name]) * (1 + 1e-6)
    assert result.report["exact_fallbacks"] == 0


def test_sequential_exact_run_tailors_block_by_block(pair, batches):
    """The first decoder block sees the fine-tuned model's inputs in either mode; later blocks
    see inputs of the tailored earlier blocks, so they differ from one pass."""
    s = Settings(keep=0.1, compensation="exact")
    sequential = run_method(pair, s, [batches])
    expected = _by_hand(pair, batches, s, lambda pre, ft, mask, h, _f: compensate_exact(pre, ft, mask, h, s.damp)[0])
    first = [n for n in expected if ".layers.0." in n]
    later = [n for n in expected if ".layers.0." not in n]
    assert first and later
    for name in first:
        torch.testing.assert_close(patched_weight(pair, sequential.patch, name), expected[name], rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(patched_weight(pair, sequential.patch, n), expected[n]) for n in later)


def test_sparsegpt_order_chooses_later_masks_after_compensating_earlier_blocks(pair, batches):
    mask_first = run_method(pair, Settings(keep=0.2, hessians="one-pass", block_size=16), [batches])
    ordered = run_method(pair, Settings(keep=0.2, hessians="one-pass", block_size=16, order="sparsegpt"),
                         [batches])
    for name in selected_linears(pair):
        a, b = mask_first.patch.tensors[f"{name}.weight"], ordered.patch.tensors[f"{name}.weight"]
        assert a.index.numel() == b.index.numel()  # the same budget in every block
        first = a.index[a.index % pair.base.get_parameter(f"{name}.weight").shape[1] < 16]
        second = b.index[b.index % pair.base.get_parameter(f"{name}.weight").shape[1] < 16]
        assert torch.equal(first.sort().values, second.sort().values)  # block 0: nothing before it
    assert any(not torch.equal(mask_first.patch.tensors[n].index, ordered.patch.tensors[n].index)
               for n in mask_first.patch.tensors if n.endswith("proj.weight"))


def test_per_layer_budget_shares_the_whole_patch_by_layer_mass(pair, batches):
    uniform = run_method(pair, Settings(keep=0.1, hessians="one-pass"), [batches])
    shared = run_method(pair, Settings(keep=0.1, budget="per-layer"), [batches])
    names = [f"{n}.weight" for n in selected_linears(pair)]
    total = sum(pair.base.get_parameter(n).numel() for n in names)
    kept = lambda result: sum(result.patch.tensors[n].index.numel() for n in names)  # noqa: E731
    # every kept entry is in the patch unless fine-tuning left it equal to the base
    assert kept(shared) <= round(0.1 * total) and kept(shared) >= round(0.1 * total) * 0.98
    fractions = [shared.patch.tensors[n].index.numel() / pair.base.get_parameter(n).numel() for n in names]
    assert max(fractions) - min(fractions) > 0.02  # layers get different shares
    assert kept(uniform) == pytest.approx(kept(shared), rel=0.03)


@pytest.mark.parametrize("options, message", [
    ({"compensation": "closed"}, "unknown compensation form"),
    ({"order": "sparsegpt", "compensation": "exact"}, "SparseGPT mask order"),
    ({"order": "sparsegpt", "scope": "row"}, "SparseGPT mask order"),
    ({"budget": "per-layer", "scope": "global"}, "per-layer budget"),
    ({"budget": "everywhere"}, "unknown patch budget"),
])
def test_variant_settings_are_checked(options, message):
    with pytest.raises(UserError, match=message):
        Settings(**options)
