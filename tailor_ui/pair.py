"""Load a pre-trained and a fine-tuned MLLM, check they match, and describe what changed."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open

from tailor_ui.adapter import (ADAPTER_CONFIG, AdapterWeights, adapter_folder, checkpoint_shapes,
                               merge_into, read_adapter)
from tailor_ui.checkpoint import Checkpoint, LazyWeights, check_shapes, key_map
from tailor_ui.control import Progress, no_progress
from tailor_ui.errors import UserError
from tailor_ui.names import component, layer_index, module_kind
from tailor_ui.weights import compute_device, holding, read_param

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
Device = Literal["cpu", "cuda", "auto"]
# owner/name as the hub spells it; no "..", no leading dot or dash
_HUB_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def resolve_source(spec: str, *, allowed_roots: list[Path] | None = None) -> str:
    """A local model folder (resolved and checked) or a validated hub id.

    With `allowed_roots`, local folders must lie under one of them (the dashboard's rule),
    and a relative name means a folder under a root: the server's working folder is never
    probed, so a visitor cannot learn what exists there.
    """
    spec = spec.strip()
    if not spec:
        raise UserError("no model given: enter a hub id (owner/name) or a local folder")
    shown = spec if len(spec) <= 120 else spec[:100] + "…"  # a pasted blob stays one short line
    try:
        if allowed_roots is not None and not spec.startswith(("/", ".", "~")):
            under = next((r / spec for r in allowed_roots  # never a probe outside a root ("../")
                          if (r / spec).resolve().is_relative_to(r.resolve())
                          and _is_model_folder(r / spec)), None)
            spec = str(under) if under is not None else spec
        looks_local = spec.startswith(("/", ".", "~")) or (
            allowed_roots is None and Path(spec).expanduser().exists())
        if looks_local:
            path = Path(spec).expanduser().resolve()
            if allowed_roots is not None and not any(path.is_relative_to(r.resolve()) for r in allowed_roots):
                raise UserError(f"{shown}: local folders outside the allowed folders are not accepted")
            if not path.is_dir():
                raise UserError(f"{shown}: no such model folder")
            if not _is_model_folder(path):
                raise UserError(f"{shown}: not a model folder (no config.json) nor an adapter "
                                f"({ADAPTER_CONFIG})")
            return str(path)
    except (OSError, RuntimeError) as exc:  # a name too long for the file system, an unknown ~user
        raise UserError(f"{shown}: not a usable folder name ({getattr(exc, 'strerror', None) or exc})") from None
    if not _HUB_ID.match(spec):
        raise UserError(f"{shown!r} is neither an existing folder nor a hub id of the form owner/name")
    return spec


def _is_model_folder(path: Path) -> bool:
    """A model folder, or a PEFT adapter folder (applied to the base, `tailor_ui.adapter`)."""
    return (path / "config.json").is_file() or (path / ADAPTER_CONFIG).is_file()


def has_safetensors(source: str) -> bool:
    """A local folder holding safetensors weights (what streaming and lazy reading need)."""
    path = Path(source)
    return path.is_dir() and any(p.name.endswith(".safetensors") for p in path.iterdir())


def weights_folder(source: str) -> str | None:
    """Where a model's safetensors lie on this machine: its local folder, or for a hub id
    the hub cache's snapshot of its safetensors and JSON files (fetched once; no pickle
    files); None where it has none, or the hub cannot give them (loading it says why)."""
    if Path(source).is_dir():
        return source if has_safetensors(source) else None
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(source, allow_patterns=["*.safetensors", "*.json"])
    except OSError:  # unreachable, missing, gated, offline and not cached
        return None
    return folder if has_safetensors(folder) else None


def _check_weight_format(source: str, allow_pickle: bool) -> None:
    path = Path(source)
    if not path.is_dir():
        return  # hub ids: from_pretrained(use_safetensors=True) refuses pickle itself
    files = [p.name for p in path.iterdir()]
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    has_pickle = any(f.endswith(_PICKLE_SUFFIXES) for f in files)
    if not has_safetensors and has_pickle and not allow_pickle:
        raise UserError(f"{path.name} holds only pickle checkpoints, which can run code when "
                        "loaded; convert it to safetensors or allow pickle explicitly")
    if not has_safetensors and not has_pickle:
        raise UserError(f"{path.name} holds no weights (no .safetensors files)")
    for name in sorted(f for f in files if f.endswith(".safetensors")):
        try:  # the header and the file's length: cheap, and before gigabytes are read
            with safe_open(str(path / name), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            raise UserError(f"{path.name}/{name} is damaged or truncated "
                            f"({_first_line(exc)[:200]})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_local_pair(base: str, finetuned: list[str], *, allowed_roots: list[Path] | None = None,
                     allow_pickle: bool = False) -> None:
    """What can be checked without loading a model, so that a bad pair is refused at once
    (the dashboard: before it lets go of the visitor's current pair; the CLI: before
    loading gigabytes): every local folder holds readable weights, and each fine-tuned
    model has the base's model type and, for the checkpoint keys both hold, its tensor
    shapes. Hub ids are checked when they are loaded."""
    sources = [resolve_source(s, allowed_roots=allowed_roots) for s in [base, *finetuned]]
    _refuse_adapter(sources[0], base)
    adapters = [adapter_folder(s) for s in sources[1:]]
    for source, adapter in zip(sources, [None, *adapters]):
        if adapter is None:
            _check_weight_format(source, allow_pickle)
    base_type, base_shapes = _checkpoint_info(sources[0])
    for source, adapter, spec in zip(sources[1:], adapters, finetuned):
        if adapter is not None:
            _check_adapter(adapter, spec, sources[0])
            continue
        model_type, shapes = _checkpoint_info(source)
        check_same_architecture(base_type, model_type)
        # a key only one checkpoint holds may be another spelling of the same parameter
        # (checkpoints saved by different transformers versions): check_match sees it after loading
        check_shapes({k: v for k, v in base_shapes.items() if k in shapes},
                     {k: v for k, v in shapes.items() if k in base_shapes})


def _refuse_adapter(source: str, spec: str) -> None:
    """Where a whole model is needed (the base, `eval --model`), an adapter is not one."""
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise UserError(f"{spec} is a PEFT adapter, not a model: give it as the fine-tuned model, on its base")


def _check_adapter(folder: Path, spec: str, base_source: str) -> None:
    """An adapter fits a local base: its modules exist there with its shapes (a hub base:
    when it is loaded)."""
    if not has_safetensors(base_source):
        return
    with Checkpoint(base_source) as checkpoint:
        shapes = checkpoint_shapes(checkpoint, key_map(base_source, checkpoint.keys))
    read_adapter(folder, spec, shapes, Path(base_source).name, base_source)


def check_same_architecture(base: str | None, finetuned: str | None) -> None:
    """Refuse a fine-tuned model of another architecture (model types or classes; an
    unknown one, e.g. a hub id not read yet, passes)."""
    if base and finetuned and base != finetuned:
        raise UserError(f"the models differ in architecture: base is {base}, fine-tuned is {finetuned}")


def _checkpoint_info(source: str) -> tuple[str | None, dict[str, tuple[int, ...]]]:
    """A local folder's model type (config.json) and tensor shapes (safetensors headers);
    nothing for a hub id."""
    path = Path(source)
    if not path.is_dir():
        return None, {}
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path.name}/config.json is not valid JSON ({_first_line(exc)[:200]})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not has_safetensors(source):
        return model_type, {}
    with Checkpoint(path) as checkpoint:
        return model_type, {k: tuple(t.shape) for k, t in checkpoint.tensors.items()}


class MissingProcessor:
    """Stands in for a processor that could not be loaded: the model still serves what
    needs no processor (inspect, data-free merges), and any use says why it is missing."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __bool__(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UserError(f"this model's processor could not be loaded ({self.reason}), "
                        "so it cannot read images or prompts")


def _load_processor(source: str, trust_remote_code: bool) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except ImportError as exc:  # e.g. Qwen2-VL's video processor needs torchvision
        return MissingProcessor(str(exc).strip().splitlines()[0][:200])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return MissingProcessor(f"{type(exc).__name__}: {str(exc).strip()[:200]}")


def model_type(spec: str, *, trust_remote_code: bool = False,
               allowed_roots: list[Path] | None = None) -> str:
    """The model type from the config alone (a hub id: config.json is all that is fetched),
    so a model that cannot be reached or read is refused before anything is given up for it."""
    from transformers import AutoConfig

    source = resolve_source(spec, allowed_roots=allowed_roots)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        first = _first_line(exc).replace(source, spec.strip())
        raise UserError(f"could not load {spec}: {first[:300]}") from None
    return str(getattr(config, "model_type", ""))


def load_model(spec: str, *, dtype: str = "float32", device: Device = "cpu",
               allow_pickle: bool = False, trust_remote_code: bool = False,
               allowed_roots: list[Path] | None = None) -> tuple[torch.nn.Module, Any]:
    """Load any image-text-to-text model with its processor.

    `device="auto"` hands placement to accelerate (`device_map="auto"`: several GPUs, CPU
    offload); `cuda` puts everything on the current GPU.
    """
    from transformers import AutoModelForImageTextToText

    source = resolve_source(spec, allowed_roots=allowed_roots)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose float32, bfloat16 or float16")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no GPU is available")
    if device not in ("cpu", "cuda", "auto"):
        raise UserError(f"unknown device {device!r}; choose cpu, cuda or auto")
    _refuse_adapter(source, spec)
    _check_weight_format(source, allow_pickle)
    device_map: Any = "auto" if device == "auto" else {"": device}
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=DTYPES[dtype], device_map=device_map,
            use_safetensors=None if allow_pickle else True, trust_remote_code=trust_remote_code)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise UserError(f"{spec}: out of GPU memory while loading; try bfloat16 or device auto") from None
    except SafetensorError as exc:
        raise UserError(f"could not load {spec}: a safetensors file is damaged or truncated "
                        f"({str(exc).strip()[:200]})") from None
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        # transformers names the resolved folder: say it as the user did
        first = _first_line(exc).replace(source, spec.strip())
        raise UserError(f"could not load {spec}: {first[:300]}") from None
    model.eval()
    return model, _load_processor(source, trust_remote_code)


def onload_model(folder: str, dtype: str, device: str) -> torch.nn.Module | str:
    """The model of a safetensors folder with no weight read: built with its parameters on
    the meta device (buffers computed as loading computes them), then dispatched by
    accelerate with every module's weights offloaded to the checkpoint's own files, read
    when the module runs and dropped after, so the model holds one module's weights at a
    time. Accelerate needs one resident module, on `device` (`_resident`). Or why the
    folder cannot be read so."""
    from accelerate import dispatch_model, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForImageTextToText

    with Checkpoint(folder) as checkpoint:
        names = key_map(folder, checkpoint.keys)
        if names.converted:
            return (f"transformers fuses or splits some tensors when loading (e.g. {sorted(names.converted)[0]}), "
                    "so they cannot be read from the checkpoint one module at a time")
        try:
            config = AutoConfig.from_pretrained(folder)
            with init_empty_weights(include_buffers=False):
                model = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[dtype])
            # as loading ties them, one parameter (outside: the context re-creates assigned ones)
            model.tie_weights(recompute_mapping=False)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            return f"its model cannot be built ({_first_line(exc)[:200]})"
        canonical = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
        index = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            key = names.key_of.get(canonical[id(param)])
            if key is None:
                return f"{canonical[id(param)]} is not in the checkpoint"
            info = checkpoint.tensors[key]
            index[name] = {"safetensors_file": str(info.file), "weight_name": key,
                           "dtype": str(param.dtype).removeprefix("torch.")}
        for name, buffer in model.named_buffers():  # persistent buffers the checkpoint holds
            if name in names.key_of:
                buffer.copy_(checkpoint.read(names.key_of[name]).to(buffer.dtype))
        owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))}
        resident = _resident(model, owners)
        if resident is None:
            return "accelerate needs one resident module and the model has none to spare"
        for name, param in model.get_submodule(resident).named_parameters():
            full = f"{resident}.{name}"
            set_module_tensor_to_device(model, full, device, value=checkpoint.read(index[full]["weight_name"]),
                                        dtype=param.dtype)
    device_map = {**dict.fromkeys(owners, "disk"), resident: device}
    dispatch_model(model, device_map=device_map, offload_index={n: i for n, i in index.items()
                                                                 if not n.startswith(f"{resident}.")},
                   skip_keys=getattr(model, "_skip_keys_device_placement", None))
    model.config._name_or_path = folder
    return model.eval()


class BaseLoading(StrEnum):
    """How a pair's base is held (`Pair.loading["base"]`, and report.json's `base_loading`)."""

    IN_MEMORY = "in memory"
    ONLOADED = "onloaded"  # read module by module from its checkpoint as it runs


@dataclass
class Pair:
    """A base model, one or more fine-tuned models of it, and the shared processor."""

    base: torch.nn.Module
    # loaded models, or `tailor_ui.checkpoint.LazyWeights` reading a checkpoint tensor by tensor;
    # the engine reads them only through `finetuned_value`
    finetuned: list[Any]
    processor: Any
    base_id: str = "base"
    finetuned_ids: list[str] = field(default_factory=lambda: ["finetuned"])
    # per-tensor scores and Hessian factors, keyed by what they depend on (engine.py)
    cache: dict = field(default_factory=dict)
    # the base's own checkpoint read by parameter name (a lazily loaded pair whose base is a
    # local safetensors folder): what `finetuned_model` puts back, so it parks no copy
    base_checkpoint: LazyWeights | None = None
    # how the base is held: {"base": "in memory"} (with why, where onloading was asked for),
    # or {"base": "onloaded", "from": its safetensors folder, "device": where modules run}
    loading: dict[str, str] = field(default_factory=lambda: {"base": BaseLoading.IN_MEMORY})
    _changed: list[str] | None = field(default=None, init=False, repr=False)

    @property
    def onloaded(self) -> bool:
        return self.loading["base"] == BaseLoading.ONLOADED

    def base_params(self) -> dict[str, torch.Tensor]:
        return dict(self.base.named_parameters())

    def base_value(self, name: str) -> torch.Tensor:
        """The base's value of a parameter (accelerate-offloaded ones included)."""
        return read_param(self.base, name)

    def finetuned_value(self, k: int, name: str, device: torch.device | None = None) -> torch.Tensor:
        """Fine-tuned model k's value of a base parameter, on `device` (default: where the
        base computes with it); a lazy model reads it from disk in the base's dtype."""
        device = device if device is not None else compute_device(self.base, name)
        tuned = self.finetuned[k]
        if isinstance(tuned, torch.nn.Module):
            return read_param(tuned, name).to(device)
        return tuned.read(name, dtype=self.base.get_parameter(name).dtype, device=device)

    @contextmanager
    def finetuned_model(self, k: int) -> Iterator[torch.nn.Module]:
        """A model that computes as fine-tuned model k does: the loaded model, or, for one
        read lazily, the base holding fine-tuned values in every changed tensor (one read
        each), put back bit for bit after. The base's values come back from its checkpoint
        where the pair has it (`base_checkpoint`: nothing held meanwhile), else from copies
        parked on the CPU. The caller holds the pair's lock (the base is shared)."""
        tuned = self.finetuned[k]
        if isinstance(tuned, torch.nn.Module):
            yield tuned
            return
        stored = self.base_checkpoint
        with holding(self.base, self.changed(), lambda name: self.finetuned_value(k, name),
                     None if stored is None else lambda name, like: stored.read(name, like.dtype, like.device)
                     ) as model:
            yield model

    def summary(self, k: int = 0) -> pd.DataFrame:
        """`summarize` of fine-tuned model k, loaded or read lazily."""
        return summarize(self.base, lambda name: self.finetuned_value(k, name))

    def changed_if_known(self) -> list[str] | None:
        """`changed()` where it has been computed, else None (nothing is read)."""
        return self._changed

    def remember_changed(self, names: list[str]) -> None:
        """`changed()` as computed elsewhere for these same models (a job's worker)."""
        self._changed = list(names)

    def changed(self) -> list[str]:
        """Base parameters that some fine-tuned model changed (torch.equal: a NaN counts as
        a change, a zero's sign does not), in model order. Computed once per pair (with lazy
        models it reads every tensor once): paired models are fixed, as the score cache assumes."""
        if self._changed is None:
            out = []
            for name, _ in self.base.named_parameters():
                device = compute_device(self.base, name)
                base = self.base_value(name).to(device)
                if any(not torch.equal(base, self.finetuned_value(k, name, device))
                       for k in range(len(self.finetuned))):
                    out.append(name)
            self._changed = out
        return self._changed


def load_pair(base: str, finetuned: str | list[str], *, lazy: bool = False, onload: bool = False,
              progress: Progress | None = None, before_loading: Callable[[], None] | None = None,
              **load_options: Any) -> Pair:
    """Load and match a base model with one or several fine-tuned models of it.

    `lazy`: a fine-tuned model with safetensors weights (a local folder, or a hub id's
    snapshot in the hub cache: `weights_folder`) is not loaded but
    read tensor by tensor when the engine needs it (`tailor_ui.checkpoint.LazyWeights`); others
    (pickle checkpoints) are loaded as usual. A PEFT adapter (a folder or hub id
    with adapter_config.json) is a fine-tuned model too: the base with the adapter merged,
    per tensor when lazy (`tailor_ui.adapter`). `progress` hears of each model
    (2 + one step per fine-tuned model). `before_loading` runs once every model's config has
    been read (a hub id: config.json only), so a model that cannot be reached or is of
    another architecture is refused before it runs (the dashboard lets go of a visitor's
    current pair there). `onload`: the base's weights stay in its safetensors and each
    module reads its own when it runs (`onload_model`), where the base has them; `Pair.loading`
    says how the base is held and why.
    """
    specs = [finetuned] if isinstance(finetuned, str) else list(finetuned)
    if not specs:
        raise UserError("give at least one fine-tuned model")
    report = progress or no_progress
    roots = load_options.get("allowed_roots")
    report("reading the models' configs", 0, 2 + len(specs))
    check_local_pair(base, specs, allowed_roots=roots, allow_pickle=load_options.get("allow_pickle", False))
    adapters = {spec: adapter_folder(resolve_source(spec, allowed_roots=roots)) for spec in specs}
    if before_loading is not None:
        trust = load_options.get("trust_remote_code", False)
        base_type = model_type(base, trust_remote_code=trust, allowed_roots=roots)
        for spec in specs:
            if adapters[spec] is None:  # an adapter has no model type: its shapes were checked
                check_same_architecture(base_type, model_type(spec, trust_remote_code=trust,
                                                              allowed_roots=roots))
        before_loading()
    report(f"loading the base model {base}", 1, 2 + len(specs))
    base_model, loading = _onloaded(base, roots, load_options) if onload else (None, {"base": BaseLoading.IN_MEMORY})
    if base_model is not None:
        processor = _load_processor(resolve_source(base, allowed_roots=roots),
                                    load_options.get("trust_remote_code", False))
    else:
        base_model, processor = load_model(base, **load_options)
    base_checkpoint = _base_checkpoint(base, base_model, roots) if lazy else None
    tuned = []
    for i, spec in enumerate(specs, start=2):
        report(f"loading the fine-tuned model {spec}", i, 2 + len(specs))
        if adapters[spec] is not None:
            tuned.append(_adapter_model(adapters[spec], spec, base, base_model, lazy, load_options))
            continue
        folder = weights_folder(resolve_source(spec, allowed_roots=roots)) if lazy else None
        if folder is not None:
            tuned.append(LazyWeights(folder, base_model))
            continue
        model, _ = load_model(spec, **load_options)
        check_match(base_model, model)
        tuned.append(model)
    return Pair(base=base_model, finetuned=tuned, processor=processor,
                base_id=base, finetuned_ids=specs, base_checkpoint=base_checkpoint, loading=loading)


def _resident(model: torch.nn.Module, owners: set[str]) -> str | None:
    """The module an onloaded model keeps on its device. Accelerate places it with all its
    submodules and offloads whatever lies below an offloaded module, so it is the module of
    the first parameter (models take `self.device` from it) where it has no submodules, no
    module above it holds weights and one path leads to it; else the first module with no
    tensors at all (an activation), which holds nothing."""
    paths = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    first = next(n for n, _ in model.named_parameters()).rpartition(".")[0]
    module = model.get_submodule(first)
    above = {first.rsplit(".", i)[0] for i in range(1, first.count(".") + 1)} | {""}
    if first and not above & owners and not any(True for _ in module.children()) and paths[id(module)] == 1:
        return first
    return next((n for n, m in model.named_modules() if n and not any(True for _ in m.parameters())
                 and not any(True for _ in m.buffers())), None)


def _onloaded(spec: str, roots: list[Path] | None, load_options: dict[str, Any]
              ) -> tuple[torch.nn.Module | None, dict[str, str]]:
    """The base onloaded from its safetensors (`onload_model`), or None and why not."""
    folder = weights_folder(resolve_source(spec, allowed_roots=roots))
    if folder is None:
        return None, {"base": BaseLoading.IN_MEMORY, "why": "the base has no safetensors weights to read module by module"}
    device = load_options.get("device", "cpu")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        return None, {"base": BaseLoading.IN_MEMORY, "why": f"device {device!r} is not available"}  # loading says so
    found = onload_model(folder, load_options.get("dtype", "float32"), device)
    if isinstance(found, str):
        return None, {"base": BaseLoading.IN_MEMORY, "why": found}
    return found, {"base": BaseLoading.ONLOADED, "from": folder, "device": device}


def _base_checkpoint(spec: str, base_model: torch.nn.Module, roots: list[Path] | None) -> LazyWeights | None:
    """The base's safetensors (`weights_folder`) read by parameter name, where every
    parameter is one checkpoint tensor (none fused or split when loading); None otherwise."""
    folder = weights_folder(resolve_source(spec, allowed_roots=roots))
    if folder is None:
        return None
    try:
        return LazyWeights(folder, base_model)
    except UserError:
        return None


def _adapter_model(folder: Path, spec: str, base: str, base_model: torch.nn.Module, lazy: bool,
                   load_options: dict[str, Any]) -> Any:
    """A fine-tuned model given as an adapter on the base: read lazily from the base's
    checkpoint with the adapter merged per tensor, or the base loaded once more with the
    adapter merged in (a hub base, or not lazy)."""
    base_source = resolve_source(base, allowed_roots=load_options.get("allowed_roots"))
    shapes = {n: tuple(p.shape) for n, p in base_model.named_parameters()}
    adapter = read_adapter(folder, spec, shapes, base, base_source)
    base_folder = weights_folder(base_source) if lazy else None
    if base_folder is not None:
        return AdapterWeights(adapter, base_folder, base_model)
    model, _ = load_model(base, **load_options)
    merge_into(model, adapter)
    return model


def check_match(base: torch.nn.Module, finetuned: torch.nn.Module, show: int = 5) -> None:
    """Same architecture, same parameter names, same shapes; otherwise list the first mismatches."""
    check_same_architecture(type(base).__name__, type(finetuned).__name__)
    check_shapes({n: tuple(p.shape) for n, p in base.named_parameters()},
                 {n: tuple(p.shape) for n, p in finetuned.named_parameters()}, show)


def summarize(base: torch.nn.Module, finetuned: torch.nn.Module | Callable[[str], torch.Tensor]
              ) -> pd.DataFrame:
    """One row per parameter: where it lives, how much fine-tuning moved it. `finetuned`:
    the fine-tuned model, or its value of a parameter by name (a lazy one: each read once)."""
    value_of = (finetuned.get_parameter if isinstance(finetuned, torch.nn.Module) else finetuned)
    linears = {f"{n}.weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    rows = []
    with torch.no_grad():
        for name, p in base.named_parameters():
            q = value_of(name).to(p.device)
            delta = q.float() - p.float()
            changed = int((delta != 0).sum())
            base_norm = float(p.float().norm())
            delta_norm = float(delta.norm())
            rows.append({
                "name": name, "component": component(name), "layer": layer_index(name),
                "module": module_kind(name), "linear": name in linears,
                "shape": "x".join(map(str, p.shape)), "numel": p.numel(),
                "changed": changed, "changed_fraction": changed / max(p.numel(), 1),
                "delta_norm": delta_norm, "base_norm": base_norm,
                "relative_change": delta_norm / base_norm if base_norm else 0.0,
            })
    return pd.DataFrame(rows)
