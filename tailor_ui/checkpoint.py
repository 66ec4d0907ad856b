"""Safetensors checkpoints read and written tensor by tensor, without loading a model.

`Checkpoint` reads one model folder's shards by key, with plain file reads (not memory
maps), so what a run holds is what the process's resident memory shows. `ShardedWriter`
writes a checkpoint whose headers are planned up front, tensor by tensor. `LazyWeights`
is a fine-tuned model that is never loaded: its tensors are read when the engine asks.

Checkpoint keys are not always the model's parameter names: transformers 5 saves e.g.
LLaVA with its legacy keys (`language_model.model.layers.0…`) while the loaded module is
`model.language_model.layers.0…`. Patches and the methods speak parameter names, so
`key_map` renames each key with transformers' own conversion rules for the model's
architecture, read from config.json, and classifies tensors from their names and header
shapes, without importing or building the model class (that import is seconds of every
run). Where the rules of a nested model could rename keys at a place only the module tree
knows, it falls back to `class_key_map`, which builds the skeleton on the meta device and
runs the renaming `from_pretrained` runs.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import struct
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch

from tailor_ui.errors import UserError
from tailor_ui.memory import prefer_huge_pages

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 2**30
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
        return self._read(info, info.start, info.nbytes).view(info.dtype).reshape(info.shape)

    def read_range(self, key: str, start: int, end: int) -> torch.Tensor:
        """Flat entries [start, end) of a tensor, as a fresh 1-D tensor."""
        info = self.tensors[key]
        size = info.dtype.itemsize
        return self._read(info, info.start + start * size, (end - start) * size).view(info.dtype)

    def _read(self, info: TensorInfo, offset: int, length: int) -> torch.Tensor:
        if self._open_file != info.file:
            self.close()
            self._handle = open(info.file, "rb")
            self._open_file = info.file
        buffer = torch.empty(length, dtype=torch.uint8)
        prefer_huge_pages(buffer)
        self._handle.seek(offset)
        if length and self._handle.readinto(memoryview(buffer.numpy())) != length:
            raise UserError(f"{info.file.name} is truncated: tensor {info.key} is incomplete")
        return buffer

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


def check_saved(base_folder: str | Path, out_folder: str | Path, dtype: torch.dtype | None = None,
                show: int = 5) -> int:
    """Every tensor of the base checkpoint is in the saved folder, with its shape and dtype
    (a floating tensor may be in `dtype`, what an in-memory model was loaded as); headers
    only. A key the output names otherwise is matched through `key_map`, and a tied copy
    transformers saves once is not required. Returns the number of tensors checked."""
    base, out = Checkpoint(base_folder), Checkpoint(out_folder)
    names = None
    problems = []
    for key, want in base.tensors.items():
        got = out.tensors.get(key)
        if got is None:
            names = names or key_map(base.folder, base.keys)
            if key in names.tied:
                continue
            got = out.tensors.get(names.param_of.get(key, key))
        dtypes = {want.dtype} | ({dtype} if dtype is not None and want.dtype.is_floating_point else set())
        if got is None:
            problems.append(f"{key} is missing")
        elif got.shape != want.shape or got.dtype not in dtypes:
            problems.append(f"{key} is {got.dtype} {list(got.shape)}, the base's {want.dtype} {list(want.shape)}")
    if problems:
        more = f" (and {len(problems) - show} more)" if len(problems) > show else ""
        raise UserError("the saved model does not hold every tensor of the base: "
                        + "; ".join(problems[:show]) + more)
    return len(base.tensors)


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
        self._part = 0  # entries of the next tensor written so far (it may come in parts)
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
        """The next planned tensor whole, or the next part of it as flat entries (parts in
        order; the tensor is done when they add up to it)."""
        if self._next >= len(self._queue):
            raise ValueError(f"unexpected tensor {key}: every planned tensor is written")
        name, (want, dtype, shape) = self._queue[self._next]
        numel = torch.Size(shape).numel()
        whole = tuple(tensor.shape) == shape and not self._part
        part = tensor.dim() == 1 and self._part + tensor.numel() <= numel
        if key != want or tensor.dtype != dtype or not (whole or part):
            raise ValueError(f"expected {want} {dtype} {shape} (or its entries from {self._part}), "
                             f"got {key} {tensor.dtype} {tuple(tensor.shape)}")
        if self._file != name:
            self._open(name)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._part += tensor.numel()
        if self._part == numel:
            self._next += 1
            self._part = 0

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
    tied: set[str] = field(default_factory=set)  # keys of a parameter another key already loads
    architecture: str = ""


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json as plain JSON (no transformers)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder.name}: cannot read its config.json ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(config, dict):
        raise UserError(f"{folder.name}/config.json is not a JSON object")
    return config


def _architecture(folder: Path, config: dict[str, Any]) -> str:
    names = config.get("architectures") or []
    if not names or not isinstance(names[0], str):
        raise UserError(f"{folder.name}: config.json names no architecture; streaming needs one "
                        "to know the parameter names")
    return names[0]


# Module names whose 2-D weight is an embedding table, not a linear map
_EMBEDDING = re.compile(r"(^|_)(embed|embeds|embedding|embeddings|wte|wpe)($|_)|^embed|embedding$")
_OUTPUT_HEADS = ("lm_head", "embed_out")  # the output embedding, when it is a linear


def _nested_configs(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The configs of the models nested in this one (vision tower, text model, Q-Former…)."""
    return [v for v in config.values() if isinstance(v, dict) and "model_type" in v]


def key_map(folder: str | Path, keys: Sequence[str]) -> KeyMap:
    """Map checkpoint keys to parameter names from config.json and the keys alone.

    Each key goes through the renamings transformers registers for the architecture (by
    class name, else model type) and its legacy ones, in loading's order
    (`core_model_loading.rename_source_key`); a key a WeightConverter catches (fused or
    split on load) lands in `converted`. Linears are the 2-D `.weight` tensors of modules
    that are neither an embedding table nor the output head. Keys of a nested model whose
    registered rules drop a wrapper level (a CLIP tower saved under `vision_model.`) need
    the module tree to place them: those checkpoints take `class_key_map`.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    folder = Path(folder)
    config = read_config(folder)
    architecture = _architecture(folder, config)
    rules = (get_checkpoint_conversion_mapping(architecture)
             or get_checkpoint_conversion_mapping(config.get("model_type")) or [])
    rules += get_checkpoint_conversion_mapping("legacy") or []
    renamings = [r for r in rules if isinstance(r, WeightRenaming)]
    converters = [r for r in rules if isinstance(r, WeightConverter)]
    renamed = {key: rename_source_key(key, renamings, converters) for key in keys}
    if _nested_rules_apply([name for name, pattern in renamed.values() if pattern is None]):
        return class_key_map(folder, keys)
    shapes = _header_shapes(folder)
    tied_to = _tied_heads(config, keys, shapes)
    out = KeyMap(param_of={}, key_of={}, architecture=architecture)
    for key in sorted(keys, key=_natural_key):
        name, pattern = renamed[tied_to.get(key, key)]
        if pattern is not None:
            out.converted.add(key)
        elif name in out.key_of:
            out.tied.add(key)  # the parameter another key already loads
        else:
            out.param_of[key] = name
            out.key_of[name] = key
            head = _module(name)
            if (name.endswith(".weight") and len(shapes.get(key, ())) == 2
                    and head not in _OUTPUT_HEADS and not _EMBEDDING.search(head)):
                out.linears.add(name)
    return out


def _module(key: str) -> str:
    """The last module name of a parameter key (`q_proj` of `….q_proj.weight`)."""
    return key.rpartition(".")[0].rpartition(".")[2]


def _tied_heads(config: dict[str, Any], keys: Sequence[str], shapes: dict[str, tuple[int, ...]]
                ) -> dict[str, str]:
    """Output-head key -> the input embedding's key it is tied to, where the config ties
    them (at the top or in the text model's config) and the checkpoint holds both: they
    load into one parameter."""
    if not (config.get("tie_word_embeddings", False)
            or any(c.get("tie_word_embeddings", False) for c in _nested_configs(config))):
        return {}
    out = {}
    for head in (k for k in keys if _module(k) in _OUTPUT_HEADS):
        tables = [k for k in keys if _EMBEDDING.search(_module(k)) and shapes.get(k) == shapes.get(head)]
        if len(tables) == 1:
            out[head] = tables[0]
    return out


def _nested_rules_apply(names: Sequence[str]) -> bool:
    """Whether a rule that drops a wrapper level inside a nested vision or text tower (a
    PrefixChange transformers registers for the tower's class, e.g. CLIPVisionModel's
    `vision_model.`) could match where a tower sits: two levels down or more
    (`model.vision_tower.vision_model.…`)."""
    compiled = _tower_prefix_changes()
    for name in names:
        parts = name.split(".")
        for i in range(2, len(parts)):
            rest = ".".join(parts[i:])
            if any(c.match(rest) for c in compiled):
                return True
    return False


@functools.cache
def _tower_prefix_changes() -> list[re.Pattern]:
    """The PrefixChange patterns of the tower classes in transformers' table (the table has
    no public listing, hence its builder)."""
    from transformers.conversion_mapping import _build_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange

    table = _build_checkpoint_conversion_mapping()
    return [re.compile(p) for p in sorted({p for cls, rules in table.items()
                                           if cls.endswith(("VisionModel", "TextModel"))
                                           for r in rules if isinstance(r, PrefixChange)
                                           for p in r.source_patterns})]


def _header_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the folder's safetensors headers (none for a config alone: then
    no key is taken for a linear)."""
    if not ((folder / SINGLE_NAME).is_file() or (folder / INDEX_NAME).is_file()):
        return {}
    with Checkpoint(folder) as checkpoint:
        return {k: t.shape for k, t in checkpoint.tensors.items()}


def _natural_key(key: str) -> list[tuple[int, Any]]:
    """Dotted keys in loading's order: numeric parts compare as numbers."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in key.split(".")]


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


def class_key_map(folder: str | Path, keys: Sequence[str]) -> KeyMap:
    """`key_map` with transformers' model class: the skeleton built on the meta device.

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
            else:
                out.tied.add(key)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            weight = f"{name}.weight"
            if weight in all_params and all_params[weight] == weight:
                out.linears.add(weight)
    return out


# config entries that fix parameter shapes or counts (of the model or a nested tower)
_SHAPE_FIELDS = {"num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "head_dim", "image_size", "patch_size",
                 "num_query_tokens", "projection_dim", "embed_dim", "depth", "num_heads"}


def check_same_shape_config(base: dict[str, Any], tuned: dict[str, Any], show: int = 5, where: str = "") -> None:
    """A fine-tuned model read lazily computes with the base's config, so its own must
    agree on what fixes the shapes (layers, widths, vocabulary…), at the top and in nested
    configs: a folder whose config disagrees with the base is another model."""
    problems = []
    for key in base.keys() & tuned.keys():
        a, b = base[key], tuned[key]
        if isinstance(a, dict) and isinstance(b, dict):
            try:
                check_same_shape_config(a, b, show, f"{where}{key}.")
            except UserError as exc:
                problems.append(str(exc).removeprefix("the models do not match: "))
        elif key in _SHAPE_FIELDS and a != b:
            problems.append(f"config {where}{key}: base {a} vs fine-tuned {b}")
    if problems:
        raise UserError("the models do not match: " + "; ".join(problems[:show]))


def check_shapes(a: dict[str, tuple[int, ...]], b: dict[str, tuple[int, ...]], show: int = 5) -> None:
    """Base parameter shapes `a` against fine-tuned `b`: list the first names or shapes that differ."""
    problems = [f"{n} only in base" for n in a if n not in b]
    problems += [f"{n} only in fine-tuned" for n in b if n not in a]
    problems += [f"{n}: base {a[n]} vs fine-tuned {b[n]}" for n in a if n in b and a[n] != b[n]]
    if problems:
        more = f" (and {len(problems) - show} more)" if len(problems) > show else ""
        raise UserError("the models do not match: " + "; ".join(problems[:show]) + more)


# --------------------------------------------------------------------------- lazy reads

class LazyWeights:
    """The parameters of a fine-tuned checkpoint folder, read on demand by parameter name.

    `reads` counts the reads per parameter: what a run held is what it read.
    """

    def __init__(self, folder: str | Path, base: torch.nn.Module) -> None:
        self.folder = Path(folder)
        self.checkpoint = Checkpoint(self.folder)
        names = key_map(self.folder, self.checkpoint.keys)
        if names.architecture != type(base).__name__:
            raise UserError(f"the models differ in architecture: base is {type(base).__name__}, "
                            f"fine-tuned is {names.architecture}")
        params = {n: tuple(p.shape) for n, p in base.named_parameters()}
        if names.converted and any(n not in names.key_of for n in params):
            raise UserError(f"{self.folder.name}: transformers fuses or splits some tensors when loading "
                            f"(e.g. {sorted(names.converted)[0]}), so they cannot be read one by one; "
                            "load it in memory")
        check_shapes(params, {names.param_of[k]: self.checkpoint.tensors[k].shape
                              for k in names.param_of})
        check_same_shape_config(base.config.to_dict(), read_config(self.folder))
        self.key_of = {n: names.key_of[n] for n in params}
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()  # one open shard handle: one read at a time

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A fresh tensor holding the parameter's fine-tuned value."""
        with self._lock:
            tensor = self.checkpoint.read(self.key_of[name])
            self.reads[name] += 1
        return tensor.to(device=device, dtype=dtype)

    def close(self) -> None:
        self.checkpoint.close()
