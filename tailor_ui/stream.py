"""Data-free merges and patch application streamed tensor by tensor from safetensors shards.

Nothing here loads a whole model. The base and the fine-tuned checkpoints are walked by
name together, one tensor at a time, with one shard file open per model; each merged
tensor goes straight into a sharded output whose headers are planned up front (the output
has the base's names, shapes and dtypes), so peak memory is one tensor's working set, not
the model's. Tensors are read with plain file reads, not memory maps, so what a run holds
is what the process's resident memory shows.

The per-tensor math is the engine's own (`tailor_ui.engine`'s per-tensor dispatch, the
functions of `tailor_ui.methods.baselines`, `tailor_ui.patch.tensor_patch` and `union`),
routed exactly as `run_method` routes it, so a streamed merge equals the in-memory merge
bit for bit.

Checkpoint keys are not always the model's parameter names: transformers 5 saves e.g.
LLaVA with its legacy keys (`language_model.model.layers.0…`) while the loaded module is
`model.language_model.layers.0…`. Patches and the method's choices (which tensors are
linear weights, the module regex, DARE's per-tensor seed) speak parameter names, so
`key_map` asks transformers itself how each key loads: it builds the model skeleton on
the meta device and runs the same renaming `from_pretrained` runs.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.memory import PeakMemory
from tailor_ui.patch import Patch, TensorPatch, check_fits, tensor_patch, union
from tailor_ui.settings import MULTI_TASK_NATIVE, Settings

from tailor_ui.engine import merge_tensor, patch_metadata  # the engine's own per-tensor dispatch

Progress = Callable[[str, int, int], None]
StopCheck = Callable[[], bool]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 2**30
ELEMENTWISE = ("wise_ft", "task_arithmetic")  # each entry's value depends on that entry alone
CHUNK_ELEMS = 1 << 24  # entries per chunk of an element-wise merge (64 MiB in float32)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")
_SKIP_FILES = {"README.md", INDEX_NAME, "pytorch_model.bin.index.json"}

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------ reading

@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor table and the metadata of one safetensors file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(8)
            if len(raw) != 8:
                raise ValueError("file too short")
            (length,) = struct.unpack("<Q", raw)
            if length > 100 * 2**20:
                raise ValueError("header too large")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{path.name} is not a readable safetensors file ({exc})") from None
    metadata = header.pop("__metadata__", None) or {}
    for key, entry in header.items():
        entry["_base"] = 8 + length
        if entry.get("dtype") not in DTYPES:
            raise UserError(f"{path.name}: tensor {key} has an unsupported dtype {entry.get('dtype')!r}")
    return header, metadata


class Checkpoint:
    """The safetensors shards of one model folder, read tensor by tensor by name.

    Headers are read up front (they are small); tensor bytes are read on demand with
    plain file reads into a fresh tensor, keeping at most one shard file open.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = self._shard_files()
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            header, _ = read_header(file)
            for key, entry in header.items():
                if key in self.tensors:
                    raise UserError(f"{self.folder.name}: tensor {key} appears in two shards")
                start, end = entry["data_offsets"]
                info = TensorInfo(key, file, DTYPES[entry["dtype"]], tuple(entry["shape"]),
                                  entry["_base"] + start, entry["_base"] + end)
                if info.nbytes != nbytes(info.dtype, info.shape):
                    raise UserError(f"{file.name} is damaged: tensor {key} has the wrong size")
                self.tensors[key] = info
        self._handle: BinaryIO | None = None
        self._open_file: Path | None = None

    def _shard_files(self) -> list[Path]:
        if not self.folder.is_dir():
            raise UserError(f"{self.folder}: no such model folder")
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{self.folder.name}/{INDEX_NAME} is damaged ({exc})") from None
            files = []
            for name in dict.fromkeys(weight_map.values()):
                path = (self.folder / name).resolve()
                if not path.is_relative_to(self.folder.resolve()) or not path.is_file():
                    raise UserError(f"{self.folder.name}: shard {name} named in the index is missing")
                files.append(path)
            return files
        if (self.folder / SINGLE_NAME).is_file():
            return [self.folder / SINGLE_NAME]
        raise UserError(f"{self.folder.name} holds no safetensors weights "
                        f"({SINGLE_NAME} or {INDEX_NAME})")

    @property
    def keys(self) -> list[str]:
        """Keys in storage order (shard by shard, by offset): the order reads are cheapest in."""
        return sorted(self.tensors, key=lambda k: (str(self.tensors[k].file), self.tensors[k].start))

    def read(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        if self._open_file != info.file:
            self.close()
            self._handle = open(info.file, "rb")
            self._open_file = info.file
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        self._handle.seek(info.start)
        if info.nbytes and self._handle.readinto(memoryview(buffer.numpy())) != info.nbytes:
            raise UserError(f"{info.file.name} is truncated: tensor {key} is incomplete")
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = self._open_file = None

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def check_same_keys(base: Checkpoint, others: Sequence[Checkpoint], show: int = 5) -> None:
    """Every checkpoint must hold the base's keys with the base's shapes; list what differs."""
    for other in others:
        a, b = base.tensors, other.tensors
        problems = [f"{k} only in base" for k in a if k not in b]
        problems += [f"{k} only in {other.folder.name}" for k in b if k not in a]
        problems += [f"{k}: base {a[k].shape} vs {other.folder.name} {b[k].shape}"
                     for k in a if k in b and a[k].shape != b[k].shape]
        if problems:
            more = f" (and {len(problems) - show} more)" if len(problems) > show else ""
            raise UserError(f"the checkpoints of {base.folder.name} and {other.folder.name} do not "
                            "match: " + "; ".join(problems[:show]) + more)


# ------------------------------------------------------------------------------ writing

class ShardedWriter:
    """Write a safetensors checkpoint tensor by tensor, in a fixed order, shard by shard.

    The layout (names, dtypes, shapes, in writing order) is known up front, so every
    shard's header is written first and tensor bytes follow as they come: nothing is
    buffered beyond the tensor being written. The index is written last, by `close`.
    """

    def __init__(self, folder: str | Path, layout: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for key, dtype, shape in layout:
            n = nbytes(dtype, shape)
            if shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, dtype, tuple(shape)))
            size += n
        count = len(shards)
        self.files = [SINGLE_NAME] if count == 1 else [
            f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        self._queue = [(self.files[i], entry) for i, shard in enumerate(shards) for entry in shard]
        self._shards = dict(zip(self.files, shards))
        self._next = 0
        self._handle: BinaryIO | None = None
        self._file: str | None = None
        self.total_bytes = sum(nbytes(d, s) for _, d, s in layout)

    def _open(self, name: str) -> None:
        self._finish_file()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for key, dtype, shape in self._shards[name]:
            n = nbytes(dtype, shape)
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned
        self._handle = open(self.folder / name, "wb")
        self._handle.write(struct.pack("<Q", len(raw)) + raw)
        self._file = name

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"unexpected tensor {key}: every planned tensor is written")
        name, (want, dtype, shape) = self._queue[self._next]
        if key != want or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"expected {want} {dtype} {shape}, got {key} {tensor.dtype} "
                             f"{tuple(tensor.shape)}")
        if self._file != name:
            self._open(name)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def _finish_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = self._file = None

    def close(self) -> None:
        if self._next != len(self._queue):
            missing = [e[1][0] for e in self._queue[self._next:self._next + 3]]
            raise ValueError(f"{len(self._queue) - self._next} planned tensors were never written "
                             f"({', '.join(missing)}…)")
        self._finish_file()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {key: name for name, (key, _, _) in self._queue}}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def copy_side_files(source: str | Path, target: str | Path) -> list[str]:
    """Config, generation config, tokenizer, processor, chat template: every top-level file
    that is not a weight file (nor the base's model card)."""
    copied = []
    for path in sorted(Path(source).iterdir()):
        if (path.is_file() and not path.name.startswith(".") and path.name not in _SKIP_FILES
                and not path.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copy2(path, Path(target) / path.name)
            copied.append(path.name)
    return copied


# ------------------------------------------------------------------------ names and keys

@dataclass
class KeyMap:
    """How a model's checkpoint keys load into its parameters (as `from_pretrained` does it)."""

    param_of: dict[str, str]  # checkpoint key -> parameter name (1:1 renames only)
    key_of: dict[str, str]  # parameter name -> checkpoint key
    converted: set[str] = field(default_factory=set)  # keys transformers reshapes or fuses
    linears: set[str] = field(default_factory=set)  # weights of nn.Linear, output embedding excluded
    architecture: str = ""


def _skeleton(folder: Path) -> torch.nn.Module:
    """The model class of the folder's config, built on the meta device (no memory, no code
    from the checkpoint)."""
    import transformers
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder.name}: cannot read its config.json ({str(exc).splitlines()[0][:200]})") from None
    names = list(getattr(config, "architectures", None) or [])
    cls = getattr(transformers, names[0], None) if names else None
    if cls is None:
        raise UserError(f"{folder.name}: transformers has no model class {names[:1] or '(none named)'}; "
                        "streaming needs one to know the parameter names")
    with torch.device("meta"):
        return cls._from_config(config)


def key_map(folder: str | Path, keys: Sequence[str]) -> KeyMap:
    """Map checkpoint keys to parameter names with transformers' own conversion mapping.

    Runs `conversion_mapping.get_model_conversion_mapping` and
    `core_model_loading.rename_source_key` over the keys in the order loading visits them,
    with loading's fallback for keys that need no renaming; tied parameters map to the
    name `named_parameters()` reports. Keys caught by a WeightConverter (fused or split on
    load, e.g. MoE experts) have no 1:1 parameter and land in `converted`.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (WeightConverter, WeightRenaming, dot_natural_key,
                                                 rename_source_key)

    model = _skeleton(Path(folder))
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    meta_state = model.state_dict()
    prefix = model.base_model_prefix
    canonical: dict[int, str] = {}
    for name, param in model.named_parameters():  # deduplicated: tied weights keep their first name
        canonical.setdefault(id(param), name)
    all_params = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    out = KeyMap(param_of={}, key_of={}, architecture=type(model).__name__)
    for key in sorted(keys, key=dot_natural_key):
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if renamed not in meta_state and key in meta_state:  # as loading does: no rename needed
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix,
                                                 meta_state_dict=meta_state)
        if pattern is not None:
            out.converted.add(key)
        elif renamed in all_params:
            name = all_params[renamed]
            if name not in out.key_of:
                out.param_of[key] = name
                out.key_of[name] = key
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            weight = f"{name}.weight"
            if weight in all_params and all_params[weight] == weight:
                out.linears.add(weight)
    return out


# ------------------------------------------------------------------------------- memory

def memory_bound_bytes(numel: int, base_bytes: int, n_models: int, method: str,
                       chunk_elems: int | None = None) -> int:
    """Working set of merging one tensor of `numel` entries (`base_bytes` each in storage).

    Storage copies of the base, the n fine-tuned tensors and the output, b·(n + 2), plus
    float32 temporaries: the upcast base and models (n + 1), task vectors and their stack
    (2n), result and change test (~3); TIES and magnitude add scores, masks and top-k
    indices (~4 per model). Element-wise methods compute on chunks of `chunk_elems`
    entries, so their temporaries are bounded by the chunk, not the tensor.
    """
    temps = 4 * (3 * n_models + 4 + (4 * n_models if method in ("ties", "magnitude") else 0))
    if chunk_elems is not None and method in ELEMENTWISE:
        return numel * base_bytes * (n_models + 2) + min(numel, chunk_elems) * temps
    return numel * (base_bytes * (n_models + 2) + temps)


# --------------------------------------------------------------------------- the merge

def _merge_one(name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor], s: Settings,
               selected: bool, chunk_elems: int = CHUNK_ELEMS) -> torch.Tensor | None:
    """One tensor's merged value (in the base dtype), or None where it stays the base,
    routed as `run_method` routes it: selected linears (and, with others="linear", every
    other changed tensor) through the method; other changed tensors by the `others`
    policy; methods that are not multi-task native run per fine-tuned model and their
    patches are combined by `union`.

    Where the value of each entry depends on that entry alone (wise_ft, task arithmetic,
    the fine-tuned values, and the union of such patches), the same functions run on flat
    chunks of `chunk_elems` entries: bit for bit the same result and a working set bounded
    by the chunk. (Chunks are large on purpose: on a busy CPU every parallel torch op pays
    for waking its threads, so a million small ops cost more than the arithmetic.)
    """
    if all(torch.equal(base, t) for t in tuned):  # engine._changed
        return None
    if not selected and s.others == "base":
        return None
    by_method = selected or s.others == "linear"
    if (by_method and s.method not in ELEMENTWISE) or base.numel() <= chunk_elems:
        return _merge_values(name, base, tuned, s, by_method)
    out = torch.empty_like(base)
    flat_out, flat_base, flat_tuned = out.view(-1), base.reshape(-1), [t.reshape(-1) for t in tuned]
    for i in range(0, base.numel(), chunk_elems):
        j = i + chunk_elems
        flat_out[i:j] = _merge_values(name, flat_base[i:j], [t[i:j] for t in flat_tuned], s, by_method)
    return out


def _merge_values(name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor], s: Settings,
                  by_method: bool) -> torch.Tensor:
    # Every baseline starts from the float32 values, so converting once up front changes no
    # bit; it saves repeated conversions where the working set is a bounded chunk, while
    # whole-tensor methods (TIES, magnitude, DARE) convert inside, one temporary at a time.
    upcast = s.method in ELEMENTWISE or not by_method
    base_in = base.float() if upcast else base
    tuned_in = [t.float() for t in tuned] if upcast else list(tuned)
    groups = [list(range(len(tuned)))] if s.method in MULTI_TASK_NATIVE else [[k] for k in range(len(tuned))]
    parts = []
    for group in groups:
        models = [tuned_in[k] for k in group]
        if by_method:
            parts.append(merge_tensor(base_in, models, name, s))
        else:  # others == "finetuned": the fine-tuned values (several models: their mean)
            parts.append(torch.stack([t.float() for t in models]).mean(dim=0))
    del base_in, tuned_in
    if len(parts) == 1:
        # base with tensor_patch(base, new) applied is new cast to the base dtype, bit for bit
        return parts[0].to(base.dtype)
    patches = [Patch(tensors={name: tp}) for tp in (tensor_patch(base, p) for p in parts)
               if tp.index.numel()]
    if not patches:
        return base.clone()
    tp = patches[0].tensors[name] if len(patches) == 1 else \
        union(patches, {name: base}, s.overlap).tensors[name]
    return _applied(base, tp)


def _applied(tensor: torch.Tensor, tp: TensorPatch, *, inplace: bool = False) -> torch.Tensor:
    """`tensor` with the patch written in (as `patch.apply_patch` writes it)."""
    out = tensor if inplace else tensor.clone()
    flat = out.view(-1)
    flat[tp.index.to(flat.device)] = tp.values.to(device=flat.device, dtype=flat.dtype)
    return out


def _changed_entries(a: torch.Tensor, b: torch.Tensor) -> int:
    if a.dtype.is_floating_point and a.element_size() in (1, 2, 4, 8):
        view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return int(torch.count_nonzero(a.reshape(-1).view(view) != b.reshape(-1).view(view)))
    return int(torch.count_nonzero(a != b))


def _device(device: str) -> torch.device:
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"unknown device {device!r}; choose cpu or cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("device cuda was asked for but no GPU is available")
    return torch.device(device)


@dataclass
class _Clock:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - start
        return now


def stream_merge(base_dir: str | Path, finetuned_dirs: str | Path | Sequence[str | Path],
                 settings: Settings, out_dir: str | Path | None, device: str = "cpu", *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_elems: int = CHUNK_ELEMS,
                 patch: Patch | None = None, progress: Progress | None = None,
                 should_stop: StopCheck | None = None) -> dict[str, Any]:
    """Merge fine-tuned checkpoints into their base with a data-free method, streaming.

    Writes a loadable model folder at `out_dir` (base's config and processor files, the
    merged weights in the base's names and dtypes), atomically. Equal, tensor for tensor,
    to `run_method(pair, settings)` applied to the base and saved. With `patch`, the
    changed entries are also collected into it, by parameter name, with its metadata: the
    patch `run_method` returns (`out_dir=None` makes only the patch). Returns a report with
    timings and peak memory. Compute runs on `device`; results are parked on the CPU.
    """
    from tailor_ui.calibration import Cancelled

    if settings.method == "tailor":
        raise UserError("Model Tailor needs calibration data and Hessians; stream only the "
                        "data-free methods (magnitude, wise_ft, task_arithmetic, ties, dare)")
    dirs = [finetuned_dirs] if isinstance(finetuned_dirs, (str, Path)) else list(finetuned_dirs)
    if not dirs:
        raise UserError("give at least one fine-tuned model")
    dev = _device(device)
    progress = progress or (lambda *_: None)
    should_stop = should_stop or (lambda: False)
    regex = re.compile(settings.modules) if settings.modules else None
    start = time.perf_counter()
    clock = _Clock()
    base = Checkpoint(base_dir)
    tuned = [Checkpoint(d) for d in dirs]
    check_same_keys(base, tuned)
    keys = base.keys
    names = key_map(base.folder, keys)
    bad = [k for k in names.converted if any(not _same_bytes(base, t, k) for t in tuned)]
    if bad:
        raise UserError(f"transformers converts {bad[0]} when loading (not a 1:1 tensor), and the "
                        "fine-tuned model changed it; merge this model in memory instead")
    layout = [(k, base.tensors[k].dtype, base.tensors[k].shape) for k in keys]
    per_tensor: dict[str, dict[str, Any]] = {}
    selected_changed = selected_numel = selected_kept = 0
    copied: list[str] = []
    largest = max((base.tensors[k].shape for k in keys), key=lambda s: torch.Size(s).numel(), default=())
    clock.add("plan", start)
    meter = PeakMemory([dev]).start()  # stopped in `finally`; planning holds no tensors
    try:
        with atomic_path(out_dir) if out_dir is not None else nullcontext() as tmp:
            writer = ShardedWriter(tmp, layout, max_shard_bytes) if tmp is not None else None
            for i, key in enumerate(keys):
                if should_stop():
                    raise Cancelled
                progress(f"merging {key}", i, len(keys))
                t0 = time.perf_counter()
                b = base.read(key)
                ts = [c.read(key).to(b.dtype) for c in tuned]
                t0 = clock.add("read", t0)
                name = names.param_of.get(key)
                new = None
                if name is not None and b.is_floating_point():
                    selected = name in names.linears and (regex is None or bool(regex.search(name[:-7])))
                    bd, tsd = b.to(dev), [t.to(dev) for t in ts]
                    new = _merge_one(name, bd, tsd, settings, selected, chunk_elems)
                    if new is not None:
                        new = new.to("cpu")
                        changed = _changed_entries(b, new)
                        if changed:
                            per_tensor[name] = {"key": key, "changed": changed, "numel": b.numel(),
                                                "fraction": changed / max(b.numel(), 1)}
                            if patch is not None:
                                patch.tensors[name] = tensor_patch(b, new)
                        if selected:
                            selected_changed += 1
                            selected_numel += b.numel()
                            selected_kept += changed
                    del bd, tsd
                t0 = clock.add("merge", t0)
                if writer is not None:
                    writer.write(key, new if new is not None else b)
                del b, ts, new
                clock.add("write", t0)
            t0 = time.perf_counter()
            if writer is not None:
                writer.close()
                copied = copy_side_files(base.folder, tmp)
            if regex is not None and not selected_changed:
                raise UserError(f"no changed linear layer matches {settings.modules!r}")
            clock.add("write", t0)
    finally:
        base.close()
        for c in tuned:
            c.close()
        meter.stop()
    seconds = time.perf_counter() - start
    numel = sum(torch.Size(base.tensors[k].shape).numel() for k in keys)
    entries = sum(t["changed"] for t in per_tensor.values())
    largest_numel = int(torch.Size(largest).numel())
    largest_bytes = max((base.tensors[k].nbytes for k in keys), default=0)
    bound = memory_bound_bytes(largest_numel, largest_bytes // max(largest_numel, 1), len(tuned),
                               settings.method, chunk_elems) / 2**20
    memory = {**meter.report(), "largest_tensor_mb": largest_bytes / 2**20, "one_tensor_bound_mb": bound,
              # the stack (torch, transformers) at start, plus one tensor's working set
              "predicted_peak_mb": meter.rss_at_start_mb + bound}
    if patch is not None:
        patch.metadata = patch_metadata(settings, str(base_dir), [str(d) for d in dirs], patch)
    return {"settings": settings.to_dict(), "base": str(base_dir), "finetuned": [str(d) for d in dirs],
            "streamed": True, "device": str(dev), "tensors_total": len(keys),
            "selected_linears": selected_changed, "patch_entries": entries,
            "linear_fraction": selected_kept / selected_numel if selected_numel else 0.0,
            "model_fraction": entries / max(numel, 1), "tensors": per_tensor,
            "files": _files(writer) + copied, "timings_s": {**clock.timings, "total": seconds},
            "memory": memory}


def _files(writer: ShardedWriter | None) -> list[str]:
    if writer is None:
        return []
    return writer.files + ([INDEX_NAME] if len(writer.files) > 1 else [])


def _same_bytes(a: Checkpoint, b: Checkpoint, key: str) -> bool:
    x, y = a.read(key), b.read(key)
    return x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def stream_apply_patch(base_dir: str | Path, patch: Patch, out_dir: str | Path, *,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None,
                       should_stop: StopCheck | None = None) -> dict[str, Any]:
    """Write base + patch as a model folder, streaming the base tensor by tensor.

    The patch names parameters; they are found in the checkpoint through `key_map`.
    Equal to loading the base, `apply_patch`, and `save_pretrained`, tensor for tensor.
    """
    from tailor_ui.calibration import Cancelled

    progress = progress or (lambda *_: None)
    should_stop = should_stop or (lambda: False)
    start = time.perf_counter()
    base = Checkpoint(base_dir)
    keys = base.keys
    if all(name in base.tensors for name in patch.tensors):  # names are the keys already
        key_of = {name: name for name in patch.tensors}
    else:
        key_of = key_map(base.folder, keys).key_of
    check_fits({n: tuple(base.tensors[k].shape) for n, k in key_of.items()}, patch)
    by_key = {key_of[n]: (n, tp) for n, tp in patch.tensors.items()}
    layout = [(k, base.tensors[k].dtype, base.tensors[k].shape) for k in keys]
    meter = PeakMemory().start()
    try:
        with atomic_path(out_dir) as tmp:
            writer = ShardedWriter(tmp, layout, max_shard_bytes)
            for i, key in enumerate(keys):
                if should_stop():
                    raise Cancelled
                progress(f"writing {key}", i, len(keys))
                tensor = base.read(key)
                if key in by_key:
                    tensor = _applied(tensor, by_key[key][1], inplace=True)
                writer.write(key, tensor)
            writer.close()
            copied = copy_side_files(base.folder, tmp)
    finally:
        base.close()
        meter.stop()
    return {"base": str(base_dir), "patch_entries": patch.num_entries, "streamed": True,
            "files": _files(writer) + copied, "timings_s": {"total": time.perf_counter() - start},
            "memory": meter.report()}
