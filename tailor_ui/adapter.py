"""PEFT LoRA adapters as fine-tuned models: base + scale·B@A, per tensor, never merged on disk.

An adapter folder (or hub id) holds `adapter_config.json` and `adapter_model.safetensors`.
`read_adapter` reads both itself (peft is not needed to use one) into an `Adapter`: per
base parameter, a low-rank term (lora_A / lora_B, or an embedding's lora_embedding_A / B,
with its scale lora_alpha / r, rsLoRA's lora_alpha / √r, `alpha_pattern` per module) and
whole tensors the adapter replaces (`modules_to_save`, saved embedding layers).
`Adapter.value(name, base)` is the merged value as peft's `merge_and_unload` forms it:
the delta in float32, added to the base and rounded once to the base's dtype.

Three readers present it with the interfaces the project already uses, so the engine,
the sweep, compare and the streamed merge hold no LoRA branch: `merge_into` (a loaded
model), `AdapterWeights` (LazyWeights' `read(name, dtype, device)`), `AdapterCheckpoint`
(Checkpoint's `read(key)` and `tensors`, for `stream.py`). All three call `value`, so they
give the same bits for the same base values.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tailor_ui.checkpoint import Checkpoint, KeyMap, LazyWeights, key_map
from tailor_ui.errors import UserError
from tailor_ui.weights import read_param, writable_param

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# adapter kinds a merge of B@A cannot express: refused by name
_UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "layer_replication": "layer replication",
                "target_parameters": "LoRA on bare parameters (target_parameters)",
                "trainable_token_indices": "trainable tokens", "alora_invocation_tokens": "activated LoRA",
                "use_qalora": "QA-LoRA", "use_bdlora": "block-diagonal LoRA"}
_LOW_RANK = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias"
                       r"|lora_embedding_A|lora_embedding_B)$")


@dataclass(frozen=True)
class LowRank:
    """One module's LoRA term: delta = scale · B @ A, transposed for Conv1D-style weights
    (fan_in_fan_out) and embeddings (whose A is (r, vocabulary))."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float
    transpose: bool

    def delta(self) -> torch.Tensor:
        product = self.b.float() @ self.a.float()
        return (product.T if self.transpose else product) * self.scale


@dataclass
class Adapter:
    """A LoRA adapter resolved against a base: every tensor it changes, by parameter name."""

    name: str  # as the user gave it
    declared_base: str | None  # adapter_config's base_model_name_or_path
    low_rank: dict[str, LowRank] = field(default_factory=dict)  # weight name -> term
    bias: dict[str, torch.Tensor] = field(default_factory=dict)  # bias name -> delta (lora_bias)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # whole tensors (modules_to_save)

    @property
    def params(self) -> set[str]:
        return set(self.low_rank) | set(self.bias) | set(self.replaced)

    def delta(self, name: str) -> torch.Tensor | None:
        if name in self.low_rank:
            return self.low_rank[name].delta()
        return self.bias.get(name)

    def value(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The fine-tuned value of a parameter whose base value is `base` (same dtype and
        device; a fresh tensor where the adapter touches it)."""
        if name in self.replaced:
            base = self.replaced[name].to(device=base.device, dtype=base.dtype)
        delta = self.delta(name)
        if delta is None:
            return base
        return (base.float() + delta.to(base.device)).to(base.dtype)

    def check_fits(self, shapes: dict[str, tuple[int, ...]], base_label: str, show: int = 3) -> None:
        """Every tensor the adapter changes exists in the base with a shape it fits."""
        problems = [f"{n} is not in the base" for n in sorted(self.params) if n not in shapes]
        for n, term in self.low_rank.items():
            got = (term.a.shape[1], term.b.shape[0]) if term.transpose else (term.b.shape[0], term.a.shape[1])
            if n in shapes and tuple(shapes[n]) != got:
                problems.append(f"{n}: base {tuple(shapes[n])}, adapter {got}")
        problems += [f"{n}: base {tuple(shapes[n])}, adapter {tuple(t.shape)}"
                     for n, t in [*self.replaced.items(), *self.bias.items()]
                     if n in shapes and tuple(shapes[n]) != tuple(t.shape)]
        if problems:
            trained = f" (it was trained on {self.declared_base})" if self.declared_base else ""
            more = f" (and {len(problems) - show} more)" if len(problems) > show else ""
            raise UserError(f"the adapter {self.name} does not fit the base {base_label}{trained}: "
                            + "; ".join(problems[:show]) + more)


# ---------------------------------------------------------------------------- finding one

def adapter_folder(source: str) -> Path | None:
    """The folder of a PEFT adapter: a local folder holding adapter_config.json, or a hub
    id whose adapter files are cached or (online) fetched; None for anything else."""
    path = Path(source)
    if path.is_dir():
        return path if (path / ADAPTER_CONFIG).is_file() else None
    if path.is_absolute() or source.startswith(".") or source.count("/") != 1:
        return None
    return _hub_adapter(source)


def _hub_adapter(repo: str) -> Path | None:
    """Two small files of a hub adapter, from the cache when there (works offline)."""
    from huggingface_hub import constants, file_exists, hf_hub_download, try_to_load_from_cache

    cached = {f: try_to_load_from_cache(repo, f) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)}
    if all(isinstance(p, str) for p in cached.values()):
        return Path(cached[ADAPTER_CONFIG]).parent
    if constants.HF_HUB_OFFLINE:
        if isinstance(cached[ADAPTER_CONFIG], str):
            raise UserError(f"{repo}: the adapter's weights are not in the hub cache and the hub is offline")
        return None
    try:
        if not file_exists(repo, ADAPTER_CONFIG):
            return None
        hf_hub_download(repo, ADAPTER_WEIGHTS)
        return Path(hf_hub_download(repo, ADAPTER_CONFIG)).parent
    except OSError:  # unreachable, gated: not known to be an adapter; loading it says why
        return None


# ---------------------------------------------------------------------------- reading one

def read_config(folder: Path, name: str) -> dict[str, Any]:
    """adapter_config.json, checked to be a LoRA whose merge is B@A."""
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{name}: {ADAPTER_CONFIG} is not readable JSON ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise UserError(f"{name}: only LoRA adapters (peft_type LORA) can be merged; this one is {kind}")
    for key, label in _UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{name}: {label} adapters are not supported; merge it with peft's "
                            "merge_and_unload and pass the merged model folder instead")
    return config


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        pickle = " (only adapter_model.bin, a pickle: convert it to safetensors)" if (
            folder / "adapter_model.bin").is_file() else ""
        raise UserError(f"{name}: no {ADAPTER_WEIGHTS}{pickle}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{name}/{ADAPTER_WEIGHTS} is damaged ({str(exc).splitlines()[0][:200]})") from None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's per-module override (rank_pattern / alpha_pattern): the first key matching
    the end of the module's name at a dot."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(folder: Path, name: str, shapes: dict[str, tuple[int, ...]], base_label: str,
                 base_source: str | None = None) -> Adapter:
    """The adapter in `folder` against a base whose parameters have `shapes`: names
    resolved (a key saved by an older transformers through `checkpoint.key_map` of the
    base at `base_source`) and shapes checked."""
    config = read_config(folder, name)
    tensors = _read_tensors(folder, name)
    raw = {(k[len(_PREFIX):] if k.startswith(_PREFIX) else k): t for k, t in tensors.items()}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, tensor in raw.items():
        match = _LOW_RANK.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        elif "lora_" in key or "trainable_tokens" in key:
            raise UserError(f"{name}: unsupported adapter tensor {key}")
        else:  # modules_to_save, or an embedding layer saved whole beside its LoRA
            whole[key.replace(".base_layer.", ".")] = tensor
    rename = _renamer([*whole, *(f"{m}.weight" for m in parts)], shapes, base_source)
    adapter = Adapter(name=name, declared_base=config.get("base_model_name_or_path"),
                      replaced={rename(k): t for k, t in whole.items()})
    for module, found in parts.items():
        _add_low_rank(adapter, module, found, config, rename, shapes)
    adapter.check_fits(shapes, base_label)
    return adapter


def _renamer(names: list[str], shapes: dict[str, tuple[int, ...]], base_source: str | None):
    """Parameter names as the loaded base has them: as saved, or renamed the way loading
    renames checkpoint keys (an adapter saved with transformers 4's LLaVA names)."""
    missing = [n for n in names if n not in shapes]
    renamed = key_map(base_source, missing).param_of if missing and base_source else {}
    return lambda n: n if n in shapes else renamed.get(n, n)


def _add_low_rank(adapter: Adapter, module: str, found: dict[str, torch.Tensor], config: dict[str, Any],
                  rename, shapes: dict[str, tuple[int, ...]]) -> None:
    embedding = "lora_embedding_A" in found
    a = found.get("lora_embedding_A" if embedding else "lora_A.weight")
    b = found.get("lora_embedding_B" if embedding else "lora_B.weight")
    if a is None or b is None or a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise UserError(f"{adapter.name}: {module} lacks a matching lora_A / lora_B pair")
    rank = a.shape[0]
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    weight = rename(f"{module}.weight")
    if embedding:
        transpose = True
    else:  # a Conv1D weight is stored (in, out): its shape says so, the config breaks a square tie
        straight = (b.shape[0], a.shape[1])
        want = tuple(shapes.get(weight, straight))
        transpose = want != straight or (want[0] == want[1] and bool(config.get("fan_in_fan_out")))
    adapter.low_rank[weight] = LowRank(a, b, float(scale), transpose)
    if "lora_B.bias" in found:
        adapter.bias[rename(f"{module}.bias")] = found["lora_B.bias"].float() * scale


# ------------------------------------------------------------------ the fine-tuned weights

def merge_into(model: torch.nn.Module, adapter: Adapter) -> None:
    """Merge the adapter into a loaded model, in place (offloaded parameters included)."""
    with torch.no_grad():
        for name in sorted(adapter.params):
            writable_param(model, name).copy_(adapter.value(name, read_param(model, name)))


class AdapterWeights:
    """A fine-tuned model never loaded: the base's checkpoint read tensor by tensor, with
    the adapter merged into the tensors it touches (LazyWeights' interface)."""

    def __init__(self, adapter: Adapter, base_folder: str | Path, base: torch.nn.Module) -> None:
        self.adapter = adapter
        self.weights = LazyWeights(base_folder, base)
        self.reads = self.weights.reads

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.adapter.value(name, self.weights.read(name, dtype, device))

    def close(self) -> None:
        self.weights.close()


class AdapterCheckpoint:
    """The base checkpoint with the adapter merged in, read by checkpoint key (Checkpoint's
    interface, for the streamed merge); tensors keep the checkpoint's dtypes."""

    def __init__(self, adapter: Adapter, folder: Path, base_folder: str | Path, names: KeyMap) -> None:
        self.adapter = adapter
        self.folder = folder
        self.base = Checkpoint(base_folder)
        self.tensors = self.base.tensors
        self.param_of = names.param_of

    def read(self, key: str) -> torch.Tensor:
        name = self.param_of.get(key)
        tensor = self.base.read(key)
        return tensor if name is None else self.adapter.value(name, tensor)  # value: base where untouched

    def close(self) -> None:
        self.base.close()


def checkpoint_shapes(base: Checkpoint, names: KeyMap) -> dict[str, tuple[int, ...]]:
    """A base checkpoint's parameter shapes by parameter name."""
    return {names.param_of[k]: tuple(base.tensors[k].shape) for k in names.param_of}


def open_finetuned(source: str | Path, base: Checkpoint, names: KeyMap) -> Checkpoint | AdapterCheckpoint:
    """A fine-tuned checkpoint for the streamed merge: a model folder, or an adapter on
    the base checkpoint."""
    folder = adapter_folder(str(source))
    if folder is None:
        return Checkpoint(source)
    adapter = read_adapter(folder, str(source), checkpoint_shapes(base, names), base.folder.name)
    return AdapterCheckpoint(adapter, folder, base.folder, names)
