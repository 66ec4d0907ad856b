"""Model Tailor layer by layer (calibration.capture_layer_inputs / run_layer, methods/tailor_run):
the same patches as the whole-model reference (`run_method(layerwise=False)`) on every
family of tests/families.py, on the demo pair and on a random pair from
bench/make_random_model.py, at the cost of one run of the model's front per batch; and a
model that does more between its layers than call them falls back, saying why."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from dataclasses import replace

import pytest
import torch

from conftest import DEMO, ROOT, demo_available
from families import FAMILIES, build_llava, finetune_like, llava_batches
from tailor_ui.engine import run_method
from tailor_ui.pair import Pair, load_pair
from tailor_ui.settings import Settings

# every family runs layer by layer; a family that cannot be driven so is named here with its reason
FALLS_BACK: dict[str, str] = {}


def assert_agree(reference, got, share: float = 0.999, *, exact: bool = False) -> None:
    """The same tensors, the same kept entries on ≥ `share` of each, and the entries both
    keep within float32 tolerance (`exact`: the same patch, bit for bit)."""
    assert reference.tensors.keys() == got.tensors.keys() and reference.tensors
    for name, want in reference.tensors.items():
        have = got.tensors[name]
        if exact:
            assert torch.equal(want.index, have.index) and torch.equal(want.values, have.values), name
            continue
        same = torch.isin(want.index, have.index)
        assert int(same.sum()) >= share * want.index.numel() and have.index.numel() == want.index.numel(), name
        mine = dict(zip(have.index.tolist(), have.values.float().tolist()))
        torch.testing.assert_close(torch.tensor([mine[int(i)] for i in want.index[same]]),
                                   want.values.float()[same], rtol=1e-5, atol=1e-6)


def both_paths(pair: Pair, settings: Settings, calibration, **options):
    reference = run_method(Pair(base=pair.base, finetuned=pair.finetuned, processor=None), settings,
                           calibration, layerwise=False, **options)
    got = run_method(Pair(base=pair.base, finetuned=pair.finetuned, processor=None), settings,
                     calibration, **options)
    return reference, got


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pair(request):
    """A family's tiny model with every layer of its tuned stack fine-tuned (families.py
    tunes the last one; several layers make the next layer's inputs matter, and with three
    a layer stands in for itself in the capture's check)."""
    family = FAMILIES[request.param]
    base = family.build(seed=0, layers=3)
    tuned = finetune_like(base, family.finetuned.replace(r"\.1\.", r"\.\d\."), seed=1)
    return request.param, Pair(base=base, finetuned=[tuned], processor=None), \
        family.batches(base.config, n=2, batch_size=2, seed=3)


@pytest.mark.parametrize("hessians", ["sequential", "one-pass"])
def test_every_family_runs_layer_by_layer_with_the_reference_patch(family_pair, hessians):
    name, pair, batches = family_pair
    reference, got = both_paths(pair, Settings(keep=0.1, hessians=hessians), [batches])
    assert reference.report["pipeline"] == {"path": "whole model", "reason": "layer by layer was turned off"}
    pipeline = got.report["pipeline"]
    if name in FALLS_BACK:
        assert pipeline == {"path": "whole model", "reason": FALLS_BACK[name]}
    else:
        assert pipeline["path"] == "layer-wise" and pipeline["layers"].endswith(".0-2"), pipeline
    assert_agree(reference.patch, got.patch, share=1.0)


@pytest.mark.parametrize("settings", [
    Settings(keep=0.2, compensation="anchored"), Settings(keep=0.2, compensation="exact", hessians="one-pass"),
    Settings(keep=0.2, order="sparsegpt", block_size=16), Settings(keep=0.2, scope="row", others="base"),
    Settings(keep=0.2, budget="per-layer", hessians="one-pass")], ids=["anchored", "exact-one-pass", "sparsegpt",
                                                                       "row-base", "per-layer"])
def test_variants_agree_with_the_reference(decoder_pair, decoder_batches, settings):
    anchor = llava_batches(decoder_pair.base.config, 2, seed=5)
    reference, got = both_paths(decoder_pair, settings, [decoder_batches], anchor=anchor)
    assert_agree(reference.patch, got.patch, share=1.0)
    if settings.budget == "per-layer":  # needs every score first: the whole model, one pass
        assert got.report["pipeline"]["path"] == "whole model" and "model-wide" in got.report["pipeline"]["reason"]
    else:
        assert got.report["pipeline"]["path"] == "layer-wise"


# which input each Llama linear reads: q/k/v one, gate/up one
READS = {"q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "heads",
         "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


@pytest.mark.parametrize("compensation", ["greedy", "anchored"])
@pytest.mark.parametrize("hessians", ["sequential", "one-pass"])
def test_linears_that_read_one_input_share_one_factor(decoder_pair, decoder_batches, monkeypatch,
                                                      compensation, hessians):
    """The float64 inversion is most of the scoring time: one per distinct input of a layer."""
    import tailor_ui.methods.tailor_run as tailor_run

    made = []
    real = tailor_run.inverse_hessian_factor
    monkeypatch.setattr(tailor_run, "inverse_hessian_factor", lambda h, damp=0.01: made.append(1) or real(h, damp))
    anchor = llava_batches(decoder_pair.base.config, 2, seed=5)
    result = run_method(decoder_pair, Settings(keep=0.1, hessians=hessians, compensation=compensation),
                        [decoder_batches], anchor=anchor, keep_scores=False)
    linears = [name.removesuffix(".weight") for name in result.patch.tensors
               if name.removesuffix(".weight").rsplit(".", 1)[1] in READS]
    inputs = {(name.rsplit(".", 2)[0], READS[name.rsplit(".", 1)[1]]) for name in linears}
    assert len(linears) > len(inputs) and len(made) == len(inputs)


@pytest.mark.parametrize("layerwise", [True, False])
def test_the_sums_are_a_timed_part_of_calibration(decoder_pair, decoder_batches, monkeypatch, layerwise):
    """The report's `calibration: XᵀX sums` holds every product the sums took (each made to
    take 20 ms here) and nothing of the forwards around them."""
    import tailor_ui.calibration as calibration

    products = []
    real = calibration.add_gram_upper
    monkeypatch.setattr(calibration, "add_gram_upper",
                        lambda acc, rows: products.append(time.sleep(0.02)) or real(acc, rows))
    result = run_method(decoder_pair, Settings(keep=0.1), [decoder_batches], layerwise=layerwise, keep_scores=False)
    timings = result.report["timings_s"]
    assert products and 0.02 * len(products) <= timings["calibration: XᵀX sums"] < timings["calibration"]
    assert timings["calibration: XᵀX sums"] < 0.02 * len(products) + 0.5 * (timings["calibration"]
                                                                          - 0.02 * len(products))


def test_a_shared_factor_holds_no_hessian_and_is_made_again_for_another():
    import gc
    import weakref

    from tailor_ui.methods.tailor_run import _SharedFactor

    shared, made = _SharedFactor(), []
    make = lambda: made.append(1) or torch.zeros(1)  # noqa: E731
    h, anchor = torch.eye(3), torch.eye(3)
    first = shared.get(h, None, make)
    assert shared.get(h, None, make) is first and len(made) == 1
    shared.get(h, anchor, make)  # the same target Hessian in another problem
    assert len(made) == 2
    gone = weakref.ref(h)
    del h
    gc.collect()
    assert gone() is None  # the factor's Hessian went with its last reader
    shared.get(torch.eye(3), anchor, make)
    assert len(made) == 3


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Calls entered (a forward stopped inside counts)."""
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_the_front_of_the_model_runs_once_per_batch_and_each_layer_at_most_twice():
    """Vision tower, projector and embeddings run once per batch (the reference: once per
    block and batch); each tuned layer runs twice per batch in sequential mode (Hessians
    with its fine-tuned weights, outputs with its patch; the last only once), once in
    one-pass mode, plus the first batch's structural check."""
    base = build_llava(seed=0, layers=3)
    tuned = finetune_like(base, r"^model\.language_model\.layers\.", seed=1)
    batches = llava_batches(base.config, 3)
    pair = Pair(base=base, finetuned=[tuned], processor=None)
    tower = _count_calls(base.model.vision_tower)
    layers = [_count_calls(layer) for layer in base.model.language_model.layers]
    run_method(pair, Settings(keep=0.1), [batches], layerwise=False, keep_scores=False)
    assert tower[0] == 3 * 3 and [c[0] for c in layers] == [3 + 3 + 3, 3 + 3, 3]
    for hessians, per_layer in (("sequential", [2 * 3, 2 * 3, 3]), ("one-pass", [3, 3, 3])):
        tower[0] = 0
        for c in layers:
            c[0] = 0
        result = run_method(pair, Settings(keep=0.1, hessians=hessians), [batches], keep_scores=False)
        assert result.report["pipeline"]["path"] == "layer-wise"
        # calls entered: the capture enters layer 0 once per batch and stops there, except the
        # first batch, which runs on through layers 0 and 1 into 2 to check what reaches them
        capture = [3, 1, 1]
        assert tower[0] == 3 and [c[0] for c in layers] == [p + x for p, x in zip(per_layer, capture)], hessians
    assert not pair.cache  # a one-shot run keeps no scores


def _shift_hidden(_module, args, kwargs):
    return (args[0] + 0.5, *args[1:]) if args else args, (
        kwargs if args else {**kwargs, "hidden_states": kwargs["hidden_states"] + 0.5})


def _shift_positions(_module, args, kwargs):
    cos, sin = kwargs["position_embeddings"]
    return args, {**kwargs, "position_embeddings": (sin, cos)}


@pytest.mark.parametrize("layers, at, change, reason", [
    (2, 1, _shift_hidden, "the model changes the hidden states between layers 0 and 1"),
    # the check computes layer 0 alone; the layers after it stand in for themselves
    (4, 2, _shift_hidden, "the model changes the hidden states between layers 1 and 2"),
    (4, 3, _shift_positions, "layer 3 is called with other arguments than layer 0")])
def test_a_model_that_does_more_between_its_layers_falls_back(layers, at, change, reason):
    """As Qwen3-VL adds visual features after early layers: driving the layers alone would
    miss it, so the run goes the whole-model way, and says why."""
    base = build_llava(seed=0, layers=layers)
    tuned = finetune_like(base, r"^model\.language_model\.layers\.", seed=1)
    batches = llava_batches(base.config, 2)
    pair = Pair(base=base, finetuned=[tuned], processor=None)
    expected = run_method(pair, Settings(keep=0.1), [batches], layerwise=False, keep_scores=False).patch
    for model in (base, tuned):
        model.model.language_model.layers[at].register_forward_pre_hook(change, with_kwargs=True)
    shifted = run_method(pair, Settings(keep=0.1), [batches], layerwise=False, keep_scores=False).patch
    for hessians in ("sequential", "one-pass"):
        got = run_method(pair, Settings(keep=0.1, hessians=hessians), [batches], keep_scores=False)
        assert got.report["pipeline"] == {"path": "whole model", "reason": reason}
        if hessians == "sequential":
            assert_agree(shifted, got.patch, share=1.0)
    assert any(not torch.equal(expected.tensors[n].index, shifted.tensors[n].index)
               or not torch.equal(expected.tensors[n].values, shifted.tensors[n].values) for n in expected.tensors)


def test_linears_before_the_decoder_go_first_on_the_whole_model(decoder_pair):
    """Projector and vision tower tuned too: they are tailored block by block on the whole
    model, then the decoder layer by layer; the patch is the reference's."""
    base = decoder_pair.base
    tuned = finetune_like(base, r"^model\.(vision_tower\.encoder\.layers\.0\.|multi_modal_projector"
                                r"|language_model\.layers)", seed=2)
    pair = Pair(base=base, finetuned=[tuned], processor=None)
    batches = llava_batches(base.config, 2)
    for hessians in ("sequential", "one-pass"):
        reference, got = both_paths(pair, Settings(keep=0.1, hessians=hessians), [batches])
        assert got.report["pipeline"]["path"] == "layer-wise" and got.report["pipeline"]["whole_model_linears"] == 6 + 2
        assert_agree(reference.patch, got.patch, share=1.0)


@pytest.mark.skipif(not demo_available(), reason="the demo pair is built by `python -m tailor_ui demo`")
def test_the_demo_pair_agrees_with_the_reference():
    from tailor_ui.calibration import calibration_batches
    from tailor_ui.data import read_calibration

    pair = load_pair(str(DEMO / "base"), str(DEMO / "finetuned"), lazy=True)
    examples = read_calibration(DEMO / "target_calib.jsonl")[:16]
    batches = calibration_batches(pair.processor, examples, 8)
    anchor = calibration_batches(pair.processor, read_calibration(DEMO / "original_calib.jsonl")[:16], 8)
    for settings in (Settings(keep=0.1), Settings(keep=0.1, compensation="anchored"),
                     Settings(keep=0.1, hessians="one-pass")):
        reference, got = both_paths(pair, settings, [batches], anchor=anchor)
        assert got.report["pipeline"]["path"] == "layer-wise"
        assert_agree(reference.patch, got.patch)


def test_a_random_bench_pair_agrees_with_the_reference(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    from make_random_model import build
    from tailor_scaling import synthetic_batches

    build(tmp_path, "llava", "tiny", 1, r"language_model\.layers\.", 0.002, "float32", 1000, 0)
    pair = load_pair(str(tmp_path / "base"), str(tmp_path / "ft1"), lazy=True)
    batches = synthetic_batches(pair.base.config, 4, 2, 16)
    for settings in (Settings(keep=0.1), replace(Settings(keep=0.1), hessians="one-pass")):
        reference, got = both_paths(pair, settings, [batches])
        assert got.report["pipeline"]["path"] == "layer-wise"
        assert_agree(reference.patch, got.patch)


_MEASURE = """
import json, sys
sys.path.insert(0, "bench")
from make_random_model import build
from tailor_scaling import synthetic_batches
from tailor_ui.engine import run_method
from tailor_ui.pair import load_pair
from tailor_ui.settings import Settings
root = sys.argv[1]
build(__import__("pathlib").Path(root), "llava", "s", 1, r"language_model\\.layers\\.[4-7]\\.", 0.002, "float16", 1000, 0)
onload = sys.argv[2] == "onloaded"
pair = load_pair(root + "/base", root + "/ft1", lazy=True, onload=onload)
report = run_method(pair, Settings(keep=0.1), [synthetic_batches(pair.base.config, 4, 4, 32)],
                    keep_scores=False, patch_path=__import__("pathlib").Path(root) / "patch" if onload else None).report
print(json.dumps({"memory": report["memory"], "pipeline": report["pipeline"], "base": report["base_loading"]}))
"""


@pytest.mark.parametrize("base", ["in memory", "onloaded"])
def test_the_predicted_peak_bounds_the_measured_one_tightly(tmp_path, base):
    """A one-shot layer-wise run on a 70M-parameter LLaVA-shaped pair (the bench's size s,
    half its decoder tuned), in a fresh process (memory an earlier test freed but the
    allocator kept would hide this run's growth): what report.json predicts is an upper
    bound of what the run added to the process, and not a loose one; with the base loaded
    and onloaded from its safetensors (writing its patch as it goes)."""
    import json
    import subprocess

    run = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), base], capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["pipeline"]["path"] == "layer-wise" and result["base"]["base"] == base
    memory = result["memory"]
    used = memory["cpu_peak_rss_mb"] - memory["rss_at_start_mb"]
    bound = memory["predicted_peak_mb"] - memory["rss_at_start_mb"]
    # the terms are summed as though all were alive at once, and the run's resident size
    # swings by 16 MB between runs (86.5 or 103 MB in memory); onloaded, the bound also adds
    # the read of the largest tensor (the embedding table, compared before any layer runs)
    # to the layers' work, which comes after it
    assert 20 < used <= bound < 2.5 * used


def test_a_kept_score_cache_is_memory_mapped_and_changes_nothing(decoder_pair, decoder_batches):
    """The dashboard's cache (kept scores) lives in memory-mapped files that are already
    unlinked; the patch is the one-shot run's, bit for bit, first run and re-threshold alike."""
    settings = Settings(keep=0.1, compensation="exact", hessians="one-pass")
    kept = Pair(base=decoder_pair.base, finetuned=decoder_pair.finetuned, processor=None)
    first = run_method(kept, settings, [decoder_batches])
    entries = [e for cache in kept.cache.values() for e in cache.values()]
    assert len(entries) == first.report["selected_linears"] > 0
    for entry in entries:
        for tensor in (entry.factor, entry.scores.salience_z, entry.scores.sensitivity_z, entry.hessian):
            path = tensor.untyped_storage().filename
            assert path is not None and not Path(path).exists()
    one_shot = run_method(Pair(base=decoder_pair.base, finetuned=decoder_pair.finetuned, processor=None),
                          settings, [decoder_batches], keep_scores=False)
    assert_agree(one_shot.patch, first.patch, exact=True)
    again = run_method(kept, replace(settings, keep=0.2), [decoder_batches])
    assert again.report["score_cache"]["misses"] == 0
    fresh = run_method(Pair(base=decoder_pair.base, finetuned=decoder_pair.finetuned, processor=None),
                       replace(settings, keep=0.2), [decoder_batches], keep_scores=False)
    assert_agree(fresh.patch, again.patch, exact=True)


def test_a_dashboard_run_predicts_its_score_cache(decoder_pair, decoder_batches):
    """With scores kept the prediction carries the cache's size; a re-threshold of cached
    scores computes nothing and predicts nothing."""
    pair = Pair(base=decoder_pair.base, finetuned=decoder_pair.finetuned, processor=None)
    report = run_method(pair, Settings(keep=0.1, hessians="one-pass"), [decoder_batches]).report
    shapes = [tuple(pair.base.get_parameter(f"{n}.weight").shape)
              for cache in pair.cache.values() for n in cache]
    assert report["memory_terms_mb"]["score cache"] == pytest.approx(
        sum(8 * o * i + 4 * i * i for o, i in shapes) / 2**20)
    assert report["memory"]["predicted_peak_mb"] > report["memory"]["rss_at_start_mb"]
    again = run_method(pair, Settings(keep=0.3, hessians="one-pass"), [decoder_batches]).report
    assert again["score_cache"]["misses"] == 0 and "memory_terms_mb" not in again


def test_the_engine_runs_any_method_by_its_run_hook(decoder_pair, decoder_batches, monkeypatch):
    """The engine names no method: a method registered at run time with a `run` hook gets
    each fine-tuned model's calibration, the selected linears and the other tensors' patch."""
    from tailor_ui.engine import selected_linears
    from tailor_ui.methods import REGISTRY

    calls = []

    def probe(pair, k, calib, linears, before, run):
        calls.append((k, len(calib), tuple(linears), set(before), run.settings.method))
        return {}

    monkeypatch.setitem(REGISTRY, "probe", replace(REGISTRY["magnitude"], label="Probe", run=probe,
                                                   needs_calibration=True))
    pair = Pair(base=decoder_pair.base, finetuned=decoder_pair.finetuned, processor=None)
    linears = selected_linears(pair)
    others = set(pair.changed()) - {f"{n}.weight" for n in linears}
    result = run_method(pair, Settings(method="probe"), [decoder_batches])
    assert calls == [(0, len(decoder_batches), tuple(linears), others, "probe")]
    assert set(result.patch.tensors) == others and others
