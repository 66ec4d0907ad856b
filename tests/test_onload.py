"""The base onloaded from its safetensors (pair.onload_model, load_pair(onload=True)): Model
Tailor layer by layer gives today's patches bit for bit on every family of
tests/families.py, writes them as it goes, holds one module of the base at a time whatever
the model's depth, and the `tailor` command saves today's model from it."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from families import FAMILIES, build_llava, finetune_like, llava_batches
from tailor_ui.cli import main
from tailor_ui.engine import run_method
from tailor_ui.pair import load_pair
from tailor_ui.patch import PatchFile, load_patch
from tailor_ui.settings import Settings
from tailor_ui.weights import _hooks, _store


def saved_pair(root: Path, base: torch.nn.Module, tuned: torch.nn.Module) -> tuple[str, str]:
    for name, model in (("base", base), ("ft", tuned)):
        model.save_pretrained(root / name)
    return str(root / "base"), str(root / "ft")


def held_copies(model: torch.nn.Module) -> int:
    """Bytes of the in-memory copies accelerate's weights maps hold for offloaded parameters."""
    loaders = {id(loader): loader for m in model.modules() for hook in _hooks(m)
               if getattr(hook, "weights_map", None) is not None
               for loader in [_store(hook.weights_map, "")[0]]}
    return sum(t.nbytes for loader in loaders.values() for t in loader.state_dict.values())


def materialized(model: torch.nn.Module) -> int:
    """Bytes of the model's weights in memory now: its resident parameters and held copies."""
    resident = {p.data_ptr(): p.nbytes for p in model.parameters() if p.device.type != "meta"}
    return sum(resident.values()) + held_copies(model)


def assert_same_patch(want, got) -> None:
    assert want.tensors.keys() == got.tensors.keys() and want.tensors
    for name, tp in want.tensors.items():
        assert torch.equal(tp.index, got.tensors[name].index), name
        assert torch.equal(tp.values, got.tensors[name].values), name


@pytest.mark.parametrize("hessians", ["sequential", "one-pass"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_onloads_with_todays_patch_written_as_it_goes(family, hessians, tmp_path):
    spec = FAMILIES[family]
    base = spec.build(seed=0, layers=3)  # three: a layer stands in for itself in the capture's check
    tuned = finetune_like(base, spec.finetuned.replace(r"\.1\.", r"\.\d\."), seed=1)
    base_dir, ft_dir = saved_pair(tmp_path, base, tuned)
    batches = spec.batches(base.config, n=2, batch_size=2, seed=3)
    settings = Settings(keep=0.1, hessians=hessians)
    today = run_method(load_pair(base_dir, ft_dir, lazy=True), settings, [batches], keep_scores=False)
    pair = load_pair(base_dir, ft_dir, lazy=True, onload=True)
    assert pair.loading == {"base": "onloaded", "from": base_dir, "device": "cpu"}
    resident, total = materialized(pair.base), sum(p.nbytes for p in base.parameters())
    assert resident < 0.1 * total  # one small module, or none
    got = run_method(pair, settings, [batches], keep_scores=False, patch_path=tmp_path / "patch.safetensors")
    assert got.report["pipeline"]["path"] == "layer-wise" and got.report["base_loading"] == pair.loading
    assert isinstance(got.patch, PatchFile)
    assert_same_patch(today.patch, got.patch.load())
    assert got.patch.metadata["counts"] == today.patch.counts()
    # every copy written in was let go; a forward stopped at the first driven layer leaves the
    # modules it was inside with their own weights onloaded (InstructBLIP's query tokens)
    assert held_copies(pair.base) == 0 and materialized(pair.base) - resident < 0.01 * total


def test_what_the_base_holds_does_not_grow_with_depth(tmp_path):
    """The most bytes of base weights in memory at once, sampled whenever a module runs and
    whenever a finished patch is handed on: the same for a decoder twice as deep when
    onloaded; loaded whole, it grows with the model (the measure can tell)."""
    def peak(layers: int, onload: bool) -> int:
        base = build_llava(seed=0, hidden=64, intermediate=128, layers=layers)
        root = tmp_path / f"{layers}-{onload}"
        base_dir, ft_dir = saved_pair(root, base, finetune_like(base, r"language_model\.layers\.", seed=1))
        pair = load_pair(base_dir, ft_dir, lazy=True, onload=onload)
        seen = [0]

        def sample(*_):
            seen[0] = max(seen[0], materialized(pair.base))

        handles = [m.register_forward_hook(sample) for m in pair.base.modules()]
        got = run_method(pair, Settings(keep=0.1), [llava_batches(base.config, 2)], keep_scores=False,
                         patch_path=root / "patch.safetensors")
        for h in handles:
            h.remove()
        assert got.report["pipeline"]["path"] == "layer-wise"
        return seen[0]

    onloaded = peak(2, True), peak(4, True)
    whole = peak(2, False), peak(4, False)
    assert 0 < onloaded[1] <= 1.1 * onloaded[0]
    assert whole[1] > 1.3 * whole[0] and onloaded[1] < 0.5 * whole[1]


@pytest.mark.parametrize("hessians", ["sequential", "one-pass"])
def test_each_driven_layer_reads_its_weights_once_whatever_the_number_of_batches(hessians, tmp_path, monkeypatch):
    """Reads from the checkpoint per parameter over a run on three batches: a driven
    layer's untailored weights (its norms) once for all its batches and both runs; each
    tailored linear once to be scored and, in sequential mode, once to have its patch
    written in for the layer's outputs (its Hessians are taken with fine-tuned values
    that no base read is made for). The capture's check computes the first driven layer
    alone (once more); what comes after the last layer is never read."""
    from accelerate.utils.offload import OffloadedWeightsLoader

    base = build_llava(seed=0, hidden=64, intermediate=128, layers=4)
    tuned = finetune_like(base, r"language_model\.layers\.\d+\.(self_attn|mlp)\.", seed=1)
    base_dir, ft_dir = saved_pair(tmp_path, base, tuned)
    pair = load_pair(base_dir, ft_dir, lazy=True, onload=True)
    pair.changed()  # reads every tensor once, before any run (and is kept)
    reads: Counter[str] = Counter()
    read = OffloadedWeightsLoader.__getitem__

    def counted(loader: OffloadedWeightsLoader, key: str):
        reads[key] += key not in loader.state_dict
        return read(loader, key)

    monkeypatch.setattr(OffloadedWeightsLoader, "__getitem__", counted)
    got = run_method(pair, Settings(keep=0.1, hessians=hessians), [llava_batches(base.config, 3)],
                     keep_scores=False, patch_path=tmp_path / "patch.safetensors")
    assert got.report["pipeline"]["path"] == "layer-wise"
    tailored = set(pair.changed())  # the decoder layers' linears
    per_linear = 2 if hessians == "sequential" else 1
    stack = "model.language_model.layers"
    for i in range(4):
        names = [f"{stack}.{i}.{n}" for n, _ in base.model.language_model.layers[i].named_parameters()]
        want = {n: (per_linear if n in tailored else 1) + (i == 0) for n in names}
        assert {n: reads[n] for n in names} == want, i
    assert reads["model.language_model.norm.weight"] == reads["lm_head.weight"] == 0


def test_tailor_saves_todays_model_and_patch_from_an_onloaded_base(disk_pair, tmp_path):
    common = ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
              "--calib", str(disk_pair / "calib.jsonl"), "--save-model"]
    assert main([*common, "--out", str(tmp_path / "today"), "--in-memory"]) == 0
    assert main([*common, "--out", str(tmp_path / "onloaded")]) == 0
    report = json.loads((tmp_path / "onloaded" / "report.json").read_text())
    assert report["base_loading"]["base"] == "onloaded" and report["pipeline"]["path"] == "layer-wise"
    assert json.loads((tmp_path / "today" / "report.json").read_text())["base_loading"] == {"base": "in memory"}
    assert_same_patch(load_patch(tmp_path / "today" / "patch.safetensors"),
                      load_patch(tmp_path / "onloaded" / "patch.safetensors"))
    from safetensors.torch import load_file

    want = load_file(tmp_path / "today" / "model" / "model.safetensors")
    got = load_file(tmp_path / "onloaded" / "model" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert report["tensors_checked"] == len(got)


def test_no_patch_leaves_only_the_model(disk_pair, tmp_path):
    out = tmp_path / "out"
    assert main(["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--calib", str(disk_pair / "calib.jsonl"), "--save-model", "--no-patch", "--out", str(out)]) == 0
    assert not (out / "patch.safetensors").exists() and (out / "model" / "model.safetensors").is_file()


def test_a_model_wide_ranking_loads_the_base_whole(disk_pair, tmp_path):
    """A global threshold needs every score before any layer is tailored: whole model."""
    out = tmp_path / "out"
    assert main(["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--calib", str(disk_pair / "calib.jsonl"), "--scope", "global", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["base_loading"] == {"base": "in memory"} and report["pipeline"]["path"] == "whole model"


def test_a_base_without_safetensors_is_loaded_whole_and_says_why(tmp_path):
    from safetensors.torch import load_file

    base = build_llava(seed=0)
    base.save_pretrained(tmp_path / "base")
    weights = tmp_path / "base" / "model.safetensors"
    torch.save(load_file(weights), tmp_path / "base" / "pytorch_model.bin")
    weights.unlink()
    finetune_like(base, r"language_model\.layers\.", seed=1).save_pretrained(tmp_path / "ft")
    pair = load_pair(str(tmp_path / "base"), str(tmp_path / "ft"), lazy=True, onload=True, allow_pickle=True)
    assert pair.loading == {"base": "in memory",
                            "why": "the base has no safetensors weights to read module by module"}
