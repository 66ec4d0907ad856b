"""One model loaded, the other read lazily (tailor_ui.checkpoint.LazyWeights), accelerate device maps, per-run
peak memory (tailor_ui.memory) and the CLI's defaults: lazy `tailor`, streamed data-free
merges and `apply`.

The reference is the in-memory engine on the same checkpoints: both models loaded,
`run_method`. Every lazy or offloaded run must give the same patch bit for bit.
"""

from __future__ import annotations

import json
import time
import weakref
from collections import Counter
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForImageTextToText

from families import build_llava, build_qwen2_vl, finetune_like, llava_batches
from tailor_ui.cli import main
from tailor_ui.engine import run_method, selected_linears
from tailor_ui.names import layer_groups
from tailor_ui.errors import UserError
from tailor_ui.checkpoint import LazyWeights
from tailor_ui.memory import PeakMemory, current_rss_mb, peak_rss_mb
from tailor_ui.pair import Pair, load_pair
from tailor_ui.patch import load_patch
from tailor_ui.settings import Settings
from tailor_ui.checkpoint import Checkpoint
from tailor_ui.weights import read_param

# both decoder blocks and the projector: linears in three groups, norms and biases as "others"
TUNED = r"^model\.(language_model\.layers\.\d\.|multi_modal_projector\.)"
OFFLOAD = {"model.vision_tower": "cpu", "model.multi_modal_projector": "disk",
           "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
           "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
           "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    """A float32 LLaVA pair in differently sharded safetensors folders (legacy keys)."""
    root = tmp_path_factory.mktemp("lazy")
    base = build_llava(seed=0)
    build_llava(seed=0).save_pretrained(root / "base", max_shard_size="40KB")
    finetune_like(base, TUNED, seed=1).save_pretrained(root / "ft", max_shard_size="70KB")
    finetune_like(base, r"mlp\.", seed=2).save_pretrained(root / "ft2")
    return root


@pytest.fixture(scope="module")
def batches(disk):
    return llava_batches(build_llava(seed=0).config, 2)


@pytest.fixture(scope="module")
def in_memory(disk):
    return load_pair(str(disk / "base"), [str(disk / "ft"), str(disk / "ft2")])


def _one(pair: Pair, k: int = 0) -> Pair:
    return Pair(base=pair.base, finetuned=[pair.finetuned[k]], processor=None, cache={})


def _assert_same_patch(a, b):
    assert a.tensors.keys() == b.tensors.keys() and a.tensors
    for name, tp in a.tensors.items():
        other = b.tensors[name]
        assert torch.equal(tp.index, other.index), name
        assert tp.values.dtype == other.values.dtype and torch.equal(
            tp.values.view(torch.int32), other.values.view(torch.int32)), name


def _state(model):
    return {n: read_param(model, n).clone() for n, _ in model.named_parameters()}


def _assert_state(model, state):
    assert all(torch.equal(read_param(model, n), v) for n, v in state.items())


class ReadLog:
    """Wraps a LazyWeights' reads: which tensors, and how many earlier reads were still
    alive (referenced by the engine) when each new one started."""

    def __init__(self, weights: LazyWeights) -> None:
        self.names: list[str] = []
        self.held: list[int] = []
        self._alive: list[weakref.ref] = []
        read = weights.read

        def logged(name, dtype, device="cpu"):
            self.held.append(sum(r() is not None for r in self._alive))
            tensor = read(name, dtype, device)
            self.names.append(name)
            self._alive.append(weakref.ref(tensor))
            return tensor

        weights.read = logged


MODES = [Settings(method="tailor", keep=0.2, hessians="sequential"),
         Settings(method="tailor", keep=0.2, hessians="one-pass"),
         Settings(method="tailor", keep=0.1, scope="global", sign="released", others="linear")]


@pytest.mark.parametrize("settings", MODES, ids=["sequential", "one-pass", "global-linear"])
def test_lazy_tailor_gives_the_in_memory_patch_bit_for_bit(disk, batches, in_memory, settings):
    assert settings.compensate
    lazy = load_pair(str(disk / "base"), [str(disk / "ft")], lazy=True)
    assert isinstance(lazy.finetuned[0], LazyWeights)
    state = _state(lazy.base)
    expected = run_method(_one(in_memory), settings, [batches])
    got = run_method(lazy, settings, [batches])
    _assert_same_patch(expected.patch, got.patch)
    _assert_state(lazy.base, state)  # the working copy leaves exactly as it came
    assert got.report["finetuned_loading"] == ["lazy"] and got.report["finetuned_reads"] > 0
    assert expected.report["finetuned_loading"] == ["in memory"] and "finetuned_reads" not in expected.report


def test_multi_task_with_lazy_models_equals_in_memory(disk, batches, in_memory):
    settings = Settings(method="tailor", keep=0.3, hessians="one-pass", overlap="mean")
    lazy = load_pair(str(disk / "base"), [str(disk / "ft"), str(disk / "ft2")], lazy=True)
    expected = run_method(in_memory, settings, [batches, batches])
    _assert_same_patch(expected.patch, run_method(lazy, settings, [batches, batches]).patch)
    for method in ("ties", "dare", "magnitude"):  # data-free methods read the same accessor
        s = Settings(method=method, keep=0.3)
        _assert_same_patch(run_method(in_memory, s).patch, run_method(lazy, s).patch)


def test_lazy_reads_hold_at_most_one_block(disk, batches):
    lazy = load_pair(str(disk / "base"), [str(disk / "ft")], lazy=True)
    changed = lazy.changed()  # the once-per-pair pass: one read per tensor
    assert Counter(lazy.finetuned[0].reads) == Counter({n: 1 for n in dict(lazy.base.named_parameters())})
    linears = [f"{n}.weight" for n in selected_linears(lazy)]
    others = [n for n in changed if n not in linears]
    groups = layer_groups(selected_linears(lazy))
    assert len(groups) == 4 and linears and others  # projector linears, then two blocks

    log = ReadLog(lazy.finetuned[0])
    run_method(lazy, Settings(method="tailor", hessians="sequential"), [batches])
    # every changed tensor read once; a linear once more when it is scored, after its block's Hessians
    assert Counter(log.names) == Counter(changed) + Counter(linears)
    block_of = {f"{n}.weight": g for g, group in enumerate(groups) for n in group}
    order = [block_of[n] for n in log.names if n in block_of]
    assert order == sorted(order)  # block by block
    largest = max(len(g) for g in groups)
    assert 0 < max(log.held) < largest < len(changed) / 2  # one block at a time, never the model

    log = ReadLog(lazy.finetuned[0])
    run_method(lazy, Settings(method="tailor", hessians="one-pass"), [batches])
    # the forward swaps every changed tensor in (one read each); then each linear once more
    assert Counter(log.names) == Counter(changed) + Counter(linears) + Counter(others)
    assert max(log.held) <= 1  # one tensor at a time (a loop's last one goes when the next comes)


def test_accelerate_device_maps_give_the_same_patch(disk, batches, in_memory, tmp_path):
    """Base placed by accelerate: device_map="auto" (all on the CPU here) and an offload
    map with the projector and the last block on disk, the rest on the CPU."""
    auto = load_pair(str(disk / "base"), [str(disk / "ft")], lazy=True, device="auto")
    offloaded = AutoModelForImageTextToText.from_pretrained(
        disk / "base", device_map=OFFLOAD, offload_folder=str(tmp_path / "offload"))
    assert offloaded.get_parameter("model.language_model.layers.1.mlp.up_proj.weight").device.type == "meta"
    state = _state(offloaded)
    loader = offloaded.get_submodule("model.language_model.layers.1.mlp.up_proj")._hf_hook.weights_map.dataset
    on_disk = dict(loader.state_dict)
    for settings in MODES[:2]:
        expected = run_method(_one(in_memory), settings, [batches])
        _assert_same_patch(expected.patch, run_method(auto, settings, [batches]).patch)
        pair = Pair(base=offloaded, finetuned=[LazyWeights(disk / "ft", offloaded)], processor=None)
        _assert_same_patch(expected.patch, run_method(pair, settings, [batches]).patch)
        _assert_state(offloaded, state)
        assert loader.state_dict.keys() == on_disk.keys()  # the in-memory copies are dropped again


def test_cached_scores_serve_new_settings_exactly_as_documented(disk, batches, in_memory):
    """docs/ARCHITECTURE.md "Caches": one-pass scores survive keep, alpha, scope, sign,
    compensation, module regex and `others`; damping, sensitivity and new calibration data
    recompute, and so does a switch to exact compensation (its entries hold the Hessian); in
    sequential mode a new keep recomputes. Anchored compensation: a new keep reuses
    (one-pass), a new μ or new anchor data recomputes. Cached runs equal fresh ones."""
    lazy = load_pair(str(disk / "base"), [str(disk / "ft")], lazy=True)
    first = Settings(method="tailor", hessians="one-pass", keep=0.1)
    assert_computed(run_method(lazy, first, [batches]).report)
    for change in (dict(keep=0.3, alpha=0.5), dict(scope="row", sign="released"),
                   dict(compensate=False), dict(modules=r"mlp\."), dict(others="base"),
                   dict(order="sparsegpt"), dict(budget="per-layer")):
        settings = replace(first, **change)
        got = run_method(lazy, settings, [batches])
        assert got.report["score_cache"] == {"hits": got.report["selected_linears"], "misses": 0}, change
        assert "calibration" not in got.report["timings_s"], change
        _assert_same_patch(run_method(_one(in_memory), settings, [batches]).patch, got.patch)
    other_batches = llava_batches(build_llava(seed=0).config, 2, seed=1)
    for settings, calib in ((replace(first, damp=0.05), batches), (replace(first, sensitivity="weight"), batches),
                            (first, other_batches), (replace(first, compensation="exact"), batches)):
        assert_computed(run_method(lazy, settings, [calib]).report)
    sequential = replace(first, hessians="sequential")
    assert_computed(run_method(lazy, sequential, [batches]).report)
    again = run_method(lazy, sequential, [batches]).report
    assert again["score_cache"] == {"hits": again["selected_linears"], "misses": 0}
    assert_computed(run_method(lazy, replace(sequential, keep=0.3), [batches]).report)
    # anchored: scores are of the anchored problem, so a new μ or new anchor data recomputes;
    # a new keep re-thresholds (one-pass)
    anchored = replace(first, compensation="anchored")
    assert_computed(run_method(lazy, anchored, [batches], anchor=other_batches).report)
    smaller = replace(anchored, keep=0.05)
    got = run_method(lazy, smaller, [batches], anchor=other_batches)
    assert got.report["score_cache"] == {"hits": got.report["selected_linears"], "misses": 0}
    _assert_same_patch(run_method(_one(in_memory), smaller, [batches], anchor=other_batches).patch, got.patch)
    assert_computed(run_method(lazy, replace(anchored, anchor_weight=2.0), [batches], anchor=other_batches).report)
    assert_computed(run_method(lazy, anchored, [batches], anchor=batches).report)


def assert_computed(report: dict) -> None:
    """Every linear's scores were computed by this run, from a calibration pass."""
    assert report["score_cache"] == {"hits": 0, "misses": report["selected_linears"]}
    assert report["selected_linears"] > 0 and "calibration" in report["timings_s"]


def test_lazy_weights_refuse_a_different_model(disk, tmp_path):
    base = load_pair(str(disk / "base"), [str(disk / "ft")], lazy=True).base
    build_llava(seed=0, intermediate=48).save_pretrained(tmp_path / "narrower")
    with pytest.raises(UserError, match=r"do not match: .*mlp\.fc1\.weight: base \(64, 32\) vs fine-tuned \(48, 32\)"):
        LazyWeights(tmp_path / "narrower", base)
    build_qwen2_vl(seed=0).save_pretrained(tmp_path / "qwen")
    with pytest.raises(UserError, match="differ in architecture"):
        LazyWeights(tmp_path / "qwen", base)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no safetensors"):
        LazyWeights(tmp_path / "empty", base)


# ------------------------------------------------------------------------------ memory

def test_peak_memory_is_per_run(disk, batches):
    rss = current_rss_mb()
    big = torch.ones(300 * 2**20 // 4)  # the process's lifetime peak: +300 MB
    big.add_(1.0)
    del big
    pair = load_pair(str(disk / "base"), [str(disk / "ft")], lazy=True)
    memory = run_method(pair, Settings(method="tailor", hessians="one-pass"), [batches]).report["memory"]
    assert memory["peak_measured_from"] == "run start"
    assert 0 < memory["rss_at_start_mb"] <= memory["cpu_peak_rss_mb"] < rss + 150
    assert ("gpu_peak_allocated_mb" in memory) == torch.cuda.is_initialized()


def test_peak_memory_is_exact_at_a_new_peak_and_sampled_below_one():
    """No reset of the kernel's mark (that would falsify `time -v` and wait4 for the whole
    process): a run that raises the process's peak reads the mark; one below it reads the
    sampler, which still sees what the run held for longer than a few samples."""
    earlier = torch.ones(300 * 2**20 // 4)  # the process's peak: above what `below` holds
    earlier.add_(1.0)
    del earlier
    with PeakMemory() as below:
        held = torch.ones(100 * 2**20 // 4)
        held.add_(1.0)
        time.sleep(0.3)
        del held
    report = below.report()
    assert report["cpu_peak_source"].startswith("resident size sampled")
    assert report["rss_at_start_mb"] + 90 <= report["cpu_peak_rss_mb"] < report["rss_at_start_mb"] + 150
    spike = int(peak_rss_mb() - current_rss_mb()) + 200  # MiB: above anything before
    with PeakMemory() as above:
        held = torch.ones(spike * 2**20 // 4)
        held.add_(1.0)  # no sleep: too short for the sampler, not for the kernel's mark
        del held
    report = above.report()
    assert report["cpu_peak_source"] == "kernel high-water mark"
    assert report["cpu_peak_rss_mb"] >= report["rss_at_start_mb"] + spike - 10


# ------------------------------------------------------------------------- command line
# on conftest's `disk_pair`: a tiny LLaVA pair saved with its processor, and calib.jsonl

def _report(folder):
    return json.loads((folder / "report.json").read_text())


def test_cli_tailor_loads_one_model_and_reads_the_other_lazily(disk_pair, tmp_path):
    args = ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
            "--calib", str(disk_pair / "calib.jsonl"), "--batch-size", "2"]
    assert main([*args, "--out", str(tmp_path / "lazy")]) == 0
    assert main([*args, "--out", str(tmp_path / "full"), "--in-memory"]) == 0
    lazy, full = _report(tmp_path / "lazy"), _report(tmp_path / "full")
    assert lazy["finetuned_loading"] == ["lazy"] and full["finetuned_loading"] == ["in memory"]
    assert lazy["finetuned_reads"] > 0
    for report in (lazy, full):
        assert report["memory"]["cpu_peak_rss_mb"] >= report["memory"]["rss_at_start_mb"] > 0
    _assert_same_patch(load_patch(tmp_path / "full" / "patch.safetensors"),
                       load_patch(tmp_path / "lazy" / "patch.safetensors"))


def _params(folder):
    return {n: p.detach() for n, p in AutoModelForImageTextToText.from_pretrained(folder).named_parameters()}


def test_cli_streams_data_free_merges_and_apply_by_default(disk_pair, tmp_path):
    args = ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
            "--method", "ties", "--keep", "0.3", "--save-model"]
    assert main([*args, "--out", str(tmp_path / "streamed")]) == 0
    assert main([*args, "--out", str(tmp_path / "loaded"), "--in-memory"]) == 0
    streamed, loaded = _report(tmp_path / "streamed"), _report(tmp_path / "loaded")
    assert streamed["streamed"] and "streamed" not in loaded
    assert streamed["patch_entries"] == loaded["patch_entries"]
    assert streamed["linear_fraction"] == pytest.approx(loaded["linear_fraction"])
    patch = load_patch(tmp_path / "streamed" / "patch.safetensors")
    _assert_same_patch(load_patch(tmp_path / "loaded" / "patch.safetensors"), patch)
    assert patch.metadata["base"] == str(disk_pair / "base") and patch.metadata["method"] == "ties"
    expected = _params(tmp_path / "loaded" / "model")
    got = _params(tmp_path / "streamed" / "model")
    assert all(torch.equal(expected[n], got[n]) for n in expected)

    apply = ["apply", "--base", str(disk_pair / "base"), "--patch", str(tmp_path / "streamed" / "patch.safetensors")]
    assert main([*apply, "--out", str(tmp_path / "applied")]) == 0
    assert {"config.json", "tokenizer.json"} <= {f.name for f in (tmp_path / "applied").iterdir()}
    got = _params(tmp_path / "applied")
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert main([*apply, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0  # loads to convert
    assert {t.dtype for t in Checkpoint(tmp_path / "bf16").tensors.values()} == {torch.bfloat16}


def test_no_patch_writes_only_the_model_and_its_report(disk_pair, tmp_path):
    args = ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
            "--method", "task_arithmetic", "--save-model", "--no-patch"]
    assert main([*args, "--out", str(tmp_path / "streamed")]) == 0
    assert main([*args, "--out", str(tmp_path / "loaded"), "--in-memory"]) == 0
    for run in ("streamed", "loaded"):
        assert sorted(f.name for f in (tmp_path / run).iterdir()) == ["model", "report.json"]
        assert _report(tmp_path / run)["patch_entries"] > 0
    expected, got = _params(tmp_path / "loaded" / "model"), _params(tmp_path / "streamed" / "model")
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    assert main([*args[:-2], "--no-patch", "--out", str(tmp_path / "nothing")]) == 2  # no --save-model
    assert not (tmp_path / "nothing").exists()
