"""The patch file: each encoding chosen where it is smallest, bit-exact round trips (every
encoding, empty, all kept, 1-D, fp16/bf16), format-1 files still read, streamed writing."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tailor_ui.errors import UserError
from tailor_ui.patch import (LEGACY_FORMAT, MaskedPatch, Patch, PatchFile, TensorPatch, encode, header_room,
                             _masked_encoding, load_patch, pack_mask, patch_writer, save_patch)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {4: torch.int32, 2: torch.int16}


def same(a: TensorPatch, b: TensorPatch) -> bool:
    view = INT_VIEW[a.values.element_size()]
    return (a.shape == b.shape and a.values.dtype == b.values.dtype and torch.equal(a.index, b.index)
            and torch.equal(a.values.view(view), b.values.view(view)))


def random_patch(shape, count, dtype, seed=0) -> TensorPatch:
    gen = torch.Generator().manual_seed(seed)
    numel = int(torch.Size(shape).numel())
    index = torch.randperm(numel, generator=gen)[:count].sort().values
    values = torch.randn(count, generator=gen).to(dtype)
    if count:  # a negative zero and a NaN must survive bit for bit
        values[0] = -0.0
        values[-1] = float("nan")
    return TensorPatch(index=index, values=values, shape=tuple(shape))


def round_trip(tmp_path, tp: TensorPatch, name="w") -> TensorPatch:
    path = tmp_path / "p.safetensors"
    save_patch(Patch(tensors={name: tp}, metadata={"method": "test"}), path)
    loaded = load_patch(path)
    assert loaded.metadata == {"method": "test"}
    return loaded.tensors[name]


def spaced_patch(shape, count, spacing, dtype) -> TensorPatch:
    """`count` entries at positions 0, spacing, 2·spacing, …, random values."""
    values = random_patch((count,), count, dtype).values
    return TensorPatch(index=torch.arange(count) * spacing, values=values, shape=tuple(shape))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, count, spacing, encoding, overhead", [
    # overhead: stored bytes beyond the values, by hand (a mask is numel/8 bytes rounded up;
    # gaps take count − 1 integers of the narrowest width holding the largest gap)
    ((64, 64), 0, 1, "gaps", 0),          # empty
    ((64, 64), 1, 1, "gaps", 0),          # one entry: its position is in the header
    ((64, 64), 40, 100, "gaps", 39),      # sparse: 39 one-byte gaps against a 512-byte mask
    ((512, 64), 20, 1000, "gaps", 38),    # gaps of 1000 take two bytes each: 38 against 4096
    ((64, 64), 2000, 2, "mask", 512),     # half kept: 1999 gaps would take more than the mask
    ((64, 64), 4096, 1, "dense", 0),      # all kept: values alone
    ((4096,), 4095, 1, "mask", 512),      # 1-D, all but one
    ((7,), 7, 1, "dense", 0),             # 1-D, shorter than a mask byte
    ((3, 5, 7), 9, 11, "gaps", 8),        # 3-D: 8 gaps against a 14-byte mask
])
def test_each_encoding_is_chosen_where_smallest_and_round_trips(tmp_path, dtype, shape, count, spacing,
                                                                encoding, overhead):
    tp = spaced_patch(shape, count, spacing, dtype)
    entry, parts = encode(tp)
    assert entry["encoding"] == encoding
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert stored == overhead + count * tp.values.element_size()
    assert same(round_trip(tmp_path, tp), tp)


def test_gaps_take_the_narrowest_integer_width():
    for spacing, width in [(200, torch.uint8), (300, torch.int16), (40_000, torch.int32)]:
        tp = TensorPatch(index=torch.arange(0, 10 * spacing, spacing), values=torch.ones(10),
                         shape=(10 * spacing,))
        assert encode(tp)[1]["gaps"].dtype == width


def test_a_patch_never_outweighs_its_values_by_more_than_a_bit_per_entry():
    """Whatever is kept, the stored bytes stay under one copy of the kept values plus one
    bit per entry of the tensor (the mask), and at one copy when everything is kept."""
    for count in (0, 1, 100, 2048, 4000, 4095, 4096):
        tp = random_patch((4096,), count, torch.float16)
        _, parts = encode(tp)
        stored = sum(t.numel() * t.element_size() for t in parts.values())
        assert stored <= 2 * count + 4096 // 8
        if count == 4096:
            assert stored == 2 * 4096


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=3), fraction=st.floats(0, 1),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_round_trips_are_bit_exact(tmp_path_factory, shape, fraction, dtype, seed):
    numel = int(torch.Size(shape).numel())
    tp = random_patch(shape, round(fraction * numel), dtype, seed)
    assert same(round_trip(tmp_path_factory.mktemp("p"), tp), tp)


def test_unsorted_positions_are_stored_sorted_with_their_values(tmp_path):
    tp = TensorPatch(index=torch.tensor([9, 2, 5]), values=torch.tensor([1.0, 2.0, 3.0]), shape=(10,))
    back = round_trip(tmp_path, tp)
    assert back.index.tolist() == [2, 5, 9] and back.values.tolist() == [2.0, 3.0, 1.0]
    with pytest.raises(ValueError, match="twice"):
        encode(TensorPatch(index=torch.tensor([3, 3]), values=torch.ones(2), shape=(10,)))


def legacy_file(path, patch: Patch) -> None:
    """A file as format 1 wrote it: int32 flat positions and values per tensor."""
    tensors, shapes = {}, {}
    for name, tp in patch.tensors.items():
        tensors[f"{name}::index"] = tp.index.to(torch.int32)
        tensors[f"{name}::values"] = tp.values
        shapes[name] = list(tp.shape)
    header = {"format": LEGACY_FORMAT, "shapes": shapes, "metadata": patch.metadata}
    save_file(tensors, str(path), metadata={"tailor_ui": json.dumps(header)})


def test_format_1_files_are_still_read(tmp_path):
    patch = Patch(tensors={"a.weight": random_patch((8, 8), 20, torch.float16),
                           "b.bias": random_patch((8,), 8, torch.bfloat16, seed=1)},
                  metadata={"method": "ties"})
    legacy_file(tmp_path / "old.safetensors", patch)
    file = PatchFile(tmp_path / "old.safetensors")
    assert file.counts() == {"a.weight": 20, "b.bias": 8} and file.num_entries == 28
    loaded = load_patch(tmp_path / "old.safetensors")
    assert loaded.metadata == {"method": "ties"}
    assert all(same(loaded.tensors[n], patch.tensors[n]) for n in patch.tensors)
    save_patch(loaded, tmp_path / "new.safetensors")  # and rewritten in the new format
    again = load_patch(tmp_path / "new.safetensors")
    assert all(same(again.tensors[n], patch.tensors[n]) for n in patch.tensors)


def test_damaged_entries_are_refused(tmp_path):
    patch = Patch(tensors={"w": random_patch((8, 8), 5, torch.float32)})
    legacy = Patch(tensors={"w": TensorPatch(index=torch.tensor([70]), values=torch.ones(1), shape=(8, 8))})
    legacy_file(tmp_path / "out.safetensors", legacy)
    with pytest.raises(UserError, match="damaged: w: positions outside"):
        load_patch(tmp_path / "out.safetensors")
    path = tmp_path / "p.safetensors"
    save_patch(patch, path)
    tensors = {"w::values": torch.ones(5)}  # the gaps are gone
    meta = PatchFile(path).entries
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata={"tailor_ui": json.dumps(
        {"format": "tailor_ui.patch/2", "tensors": meta, "metadata": {}})})
    with pytest.raises(UserError, match="damaged: tensor w is incomplete"):
        PatchFile(tmp_path / "cut.safetensors")


def test_streamed_writer_appends_tensor_by_tensor_and_leaves_nothing_on_failure(tmp_path):
    path = tmp_path / "p.safetensors"
    parts = {f"layer{i}": random_patch((32, 32), 100 * i, torch.float16, seed=i) for i in range(4)}
    with patch_writer(path) as writer:
        for name, tp in parts.items():
            writer.add(name, tp)
            assert not path.exists()  # complete at the end of the body, not before
        writer.metadata = {"counts": writer.counts()}
    loaded = load_patch(path)
    assert loaded.metadata == {"counts": {n: tp.index.numel() for n, tp in parts.items()}}
    assert all(same(loaded.tensors[n], tp) for n, tp in parts.items())
    with pytest.raises(RuntimeError), patch_writer(tmp_path / "q.safetensors") as writer:
        writer.add("layer1", parts["layer1"])
        raise RuntimeError("the merge failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


@pytest.mark.parametrize("room", [0, 64, None])
def test_the_header_goes_in_its_room_or_the_data_moves_behind_it(tmp_path, room):
    """Room enough (`header_room`'s estimate) for data 16 times larger: the data stays where
    it was written; too little room: it is moved; the file reads the same either way."""
    parts = {f"layer{i}": random_patch((512, 512), 50_000 * i, torch.bfloat16, seed=i) for i in range(3)}
    estimated = room is None
    room = header_room(parts) if estimated else room
    with patch_writer(tmp_path / "p.safetensors", room) as writer:
        for name, tp in parts.items():
            writer.add(name, tp)
    loaded = load_patch(tmp_path / "p.safetensors")
    assert all(same(loaded.tensors[n], tp) for n, tp in parts.items())
    header = int.from_bytes((tmp_path / "p.safetensors").read_bytes()[:8], "little")
    assert (header == room + (-(8 + room) % 8)) == estimated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.safetensors"]


def test_a_small_patch_is_not_padded_to_its_room(tmp_path):
    tp = random_patch((16, 16), 10, torch.float16)
    with patch_writer(tmp_path / "p.safetensors", 100_000) as writer:
        writer.add("w", tp)
    assert (tmp_path / "p.safetensors").stat().st_size < 2_000
    assert same(load_patch(tmp_path / "p.safetensors").tensors["w"], tp)


# ------------------------------------------------------------ masked parts (streamed merges)

def masked_parts(tp: TensorPatch, part: int) -> list[MaskedPatch]:
    """`tp` as a streamed merge hands it to the writer: packed masks and values over
    consecutive parts of `part` entries (the whole tensor where `part` is 0)."""
    numel = tp.numel
    mask = np.zeros(numel, dtype=bool)
    mask[tp.index.numpy()] = True
    pieces, before = [], 0
    for start in range(0, numel, part or numel):
        end = min(start + (part or numel), numel)
        count = int(mask[start:end].sum())
        pieces.append(MaskedPatch(pack_mask(mask[start:end]), tp.values[before:before + count], tp.shape,
                                  start, end))
        before += count
    return pieces


def written(path, patches: dict, part: int = 0, room: int = 0) -> bytes:
    """The file of `patches` given as masked parts of `part` entries (0: whole), or by
    positions (-1; leaving out, as masked parts do, a tensor that keeps nothing)."""
    with patch_writer(path, room) as writer:
        writer.metadata = {"method": "test"}
        for name, tp in patches.items():
            for piece in masked_parts(tp, part) if part >= 0 else [tp] if tp.index.numel() else []:
                writer.add(name, piece)
    return path.read_bytes()


@settings(max_examples=80, deadline=None)
@given(numel=st.integers(2, 400), fraction=st.floats(0, 1), clustered=st.booleans(),
       part=st.sampled_from([0, 8, 16, 48, 400]), step=st.sampled_from([8, 24, 1 << 16]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_masked_parts_give_the_bytes_of_the_patch_by_positions(tmp_path_factory, numel, fraction, clustered,
                                                               part, step, dtype, seed):
    """However a tensor is split into parts, and however its mask is stepped through for
    the gaps, the writer stores what `encode` stores for the same entries by positions:
    every encoding (gaps of any width, mask, dense, one entry, none), kept entries spread
    out or in one run."""
    import tailor_ui.patch as patch_module

    count = round(fraction * numel)
    tp = random_patch((numel,), count, dtype, seed)
    if clustered:  # one run of kept entries, far from the start: long gaps either side
        tp.index = torch.arange(numel - count, numel)
    root = tmp_path_factory.mktemp("m")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patch_module, "MASK_STEP", step)
        streamed = written(root / "parts.safetensors", {"w": tp, "b": tp}, part)
    assert streamed == written(root / "positions.safetensors", {"w": tp, "b": tp}, part=-1)


def test_a_whole_one_entry_tensor_from_a_mask_is_dense():
    """The one case where a mask and positions store differently (as they always have): a
    tensor of one entry, kept, is "dense" from a mask and "gaps" (no gaps) by positions;
    both take the value's bytes alone."""
    tp = TensorPatch(index=torch.tensor([0]), values=torch.tensor([2.5]), shape=(1,))
    assert encode(tp)[0]["encoding"] == "gaps" and not encode(tp)[1]["gaps"].numel()
    assert _masked_encoding(pack_mask(np.ones(1, dtype=bool)).numpy(), 1, 1, 4)[0] == "dense"


def test_gap_widths_and_first_positions_from_masks_in_parts(tmp_path):
    """Gaps wider than a byte that straddle parts and mask steps, and a first position in a
    later part: the same file as by positions."""
    import tailor_ui.patch as patch_module

    for spacing, width in [(200, "U8"), (300, "I16"), (40_000, "I32")]:
        tp = TensorPatch(index=torch.arange(5 * spacing, 15 * spacing, spacing), values=torch.ones(10),
                         shape=(16 * spacing,))
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(patch_module, "MASK_STEP", 64)
            streamed = written(tmp_path / "parts.safetensors", {"w": tp}, part=256)
        assert streamed == written(tmp_path / "positions.safetensors", {"w": tp}, part=-1)
        file = PatchFile(tmp_path / "parts.safetensors")
        assert file.entries["w"]["encoding"] == "gaps" and file.entries["w"]["first"] == 5 * spacing
        assert file._handle.get_slice("w::gaps").get_dtype() == width
        assert same(file.read("w"), tp)


def test_masked_parts_must_come_whole_and_in_order(tmp_path):
    tp = random_patch((64,), 30, torch.float16)
    first, second, last = masked_parts(tp, 24)
    unaligned = MaskedPatch(second.bits, second.values, (64,), 20, 48)
    for pieces, error in [([second], "in order"), ([first, last], "in order"), ([first, unaligned], "in order"),
                          ([first, first], "missing its last part"), ([first, tp], "missing its last part"),
                          ([first], "missing its last part")]:
        with pytest.raises(ValueError, match=error), patch_writer(tmp_path / "p.safetensors") as writer:
            for piece in pieces:
                writer.add("w", piece)
    assert not list(tmp_path.iterdir())  # nothing left behind


def golden_patch() -> dict[str, TensorPatch]:
    """One tensor per encoding, from integer arithmetic alone (no random generator)."""
    def spread(numel, index, dtype):
        index = torch.as_tensor(index)
        return TensorPatch(index=index, values=(index.double() * 0.37 - 5).to(dtype), shape=(numel,))

    return {"gaps.u8": spread(4096, torch.arange(3, 4096, 97), torch.float16),
            "gaps.i16": spread(20_000, torch.arange(11, 20_000, 700), torch.bfloat16),
            "one": spread(500, [499], torch.float32),
            "mask": spread(4096, torch.arange(0, 4096, 3), torch.float16),
            "dense": spread(100, torch.arange(100), torch.bfloat16)}


# the golden patch's file (with `written`'s metadata) as format 2 was written before masked
# parts existed, by positions and from whole masks alike
GOLDEN_SHA256 = "107518badaf3165c93e420b1c3dc3af7b8638d99179e63082fac65feefe947e9"


@pytest.mark.parametrize("part", [-1, 0, 64])
def test_the_file_format_keeps_its_bytes(tmp_path, part):
    """A fixed patch's file, written by positions or from masks (whole or in parts), has
    the bytes it has always had: readers of older files and of files streamed elsewhere
    rely on them."""
    import hashlib

    data = written(tmp_path / "p.safetensors", golden_patch(), part, room=header_room(golden_patch()))
    assert hashlib.sha256(data).hexdigest() == GOLDEN_SHA256
