"""Data-free merges and patch application streamed tensor by tensor from safetensors shards.

Nothing here loads a whole model. The base and the fine-tuned checkpoints are walked by
name together, one tensor at a time, with one shard file open per model
(`tailor_ui.checkpoint`); each merged tensor goes straight into a sharded output whose
headers are planned up front (the output has the base's names, shapes and dtypes), so peak
memory is one tensor's working set, not the model's.

Each tensor goes through `tailor_ui.routing.route_tensor`, the routing `run_method` uses
too (the method's per-tensor merge from the registry, the `others` policy, `union` of
per-model patches), so a streamed merge equals the in-memory merge bit for bit.
Checkpoint keys are mapped to parameter names by `checkpoint.key_map`.
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
                                  KeyMap, check_same_keys, check_saved, copy_side_files, key_map)
from tailor_ui.control import Cancelled, Progress, StopCheck, never_stop, no_progress
from tailor_ui.engine import patch_metadata
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.memory import PeakMemory
from tailor_ui.methods import REGISTRY
from tailor_ui.patch import Patch, PatchFile, PatchWriter, check_fits, tensor_patch
from tailor_ui.routing import route_tensor, with_patch
from tailor_ui.settings import Settings
from tailor_ui.weights import parse_device

CHUNK_ELEMS = 1 << 24  # entries per chunk of an element-wise merge (64 MiB in float32)


# ------------------------------------------------------------------------------- memory

def memory_bound_bytes(numel: int, base_bytes: int, n_models: int, method: str,
                       chunk_elems: int | None = None) -> int:
    """Working set of merging one tensor of `numel` entries (`base_bytes` each in storage).

    Storage copies of the base, the n fine-tuned tensors and the output, b·(n + 2), plus
    float32 temporaries: the upcast base and models (n + 1), task vectors and their stack
    (2n), result and change test (~3); plus the method's own per model (scores, masks and
    top-k indices: `Method.temporaries`, ~4 for TIES and magnitude). Element-wise methods
    compute on chunks of `chunk_elems` entries, so their temporaries are bounded by the
    chunk, not the tensor.
    """
    info = REGISTRY[method]
    temps = 4 * (3 * n_models + 4 + info.temporaries * n_models)
    if chunk_elems is not None and info.elementwise:
        return numel * base_bytes * (n_models + 2) + min(numel, chunk_elems) * temps
    return numel * (base_bytes * (n_models + 2) + temps)


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


@dataclass
class _Tally:
    """What the merge counts as it goes: changed tensors, and the selected linears' share."""

    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    selected_changed: int = 0
    selected_numel: int = 0
    selected_kept: int = 0

    def add(self, key: str, name: str, old: torch.Tensor, new: torch.Tensor, selected: bool) -> int:
        changed = _changed_entries(old, new)
        if changed:
            self.per_tensor[name] = {"key": key, "changed": changed, "numel": old.numel(),
                                     "fraction": changed / max(old.numel(), 1)}
        if selected:
            self.selected_changed += 1
            self.selected_numel += old.numel()
            self.selected_kept += changed
        return changed


@dataclass
class _Job:
    """One streamed merge: its checkpoints, how keys map to parameters, what it counts."""

    settings: Settings
    base: Checkpoint
    tuned: list[Checkpoint]
    names: KeyMap
    device: torch.device
    chunk_elems: int
    regex: re.Pattern | None
    patch: Patch | PatchWriter | None
    clock: _Clock = field(default_factory=_Clock)
    tally: _Tally = field(default_factory=_Tally)
    tensors_checked: int = 0  # tensors of the base found in the written folder

    def merge_key(self, key: str) -> torch.Tensor:
        """What the output holds for one checkpoint tensor: its merged value or the base's."""
        t0 = time.perf_counter()
        b = self.base.read(key)
        ts = [c.read(key).to(b.dtype) for c in self.tuned]
        t0 = self.clock.add("read", t0)
        name = self.names.param_of.get(key)
        new = None
        if name is not None and b.is_floating_point():
            selected = name in self.names.linears and (
                self.regex is None or bool(self.regex.search(name[:-7])))  # drop ".weight"
            new = route_tensor(name, b.to(self.device), [t.to(self.device) for t in ts],
                               self.settings, selected, self.chunk_elems)
            if new is not None:
                new = new.to("cpu")
                if self.tally.add(key, name, b, new, selected) and self.patch is not None:
                    self.patch.add(name, tensor_patch(b, new))
        self.clock.add("merge", t0)
        return new if new is not None else b


def stream_merge(base_dir: str | Path, finetuned_dirs: str | Path | Sequence[str | Path],
                 settings: Settings, out_dir: str | Path | None, device: str = "cpu", *,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, chunk_elems: int = CHUNK_ELEMS,
                 patch: Patch | PatchWriter | None = None, progress: Progress | None = None,
                 should_stop: StopCheck | None = None) -> dict[str, Any]:
    """Merge fine-tuned checkpoints into their base with a data-free method, streaming.

    Writes a loadable model folder at `out_dir` (base's config and processor files, the
    merged weights in the base's names and dtypes), atomically. Equal, tensor for tensor,
    to `run_method(pair, settings)` applied to the base and saved. With `patch`, the
    changed entries are also collected into it, by parameter name, with its metadata: the
    patch `run_method` returns (`out_dir=None` makes only the patch); a `PatchWriter`
    takes each tensor's entries into its file as they come, so no patch is held. Returns a report with
    timings and peak memory. Compute runs on `device`; results are parked on the CPU.
    """
    method = REGISTRY[settings.method]
    if method.needs_calibration:
        data_free = ", ".join(n for n, m in REGISTRY.items() if not m.needs_calibration)
        raise UserError(f"{method.label} needs calibration data; stream only the data-free "
                        f"methods ({data_free})")
    dirs = [finetuned_dirs] if isinstance(finetuned_dirs, (str, Path)) else list(finetuned_dirs)
    if not dirs:
        raise UserError("give at least one fine-tuned model")
    start = time.perf_counter()
    job = _open(base_dir, dirs, settings, parse_device(device), chunk_elems, patch)
    job.clock.add("plan", start)
    meter = PeakMemory([job.device]).start()  # stopped in `finally`; planning holds no tensors
    try:
        files = _write(job, out_dir, max_shard_bytes, progress or no_progress, should_stop or never_stop)
    finally:
        job.base.close()
        for c in job.tuned:
            c.close()
        meter.stop()
    if patch is not None:
        patch.metadata = patch_metadata(settings, str(base_dir), [str(d) for d in dirs], patch)
    return _report(job, meter, files, time.perf_counter() - start, str(base_dir), [str(d) for d in dirs])


def _open(base_dir: str | Path, dirs: Sequence[str | Path], settings: Settings, device: torch.device,
          chunk_elems: int, patch: Patch | PatchWriter | None) -> _Job:
    """Open the checkpoints and check that their tensors can be merged name by name."""
    base = Checkpoint(base_dir)
    tuned = [Checkpoint(d) for d in dirs]
    check_same_keys(base, tuned)
    names = key_map(base.folder, base.keys)
    bad = [k for k in names.converted if any(not _same_bytes(base, t, k) for t in tuned)]
    if bad:
        raise UserError(f"transformers converts {bad[0]} when loading (not a 1:1 tensor), and the "
                        "fine-tuned model changed it; merge this model in memory instead")
    regex = re.compile(settings.modules) if settings.modules else None
    return _Job(settings, base, tuned, names, device, chunk_elems, regex, patch)


def _write(job: _Job, out_dir: str | Path | None, max_shard_bytes: int, progress: Progress,
           should_stop: StopCheck) -> list[str]:
    """Merge every tensor in checkpoint order, writing each to the output as it comes;
    returns the files written."""
    keys = job.base.keys
    layout = [(k, job.base.tensors[k].dtype, job.base.tensors[k].shape) for k in keys]
    with atomic_path(out_dir) if out_dir is not None else nullcontext() as tmp:
        writer = ShardedWriter(tmp, layout, max_shard_bytes) if tmp is not None else None
        for i, key in enumerate(keys):
            if should_stop():
                raise Cancelled
            progress(f"merging {key}", i, len(keys))
            value = job.merge_key(key)
            t0 = time.perf_counter()
            if writer is not None:
                writer.write(key, value)
            del value
            job.clock.add("write", t0)
        t0 = time.perf_counter()
        copied = []
        if writer is not None:
            writer.close()
            copied = copy_side_files(job.base.folder, tmp)
            job.tensors_checked = check_saved(job.base.folder, tmp)
        if job.regex is not None and not job.tally.selected_changed:
            raise UserError(f"no changed linear layer matches {job.settings.modules!r}")
        job.clock.add("write", t0)
    return _files(writer) + copied


def _report(job: _Job, meter: PeakMemory, files: list[str], seconds: float, base_id: str,
            finetuned_ids: list[str]) -> dict[str, Any]:
    keys, tally, tensors = job.base.keys, job.tally, job.base.tensors
    numel = sum(torch.Size(tensors[k].shape).numel() for k in keys)
    entries = sum(t["changed"] for t in tally.per_tensor.values())
    largest_numel = max((torch.Size(tensors[k].shape).numel() for k in keys), default=0)
    largest_bytes = max((tensors[k].nbytes for k in keys), default=0)
    bound = memory_bound_bytes(largest_numel, largest_bytes // max(largest_numel, 1), len(job.tuned),
                               job.settings.method, job.chunk_elems) / 2**20
    memory = {**meter.report(), "largest_tensor_mb": largest_bytes / 2**20, "one_tensor_bound_mb": bound,
              # the stack (torch, transformers) at start, plus one tensor's working set
              "predicted_peak_mb": meter.rss_at_start_mb + bound}
    return {"settings": job.settings.to_dict(), "base": base_id, "finetuned": finetuned_ids,
            "streamed": True, "device": str(job.device), "tensors_total": len(keys),
            "tensors_checked": job.tensors_checked,
            "selected_linears": tally.selected_changed, "patch_entries": entries,
            "linear_fraction": tally.selected_kept / tally.selected_numel if tally.selected_numel else 0.0,
            "model_fraction": entries / max(numel, 1), "tensors": tally.per_tensor,
            "files": files, "timings_s": {**job.clock.timings, "total": seconds},
            "memory": memory}


def _files(writer: ShardedWriter | None) -> list[str]:
    if writer is None:
        return []
    return writer.files + ([INDEX_NAME] if len(writer.files) > 1 else [])


def _same_bytes(a: Checkpoint, b: Checkpoint, key: str) -> bool:
    x, y = a.read(key), b.read(key)
    return x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8))


def stream_apply_patch(base_dir: str | Path, patch: Patch | PatchFile, out_dir: str | Path, *,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = None,
                       should_stop: StopCheck | None = None) -> dict[str, Any]:
    """Write base + patch as a model folder, streaming the base tensor by tensor.

    The patch names parameters; they are found in the checkpoint through `key_map`.
    Equal to loading the base, `apply_patch`, and `save_pretrained`, tensor for tensor.
    A `PatchFile` is read one tensor at a time, as its tensor is written.
    """
    progress = progress or no_progress
    should_stop = should_stop or never_stop
    start = time.perf_counter()
    base = Checkpoint(base_dir)
    keys = base.keys
    if all(name in base.tensors for name in patch.shapes):  # names are the keys already
        key_of = {name: name for name in patch.shapes}
    else:
        key_of = key_map(base.folder, keys).key_of
    check_fits({n: tuple(base.tensors[k].shape) for n, k in key_of.items()}, patch)
    name_of = {key_of[n]: n for n in patch.shapes}
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
                if key in name_of:
                    tensor = with_patch(tensor, patch.read(name_of[key]), inplace=True)
                writer.write(key, tensor)
            writer.close()
            copied = copy_side_files(base.folder, tmp)
            checked = check_saved(base.folder, tmp)
    finally:
        base.close()
        meter.stop()
    return {"base": str(base_dir), "patch_entries": patch.num_entries, "streamed": True,
            "files": _files(writer) + copied, "tensors_checked": checked,
            "timings_s": {"total": time.perf_counter() - start},
            "memory": meter.report()}
