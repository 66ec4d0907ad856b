"""The patch: diff, save → load → apply → revert round trips, unions, damaged files."""

import pytest
import torch

from tailor_ui.errors import UserError
from tailor_ui.patch import (Patch, applied, apply_patch, changed_entries, load_patch,
                             revert_patch, save_patch, tensor_patch, union)


def tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.LayerNorm(12),
                               torch.nn.Linear(12, 5)).to(dtype)


def state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bits_equal(a, b):
    return all(torch.equal(a[n].view(torch.uint8) if a[n].dtype != torch.uint8 else a[n],
                           b[n].view(torch.uint8)) for n in a)


def make_patch(base, tuned):
    b, t = dict(base.named_parameters()), dict(tuned.named_parameters())
    tensors = {n: tensor_patch(b[n].detach(), t[n].detach()) for n in b}
    return Patch(tensors={n: tp for n, tp in tensors.items() if tp.index.numel()},
                 metadata={"method": "test"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_apply_revert_is_bit_exact(tmp_path, dtype):
    base, tuned = tiny(dtype), tiny(dtype)
    with torch.no_grad():  # sparse changes, a negative zero and a NaN included
        tuned[0].weight.copy_(base[0].weight)
        tuned[0].weight[0, :5] += 1
        tuned[0].weight[1, 0] = -0.0 if base[0].weight[1, 0] == 0 else base[0].weight[1, 0] * -1
        tuned[2].bias[0] = float("nan")
    original, target = state(base), state(tuned)
    path = tmp_path / "p.safetensors"
    save_patch(make_patch(base, tuned), path)
    loaded = load_patch(path)
    assert loaded.metadata == {"method": "test"}
    applied = apply_patch(base, loaded)
    assert bits_equal(state(base), target)
    revert_patch(base, applied)
    assert bits_equal(state(base), original)


def test_applied_holds_the_patch_for_the_body_and_reverts_however_it_ends():
    base, tuned = tiny(), tiny(seed=1)
    original, target = state(base), state(tuned)
    patch = make_patch(base, tuned)
    with applied(base, patch) as model:
        assert model is base and bits_equal(state(base), target)
    assert bits_equal(state(base), original)
    with pytest.raises(RuntimeError), applied(base, patch):
        raise RuntimeError("the body failed")
    assert bits_equal(state(base), original)
    with applied(base, None) as model:  # no patch: the model as it is
        assert bits_equal(state(model), original)


def test_changed_entries_sees_sign_of_zero_and_nan():
    a = torch.tensor([0.0, 1.0, float("nan"), 2.0])
    b = torch.tensor([-0.0, 1.0, float("nan"), 3.0])
    assert changed_entries(a, b).tolist() == [0, 3]


def test_patch_holds_only_changed_entries():
    base, tuned = tiny(), tiny()
    with torch.no_grad():
        for p, q in zip(base.parameters(), tuned.parameters()):
            q.copy_(p)
        tuned[2].weight[3, 4] += 0.5
    patch = make_patch(base, tuned)
    assert patch.counts() == {"2.weight": 1}
    assert patch.tensors["2.weight"].index.tolist() == [3 * 12 + 4]


def test_apply_refuses_a_patch_for_another_model(tmp_path):
    base, tuned = tiny(), tiny(seed=1)
    patch = make_patch(base, tuned)
    other = torch.nn.Sequential(torch.nn.Linear(16, 12))
    with pytest.raises(UserError, match="lacks"):
        apply_patch(other, patch)
    wrong = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.LayerNorm(12), torch.nn.Linear(12, 5))
    with pytest.raises(UserError, match="shape"):
        apply_patch(wrong, patch)


def test_damaged_or_foreign_files_are_refused(tmp_path):
    base, tuned = tiny(), tiny(seed=1)
    path = tmp_path / "p.safetensors"
    save_patch(make_patch(base, tuned), path)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_patch(truncated)
    from safetensors.torch import save_file
    foreign = tmp_path / "f.safetensors"
    save_file({"x": torch.zeros(2)}, str(foreign))
    with pytest.raises(UserError, match="not a Model Tailor Studio patch"):
        load_patch(foreign)
    with pytest.raises(UserError, match="not found"):
        load_patch(tmp_path / "missing.safetensors")


def test_save_leaves_no_partial_file_when_writing_fails(tmp_path, monkeypatch):
    import tailor_ui.patch as patch_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(patch_module, "encode", broken)
    with pytest.raises(OSError):
        save_patch(make_patch(tiny(), tiny(seed=1)), tmp_path / "p.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rule, expected", [("mean", [2.0, 1.0, 0.0, 3.0]),
                                            ("sum", [4.0, 1.0, 0.0, 3.0]),
                                            ("first", [1.0, 1.0, 0.0, 3.0])])
def test_union_overlap_rules(rule, expected):
    base = {"w": torch.zeros(4)}
    first = Patch(tensors={"w": tensor_patch(base["w"], torch.tensor([1.0, 1.0, 0.0, 0.0]))})
    second = Patch(tensors={"w": tensor_patch(base["w"], torch.tensor([3.0, 0.0, 0.0, 3.0]))})
    merged = union([first, second], base, rule)
    result = base["w"].clone()
    result[merged.tensors["w"].index] = merged.tensors["w"].values
    assert result.tolist() == expected


def test_union_drops_entries_that_cancel_out():
    base = {"w": torch.zeros(3)}
    up = Patch(tensors={"w": tensor_patch(base["w"], torch.tensor([1.0, 0.0, 0.0]))})
    down = Patch(tensors={"w": tensor_patch(base["w"], torch.tensor([-1.0, 0.0, 2.0]))})
    merged = union([up, down], base, "sum")
    assert merged.tensors["w"].index.tolist() == [2]
