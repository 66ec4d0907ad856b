"""Model-Dowser (docs/methods.md#model-dowser): the probe against a direct Jacobian computation, the
boundary rules, the exact ρ masks, the cache, and sparse training that leaves every other
entry bit-identical."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from tailor_ui.demo import world
from families import tiny_demo_model as tiny

from tailor_ui.errors import UserError
from tailor_ui.training.dowser import (DowserScores, dowser_importance, dowser_scores,
                                       keep_lowest, model_fingerprint, probe_statistics,
                                       self_generated_prompts)
from tailor_ui.training.finetune import finetune

PROJECTOR = "model.multi_modal_projector.linear_1"
Q = "model.language_model.layers.1.self_attn.q_proj"


# ------------------------------------------------------------ the probe, checked directly

class Stack(torch.nn.Module):
    """embedding → l1 → tanh → causal running mean over positions → l2 (= logits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(7, 4)
        self.l1 = torch.nn.Linear(4, 5)
        self.l2 = torch.nn.Linear(5, 3)

    def after_l1(self, y1: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(y1)
        h = h.cumsum(dim=1) / torch.arange(1, h.shape[1] + 1)[None, :, None]
        return h

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.l2(self.after_l1(self.l1(self.emb(ids))))


def _batch():
    ids = torch.tensor([[1, 4, 2, 6], [3, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    return {"input_ids": ids, "attention_mask": mask}


def _direct(stack: Stack, batch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """ψ from explicit Jacobians of the last position's logits, averaged over every sign
    vector ξ ∈ {±1}³ and every real token; a from the layers' inputs."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))
    with torch.no_grad():
        x1 = stack.emb(ids)
        y1 = stack.l1(x1)
        x2 = stack.after_l1(y1)
    out = {}
    for name, inputs, tail in (("l1", y1, lambda y: stack.l2(stack.after_l1(y))),
                               ("l2", stack.l2(x2).detach(), lambda y: y)):
        psi = torch.zeros(inputs.shape[-1])
        count = 0
        for b in range(ids.shape[0]):
            last = int(mask[b].sum()) - 1
            jac = torch.autograd.functional.jacobian(
                lambda y: tail(y)[b, last], inputs)  # (vocab, batch, tokens, outputs)
            for t in range(int(mask[b].sum())):
                for xi in signs:
                    psi += (xi[:, None] * jac[:, b, t, :]).sum(dim=0).abs()
                    count += 1
        x = x1 if name == "l1" else x2
        act = x[mask.bool()].abs().mean(dim=0)
        out[name] = (psi / count, act)
    return out


def test_probe_matches_direct_jacobian():
    stack = Stack()
    batch = _batch()
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))
    scores = probe_statistics(lambda b: stack(b["input_ids"]), {"l1": stack.l1, "l2": stack.l2},
                              [batch], probes=signs)
    direct = _direct(stack, batch)
    for name in ("l1", "l2"):
        assert torch.allclose(scores.psi[name], direct[name][0], atol=1e-6), name
        assert torch.allclose(scores.act[name], direct[name][1], atol=1e-6), name
    # importance = ψ_i · |W_ij| · a_j
    imp = scores.importance("l1", stack.l1.weight)
    assert torch.allclose(imp, direct["l1"][0][:, None] * stack.l1.weight.abs()
                          * direct["l1"][1][None, :])
    assert not any(p.grad is not None for p in stack.parameters())  # no parameter gradients


def test_random_probes_estimate_the_expectation():
    stack = Stack()
    batch = _batch()
    exact = _direct(stack, batch)["l1"][0]
    scores = probe_statistics(lambda b: stack(b["input_ids"]), {"l1": stack.l1}, [batch],
                              probes=600, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(scores.psi["l1"], exact, rtol=0.1)


def test_boundary_rules_on_unit_and_unreached_layers():
    stack = Stack()
    unused = torch.nn.Linear(4, 2)
    scores = probe_statistics(lambda b: stack(b["input_ids"]),
                              {"l2": stack.l2, "unused": unused}, [_batch()], probes=2,
                              unit_psi=["l2"])
    assert torch.equal(scores.psi["l2"], torch.ones(3))
    assert torch.equal(scores.psi["unused"], torch.ones(2))
    assert torch.equal(scores.act["unused"], torch.ones(4))


# ------------------------------------------------------------ on the tiny LLaVA

def test_self_generated_prompts_are_text_only_and_seeded():
    model, processor = tiny()
    first = self_generated_prompts(model, processor, 5, batch_size=2, length=10, seed=4)
    again = self_generated_prompts(model, processor, 5, batch_size=2, length=10, seed=4)
    assert [b["input_ids"].shape[0] for b in first] == [2, 2, 1]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, again))
    image = processor.image_token_id
    for b in first:
        assert set(b) == {"input_ids", "attention_mask"}
        real = b["input_ids"][b["attention_mask"].bool()]
        assert image not in real.tolist() and processor.tokenizer.eos_token_id not in real.tolist()
        assert (b["input_ids"][:, 0] == processor.tokenizer.bos_token_id).all()
        assert b["attention_mask"].sum(dim=1).min() >= 4  # bos + three start tokens


def test_scores_on_llava_boundaries_and_cache(tmp_path):
    model, processor = tiny()
    before = copy.deepcopy(model.state_dict())
    scores = dowser_scores(model, processor, K=6, M=2, batch_size=3, prompt_length=8,
                           cache=tmp_path)
    assert torch.equal(scores.psi["lm_head"], torch.ones(model.lm_head.out_features))
    assert torch.equal(scores.psi[PROJECTOR], torch.ones(32))  # images off: never reached
    assert torch.equal(scores.act[PROJECTOR], torch.ones(32))
    assert not any("vision" in n for n in scores.psi)
    assert (scores.psi[Q] > 0).all() and (scores.act[Q] > 0).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    files = list(tmp_path.glob("dowser-*.safetensors"))
    assert len(files) == 1 and not scores.meta["cached"]
    again = dowser_scores(model, processor, K=6, M=2, batch_size=3, prompt_length=8,
                          cache=tmp_path)
    assert again.meta["cached"]
    assert all(torch.equal(scores.psi[n], again.psi[n]) and torch.equal(scores.act[n], again.act[n])
               for n in scores.psi)
    # another base model, or other probe settings, get their own entry
    other, _ = tiny(seed=1)
    assert model_fingerprint(other) != model_fingerprint(model)
    dowser_scores(model, processor, K=6, M=3, batch_size=3, prompt_length=8, cache=tmp_path)
    assert len(list(tmp_path.glob("dowser-*.safetensors"))) == 2
    importance = dowser_importance(model, processor, K=6, M=2, batch_size=3, prompt_length=8,
                                   cache=tmp_path)
    w = model.get_parameter(f"{Q}.weight")
    assert torch.equal(importance[f"{Q}.weight"],
                       scores.psi[Q][:, None] * w.detach().abs() * scores.act[Q][None, :])
    with pytest.raises(UserError, match="not a Model-Dowser"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "bad.safetensors"))
        DowserScores.load(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("shape, rho", [((7, 9), 0.1), ((128, 33), 0.1), ((10, 10), 0.0),
                                        ((10, 10), 1.0), ((5, 3), 0.5), ((1, 1), 0.4)])
def test_keep_lowest_exact_count(shape, rho):
    importance = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mask = keep_lowest(importance, rho)
    n = importance.numel()
    assert int(mask.sum()) == round(rho * n)
    if 0 < mask.sum() < n:
        assert importance[mask].max() <= importance[~mask].min()


def test_keep_lowest_ties_are_deterministic():
    importance = torch.zeros(4, 5)
    mask = keep_lowest(importance, 0.2)
    assert mask.reshape(-1).tolist() == [True] * 4 + [False] * 16


def test_sparse_training_leaves_the_rest_bit_identical(tmp_path):
    base, processor = tiny()
    model = copy.deepcopy(base)
    samples = world.generate("count", 16, 0)
    scores = dowser_scores(base, processor, K=4, M=2, batch_size=2, prompt_length=8)
    # weight decay on: AdamW's decay would move frozen entries if it were not masked
    report = finetune(model, processor, samples, method="dowser", rho=0.1, importance=scores,
                      lr=1e-2, weight_decay=0.1, batch_size=8, epochs=2)
    assert report.extra["masked_tensors"] == 7
    before = dict(base.named_parameters())
    trained_norms = 0
    for name, p in model.named_parameters():
        old = before[name]
        if ".layers.1." in name and "language_model" in name and name.endswith("proj.weight"):
            module = name.rsplit(".", 1)[0]
            mask = keep_lowest(scores.importance(module, old), 0.1)
            assert int(mask.sum()) == round(0.1 * old.numel())
            assert torch.equal(p[~mask], old[~mask]), name  # bit-identical outside the mask
            assert (p[mask] != old[mask]).float().mean() > 0.9, name  # and the mask trains
        elif ".layers.1." in name and "layernorm" in name:
            trained_norms += not torch.equal(p, old)  # norms of trained layers train fully
        else:
            assert torch.equal(p, old), name  # everything outside the trained layers
    assert trained_norms == 2
    assert report.trainable_entries == sum(
        round(0.1 * base.get_parameter(n).numel()) for n, _ in base.named_parameters()
        if ".layers.1." in n and "language_model" in n and n.endswith("proj.weight")) + 2 * 32


def test_dowser_computes_importance_itself_with_the_cache(tmp_path):
    base, processor = tiny()
    samples = world.generate("count", 8, 0)
    report = finetune(copy.deepcopy(base), processor, samples, method="dowser", batch_size=8,
                      probe_prompts=4, probes=2, importance_cache=tmp_path)
    assert report.extra["importance"]["cached"] is False
    report = finetune(copy.deepcopy(base), processor, samples, method="dowser", batch_size=8,
                      probe_prompts=4, probes=2, importance_cache=tmp_path)
    assert report.extra["importance"]["cached"] is True
    assert report.extra["kept_fraction"] == pytest.approx(0.1, abs=0.002)


def test_bad_dowser_options():
    model, processor = tiny()
    with pytest.raises(UserError, match="rho"):
        finetune(model, processor, world.generate("count", 4, 0), method="dowser", rho=1.5)
    with pytest.raises(UserError, match="K"):
        dowser_scores(model, processor, K=0)


def test_scores_of_another_model_are_refused():
    model, processor = tiny()
    wrong = DowserScores(psi={Q: torch.ones(3)}, act={Q: torch.ones(32)})
    with pytest.raises(UserError, match="do not fit"):
        finetune(model, processor, world.generate("count", 4, 0), method="dowser",
                 importance=wrong)


def test_random_mask_control_trains_a_seeded_uniform_sparse_mask():
    from tailor_ui.training.random_mask import random_masks

    base, processor = tiny()
    samples = world.generate("count", 16, 0)
    runs = []
    for seed in (0, 0, 1):
        model = copy.deepcopy(base)
        report = finetune(model, processor, samples, method="random_mask", rho=0.2, lr=1e-2,
                          weight_decay=0.1, batch_size=8, seed=seed)
        runs.append((model, report))
    assert runs[0][1].settings["rho"] == 0.2 and runs[0][1].extra["masked_tensors"] == 7
    weights = [n for n, _ in base.named_parameters()
               if ".layers.1." in n and "language_model" in n and n.endswith("proj.weight")]
    masks = random_masks(base, weights, 0.2, 0)
    for name in weights:
        old, new = base.get_parameter(name), runs[0][0].get_parameter(name)
        assert int(masks[name].sum()) == round(0.2 * old.numel())
        assert torch.equal(new[~masks[name]], old[~masks[name]]), name  # bit-identical outside
        assert torch.equal(new, runs[1][0].get_parameter(name))  # same seed, same run
    other = random_masks(base, weights, 0.2, 1)
    assert any(not torch.equal(masks[n], other[n]) for n in weights)  # the seed draws the mask
