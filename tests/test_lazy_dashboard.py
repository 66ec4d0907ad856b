"""A visitor's own pair in the dashboard holds the base once and reads the fine-tuned model
from disk where it is used (tailor_ui.app.service.pairs.load_handle with `load_pair(lazy=True)`):
what the pair holds is one model's tensors, and merging, the quick check, Compare and
Export give what a pair holding both models gives, bit for bit."""

from __future__ import annotations

import gc
import types

import pandas as pd
import pytest
import torch
from PIL import Image

from tailor_ui.checkpoint import Checkpoint, LazyWeights
from tailor_ui.control import never_stop, no_progress
from tailor_ui.data import read_calibration
from tailor_ui.evaluation.sets import EvalSpec
from tailor_ui.pair import load_pair
from tailor_ui.app.service import export
from tailor_ui.app.service.compare import model_answers
from tailor_ui.app.service.pairs import load_handle
from tailor_ui.app.service.tailor import tailor_run
from tailor_ui.app.session import PairHandle
from tailor_ui.settings import Settings

_OPAQUE = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
           types.CodeType, type(len), types.FrameType)


def tensor_bytes(root: object) -> int:
    """Bytes of the distinct tensor storages reachable from `root` through instances and
    containers (not through classes, modules or functions, which reach the whole process)."""
    seen, storages, stack = set(), {}, [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _OPAQUE):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
            continue
        stack.extend(gc.get_referents(obj))
    return sum(storages.values())


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(torch.uint8), b[n].contiguous().view(torch.uint8)) for n in a)


@pytest.fixture(scope="module")
def handles(disk_pair):
    """The dashboard's handle of the tiny pair (lazy) and one holding both models."""
    lazy = load_handle(str(disk_pair / "base"), str(disk_pair / "ft"), "cpu", no_progress, lambda: None)
    loaded = load_pair(str(disk_pair / "base"), [str(disk_pair / "ft")])
    return {"lazy": lazy, "loaded": PairHandle(pair=loaded, label="loaded", shared=False, lane="cpu",
                                               summary=loaded.summary())}


def test_an_own_pair_holds_one_model_and_reads_the_fine_tuned_one(handles, disk_pair):
    lazy = handles["lazy"].pair
    assert isinstance(lazy.finetuned[0], LazyWeights) and lazy.base_checkpoint is not None
    with Checkpoint(disk_pair / "base") as checkpoint:
        model_bytes = sum(t.nbytes for t in checkpoint.tensors.values())
    held = tensor_bytes(handles["lazy"])
    assert model_bytes <= held < 1.2 * model_bytes  # the base (and its buffers), nothing more
    assert tensor_bytes(handles["loaded"]) > 1.9 * model_bytes  # what it held before: both
    pd.testing.assert_frame_equal(handles["lazy"].summary, handles["loaded"].summary)


def test_the_fine_tuned_model_is_the_base_holding_its_values_put_back_from_disk(handles):
    lazy, loaded = handles["lazy"].pair, handles["loaded"].pair
    before = snapshot(lazy.base)
    reads = sum(lazy.base_checkpoint.reads.values())
    with handles["lazy"].lock, lazy.finetuned_model(0) as model:
        assert model is lazy.base
        assert same_bits(snapshot(model), snapshot(loaded.finetuned[0]))
    assert same_bits(before, snapshot(lazy.base))
    # put back from the base's checkpoint, one read per changed tensor: no copy parked
    assert sum(lazy.base_checkpoint.reads.values()) - reads == len(lazy.changed()) > 0


def test_compare_quick_check_merges_and_export_match_a_pair_holding_both(handles, disk_pair, tmp_path):
    image = Image.new("RGB", (32, 32), (200, 40, 40))
    prompts = [(image, "how many shapes are there?"), (image, "what colour is it?")]
    examples = read_calibration(disk_pair / "calib.jsonl")
    sets = [EvalSpec(name="shapes", task="vqa", examples=tuple(examples), role="original")]
    results = {}
    for kind, handle in handles.items():
        before = snapshot(handle.pair.base)
        answers = model_answers(handle.pair, [], prompts, 6, no_progress, lock=handle.lock)
        runs = {s.method: tailor_run(handle, s, examples if s.method == "tailor" else [], "calib",
                                     s.method, None, batch_size=2, quick_examples=3, sets=sets,
                                     progress=no_progress, should_stop=never_stop)
                for s in (Settings(method="task_arithmetic", lam=0.7), Settings(method="tailor", keep=0.2))}
        folder = tmp_path / kind
        export.write_tailored(handle.pair, runs["tailor"].get_patch(), folder, no_progress, never_stop)
        with Checkpoint(folder) as saved:
            exported = {k: saved.read(k) for k in saved.keys}
        assert same_bits(before, snapshot(handle.pair.base))  # every path put the base back
        results[kind] = answers, runs, exported
    (answers, runs, exported), (answers0, runs0, exported0) = results["lazy"], results["loaded"]
    assert answers == answers0
    for method, run in runs.items():
        patch, patch0 = run.get_patch(), runs0[method].get_patch()
        assert patch.counts() == patch0.counts() and patch.num_entries > 0, method
        for name in patch0.shapes:
            a, b = patch.read(name), patch0.read(name)
            assert torch.equal(a.index, b.index) and torch.equal(a.values, b.values), (method, name)
        pd.testing.assert_frame_equal(run.quick, runs0[method].quick)
    assert same_bits(exported, exported0)


def test_a_hub_fine_tune_is_read_from_the_hub_cache_snapshot(disk_pair, monkeypatch):
    """A fine-tuned hub id is fetched as its safetensors and JSON files only (the snapshot in
    the hub cache) and read lazily from there, like a local folder."""
    import huggingface_hub

    asked = []

    def snapshot(repo_id, allow_patterns=None, **_):
        asked.append((repo_id, tuple(allow_patterns)))
        return str(disk_pair / "ft")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    pair = load_pair(str(disk_pair / "base"), ["someone/tiny-ft"], lazy=True)
    assert asked == [("someone/tiny-ft", ("*.safetensors", "*.json"))]
    assert isinstance(pair.finetuned[0], LazyWeights)
    loaded = load_pair(str(disk_pair / "base"), [str(disk_pair / "ft")])
    for name, param in loaded.finetuned[0].named_parameters():
        assert torch.equal(pair.finetuned_value(0, name).view(torch.uint8), param.detach().view(torch.uint8))
