"""The sparse patch: the entries of a model that differ from its base.

A patch holds, per tensor, flat indices and the values to put there. Applying it to the
base gives the tailored model bit-exactly; the applied state keeps the base values it
overwrote, so reverting gives the base back bit-exactly. Nothing here copies a model.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.weights import writable_param

FORMAT = "tailor_ui.patch/1"
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
class Patch:
    tensors: dict[str, TensorPatch]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_entries(self) -> int:
        return sum(t.index.numel() for t in self.tensors.values())

    def counts(self) -> dict[str, int]:
        return {name: t.index.numel() for name, t in self.tensors.items()}


def changed_entries(base: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Flat indices where `new` differs from `base` bit for bit (so -0.0 and NaNs count)."""
    if base.shape != new.shape:
        raise ValueError(f"shape mismatch {tuple(base.shape)} vs {tuple(new.shape)}")
    new = new.to(device=base.device, dtype=base.dtype)
    if base.dtype.is_floating_point:
        view = _INT_VIEW[base.element_size()]
        differs = base.reshape(-1).view(view) != new.reshape(-1).view(view)
    else:
        differs = base.reshape(-1) != new.reshape(-1)
    return differs.nonzero().flatten().cpu()


def tensor_patch(base: torch.Tensor, new: torch.Tensor) -> TensorPatch:
    """The entries of `new` (cast to the base dtype) that differ from `base`."""
    new = new.to(device=base.device, dtype=base.dtype)
    index = changed_entries(base, new)
    values = new.reshape(-1)[index.to(base.device)].cpu()
    return TensorPatch(index=index, values=values, shape=tuple(base.shape))


@dataclass
class AppliedPatch:
    """What a model held before a patch was written into it."""

    originals: dict[str, torch.Tensor]
    patch: Patch


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def apply_patch(model: torch.nn.Module, patch: Patch) -> AppliedPatch:
    """Write the patch into the model in place; return what is needed to revert it."""
    params = _parameters(model)
    check_fits({n: tuple(p.shape) for n, p in params.items()}, patch)
    originals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, tp in patch.tensors.items():
            flat = writable_param(model, name).view(-1)  # offloaded modules too
            index = tp.index.to(flat.device)
            originals[name] = flat[index].cpu()
            flat[index] = tp.values.to(device=flat.device, dtype=flat.dtype)
    return AppliedPatch(originals=originals, patch=patch)


def revert_patch(model: torch.nn.Module, applied: AppliedPatch) -> None:
    """Put back the values an `apply_patch` overwrote (bit-exact)."""
    with torch.no_grad():
        for name, values in applied.originals.items():
            flat = writable_param(model, name).view(-1)
            flat[applied.patch.tensors[name].index.to(flat.device)] = values.to(flat.device)


@contextmanager
def applied(model: torch.nn.Module, patch: Patch | None) -> Iterator[torch.nn.Module]:
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


def check_fits(shapes: Mapping[str, tuple[int, ...]], patch: Patch) -> None:
    """Every patched tensor exists with the patch's shape and every index lies inside it."""
    missing = [n for n in patch.tensors if n not in shapes]
    if missing:
        raise UserError(f"the patch names tensors the model lacks: {', '.join(missing[:5])}")
    for name, tp in patch.tensors.items():
        if tuple(shapes[name]) != tuple(tp.shape):
            raise UserError(f"patch tensor {name} has shape {tuple(tp.shape)}, model has {tuple(shapes[name])}")
        if tp.index.numel() and (int(tp.index.max()) >= tp.numel or int(tp.index.min()) < 0):
            raise UserError(f"patch tensor {name} has indices outside the tensor")


def save_patch(patch: Patch, path: str | Path) -> None:
    """One safetensors file: `<name>::index` (int32 where it fits) and `<name>::values`."""
    tensors: dict[str, torch.Tensor] = {}
    shapes = {}
    for name, tp in patch.tensors.items():
        small = tp.numel < 2**31
        tensors[f"{name}::index"] = tp.index.to(torch.int32 if small else torch.int64).contiguous()
        tensors[f"{name}::values"] = tp.values.contiguous()
        shapes[name] = list(tp.shape)
    header = {"format": FORMAT, "shapes": shapes, "metadata": patch.metadata}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"tailor_ui": json.dumps(header)})


def load_patch(path: str | Path) -> Patch:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"patch file not found: {path.name}")
    try:
        raw = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            header = json.loads((handle.metadata() or {}).get("tailor_ui", "null"))
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path.name} is not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise UserError(f"{path.name} is not a Model Tailor Studio patch")
    tensors = {}
    for name, shape in header["shapes"].items():
        try:
            index, values = raw[f"{name}::index"], raw[f"{name}::values"]
        except KeyError:
            raise UserError(f"{path.name} is damaged: tensor {name} is incomplete") from None
        if index.numel() != values.numel():
            raise UserError(f"{path.name} is damaged: {name} has mismatched index/values")
        tensors[name] = TensorPatch(index=index.to(torch.int64), values=values, shape=tuple(shape))
    return Patch(tensors=tensors, metadata=header.get("metadata", {}))


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
