"""The engine on tiny models of several MLLM families (tests/families.py).

Per family: a save_pretrained → load_pair round trip, check_match, summarize, and Model
Tailor through run_method in both Hessian modes, on synthetic calibration batches.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from families import FAMILIES, VOCAB, finetune_like, matching
from tailor_ui.engine import run_method, selected_linears
from tailor_ui.errors import UserError
from tailor_ui.methods.selection import column_blocks
from tailor_ui.pair import Pair, check_match, load_pair, summarize
from tailor_ui.patch import apply_patch, load_patch, revert_patch, save_patch
from tailor_ui.settings import Settings

KEEP = 0.1


# ------------------------------------------------------------------------------ helpers

def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.reshape(-1).view(view), b.reshape(-1).view(view))
    return torch.equal(a, b)


def assert_state(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    different = [n for n in expected if not same_bits(params[n].detach(), expected[n])]
    assert not different, f"changed: {different[:5]}"


def linear_weights(model: torch.nn.Module) -> set[str]:
    """`<module>.weight` of every nn.Linear except the output embedding."""
    output = model.get_output_embeddings()
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not output}


def expected_kept(shape: tuple[int, ...], keep: float, block_size: int = 128) -> int:
    """Entries the block scope keeps: round(keep · size) in each block of columns."""
    rows, cols = shape
    return sum(round(keep * rows * (i2 - i1)) for i1, i2 in column_blocks(cols, block_size))


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module", params=list(FAMILIES))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def models(name):
    """The in-memory originals: base, fine-tuned, and what fine-tuning changed."""
    family = FAMILIES[name]
    base = family.build(seed=0)
    tuned = finetune_like(base, family.finetuned, scale=0.02, seed=1)
    perturbed = set(matching(base, family.finetuned))
    return base, tuned, perturbed, snapshot(base), snapshot(tuned)


@pytest.fixture(scope="module")
def saved(name, models, tmp_path_factory):
    """Both models saved with save_pretrained, each with the family's processor."""
    family = FAMILIES[name]
    root = tmp_path_factory.mktemp(name)
    base, tuned = models[:2]
    for folder, model in (("base", base), ("ft", tuned)):
        model.save_pretrained(root / folder)
        family.processor().save_pretrained(root / folder)
    return root / "base", root / "ft"


@pytest.fixture(scope="module")
def loaded(name, saved) -> Pair:
    """The pair as load_pair reads it back from disk (AutoModelForImageTextToText), with the
    family's real processor."""
    return load_pair(*map(str, saved))


@pytest.fixture
def pair(loaded) -> Pair:
    """The loaded models in a fresh Pair (empty score cache)."""
    return Pair(base=loaded.base, finetuned=list(loaded.finetuned), processor=loaded.processor,
                base_id=loaded.base_id, finetuned_ids=list(loaded.finetuned_ids))


@pytest.fixture(scope="module")
def calibration(name, models):
    return [FAMILIES[name].batches(models[0].config, n=2, batch_size=2, seed=3)]


# -------------------------------------------------------------------------------- tests

def test_round_trip_through_load_pair(name, models, loaded):
    _, _, _, base_state, tuned_state = models
    assert type(loaded.base).__name__ == type(models[0]).__name__
    assert not loaded.base.training and not loaded.finetuned[0].training
    assert_state(loaded.base, base_state)
    assert_state(loaded.finetuned[0], tuned_state)
    assert type(loaded.processor).__name__ == type(FAMILIES[name].processor()).__name__


def test_synthetic_batches_run_the_model(name, models, calibration):
    base = models[0]
    with torch.no_grad():
        for batch in calibration[0]:
            logits = base(**batch).logits
            assert logits.shape[:2] == batch["input_ids"].shape
            assert torch.isfinite(logits).all()


def test_synthetic_batches_match_the_processor_layout(name, models, loaded):
    """What the processor makes of a prompt+answer (tailor_ui.prompts, as calibration uses
    it) has the synthetic batches' keys, ranks, dtypes and image-token counts, and runs."""
    family = FAMILIES[name]
    from tailor_ui.prompts import encode_with_answers

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(2)]
    real = encode_with_answers(loaded.processor, images, ["w1 w2", "w3"], ["w4 w5 w6", "w7"])
    real.pop("labels")
    synthetic = family.batches(models[0].config, n=1, batch_size=2)[0]
    assert real.keys() == synthetic.keys()
    for key in real:
        assert real[key].dim() == synthetic[key].dim(), key
        assert real[key].is_floating_point() == synthetic[key].is_floating_point(), key
    image_token = models[0].config.image_token_id
    if "image_grid_thw" in real:  # Qwen2-VL: each image's token count follows its own size
        merge = models[0].config.vision_config.spatial_merge_size
        for batch in (real, synthetic):
            counts = (batch["input_ids"] == image_token).sum(1)
            assert counts.tolist() == (batch["image_grid_thw"].prod(1) // merge ** 2).tolist()
            assert (counts > 0).all()
    else:  # the last sample has one image in both (families.py gives Idefics3's first sample two)
        assert (real["input_ids"][-1] == image_token).sum() == (synthetic["input_ids"][-1] == image_token).sum() > 0
    with torch.no_grad():
        assert torch.isfinite(models[0](**real).logits).all()


def test_loaded_pair_answers_through_its_real_processor(name, loaded):
    """Greedy answers for a batch of differently sized images (left padding, each family's
    image layout): up to 4 vocabulary words per question, starting as when asked alone (later
    tokens of a random model can flip on rounding between padded and unpadded runs)."""
    from tailor_ui.evaluation.generate import _generate

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)) for size in ((20, 24, 3), (16, 40, 3))]
    questions = ["w1 w2", "w3 w4 w5 w6"]
    batched = _generate(loaded.base, loaded.processor, images, questions, max_new_tokens=4)
    alone = [_generate(loaded.base, loaded.processor, [im], [q], max_new_tokens=4)[0]
             for im, q in zip(images, questions)]
    assert len(batched) == 2
    for answer, single in zip(batched, alone):
        assert 1 <= len(answer.split()) <= 4 and set(answer.split()) <= set(VOCAB), answer
        assert answer.split()[0] == single.split()[0]


def test_check_match(name, models):
    family = FAMILIES[name]
    base, tuned = models[:2]
    check_match(base, tuned)

    wider = family.build(seed=0, intermediate=48)
    expected = [n for n, p in base.named_parameters()
                if tuple(p.shape) != tuple(wider.get_parameter(n).shape)]
    with pytest.raises(UserError, match="do not match") as info:
        check_match(base, wider)
    message = str(info.value)
    listed = re.findall(r"([\w.]+): base \((.*?)\) vs fine-tuned \((.*?)\)", message)
    assert listed and len(listed) == min(5, len(expected))
    for param, a, b in listed:
        assert param in expected and a != b
        assert tuple(int(x) for x in a.split(",") if x.strip()) == tuple(base.get_parameter(param).shape)
    if len(expected) > 5:
        assert f"(and {len(expected) - 5} more)" in message

    deeper = family.build(seed=0, layers=3)
    with pytest.raises(UserError, match="only in fine-tuned"):
        check_match(base, deeper)

    other = FAMILIES[next(n for n in FAMILIES if n != name)].build(seed=0)
    with pytest.raises(UserError, match="architecture") as info:
        check_match(base, other)
    assert type(base).__name__ in str(info.value) and type(other).__name__ in str(info.value)


def test_summarize_flags_exactly_the_perturbed_tensors(models, pair):
    perturbed = models[2]
    table = summarize(pair.base, pair.finetuned[0])
    assert set(table["name"]) == set(models[3])
    changed = table[table["changed"] > 0]
    assert set(changed["name"]) == perturbed
    assert (changed["changed"] == changed["numel"]).all()  # finetune_like moves every entry
    assert (table[table["changed"] == 0]["delta_norm"] == 0).all()
    linears = linear_weights(pair.base)
    assert set(table[table["linear"]]["name"]) >= linears


@pytest.mark.parametrize("hessians", ["sequential", "one-pass"])
def test_tailor_patch(models, pair, calibration, hessians, tmp_path):
    _, _, perturbed, base_state, tuned_state = models
    linears = sorted(perturbed & linear_weights(pair.base))
    others = perturbed - set(linears)
    assert linears and others  # the family's fine-tuning touches linears and norms/biases
    assert {f"{n}.weight" for n in selected_linears(pair)} == set(linears)

    result = run_method(pair, Settings(method="tailor", keep=KEEP, hessians=hessians), calibration)
    patch, report = result.patch, result.report
    assert_state(pair.base, base_state)  # run_method leaves both models as they were
    assert_state(pair.finetuned[0], tuned_state)

    assert set(patch.tensors) == perturbed
    assert report["selected_linears"] == len(linears)
    for n in linears:
        tp = patch.tensors[n]
        assert tp.index.numel() == expected_kept(tp.shape, KEEP), n
        assert torch.isfinite(tp.values).all()
    assert report["linear_fraction"] == pytest.approx(KEEP, abs=0.01)
    for n in others:  # default policy: the fine-tuned values, whole
        tp = patch.tensors[n]
        assert tp.index.numel() == tp.numel
        assert same_bits(tp.values, tuned_state[n].reshape(-1))

    applied = apply_patch(pair.base, patch)
    params = dict(pair.base.named_parameters())
    for n, tp in patch.tensors.items():
        flat = params[n].detach().reshape(-1)
        assert same_bits(flat[tp.index], tp.values)
        untouched = torch.ones(flat.numel(), dtype=torch.bool)
        untouched[tp.index] = False
        assert same_bits(flat[untouched], base_state[n].reshape(-1)[untouched])
    for n in set(base_state) - perturbed:
        assert same_bits(params[n].detach(), base_state[n])
    revert_patch(pair.base, applied)
    assert_state(pair.base, base_state)

    save_patch(patch, tmp_path / "patch.safetensors")
    again = load_patch(tmp_path / "patch.safetensors")
    assert again.tensors.keys() == patch.tensors.keys()
    for n, tp in patch.tensors.items():
        assert torch.equal(again.tensors[n].index, tp.index) and same_bits(again.tensors[n].values, tp.values)


def test_hessian_modes_agree_when_one_block_was_tuned(models, pair, calibration):
    """With a single fine-tuned block, the sequential pass sees the same inputs there as
    the one-pass collection on the fine-tuned model, so both give the same patch."""
    sequential = run_method(pair, Settings(keep=KEEP, hessians="sequential"), calibration).patch
    one_pass = run_method(pair, Settings(keep=KEEP, hessians="one-pass"), calibration).patch
    assert sequential.tensors.keys() == one_pass.tensors.keys()
    for n, tp in sequential.tensors.items():
        assert torch.equal(tp.index, one_pass.tensors[n].index), n
        torch.testing.assert_close(tp.values, one_pass.tensors[n].values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compensate", [False, True])
@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_keep_extremes(models, pair, calibration, keep, compensate):
    """keep=1 takes the fine-tuned linears exactly, keep=0 the base ones (others: fine-tuned)."""
    _, _, perturbed, base_state, tuned_state = models
    linears = perturbed & linear_weights(pair.base)
    settings = Settings(keep=keep, compensate=compensate, hessians="one-pass")
    patch = run_method(pair, settings, calibration).patch
    applied = apply_patch(pair.base, patch)
    try:
        params = dict(pair.base.named_parameters())
        for n in base_state:
            if n in linears:
                expected = tuned_state[n] if keep == 1.0 else base_state[n]
            else:
                expected = tuned_state[n]  # unperturbed tensors are equal in both
            assert same_bits(params[n].detach(), expected), n
    finally:
        revert_patch(pair.base, applied)
    assert_state(pair.base, base_state)
    if keep == 0.0:
        assert not linears & set(patch.tensors)


@pytest.mark.parametrize("others", ["base", "linear"])
def test_policy_for_other_tensors(models, pair, calibration, others):
    """Norms and biases the fine-tuning changed: reverted (base) or kept by |τ| (linear)."""
    _, _, perturbed, base_state, tuned_state = models
    linears = perturbed & linear_weights(pair.base)
    rest = perturbed - linears
    patch = run_method(pair, Settings(keep=KEEP, others=others, hessians="one-pass"), calibration).patch
    assert_state(pair.base, base_state)
    if others == "base":
        assert set(patch.tensors) == linears
        return
    assert set(patch.tensors) == perturbed
    for n in rest:
        tp = patch.tensors[n]
        shape = tp.shape if len(tp.shape) == 2 else (1, tp.numel)  # a 1-D tensor is one row
        assert tp.index.numel() == expected_kept(shape, KEEP), n
        assert torch.equal(tp.values, tuned_state[n].reshape(-1)[tp.index]), n


# An install without torchvision, as transformers sees it: find_spec is what it asks.
_WITHOUT_TORCHVISION = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] == "torchvision" else find_spec(name, *a)
sys.path.insert(0, "tests")
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from families import FAMILIES, tokenizer
from tailor_ui.errors import UserError
from tailor_ui.pair import load_model

folder = sys.argv[1]
FAMILIES["qwen2_vl"].build().save_pretrained(folder)
tokenizer().save_pretrained(folder)
Qwen2VLImageProcessorPil(min_pixels=256, max_pixels=256, patch_size=4, merge_size=2).save_pretrained(folder)
model, processor = load_model(folder)
assert type(model).__name__ == "Qwen2VLForConditionalGeneration"
assert not processor
try:
    processor.apply_chat_template([])
except UserError as exc:
    print("REFUSED:", exc)
"""


def test_qwen2_vl_without_torchvision_loads_and_says_why_it_cannot_read_images(tmp_path):
    """Qwen2-VL's processor needs torchvision; in an install without it the model still
    loads for inspect and the data-free merges, and any use of the processor names the reason."""
    run = subprocess.run([sys.executable, "-c", _WITHOUT_TORCHVISION, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    refusal = run.stdout.split("REFUSED:", 1)[-1]
    assert "REFUSED:" in run.stdout and re.search("(?i)torchvision", refusal), run.stdout
