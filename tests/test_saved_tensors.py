"""Every tensor of the base is in every saved model: the streamed merge, the streamed
patch, and the in-memory save (CLI --save-model, apply, the dashboard's zip) check the
written headers against the base checkpoint, and a save that lost a tensor leaves nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import tailor_ui.stream
from families import build_llava, finetune_like, llava_processor
from tailor_ui.checkpoint import SINGLE_NAME, Checkpoint, check_saved
from tailor_ui.engine import run_method
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.pair import load_model, load_pair
from tailor_ui.outputs import save_model, save_tailored
from tailor_ui.settings import Settings
from tailor_ui.stream import stream_apply_patch, stream_merge

VISION = "vision_tower.encoder.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved")
    base = build_llava(seed=0)
    base.save_pretrained(root / "base")
    llava_processor().save_pretrained(root / "base")
    finetune_like(base, r"^model\.language_model\.layers\.1\.", seed=1).save_pretrained(root / "ft")
    assert VISION in Checkpoint(root / "base").tensors
    return root


def drop(folder, key=VISION):
    """Remove one tensor from a written single-file checkpoint (a save that lost it)."""
    tensors = load_file(folder / SINGLE_NAME)
    del tensors[key]
    save_file(tensors, folder / SINGLE_NAME, metadata={"format": "pt"})


def test_every_save_path_accounts_for_every_tensor(models, tmp_path):
    n = len(Checkpoint(models / "base").tensors)
    report = stream_merge(models / "base", models / "ft", Settings(method="wise_ft"), tmp_path / "merged")
    assert report["tensors_checked"] == n
    pair = load_pair(str(models / "base"), [str(models / "ft")])
    patch = run_method(pair, Settings(method="magnitude", keep=0.2)).patch
    assert stream_apply_patch(models / "base", patch, tmp_path / "applied")["tensors_checked"] == n
    assert save_tailored(pair, patch, tmp_path / "in-memory") == n
    assert check_saved(models / "base", tmp_path / "merged") == n


def test_a_lost_or_changed_tensor_is_named(models, tmp_path):
    out = tmp_path / "copy"
    stream_merge(models / "base", models / "ft", Settings(method="wise_ft"), out)
    tensors = load_file(out / SINGLE_NAME)
    tensors[VISION] = tensors[VISION].half()
    save_file(tensors, out / SINGLE_NAME, metadata={"format": "pt"})
    with pytest.raises(UserError, match=rf"{VISION} is torch.float16 \[32, 32\], the base's torch.float32"):
        check_saved(models / "base", out)
    assert check_saved(models / "base", out, dtype=torch.float16) > 0  # a model loaded in float16
    drop(out)
    with pytest.raises(UserError, match=rf"does not hold every tensor of the base: {VISION} is missing"):
        check_saved(models / "base", out)


def test_a_streamed_save_that_drops_a_vision_tensor_leaves_nothing(models, tmp_path, monkeypatch):
    copy = tailor_ui.stream.copy_side_files

    def copy_and_lose(source, target):
        drop(target)
        return copy(source, target)

    monkeypatch.setattr(tailor_ui.stream, "copy_side_files", copy_and_lose)
    with pytest.raises(UserError, match=f"{VISION} is missing"):
        stream_merge(models / "base", models / "ft", Settings(method="wise_ft"), tmp_path / "merged")
    pair = load_pair(str(models / "base"), [str(models / "ft")])
    patch = run_method(pair, Settings(method="magnitude", keep=0.2)).patch
    with pytest.raises(UserError, match=f"{VISION} is missing"):
        stream_apply_patch(models / "base", patch, tmp_path / "applied")
    assert list(tmp_path.iterdir()) == []


def test_an_in_memory_save_that_drops_a_vision_tensor_leaves_nothing(models, tmp_path, monkeypatch):
    model, processor = load_model(str(models / "base"))
    save = type(model).save_pretrained

    def save_and_lose(self, folder, **kwargs):
        save(self, folder, **kwargs)
        drop(folder)

    monkeypatch.setattr(type(model), "save_pretrained", save_and_lose)
    with pytest.raises(UserError, match=f"{VISION} is missing"):
        with atomic_path(tmp_path / "out") as tmp:
            save_model(model, processor, tmp)
    assert list(tmp_path.iterdir()) == []
