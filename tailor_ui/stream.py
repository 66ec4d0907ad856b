"""Data-free merges and patch application streamed tensor by tensor from safetensors shards.

Nothing here loads a whole model. The base and the fine-tuned checkpoints are walked by
name together, one tensor at a time, with one shard file open per model
(`tailor_ui.checkpoint`); each merged tensor goes straight into a sharded output whose
headers are planned up front (the output has the base's names, shapes and dtypes), so peak
memory is one tensor's working set, not the model's.

The per-tensor math is the engine's own (`tailor_ui.engine`'s per-tensor dispatch, the
functions of `tailor_ui.methods.baselines`, `tailor_ui.patch.tensor_patch` and `union`),
routed exactly as `run_method` routes it, so a streamed merge equals the in-memory merge
bit for bit. Checkpoint keys are mapped to parameter names by `checkpoint.key_map`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tailor_ui.checkpoint import (DEFAULT_SHARD_BYTES, INDEX_NAME, Checkpoint, ShardedWriter,
                                  check_same_keys, copy_side_files, key_map)
from tailor_ui.control import Cancelled, Progress, StopCheck, never_stop, no_progress
from tailor_ui.engine import merge_tensor, patch_metadata
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.memory import PeakMemory
from tailor_ui.patch import Patch, TensorPatch, check_fits, tensor_patch, union
from tailor_ui.settings import MULTI_TASK_NATIVE, Settings
from tailor_ui.weights import parse_device

ELEMENTWISE = ("wise_ft", "task_arithmetic")  # each entry's value depends on that entry alone
CHUNK_ELEMS = 1 << 24  # entries per chunk of an element-wise merge (64 MiB in float32)


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
    if settings.method == "tailor":
        raise UserError("Model Tailor needs calibration data and Hessians; stream only the "
                        "data-free methods (magnitude, wise_ft, task_arithmetic, ties, dare)")
    dirs = [finetuned_dirs] if isinstance(finetuned_dirs, (str, Path)) else list(finetuned_dirs)
    if not dirs:
        raise UserError("give at least one fine-tuned model")
    dev = parse_device(device)
    progress = progress or no_progress
    should_stop = should_stop or never_stop
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
    progress = progress or no_progress
    should_stop = should_stop or never_stop
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
