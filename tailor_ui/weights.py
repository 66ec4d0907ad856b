"""Read and write a model's parameters wherever accelerate keeps them.

A model loaded with a `device_map` may have modules that accelerate offloads (to the CPU
when GPUs run the model, or to disk): their parameters sit on the meta device, and a hook
copies the real values from its weights map to the execution device before each forward.
The engine reads base weights, writes fine-tuned values and patches into the base in
place, and computes where the layer runs; these functions make that work for resident
and offloaded parameters alike.

Writing to a disk-offloaded parameter first holds its value in memory, in the weights
map's in-memory dict (which accelerate reads before the disk); `release` drops those
copies again, so the model reads its (unchanged) disk weights once more.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from tailor_ui.errors import UserError

_HELD = "_tailor_ui_held"  # attribute of an accelerate weights loader: keys we hold in memory


def _hooks(module: torch.nn.Module) -> list[Any]:
    hook = getattr(module, "_hf_hook", None)
    return list(getattr(hook, "hooks", None) or ([hook] if hook is not None else []))


def _offload_hook(model: torch.nn.Module, name: str) -> tuple[Any, str]:
    """The accelerate hook that holds an offloaded parameter, and the name it is kept under
    in the hook's weights map (the parameter's own module, or a parent placing its
    submodules)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        for hook in _hooks(module):
            if getattr(hook, "offload", False) and getattr(hook, "weights_map", None) is not None:
                return hook, ".".join(parts[cut:])
    raise UserError(f"{name} is on the meta device and no accelerate hook holds its weights")


def _store(weights_map: Mapping, key: str) -> tuple[Mapping, str]:
    """The mapping that finally holds `key` behind accelerate's prefixed views."""
    while hasattr(weights_map, "dataset") and hasattr(weights_map, "prefix"):  # PrefixedDataset
        weights_map, key = weights_map.dataset, weights_map.prefix + key
    return weights_map, key


def read_param(model: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter's value (no copy where it is resident; offloaded: accelerate's copy)."""
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param.detach()
    hook, key = _offload_hook(model, name)
    return hook.weights_map[key].detach()


def writable_param(model: torch.nn.Module, name: str, *, overwrite: bool = False) -> torch.Tensor:
    """The tensor holding a parameter's value, to write into in place: the parameter itself,
    or the offloaded copy its hook loads before each forward (disk: held in memory until
    `release` or `drop`). With `overwrite` (every entry is about to be written) a copy not
    held yet starts empty instead of reading the file for values that would be lost."""
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param.data
    loader, memory, full = _memory(model, name)
    if full not in memory:
        device = getattr(loader, "device", None) or "cpu"  # where the loader puts what it reads
        memory[full] = (torch.empty(param.shape, dtype=param.dtype, device=device) if overwrite
                        else loader[full].detach().clone())
        if not hasattr(loader, _HELD):
            setattr(loader, _HELD, set())
        getattr(loader, _HELD).add(full)
    return memory[full]


def _memory(model: torch.nn.Module, name: str) -> tuple[Any, MutableMapping, str]:
    """An offloaded parameter's loader, the in-memory dict it reads first, and its key there."""
    hook, key = _offload_hook(model, name)
    loader, full = _store(hook.weights_map, key)
    memory = getattr(loader, "state_dict", loader)  # OffloadedWeightsLoader: its dict comes first
    if not isinstance(memory, MutableMapping):
        raise UserError(f"{name} is offloaded in a way that cannot be written to ({type(loader).__name__})")
    return loader, memory, full


def on_disk_only(model: torch.nn.Module, name: str) -> bool:
    """A disk-offloaded parameter with no copy held in memory: what it reads is its file's
    value, so putting it back after a write is dropping the copy (`drop`), nothing parked."""
    if model.get_parameter(name).device.type != "meta":
        return False
    loader, memory, full = _memory(model, name)
    return full not in memory and hasattr(loader, "index") and full in loader.index


def drop(model: torch.nn.Module, name: str) -> None:
    """Let go of the in-memory copy `writable_param` made of a disk-offloaded parameter:
    it reads its file's value again."""
    loader, memory, full = _memory(model, name)
    memory.pop(full, None)
    getattr(loader, _HELD, set()).discard(full)


def release(model: torch.nn.Module) -> None:
    """Drop the in-memory copies `writable_param` made of disk-offloaded parameters; call
    only once they hold their disk values again (the engine calls it after reverting)."""
    for module in model.modules():
        for hook in _hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            if weights_map is None:
                continue
            loader, _ = _store(weights_map, "")
            for key in getattr(loader, _HELD, set()):
                loader.state_dict.pop(key, None)
            if hasattr(loader, _HELD):
                getattr(loader, _HELD).clear()


@contextmanager
def onloaded(model: torch.nn.Module, names: Sequence[str]) -> Iterator[None]:
    """The named parameters that only their files hold (`on_disk_only`) read once and held
    in memory for the body, so accelerate's hooks take the held value at every forward
    instead of reading and converting the file again; let go of after (they read their
    files again). Others (resident, or held already) are left as they are."""
    taken = []
    try:
        for name in names:
            if on_disk_only(model, name):  # asked here: a tied name is held by its first
                loader, memory, full = _memory(model, name)
                memory[full] = loader[full].detach()
                taken.append(name)
        yield
    finally:
        for name in taken:
            drop(model, name)


def compute_device(model: torch.nn.Module, name: str) -> torch.device:
    """Where the layer owning a parameter computes: its device, or for an offloaded one the
    hook's execution device."""
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param.device
    device = _offload_hook(model, name)[0].execution_device
    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def parse_device(device: str) -> torch.device:
    """A device the user named for computing on: cpu, cuda or cuda:N, and only a GPU that exists."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no GPU is available")
    return torch.device(device)


def model_device(model: torch.nn.Module) -> torch.device:
    # accelerate leaves offloaded parameters on the meta device; its hooks move inputs on
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def to_model(batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Move a batch to the model's (first) device; images take the model's float dtype."""
    device = model_device(model)
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    return {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in batch.items()}


@contextmanager
def holding(model: torch.nn.Module, names: Sequence[str], value_of: Callable[[str], torch.Tensor],
            original_of: Callable[[str, torch.Tensor], torch.Tensor] | None = None
            ) -> Iterator[torch.nn.Module]:
    """`model` with the named parameters set to `value_of(name)`, their values written back
    bit for bit at the end: `original_of(name, storage)` where given (read again from the
    checkpoint the model was loaded from: nothing is held meanwhile), else copies parked on
    the CPU; a parameter read from its file alone (`on_disk_only`) just drops its copy."""
    saved: dict[str, torch.Tensor] = {}
    written: list[str] = []
    dropped: set[str] = set()
    try:
        with torch.no_grad():
            for name in names:
                if on_disk_only(model, name):
                    dropped.add(name)
                storage = writable_param(model, name, overwrite=name in dropped)
                if original_of is None and name not in dropped:
                    saved[name] = storage.to("cpu", copy=True)
                written.append(name)
                storage.copy_(value_of(name))
        yield model
    finally:
        with torch.no_grad():
            for name in written:
                if name in dropped:
                    drop(model, name)
                    continue
                storage = writable_param(model, name)
                storage.copy_(saved[name] if original_of is None else original_of(name, storage))
