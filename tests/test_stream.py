"""Streaming merges and patch application over safetensors shards (tailor_ui.stream).

The reference is the in-memory engine: load the pair, `run_method`, `apply_patch`. The
streamed output must equal it bit for bit, on a tiny LLaVA whose checkpoint keys (legacy
`language_model.model.…`) differ from its parameter names (`model.language_model.…`),
saved in several shards with a different shard layout per model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from families import FAMILIES, build_llava, finetune_like, llava_batches
from tailor_ui.control import Cancelled
from tailor_ui.engine import run_method
from tailor_ui.errors import UserError
from tailor_ui.methods import REGISTRY
from tailor_ui.pair import load_pair
from tailor_ui.patch import (Patch, PatchFile, TensorPatch, apply_patch, load_patch, patch_writer,
                             revert_patch, save_patch)
from tailor_ui.settings import Settings
from tailor_ui.stream import stream_apply_patch, stream_merge
from tailor_ui.checkpoint import INDEX_NAME, Checkpoint, ShardedWriter, key_map

LAST_LAYER = r"^model\.language_model\.layers\.1\."
MLPS = r"^model\.language_model\.layers\.\d\.mlp\."


def _edges(base, tuned):
    """Entries that test the routing: a tensor differing only by the sign of a zero (equal
    values: unchanged, as the engine sees it) and a NaN (changed)."""
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    with torch.no_grad():
        bias = "model.multi_modal_projector.linear_1.bias"
        b[bias][0] = 0.0
        t[bias].copy_(b[bias])
        t[bias][0] = -0.0
        t["model.language_model.norm.weight"].copy_(b["model.language_model.norm.weight"])
        t["model.language_model.norm.weight"][3] = float("nan")


@pytest.fixture(scope="module")
def disk_models(tmp_path_factory):
    """base (4 shards), ft_a (one file), ft_b (other shards): float32 LLaVAs on disk."""
    root = tmp_path_factory.mktemp("stream")
    base = build_llava(seed=0)
    ft_a = finetune_like(base, LAST_LAYER, seed=1)
    ft_b = finetune_like(base, MLPS, seed=2)  # overlaps ft_a on layer 1's MLP
    _edges(base, ft_a)
    dirs = {}
    for name, model, shard in (("base", base, "40KB"), ("ft_a", ft_a, "50GB"), ("ft_b", ft_b, "70KB")):
        dirs[name] = root / name
        model.save_pretrained(dirs[name], max_shard_size=shard)
    assert (dirs["base"] / INDEX_NAME).exists() and not (dirs["ft_a"] / INDEX_NAME).exists()
    return dirs


@pytest.fixture(scope="module")
def pairs(disk_models):
    d = disk_models
    return {1: load_pair(str(d["base"]), [str(d["ft_a"])]),
            2: load_pair(str(d["base"]), [str(d["ft_a"]), str(d["ft_b"])])}


def _bits(t):
    return t.contiguous().view(torch.uint8) if t.dtype != torch.bool else t


def _streamed_params(folder, base_dir):
    """The streamed output read back by parameter name (through transformers' key mapping)."""
    ckpt = Checkpoint(folder)
    names = key_map(base_dir, ckpt.keys)
    with ckpt:
        return {names.param_of[k]: ckpt.read(k) for k in ckpt.keys if k in names.param_of}


def _assert_bit_equal(expected: dict, got: dict):
    assert set(expected) == set(got)
    bad = [n for n in expected if expected[n].dtype != got[n].dtype
           or not torch.equal(_bits(expected[n]), _bits(got[n]))]
    assert not bad, f"differ: {bad[:5]}"


def _in_memory(pair, settings):
    result = run_method(pair, settings)
    applied = apply_patch(pair.base, result.patch)
    try:
        return {n: p.detach().clone() for n, p in pair.base.named_parameters()}, result
    finally:
        revert_patch(pair.base, applied)


CASES = [
    (1, Settings(method="magnitude", keep=0.2)),
    (1, Settings(method="magnitude", keep=0.3, scope="row", others="linear")),
    (1, Settings(method="wise_ft", lam=0.3)),
    (1, Settings(method="dare", keep=0.4, seed=3)),
    (1, Settings(method="task_arithmetic", lam=0.7, others="base")),
    (1, Settings(method="ties", keep=0.25, lam=0.9)),
    (1, Settings(method="magnitude", keep=0.1, modules=r"mlp\.(up|down)_proj")),
    (2, Settings(method="task_arithmetic", lam=0.5)),
    (2, Settings(method="task_arithmetic", others="linear")),
    (2, Settings(method="ties", keep=0.3, others="linear")),
    (2, Settings(method="ties", keep=0.2, others="finetuned")),
    (2, Settings(method="magnitude", keep=0.2, overlap="mean")),
    (2, Settings(method="dare", keep=0.5, overlap="sum")),
    (2, Settings(method="wise_ft", lam=0.6, overlap="first", others="linear")),
]


@pytest.mark.parametrize("n_models,settings", CASES,
                         ids=[f"{n}x-{s.method}-{s.others}-{s.overlap}-{s.modules or 'all'}"
                              for n, s in CASES])
def test_streaming_merge_equals_in_memory_merge_bit_exactly(disk_models, pairs, tmp_path,
                                                           n_models, settings):
    d = disk_models
    tuned = [d["ft_a"], d["ft_b"]][:n_models]
    # small chunks, so element-wise merges run in several pieces per tensor
    report = stream_merge(d["base"], tuned, settings, tmp_path / "out", max_shard_bytes=60_000,
                          chunk_elems=1000)
    expected, result = _in_memory(pairs[n_models], settings)
    _assert_bit_equal(expected, _streamed_params(tmp_path / "out", d["base"]))
    # the report counts what changed like the patch does
    assert report["patch_entries"] == result.patch.num_entries
    assert {n: t["changed"] for n, t in report["tensors"].items()} == result.patch.counts()


PART_CASES = [
    (1, Settings(method="task_arithmetic", lam=0.7, others="base")),
    (2, Settings(method="task_arithmetic", others="linear")),
    (2, Settings(method="wise_ft", lam=0.6, overlap="first", others="linear")),
    (1, Settings(method="magnitude", keep=0.3, others="finetuned")),
]


@pytest.mark.parametrize("n_models,settings", PART_CASES,
                         ids=[f"{n}x-{s.method}-{s.others}" for n, s in PART_CASES])
def test_tensors_merged_in_parts_equal_the_whole_tensor_merge(disk_models, pairs, tmp_path, monkeypatch,
                                                              n_models, settings):
    """Element-wise merges without a patch read, merge and write larger tensors in parts;
    the output is the in-memory merge's bit for bit, the unchanged -0.0 and the NaN of
    `_edges` included (parts of 16 entries split every tensor but the smallest)."""
    import tailor_ui.stream as stream

    monkeypatch.setattr(stream, "PART_ELEMS", 16)
    d = disk_models
    tuned = [d["ft_a"], d["ft_b"]][:n_models]
    report = stream_merge(d["base"], tuned, settings, tmp_path / "out", max_shard_bytes=60_000,
                          chunk_elems=5)
    assert report["tensors_in_parts"] > report["tensors_total"] // 2
    expected, result = _in_memory(pairs[n_models], settings)
    _assert_bit_equal(expected, _streamed_params(tmp_path / "out", d["base"]))
    assert {n: t["changed"] for n, t in report["tensors"].items()} == result.patch.counts()
    if REGISTRY[settings.method].elementwise:  # every tensor goes in parts (magnitude's linears whole)
        assert report["memory"]["largest_tensor_mb"] == pytest.approx(16 * 4 / 2**20)


def test_streamed_folder_is_a_loadable_model_with_the_base_layout(disk_models, tmp_path):
    d = disk_models
    report = stream_merge(d["base"], d["ft_a"], Settings(method="task_arithmetic"), tmp_path / "out",
                          max_shard_bytes=50_000)
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and set(report["files"]) >= set(shards) | {INDEX_NAME, "config.json"}
    base = Checkpoint(d["base"])
    assert set(index["weight_map"]) == set(base.tensors)  # the base's legacy keys, as saved
    size = 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as handle:  # the reference reader accepts it
            assert handle.metadata() == {"format": "pt"}
            for key in handle.keys():
                t = handle.get_tensor(key)
                assert t.dtype == base.tensors[key].dtype and tuple(t.shape) == base.tensors[key].shape
                size += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == size
    assert (out / "config.json").read_text() == (d["base"] / "config.json").read_text()
    model = AutoModelForImageTextToText.from_pretrained(out)
    _assert_bit_equal({n: p.detach() for n, p in model.named_parameters()},
                      _streamed_params(out, d["base"]))


def test_peak_memory_accounting_is_in_the_report(disk_models, tmp_path):
    """The run stays under its predicted peak, and the one-tensor bound is the closed form
    for TIES over two models."""
    d = disk_models
    report = stream_merge(d["base"], [d["ft_a"], d["ft_b"]], Settings(method="ties"), tmp_path / "o")
    memory = report["memory"]
    assert memory["peak_measured_from"] == "run start"
    assert 0 < memory["rss_at_start_mb"] <= memory["cpu_peak_rss_mb"] <= memory["predicted_peak_mb"]
    largest = max(Checkpoint(d["base"]).tensors.values(), key=lambda i: i.nbytes)
    n, b = torch.Size(largest.shape).numel(), largest.dtype.itemsize
    assert memory["largest_tensor_mb"] == pytest.approx(n * b / 2**20)
    # base and two models in storage, b·3 per entry; TIES runs by chunks of 2^18 entries with
    # 4 bytes × (3·2 + 4 + 4·2) = 72 of float32 temporaries per chunk entry
    assert memory["one_tensor_bound_mb"] * 2**20 == pytest.approx(3 * n * b + 72 * min(n, 2**18))
    assert set(report["timings_s"]) >= {"read", "merge", "write", "total"}
    assert "gpu_peak_allocated_mb" not in memory or torch.cuda.is_available()
    applied = stream_apply_patch(d["base"], Patch(tensors={}), tmp_path / "p")
    assert applied["memory"]["cpu_peak_rss_mb"] > 0


# Each family's linear layers as its architecture defines them (two layers per stack in
# tests/families.py): (prefix with {i} for the layer, suffixes); lm_head is never one.
_QFORMER = ("attention.attention.query", "attention.attention.key", "attention.attention.value",
            "attention.output.dense", "crossattention.attention.query", "crossattention.attention.key",
            "crossattention.attention.value", "crossattention.output.dense",
            "intermediate_query.dense", "output_query.dense")
_LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_CLIP = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
_BLIP = ("self_attn.qkv", "self_attn.projection", "mlp.fc1", "mlp.fc2")
_LINEARS = {
    "llava": [("model.vision_tower.encoder.layers.{i}", _CLIP),
              ("model.multi_modal_projector", ("linear_1", "linear_2")),
              ("model.language_model.layers.{i}", _LLAMA)],
    "qwen2_vl": [("model.visual.blocks.{i}", ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")),
                 ("model.visual.merger.mlp", ("0", "2")), ("model.language_model.layers.{i}", _LLAMA)],
    "instructblip": [("vision_model.encoder.layers.{i}", _BLIP),
                     ("qformer.encoder.layer.{i}", _QFORMER + ("intermediate.dense", "output.dense")),
                     ("", ("language_projection",)), ("language_model.model.layers.{i}", _LLAMA)],
    "blip2": [("vision_model.encoder.layers.{i}", _BLIP), ("qformer.encoder.layer.{i}", _QFORMER),
              ("", ("language_projection",)),
              ("language_model.model.decoder.layers.{i}", _CLIP[:4] + ("fc1", "fc2"))],
    "idefics3": [("model.vision_model.encoder.layers.{i}", _CLIP),
                 ("model.connector.modality_projection", ("proj",)), ("model.text_model.layers.{i}", _LLAMA)],
}


def _expected_linears(family: str) -> set[str]:
    out = set()
    for prefix, suffixes in _LINEARS[family]:
        for i in (0, 1) if "{i}" in prefix else (None,):
            stem = prefix.format(i=i)
            out |= {f"{stem}.{s}.weight" if stem else f"{s}.weight" for s in suffixes}
    return out


def _assert_same_map(a, b, label):
    for field in ("param_of", "key_of", "converted", "linears", "tied", "architecture"):
        assert getattr(a, field) == getattr(b, field), f"{label}: {field}"


def _resave(source: Path, target: Path, rename=lambda k: k, add=None) -> None:
    """A copy of a checkpoint folder with its keys renamed (and tensors added): how other
    transformers versions or tools save the same model."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    state = {}
    for file in sorted(source.glob("*.safetensors")):
        state.update(load_file(file))
    state = {rename(k): v for k, v in state.items()}
    state.update((add or (lambda s: {}))(state))
    save_file(state, target / "model.safetensors", metadata={"format": "pt"})


def test_key_map_from_headers_equals_transformers_own_for_every_family(tmp_path, monkeypatch):
    """config.json and the headers give the map the model class gives, for every family,
    without the class: every checkpoint key maps to exactly one parameter."""
    import tailor_ui.checkpoint as checkpoint

    for name, family in FAMILIES.items():
        model = family.build()
        model.save_pretrained(tmp_path / name, max_shard_size="60KB")
        ckpt = Checkpoint(tmp_path / name)
        names = key_map(tmp_path / name, ckpt.keys)
        _assert_same_map(names, checkpoint.class_key_map(tmp_path / name, ckpt.keys), name)
        params = dict(model.named_parameters())
        assert set(names.param_of.values()) == set(params), name
        assert not names.converted
        for key, param in names.param_of.items():
            assert ckpt.tensors[key].shape == tuple(params[param].shape)
        assert names.linears == _expected_linears(name), name
    llava = key_map(tmp_path / "llava", Checkpoint(tmp_path / "llava").keys)
    assert llava.key_of["model.language_model.layers.0.self_attn.q_proj.weight"] == \
        "language_model.model.layers.0.self_attn.q_proj.weight"
    assert llava.key_of["lm_head.weight"] == "language_model.lm_head.weight"

    # older layouts: LLaVA-1.5's CLIP tower under `vision_model.` (placed by the class: a
    # fallback), and BLIP-2 with its tied head saved beside the embedding
    _resave(tmp_path / "llava", tmp_path / "llava15",
            rename=lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    _resave(tmp_path / "blip2", tmp_path / "blip2_head", add=lambda s: {
        "language_model.lm_head.weight": s["language_model.model.decoder.embed_tokens.weight"].clone()})
    for name in ("llava15", "blip2_head"):
        keys = Checkpoint(tmp_path / name).keys
        _assert_same_map(key_map(tmp_path / name, keys), checkpoint.class_key_map(tmp_path / name, keys), name)
    assert key_map(tmp_path / "blip2_head", Checkpoint(tmp_path / "blip2_head").keys).tied == {
        "language_model.model.decoder.embed_tokens.weight"}

    # the families need no model class: building one fails the test
    monkeypatch.setattr(checkpoint, "class_key_map", lambda *a: pytest.fail("model class used"))
    for name in FAMILIES:
        key_map(tmp_path / name, Checkpoint(tmp_path / name).keys)


def test_streamed_merge_imports_no_model_class(disk_models, tmp_path):
    """The data-free command's start-up: no transformers model class, no modeling stack."""
    d = disk_models
    code = (
        "import sys\n"
        "from tailor_ui.settings import Settings\n"
        "from tailor_ui.stream import stream_merge\n"
        f"stream_merge({str(d['base'])!r}, [{str(d['ft_a'])!r}], Settings(method='task_arithmetic'), "
        f"{str(tmp_path / 'out')!r})\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') "
        "or m == 'transformers.modeling_utils'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("source", ["loaded", "file"])
def test_stream_apply_patch_equals_apply_patch(disk_models, pairs, tmp_path, source):
    d = disk_models
    pair = pairs[2]
    result = run_method(pair, Settings(method="magnitude", keep=0.15))
    save_patch(result.patch, tmp_path / "patch.safetensors")
    patch = load_patch(tmp_path / "patch.safetensors")
    assert any(not Checkpoint(d["base"]).tensors.get(n) for n in patch.tensors)  # names ≠ keys
    # a PatchFile is read tensor by tensor as the stream reaches each tensor
    given = patch if source == "loaded" else PatchFile(tmp_path / "patch.safetensors")
    report = stream_apply_patch(d["base"], given, tmp_path / "out", max_shard_bytes=80_000)
    applied = apply_patch(pair.base, patch)
    try:
        expected = {n: p.detach().clone() for n, p in pair.base.named_parameters()}
    finally:
        revert_patch(pair.base, applied)
    _assert_bit_equal(expected, _streamed_params(tmp_path / "out", d["base"]))
    assert report["patch_entries"] == patch.num_entries


def test_stream_apply_patch_refuses_a_patch_for_another_model(disk_models, tmp_path):
    d = disk_models
    stranger = Patch(tensors={"model.nowhere.weight": TensorPatch(torch.tensor([0]), torch.tensor([1.0]), (2,))})
    with pytest.raises(UserError, match="lacks"):
        stream_apply_patch(d["base"], stranger, tmp_path / "a")
    name = "model.language_model.norm.weight"
    wrong = Patch(tensors={name: TensorPatch(torch.tensor([0]), torch.tensor([1.0]), (7,))})
    with pytest.raises(UserError, match="shape"):
        stream_apply_patch(d["base"], wrong, tmp_path / "b")
    outside = Patch(tensors={name: TensorPatch(torch.tensor([10**6]), torch.tensor([1.0]), (32,))})
    with pytest.raises(UserError, match="outside"):
        stream_apply_patch(d["base"], outside, tmp_path / "c")
    assert not any(tmp_path.iterdir())


def test_mismatched_checkpoints_are_listed(disk_models, tmp_path):
    d = disk_models
    build_llava(seed=0, layers=3).save_pretrained(tmp_path / "deeper")
    with pytest.raises(UserError, match=r"do not match: .*only in deeper"):
        stream_merge(d["base"], tmp_path / "deeper", Settings(method="wise_ft"), tmp_path / "o1")
    build_llava(seed=0, intermediate=48).save_pretrained(tmp_path / "narrower")
    with pytest.raises(UserError, match=r"mlp\.\w+_proj\.weight: base \(\d+, \d+\) vs narrower"):
        stream_merge(d["base"], tmp_path / "narrower", Settings(method="wise_ft"), tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no safetensors"):
        stream_merge(d["base"], tmp_path / "empty", Settings(method="wise_ft"), tmp_path / "o3")
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir())


def test_bad_requests_write_nothing(disk_models, tmp_path):
    d = disk_models
    with pytest.raises(UserError, match="calibration"):
        stream_merge(d["base"], d["ft_a"], Settings(method="tailor"), tmp_path / "o")
    with pytest.raises(UserError, match="no changed linear layer matches"):
        stream_merge(d["base"], d["ft_a"], Settings(method="magnitude", modules="vision_tower"),
                     tmp_path / "o")
    calls = []
    with pytest.raises(Cancelled):
        stream_merge(d["base"], d["ft_a"], Settings(method="wise_ft"), tmp_path / "o",
                     progress=lambda *a: calls.append(a), should_stop=lambda: len(calls) > 5)
    with pytest.raises(UserError, match="no GPU") if not torch.cuda.is_available() else \
            pytest.raises(UserError, match="unknown device"):
        stream_merge(d["base"], d["ft_a"], Settings(method="wise_ft"), tmp_path / "o",
                     device="cuda" if not torch.cuda.is_available() else "tpu")
    assert list(tmp_path.iterdir()) == []


def test_writer_checks_order_and_completeness(tmp_path):
    layout = [("a", torch.float16, (3, 4)), ("b", torch.bfloat16, (5,)), ("c", torch.int64, ()),
              ("d", torch.bool, (2, 2)), ("e", torch.float32, (0, 3))]
    tensors = {"a": torch.randn(3, 4).half(), "b": torch.randn(5).bfloat16(), "c": torch.tensor(7),
               "d": torch.tensor([[True, False], [False, True]]), "e": torch.empty(0, 3)}
    writer = ShardedWriter(tmp_path / "w", layout, max_shard_bytes=30)
    with pytest.raises(ValueError, match="expected a"):
        writer.write("b", tensors["b"])
    for key in "abcd":
        writer.write(key, tensors[key])
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    writer.write("e", tensors["e"])
    writer.close()
    ckpt = Checkpoint(tmp_path / "w")
    assert len(writer.files) > 1 and ckpt.keys == list("abcde")
    with ckpt:
        for key, t in tensors.items():
            got = ckpt.read(key)
            assert got.dtype == t.dtype and torch.equal(got, t)
    for name in writer.files:
        with open(tmp_path / "w" / name, "rb") as handle:
            assert (8 + int.from_bytes(handle.read(8), "little")) % 8 == 0


def test_streamed_model_runs_through_accelerate_device_maps(disk_models, pairs, tmp_path):
    """The streamed output loads and computes the same on the CPU and with a layer offloaded
    to disk through accelerate; the engine's `device="auto"` path runs on the CPU too."""
    d = disk_models
    settings = Settings(method="dare", keep=0.5)
    stream_merge(d["base"], d["ft_b"], settings, tmp_path / "out")  # ft_b: no NaN to spread
    batch = llava_batches(pairs[1].base.config, 1)[0]
    on_cpu = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", device_map={"": "cpu"})
    offload = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
               "model.language_model.embed_tokens": "cpu", "model.language_model.layers.0": "cpu",
               "model.language_model.layers.1": "disk", "model.language_model.norm": "cpu",
               "model.language_model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForImageTextToText.from_pretrained(
        tmp_path / "out", device_map=offload, offload_folder=str(tmp_path / "offload"))
    assert offloaded.hf_device_map["model.language_model.layers.1"] == "disk"
    with torch.no_grad():
        logits = on_cpu(**batch).logits
        assert torch.isfinite(logits).all() and torch.equal(logits, offloaded(**batch).logits)
    auto = load_pair(str(d["base"]), [str(d["ft_b"])], device="auto")
    expected, _ = _in_memory(auto, settings)
    _assert_bit_equal(expected, _streamed_params(tmp_path / "out", d["base"]))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_stream_in_their_dtype(tmp_path, dtype):
    base = build_llava(seed=4).to(getattr(torch, dtype))
    tuned = finetune_like(base, MLPS, scale=0.05, seed=5)
    base.save_pretrained(tmp_path / "base", max_shard_size="30KB")
    tuned.save_pretrained(tmp_path / "ft")
    pair = load_pair(str(tmp_path / "base"), [str(tmp_path / "ft")], dtype=dtype)
    for settings in (Settings(method="ties", keep=0.3, others="linear"),
                     Settings(method="task_arithmetic", lam=0.7, others="linear")):
        out = tmp_path / settings.method
        stream_merge(tmp_path / "base", tmp_path / "ft", settings, out, chunk_elems=500)
        expected, _ = _in_memory(pair, settings)
        got = _streamed_params(out, tmp_path / "base")
        assert all(t.dtype == getattr(torch, dtype) for t in got.values())
        _assert_bit_equal(expected, got)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_compute_matches_cpu(disk_models, tmp_path):
    d = disk_models
    for method in ("task_arithmetic", "wise_ft", "dare"):  # elementwise: the same on both
        settings = Settings(method=method)
        cpu = stream_merge(d["base"], d["ft_a"], settings, tmp_path / f"{method}-cpu")
        gpu = stream_merge(d["base"], d["ft_a"], settings, tmp_path / f"{method}-gpu", device="cuda")
        assert "gpu_peak_allocated_mb" in gpu["memory"] and cpu["patch_entries"] == gpu["patch_entries"]
        _assert_bit_equal(_streamed_params(tmp_path / f"{method}-cpu", d["base"]),
                          _streamed_params(tmp_path / f"{method}-gpu", d["base"]))


@pytest.mark.parametrize("settings, part_elems", [(Settings(method="ties", keep=0.3), None),
                                                 (Settings(method="task_arithmetic", lam=0.6, others="linear"), 16),
                                                 (Settings(method="magnitude", keep=0.05, others="finetuned"), 64)],
                         ids=["whole", "parts", "sparse-parts"])
def test_a_streamed_patch_file_equals_the_collected_patch_saved(disk_models, tmp_path, monkeypatch, settings,
                                                                part_elems):
    """A `patch_writer` takes each tensor's entries into the file as the merge makes them,
    in parts where the merge reads the tensor in parts: the same bytes as collecting the
    patch in memory (tensors whole) and saving it."""
    import tailor_ui.stream as stream

    if part_elems:
        monkeypatch.setattr(stream, "PART_ELEMS", part_elems)
    d = disk_models
    collected = Patch(tensors={})
    stream_merge(d["base"], [d["ft_a"], d["ft_b"]], settings, None, patch=collected, chunk_elems=40)
    save_patch(collected, tmp_path / "collected.safetensors")
    with patch_writer(tmp_path / "streamed.safetensors") as writer:
        report = stream_merge(d["base"], [d["ft_a"], d["ft_b"]], settings, None, patch=writer, chunk_elems=40)
    assert (report["tensors_in_parts"] > 0) == bool(part_elems)
    assert writer.counts() == collected.counts() and collected.num_entries > 0
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "collected.safetensors").read_bytes()


def _large_pair(root, n_models: int) -> list:
    """A 106M-parameter Llama (fp16, hidden 1024, 8 layers, 8k vocabulary) and fine-tuned
    copies with every entry moved, written tensor by tensor (values from cheap integer
    hashing: random normals for 100M entries take minutes on a busy machine)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=8000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        layout = [(k, torch.float16, tuple(t.shape)) for k, t in LlamaForCausalLM(config).state_dict().items()]
    folders = [root / name for name in ["base"] + [f"ft{k}" for k in range(n_models)]]
    writers = []
    for folder in folders:
        config.save_pretrained(folder)
        writers.append(ShardedWriter(folder, layout, 2**28))
    for t, (key, _, shape) in enumerate(layout):
        ints = torch.arange(torch.Size(shape).numel(), dtype=torch.int64) + 7919 * t
        base = ((ints * 2654435761 % 65521).float() / 65521 - 0.5).half().reshape(shape)
        writers[0].write(key, base)
        for k, writer in enumerate(writers[1:]):
            writer.write(key, base + ((ints * (40503 + k) % 251).float() / 251e2 - 0.004).half().reshape(shape))
    for writer in writers:
        writer.close()
    return folders


@pytest.mark.parametrize("method, models, with_patch", [("task_arithmetic", 1, True),
                                                        ("ties", 2, False), ("dare", 1, False)])
def test_measured_peak_stays_under_the_predicted_peak(tmp_path, method, models, with_patch):
    """On a ≥ 100M-parameter pair, what the report predicts is an upper bound of what the
    run held (the three pipeline stages in flight, the patch's buffers, each method's
    temporaries), and not a loose one."""
    base, *tuned = _large_pair(tmp_path, models)
    assert sum(i.nbytes for i in Checkpoint(base).tensors.values()) > 2e8
    # in a fresh process: memory an earlier test freed but the allocator kept would hide
    # this run's growth from its RSS
    script = (
        "import json, sys\n"
        "from contextlib import nullcontext\n"
        "from tailor_ui.patch import patch_writer\n"
        "from tailor_ui.settings import Settings\n"
        "from tailor_ui.stream import stream_merge\n"
        f"with patch_writer({str(tmp_path / 'patch.safetensors')!r}) if {with_patch} else nullcontext() as patch:\n"
        f"    report = stream_merge({str(base)!r}, {[str(t) for t in tuned]!r},\n"
        f"                          Settings(method={method!r}, keep=0.2, others='linear'),\n"
        f"                          {str(tmp_path / 'out')!r}, patch=patch)\n"
        "print(json.dumps(report['memory']))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    memory = json.loads(run.stdout.strip().splitlines()[-1])
    used = memory["cpu_peak_rss_mb"] - memory["rss_at_start_mb"]
    bound = memory["predicted_peak_mb"] - memory["rss_at_start_mb"]
    assert memory["largest_tensor_mb"] < used <= bound < 4 * used
