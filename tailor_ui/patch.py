"""The sparse patch: the entries of a model that differ from its base.

A patch holds, per tensor, flat indices and the values to put there. Applying it to the
base gives the tailored model bit-exactly; the applied state keeps the base values it
overwrote, so reverting gives the base back bit-exactly. Nothing here copies a model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from tailor_ui.checkpoint import DTYPE_NAMES
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.weights import drop, on_disk_only, read_param, writable_param

FORMAT = "tailor_ui.patch/2"
LEGACY_FORMAT = "tailor_ui.patch/1"
_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
OverlapRule = Literal["mean", "sum", "first"]


@dataclass
class TensorPatch:
    index: torch.Tensor  # int64, flat positions into the tensor, ascending
    values: torch.Tensor  # the tensor's dtype, one value per index
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def fraction(self) -> float:
        return self.index.numel() / max(self.numel, 1)


@dataclass
class MaskedPatch:
    """A tensor's patch as a streamed merge has it in hand: over flat entries [start, end) of
    a tensor of `shape` (all of them, or one part of a tensor that comes in consecutive
    parts), a packed mask of the kept entries, a bit per entry (little-endian, as the file's
    "mask" encoding stores it), and their values in order. Positions are computed only where
    something needs them (int64 positions take 64 bits per entry, the mask one)."""

    bits: torch.Tensor  # uint8, (end - start + 7) // 8
    values: torch.Tensor  # one per set bit, in order
    shape: tuple[int, ...]  # the whole tensor's
    start: int
    end: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def positions(self) -> TensorPatch:
        """The whole tensor's patch by positions (a part has only some of them)."""
        if (self.start, self.end) != (0, self.numel):
            raise ValueError("positions are computed for a whole tensor, not a part")
        return TensorPatch(index=torch.from_numpy(_set_bits(self.bits.numpy(), 0, self.numel)),
                           values=self.values, shape=self.shape)


def pack_mask(mask: np.ndarray) -> torch.Tensor:
    """A boolean mask as `MaskedPatch.bits` (and the file's "mask" part) hold it."""
    return torch.from_numpy(np.packbits(mask, bitorder="little"))


def _set_bits(bits: np.ndarray, start: int, end: int) -> np.ndarray:
    """The positions (int64, ascending) of the set bits among entries [start, end) of a
    packed mask; `start` a multiple of 8."""
    return np.unpackbits(bits[start // 8:(end + 7) // 8], count=end - start, bitorder="little").nonzero()[0] + start


@dataclass
class Patch:
    tensors: dict[str, TensorPatch]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return sum(t.index.numel() for t in self.tensors.values())

    def counts(self) -> dict[str, int]:
        return {name: t.index.numel() for name, t in self.tensors.items()}

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(t.shape) for name, t in self.tensors.items()}

    def add(self, name: str, tp: TensorPatch | MaskedPatch) -> None:
        """One tensor's patch (as `PatchWriter.add` takes it into a file)."""
        self.tensors[name] = tp.positions() if isinstance(tp, MaskedPatch) else tp

    def read(self, name: str) -> TensorPatch:
        """One tensor's patch (as `PatchFile.read` reads it from a file)."""
        return self.tensors[name]


def bits_differ(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Flat mask of where `b` differs from `a` (same dtype) bit for bit, so -0.0 and NaNs count."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.dtype.is_floating_point:
        view = _INT_VIEW[a.element_size()]
        return a.view(view) != b.view(view)
    return a != b


def bit_ints(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor's entries, flat, as integers of their width (a view, no copy): they
    compare equal where the entries are equal bit for bit, so -0.0 and NaNs count."""
    return t.reshape(-1).view(_INT_VIEW[t.element_size()]).numpy()


def changed_entries(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Flat indices where `new` differs from `base` bit for bit (so -0.0 and NaNs count)."""
    if base.shape != new.shape:
        raise ValueError(f"shape mismatch {tuple(base.shape)} vs {tuple(new.shape)}")
    new = new.to(device=base.device, dtype=base.dtype)
    return bits_differ(base, new).nonzero().flatten().cpu()


def tensor_patch(base: torch.Tensor, new: torch.Tensor) -> TensorPatch:
    """The entries of `new` (cast to the base dtype) that differ from `base`."""
    new = new.to(device=base.device, dtype=base.dtype)
    index = changed_entries(base, new)
    values = new.reshape(-1)[index.to(base.device)].cpu()
    return TensorPatch(index=index, values=values, shape=tuple(base.shape))


def model_patch(base: torch.nn.Module, model: torch.nn.Module) -> Patch:
    """The patch that makes `base` compute as `model` (a trained copy of it): every entry
    that differs, parameter by parameter."""
    with torch.no_grad():
        found = {name: tensor_patch(read_param(base, name), value)
                 for name, value in model.named_parameters()}
    return Patch(tensors={name: tp for name, tp in found.items() if tp.index.numel()})


@dataclass
class AppliedPatch:
    """What a model held before a patch was written into it."""

    originals: dict[str, torch.Tensor]
    patch: Patch | PatchFile
    # parameters read from their file alone (`weights.on_disk_only`): reverted by dropping the copy
    dropped: set[str] = field(default_factory=set)


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def apply_patch(model: torch.nn.Module, patch: Patch | PatchFile) -> AppliedPatch:
    """Write the patch into the model in place, tensor by tensor (a file's tensors are read
    one at a time, as each is written); return what is needed to revert it. Where a tensor
    cannot be read (a damaged file), those written before it are reverted."""
    params = _parameters(model)
    check_fits({n: tuple(p.shape) for n, p in params.items()}, patch)
    state = AppliedPatch(originals={}, patch=patch)
    try:
        with torch.no_grad():
            for name in patch.shapes:
                tp = patch.read(name)
                fresh = on_disk_only(model, name)
                flat = writable_param(model, name).view(-1)  # offloaded modules too
                index = tp.index.to(flat.device)
                if fresh:
                    state.dropped.add(name)
                else:
                    state.originals[name] = flat[index].cpu()
                flat[index] = tp.values.to(device=flat.device, dtype=flat.dtype)
    except BaseException:
        revert_patch(model, state)
        raise
    return state


def revert_patch(model: torch.nn.Module, applied: AppliedPatch) -> None:
    """Put back the values an `apply_patch` overwrote (bit-exact); a file's positions are
    read again, tensor by tensor."""
    for name in applied.dropped:
        drop(model, name)
    with torch.no_grad():
        for name, values in applied.originals.items():
            flat = writable_param(model, name).view(-1)
            flat[applied.patch.read(name).index.to(flat.device)] = values.to(flat.device)


@contextmanager
def applied(model: torch.nn.Module, patch: Patch | PatchFile | None) -> Iterator[torch.nn.Module]:
    """`model` with `patch` written into it for the body, reverted bit-exactly after
    (however the body ends); no patch: the model as it is."""
    if patch is None:
        yield model
        return
    state = apply_patch(model, patch)
    try:
        yield model
    finally:
        revert_patch(model, state)


def check_fits(shapes: Mapping[str, tuple[int, ...]], patch: "Patch | PatchFile") -> None:
    """Every patched tensor exists with the patch's shape and every index lies inside it
    (a file's indices are checked as each tensor is read)."""
    missing = [n for n in patch.shapes if n not in shapes]
    if missing:
        raise UserError(f"the patch names tensors the model lacks: {', '.join(missing[:5])}")
    for name, shape in patch.shapes.items():
        if tuple(shapes[name]) != tuple(shape):
            raise UserError(f"patch tensor {name} has shape {tuple(shape)}, model has {tuple(shapes[name])}")
    for name, tp in patch.tensors.items() if isinstance(patch, Patch) else ():
        if tp.index.numel() and (int(tp.index.max()) >= tp.numel or int(tp.index.min()) < 0):
            raise UserError(f"patch tensor {name} has indices outside the tensor")


# ------------------------------------------------------------------------- the file
#
# One safetensors file. Per tensor, whichever of three encodings is smallest:
#   "gaps":  `<name>::gaps`, the distances between consecutive kept positions at the
#            narrowest integer width that holds the largest (the first position is in the
#            header), and `<name>::values`;
#   "mask":  `<name>::mask`, one bit per entry (packed, little-endian), and `<name>::values`;
#   "dense": `<name>::values` alone, every entry kept.
# The header's metadata `tailor_ui` holds the format, each tensor's encoding, shape, dtype,
# count and first position (gaps; else 0), and the patch's own metadata. Format 1 (`<name>::index`, flat
# int32/int64 positions, and `<name>::values`) is still read.

_GAP_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
# entries of a packed mask turned into positions at a time (a multiple of 8), so encoding a
# tensor's gaps holds a few such steps' positions, not the tensor's
MASK_STEP = 1 << 16


def _gap_dtype(largest: int) -> torch.dtype:
    """The narrowest integer dtype holding `largest` (uint8, then signed widths)."""
    for dtype in _GAP_DTYPES:
        if largest <= (torch.iinfo(dtype).max):
            return dtype
    raise ValueError(f"position gap {largest} does not fit in 64 bits")


def encoded_sizes(count: int, numel: int, value_bytes: int, largest_gap: int) -> dict[str, int]:
    """Bytes each encoding takes for `count` kept entries of a tensor of `numel`."""
    gap_bytes = torch.empty((), dtype=_gap_dtype(largest_gap)).element_size()
    sizes = {"gaps": max(count - 1, 0) * gap_bytes + count * value_bytes,
             "mask": (numel + 7) // 8 + count * value_bytes}
    if count == numel:
        sizes["dense"] = numel * value_bytes
    return sizes


def encode(tp: TensorPatch) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The smallest encoding of a tensor's patch: its header entry and its stored parts."""
    numel, count = int(torch.Size(tp.shape).numel()), tp.values.numel()
    entry = {"shape": list(tp.shape), "dtype": DTYPE_NAMES[tp.values.dtype], "count": count}
    index, values = _ascending(tp)
    gaps = index.diff() if count else index
    largest = int(gaps.max()) if gaps.numel() else 0
    sizes = encoded_sizes(count, numel, values.element_size(), largest)
    encoding = min(sizes, key=sizes.__getitem__)  # ties go to the first: gaps, mask, dense
    entry.update(encoding=encoding, first=int(index[0]) if encoding == "gaps" and count else 0)
    parts = {"values": values.contiguous()}
    if encoding == "gaps":
        parts["gaps"] = gaps.to(_gap_dtype(largest))
    elif encoding == "mask":
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[index] = True
        parts["mask"] = pack_mask(mask.numpy())
    return entry, parts


def _masked_encoding(bits: np.ndarray, count: int, numel: int, value_bytes: int) -> tuple[str, int, int]:
    """`encode`'s choice for a packed mask of `count` kept entries: the encoding, the first
    kept position and the largest gap (both found only where gaps may be smallest)."""
    if count == numel:
        return "dense", 0, 0
    if count - 1 > (numel + 7) // 8:  # every gap takes a byte at least: the mask is smaller
        return "mask", 0, 0
    first = next(int(p[0]) for p in _positions(bits, numel) if p.size)
    largest = max((int(g.max()) for g in _gaps(bits, numel)), default=0)
    sizes = encoded_sizes(count, numel, value_bytes, largest)
    encoding = min(sizes, key=sizes.__getitem__)  # as `encode` chooses
    return encoding, first if encoding == "gaps" else 0, largest


def _positions(bits: np.ndarray, numel: int) -> Iterator[np.ndarray]:
    """The set bits' positions, `MASK_STEP` entries of the mask at a time."""
    for start in range(0, numel, MASK_STEP):
        yield _set_bits(bits, start, min(start + MASK_STEP, numel))


def _gaps(bits: np.ndarray, numel: int) -> Iterator[np.ndarray]:
    """The distances between consecutive set bits (int64), a step of the mask at a time."""
    previous = None
    for positions in _positions(bits, numel):
        if positions.size > (previous is None):  # none before the first position
            yield np.diff(positions) if previous is None else np.diff(positions, prepend=previous)
        if positions.size:
            previous = positions[-1:]


def _ascending(tp: TensorPatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch's positions in strictly ascending order, with their values."""
    index, values = tp.index.reshape(-1).to(torch.int64), tp.values.reshape(-1)
    steps = index.diff()
    if bool((steps <= 0).any()):
        order = index.argsort()
        index, values = index[order], values[order]
        if bool((index.diff() == 0).any()):
            raise ValueError("a patch holds one position twice")
    return index, values


def decode(name: str, entry: Mapping[str, Any], parts: Mapping[str, torch.Tensor]) -> TensorPatch:
    """A tensor's patch from its header entry and stored parts (checked: a damaged file
    is a ValueError, never a wrong model)."""
    shape = tuple(entry["shape"])
    numel = int(torch.Size(shape).numel())
    values, encoding = parts["values"].reshape(-1), entry["encoding"]
    if encoding == "dense":
        index = torch.arange(numel)
    elif encoding == "mask":
        if parts["mask"].numel() != (numel + 7) // 8:
            raise ValueError(f"{name}: the mask does not match the shape")
        bits = np.unpackbits(parts["mask"].numpy(), count=numel, bitorder="little")
        index = torch.from_numpy(bits).nonzero().flatten()
    elif encoding == "gaps":
        gaps = parts["gaps"].to(torch.int64)
        if bool((gaps <= 0).any()):
            raise ValueError(f"{name}: positions are not ascending")
        first = torch.tensor([int(entry["first"])]) if values.numel() else gaps
        index = torch.cat([first, gaps]).cumsum(0)
    elif encoding == "index":  # format 1
        index = parts["index"].reshape(-1).to(torch.int64)
    else:
        raise ValueError(f"{name}: unknown encoding {encoding!r}")
    if index.numel() != values.numel():
        raise ValueError(f"{name}: positions and values differ in number")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"{name}: positions outside the tensor")
    return TensorPatch(index=index, values=values, shape=shape)


def header_room(names: Iterable[str]) -> int:
    """Bytes to reserve for the header of a patch of (at most) these tensors: its parts'
    table, their encodings and counts, and 16 KiB for the settings and model names."""
    return sum(5 * len(name) + 400 for name in names) + 16 * 2**10


def writer_bytes(numel: int) -> int:
    """What a `PatchWriter` holds at worst besides the part it is given, for a tensor of
    `numel` entries: the tensor's packed mask, filled part by part, and what turning a mask
    into gaps takes (a step's unpacked mask, then at most three int64 arrays of positions
    or gaps, one more while they are diffed, and the narrowed gaps: 33 bytes per entry)."""
    return (numel + 7) // 8 + 33 * MASK_STEP


@dataclass
class _Open:
    """A tensor whose masked parts are coming; its values go to the file as they come."""

    name: str
    shape: tuple[int, ...]
    bits: torch.Tensor  # the whole tensor's packed mask, filled part by part
    dtype: torch.dtype
    at: int  # where its values start in the data
    count: int = 0
    next: int = 0  # the flat entry its next part starts at


class PatchWriter:
    """Writes tensors' patches to the file as they come, behind `header_bytes` kept for
    the header; `finish` writes the header in front (where it outgrew that room, or the
    data is small, the data is copied once behind it). Nothing but the tensor being added
    is held (for a tensor in parts, the part and the tensor's packed mask)."""

    def __init__(self, path: Path, header_bytes: int = 0) -> None:
        self.path = path
        self.metadata: dict[str, Any] = {}
        self.entries: dict[str, dict[str, Any]] = {}
        self._table: dict[str, dict[str, Any]] = {}
        self._room = header_bytes + (-(8 + header_bytes) % 8)  # tensor data starts 8-byte aligned
        self._file = open(path, "wb")
        self._file.seek(8 + self._room)
        self._offset = 0
        self._open: _Open | None = None

    def add(self, name: str, tp: TensorPatch | MaskedPatch) -> None:
        """A tensor's patch. A `MaskedPatch` may come in consecutive parts: the values are
        written as they come, the mask or gaps after the last part, so the file's bytes are
        the same however the tensor was split (and a tensor whose parts keep nothing is left
        out)."""
        if isinstance(tp, MaskedPatch):
            self._add_masked(name, tp)
            return
        self._check_new(name)
        entry, parts = encode(tp)
        self.entries[name] = entry
        for part, tensor in parts.items():
            start = self._offset
            self._append(tensor)
            self._record(f"{name}::{part}", tensor.dtype, tensor.numel(), start)

    def _check_new(self, name: str) -> None:
        if name in self.entries:
            raise ValueError(f"{name} is in the patch already")
        if self._open is not None:
            raise ValueError(f"{self._open.name} is missing its last part")

    def _append(self, tensor: torch.Tensor) -> None:
        raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        self._file.write(raw)
        self._offset += len(raw)

    def _record(self, key: str, dtype: torch.dtype, count: int, start: int) -> None:
        """The table's entry for a stored part: `count` entries from `start` up to here."""
        self._table[key] = {"dtype": DTYPE_NAMES[dtype], "shape": [count], "data_offsets": [start, self._offset]}

    def _add_masked(self, name: str, tp: MaskedPatch) -> None:
        if tp.start == 0:
            self._check_new(name)
            whole = tp.end == tp.numel
            bits = tp.bits if whole else torch.zeros((tp.numel + 7) // 8, dtype=torch.uint8)
            self._open = _Open(name, tuple(tp.shape), bits, tp.values.dtype, self._offset)
        opened = self._open
        if opened is None or opened.name != name or tp.start != opened.next or tp.start % 8:
            raise ValueError(f"{name}: parts come in order, each from a whole byte of the mask")
        if opened.bits is not tp.bits:
            opened.bits[tp.start // 8:tp.start // 8 + tp.bits.numel()] = tp.bits
        self._append(tp.values)
        opened.count += tp.values.numel()
        opened.next = tp.end
        if tp.end == tp.numel:
            self._open = None
            if opened.count:
                self._close(opened)

    def _close(self, t: _Open) -> None:
        """A masked tensor's last part is in: its entry, and the mask or the gaps
        (computed from the mask a step at a time) behind its values."""
        numel = int(torch.Size(t.shape).numel())
        self._record(f"{t.name}::values", t.dtype, t.count, t.at)
        bits = t.bits.numpy()
        encoding, first, largest = _masked_encoding(bits, t.count, numel, t.dtype.itemsize)
        self.entries[t.name] = {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype], "count": t.count,
                                "encoding": encoding, "first": first}
        start = self._offset
        if encoding == "mask":
            self._append(t.bits)
            self._record(f"{t.name}::mask", t.bits.dtype, t.bits.numel(), start)
        elif encoding == "gaps":
            dtype = _gap_dtype(largest)
            for gaps in _gaps(bits, numel):
                self._append(torch.from_numpy(gaps).to(dtype))
            self._record(f"{t.name}::gaps", dtype, t.count - 1, start)

    def counts(self) -> dict[str, int]:
        return {name: entry["count"] for name, entry in self.entries.items()}

    def finish(self) -> None:
        if self._open is not None:
            raise ValueError(f"{self._open.name} is missing its last part")
        info = {"format": FORMAT, "tensors": self.entries, "metadata": self.metadata}
        header = {"__metadata__": {"tailor_ui": json.dumps(info)}, **self._table}
        raw = json.dumps(header, separators=(",", ":")).encode()
        # the header in its room, or (outgrown, or data so small the room's padding would
        # weigh, and moving it costs nothing) the data moved behind a header of its size
        if len(raw) <= self._room and self._offset >= 16 * self._room:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._room) + raw + b" " * (self._room - len(raw)))
            self._file.close()
            return
        self._file.close()
        raw += b" " * (-(8 + len(raw)) % 8)
        aside = self.path.with_name(self.path.name + ".data")
        os.replace(self.path, aside)
        with open(self.path, "wb") as out, open(aside, "rb") as data:
            out.write(struct.pack("<Q", len(raw)) + raw)
            data.seek(8 + self._room)
            shutil.copyfileobj(data, out, 16 * 2**20)
        aside.unlink()


@contextmanager
def patch_writer(path: str | Path, header_bytes: int = 0) -> Iterator[PatchWriter]:
    """A patch file written tensor by tensor (`add`), complete at the end of the body or
    absent (the body raised). `header_bytes` (`header_room`) saves copying the data once."""
    with atomic_path(path) as tmp:
        writer = PatchWriter(tmp, header_bytes)
        try:
            yield writer
        except BaseException:
            writer._file.close()
            raise
        writer.finish()


def save_patch(patch: Patch, path: str | Path) -> None:
    """The patch as one file, each tensor in its smallest encoding."""
    with patch_writer(path) as writer:
        writer.metadata = patch.metadata
        for name, tp in patch.tensors.items():
            writer.add(name, tp)


class PatchFile:
    """A patch file read tensor by tensor: the header up front, a tensor's entries when asked."""

    def __init__(self, path: str | Path) -> None:
        self.path = path = Path(path)
        if not path.is_file():
            raise UserError(f"patch file not found: {path.name}")
        try:
            self._handle = safe_open(str(path), "pt")
            info = json.loads((self._handle.metadata() or {}).get("tailor_ui", "null"))
            keys = set(self._handle.keys())
        except (SafetensorError, OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path.name} is not a readable safetensors file ({exc})") from None
        if not isinstance(info, dict) or info.get("format") not in (FORMAT, LEGACY_FORMAT):
            raise UserError(f"{path.name} is not a Model Tailor Studio patch")
        self.metadata: dict[str, Any] = info.get("metadata", {})
        if info["format"] == LEGACY_FORMAT:
            info["tensors"] = {name: {"encoding": "index", "shape": shape,
                                      "count": self._length(f"{name}::index", keys)}
                               for name, shape in info["shapes"].items()}
        self.entries: dict[str, dict[str, Any]] = info["tensors"]
        for name, entry in self.entries.items():
            for part in self._parts(entry):
                self._length(f"{name}::{part}", keys)

    @staticmethod
    def _parts(entry: Mapping[str, Any]) -> tuple[str, ...]:
        return {"gaps": ("gaps", "values"), "mask": ("mask", "values"), "dense": ("values",),
                "index": ("index", "values")}.get(entry["encoding"], ("values",))

    def _length(self, key: str, keys: set[str]) -> int:
        if key not in keys:
            raise UserError(f"{self.path.name} is damaged: tensor {key.split('::')[0]} is incomplete")
        return int(torch.Size(self._handle.get_slice(key).get_shape()).numel())

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(entry["shape"]) for name, entry in self.entries.items()}

    def counts(self) -> dict[str, int]:
        return {name: int(entry["count"]) for name, entry in self.entries.items()}

    @property
    def num_entries(self) -> int:
        return sum(self.counts().values())

    @property
    def tensors(self) -> Mapping[str, TensorPatch]:
        """Name → its patch, decoded when looked up (Patch.tensors' interface, one at a time)."""
        return _FileTensors(self)

    def read(self, name: str) -> TensorPatch:
        entry = self.entries[name]
        parts = {part: self._handle.get_tensor(f"{name}::{part}") for part in self._parts(entry)}
        try:
            return decode(name, entry, parts)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.path.name} is damaged: {exc}") from None

    def load(self) -> Patch:
        return Patch(tensors={name: self.read(name) for name in self.entries}, metadata=self.metadata)


class _FileTensors(Mapping):
    def __init__(self, file: PatchFile) -> None:
        self._file = file

    def __getitem__(self, name: str) -> TensorPatch:
        if name not in self._file.entries:
            raise KeyError(name)
        return self._file.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file.entries)

    def __len__(self) -> int:
        return len(self._file.entries)


def load_patch(path: str | Path) -> Patch:
    """A whole patch file in memory (either format)."""
    return PatchFile(path).load()


def union(patches: Iterable[Patch], base: Mapping[str, torch.Tensor],
          rule: OverlapRule = "mean") -> Patch:
    """Combine patches of several tasks on one base.

    Where one patch touches an entry, its value is taken. Where several touch the same
    entry: `first` keeps the first patch's value; `mean` and `sum` average or add the
    patches' changes from the base there. Entries that end equal to the base are dropped.
    """
    patches = list(patches)
    merged: dict[str, TensorPatch] = {}
    for name in sorted({n for p in patches for n in p.tensors}):
        parts = [p.tensors[name] for p in patches if name in p.tensors]
        if len(parts) == 1:
            merged[name] = parts[0]
            continue
        base_tensor = base[name].detach().cpu()
        flat_base = base_tensor.reshape(-1)
        if rule == "first":
            new = flat_base.clone()
            for tp in reversed(parts):  # earlier patches overwrite later ones
                new[tp.index] = tp.values.to(new.dtype)
        else:
            delta = torch.zeros(flat_base.shape, dtype=torch.float64)
            hits = torch.zeros(flat_base.shape, dtype=torch.float64)
            for tp in parts:
                delta[tp.index] += tp.values.double() - flat_base[tp.index].double()
                hits[tp.index] += 1
            if rule == "mean":
                delta /= hits.clamp(min=1)
            new = (flat_base.double() + delta).to(flat_base.dtype)
        merged[name] = tensor_patch(base_tensor, new.reshape(base_tensor.shape))
    return Patch(tensors=merged, metadata={"union_of": [p.metadata for p in patches],
                                           "overlap_rule": rule})
