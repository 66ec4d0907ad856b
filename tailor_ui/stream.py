"""Data-free merges and patch application streamed tensor by tensor from safetensors shards.

Nothing here loads a whole model. The base and the fine-tuned checkpoints are walked by
name together, one tensor at a time, with one shard file open per model
(`tailor_ui.checkpoint`); each merged tensor goes straight into a sharded output whose
headers are planned up front (the output has the base's names, shapes and dtypes), so peak
memory is a few tensors' working set (one read ahead, one merged, one being written), not
the model's; large tensors merged entry by entry go in parts (`PART_ELEMS`), so it is a
few parts' (where the patch is collected in memory, not written to its file, they go whole).

Each tensor goes through `tailor_ui.routing.route_tensor`, the routing `run_method` uses
too (the method's per-tensor merge from the registry, the `others` policy, `union` of
per-model patches), so a streamed merge equals the in-memory merge bit for bit.
Checkpoint keys are mapped to parameter names by `checkpoint.key_map`.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tailor_ui.adapter import open_finetuned
from tailor_ui.checkpoint import (DEFAULT_SHARD_BYTES, INDEX_NAME, Checkpoint, ShardedWriter,
                                  KeyMap, check_same_keys, check_saved, copy_side_files, key_map)
from tailor_ui.control import Cancelled, Progress, StopCheck, never_stop, no_progress
from tailor_ui.engine import patch_metadata
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.memory import PeakMemory, predicted_peak_mb, release_large_frees
from tailor_ui.methods import REGISTRY
from tailor_ui.patch import (MaskedPatch, Patch, PatchFile, PatchWriter, bit_ints, check_fits, pack_mask,
                             writer_bytes)
from tailor_ui.routing import merged_chunks, runs_elementwise, with_patch
from tailor_ui.settings import Settings
from tailor_ui.weights import parse_device

CHUNK_ELEMS = 1 << 18  # entries per chunk of an element-wise merge (1 MiB in float32: in cache)
# entries per part of a larger tensor that an element-wise merge reads, merges and writes
# in parts (8 MiB in fp16): the pipeline's working set is bounded by the part, not by the
# largest tensor (an embedding or output head is 60-250 MB). A multiple of 8, so that a
# part's packed mask for the patch is whole bytes.
PART_ELEMS = 1 << 22


# ------------------------------------------------------------------------------- memory

def memory_bound_bytes(numel: int, base_bytes: int, n_models: int, method: str,
                       chunk_elems: int | None = None, patch: bool = False) -> int:
    """Working set of merging one tensor of `numel` entries (`base_bytes` each in storage).

    Storage copies of the base (which the merged values overwrite in place) and the n
    fine-tuned tensors, b·(n + 1), plus float32 temporaries: the upcast base and models
    (n + 1), task vectors and their stack (2n), result and change test (~3); plus the
    method's own per model (scores, masks and top-k indices: `Method.temporaries`, ~4 for
    TIES and magnitude). Element-wise methods, and those that run by chunks themselves
    (`Method.chunks`: TIES, DARE), compute on chunks of `chunk_elems` entries, so their
    temporaries are bounded by the chunk, not the tensor. With `patch`, `patch_bytes`.
    """
    info = REGISTRY[method]
    temps = 4 * (3 * n_models + 4 + info.temporaries * n_models)
    held = numel * base_bytes * (n_models + 1) + (patch_bytes(numel, base_bytes) if patch else 0)
    if chunk_elems is not None and (info.elementwise or info.chunks is not None):
        return held + min(numel, chunk_elems) * temps
    return held + numel * temps


def patch_bytes(numel: int, base_bytes: int) -> int:
    """A tensor's (or part's) patch in hand: the changed entries' mask (a byte each), the
    values buffer, and the mask packed (a bit each)."""
    return numel * (1 + base_bytes) + (numel + 7) // 8


def pipeline_bound_bytes(tensors: Sequence[tuple[int, int, int]], n_models: int, method: str,
                         chunk_elems: int | None = None, patch: bool = False) -> int:
    """Working set of the streamed merge over `tensors` ((entries, bytes per entry, entries
    of the whole tensor) of each tensor or part, in checkpoint order): at worst, tensor i + 1
    read (base and models), tensor i merged (`memory_bound_bytes`) and tensor i − 1 being
    written, with its patch and what the patch's writer holds for its whole tensor."""
    def read(k: int) -> int:
        return tensors[k][0] * tensors[k][1] * (n_models + 1) if 0 <= k < len(tensors) else 0

    def written(k: int) -> int:
        if not 0 <= k < len(tensors):
            return 0
        numel, size, whole = tensors[k]
        return numel * size + (patch_bytes(numel, size) + writer_bytes(whole) if patch else 0)

    return max((read(i + 1) + memory_bound_bytes(numel, size, n_models, method, chunk_elems, patch)
                + written(i - 1) for i, (numel, size, _) in enumerate(tensors)), default=0)


@dataclass
class _Clock:
    """Busy seconds per stage; stages run in their own threads, so they overlap."""

    timings: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.timings[stage] = self.timings.get(stage, 0.0) + now - start
        return now


@dataclass
class _Tally:
    """What the merge counts as it goes: changed tensors, and the selected linears' share."""

    per_tensor: dict[str, dict[str, Any]] = field(default_factory=dict)
    selected_changed: int = 0
    selected_numel: int = 0
    selected_kept: int = 0

    def add(self, key: str, name: str, numel: int, changed: int, selected: bool) -> None:
        if changed:
            self.per_tensor[name] = {"key": key, "changed": changed, "numel": numel,
                                     "fraction": changed / max(numel, 1)}
        if selected:
            self.selected_changed += 1
            self.selected_numel += numel
            self.selected_kept += changed


@dataclass(frozen=True)
class _Item:
    """A checkpoint tensor, or a part of it (flat entries [start, end)), as the pipeline
    reads, merges and writes it."""

    key: str
    start: int
    end: int
    numel: int  # the whole tensor's

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.end == self.numel


@dataclass
class _Job:
    """One streamed merge: its checkpoints, how keys map to parameters, what it counts."""

    settings: Settings
    base: Checkpoint
    tuned: list[Checkpoint]
    names: KeyMap
    device: torch.device
    chunk_elems: int
    patch: Patch | PatchWriter | None
    # larger tensors merged entry by entry go in parts of this many entries (None: whole)
    part_elems: int | None = None
    clock: _Clock = field(default_factory=_Clock)
    tally: _Tally = field(default_factory=_Tally)
    tensors_checked: int = 0  # tensors of the base found in the written folder
    _changed: dict[str, bool] = field(default_factory=dict)  # reader's: a tensor in parts differs
    _counted: int = 0  # merger's: changed entries of the tensor in parts so far
    # the patch's buffers, used again for the next item of the same size (fresh memory costs
    # a page fault per 4 KiB: as much as finding and gathering the entries): the merger's
    # mask, and the values' storage a file writer is done with (one kept: at most two are in
    # use, one being filled and one being written)
    _mask: np.ndarray | None = None
    _spare: deque = field(default_factory=lambda: deque(maxlen=1))

    @functools.cached_property
    def regex(self) -> re.Pattern | None:
        """The module pattern (`--modules`) the linears merged by the method must match."""
        return re.compile(self.settings.modules) if self.settings.modules else None

    def selected(self, name: str) -> bool:
        """A linear the method merges (the others go by the `others` policy)."""
        return name in self.names.linears and (
            self.regex is None or bool(self.regex.search(name[:-7])))  # drop ".weight"

    def items(self) -> list[_Item]:
        """Every base tensor in storage order; in parts where it is larger than
        `part_elems` and each merged entry depends on that entry alone."""
        out = []
        for key in self.base.keys:
            numel = torch.Size(self.base.tensors[key].shape).numel()
            name = self.names.param_of.get(key)
            if (self.part_elems and numel > self.part_elems and name is not None
                    and runs_elementwise(self.settings, self.selected(name))):
                out += [_Item(key, i, min(i + self.part_elems, numel), numel)
                        for i in range(0, numel, self.part_elems)]
            else:
                out.append(_Item(key, 0, numel, numel))
        return out

    def read_item(self, item: _Item) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The base's tensor (or part) and the fine-tuned ones (in the base's dtype)."""
        t0 = time.perf_counter()
        if item.whole:
            b = self.base.read(item.key)
            ts = [c.read(item.key).to(b.dtype) for c in self.tuned]
        else:
            b, ts = self._read_part(item.key, item.start, item.end)
            if item.start == 0:  # the merge of the first part must know whether the tensor changed
                self._changed[item.key] = self._differs(item, b, ts)
        self.clock.add("read", t0)
        return b, ts

    def _read_part(self, key: str, start: int, end: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b = self.base.read_range(key, start, end)
        return b, [c.read_range(key, start, end).to(b.dtype) for c in self.tuned]

    def _differs(self, first: _Item, b: torch.Tensor, ts: list[torch.Tensor]) -> bool:
        """Whether a fine-tuned tensor differs from the base's (torch.equal), from its first
        part (`b`, `ts`) and, where that is equal, the others read once more."""
        step = first.end - first.start
        for start in range(0, first.numel, step):
            if start:
                b, ts = self._read_part(first.key, start, min(start + step, first.numel))
            if any(not torch.equal(b, t) for t in ts):
                return True
        return False

    def merge_item(self, item: _Item, b: torch.Tensor, ts: list[torch.Tensor]
                   ) -> tuple[torch.Tensor, MaskedPatch | None]:
        """What the output holds for one checkpoint tensor or part: the merged value,
        written over `b` in place (a fresh read), chunk by chunk; and its entries for the
        patch (None where nothing changed or no patch is made)."""
        t0 = time.perf_counter()
        name = self.names.param_of.get(item.key)
        entries = None
        if name is not None and b.is_floating_point():
            selected = self.selected(name)
            on_device = b.to(self.device)
            chunks = merged_chunks(name, on_device, [t.to(self.device) for t in ts], self.settings,
                                   selected, self.chunk_elems,
                                   None if item.whole else self._changed[item.key])
            if chunks is not None:
                changed, entries = self._take(b, item, chunks)
                self._counted = (0 if item.start == 0 else self._counted) + changed
                if item.end == item.numel:  # the tensor is done
                    self.tally.add(item.key, name, item.numel, self._counted, selected)
        self.clock.add("merge", t0)
        return b, entries

    def _take(self, out: torch.Tensor, item: _Item, chunks: Iterator[tuple[int, torch.Tensor]]
              ) -> tuple[int, MaskedPatch | None]:
        """Write each chunk into `out` after counting its changed entries (bit for bit against
        the base values `out` still holds) and copying them for the patch, into a mask and a
        values buffer of the item's size (so the patch never takes more than 1 + b bytes per
        entry), packed after the last chunk. Compared and copied by numpy: torch's boolean
        indexing took 6 ns per entry on one thread, numpy's `compress` about 1. A part
        gives its entries even where none changed: the patch must see a tensor's last part."""
        flat_out = out.view(-1)
        collect = self.patch is not None
        mask = self._mask_buffer(out.numel()) if collect else None
        values = self._values_buffer(out.numel(), out.dtype) if collect else None
        kept = bit_ints(values) if collect else None
        changed = 0
        for start, new in chunks:
            end = start + new.numel()
            now, was = bit_ints(new.cpu()), bit_ints(flat_out[start:end].cpu())  # no copies on the CPU
            differs = np.not_equal(was, now, out=mask[start:end] if collect else None)
            count = int(np.count_nonzero(differs))
            if collect:
                np.compress(differs, now, out=kept[changed:changed + count])
            changed += count
            flat_out[start:end] = new  # after the comparison: on the CPU `base` is `out`
        if not collect or (not changed and item.whole):
            if collect:
                self._spare.append(values.untyped_storage())
            return changed, None
        shape = tuple(self.base.tensors[item.key].shape)
        return changed, MaskedPatch(pack_mask(mask), values[:changed], shape, item.start, item.end)

    def _mask_buffer(self, numel: int) -> np.ndarray:
        if self._mask is None or self._mask.size != numel:
            self._mask = None  # freed before its successor is taken
            self._mask = np.empty(numel, dtype=np.bool_)
        return self._mask

    def _values_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        spare = self._spare.pop() if self._spare else None
        if spare is None or spare.nbytes() != numel * dtype.itemsize:
            return torch.empty(numel, dtype=dtype)
        return torch.empty(0, dtype=dtype).set_(spare)

    def written(self, entries: MaskedPatch) -> None:
        """The writer is done with `entries` (a file writer keeps nothing of them)."""
        if isinstance(self.patch, PatchWriter):
            self._spare.append(entries.values.untyped_storage())


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
    _check_data_free(settings)
    dirs = [finetuned_dirs] if isinstance(finetuned_dirs, (str, Path)) else list(finetuned_dirs)
    if not dirs:
        raise UserError("give at least one fine-tuned model")
    start = time.perf_counter()
    job = _open(base_dir, dirs, settings, parse_device(device), chunk_elems, patch)
    # an adapter reads whole tensors; a collected patch takes them whole (a file, in parts)
    if not isinstance(patch, Patch) and all(type(c) is Checkpoint for c in job.tuned):
        job.part_elems = PART_ELEMS
    return _run(job, start, out_dir, max_shard_bytes, progress, should_stop, str(base_dir),
                [str(d) for d in dirs])


def stream_sources(base: Any, tuned: Sequence[Any], names: KeyMap, settings: Settings,
                   patch: Patch | PatchWriter, device: str | torch.device = "cpu", *,
                   chunk_elems: int = CHUNK_ELEMS, progress: Progress | None = None,
                   should_stop: StopCheck | None = None, base_id: str = "base",
                   finetuned_ids: Sequence[str] = ()) -> dict[str, Any]:
    """`stream_merge`'s merge into `patch` alone, over sources already open: anything with
    Checkpoint's reading interface (`keys`, `tensors`, `read`, `close`), e.g. a loaded
    pair's own tensors (`tailor_ui.pair_stream`). `base.read` must return a fresh tensor
    (the merge overwrites it); `names` maps its keys to parameter names."""
    _check_data_free(settings)
    start = time.perf_counter()
    device = device if isinstance(device, torch.device) else parse_device(device)
    job = _Job(settings, base, list(tuned), names, device, chunk_elems, patch)
    return _run(job, start, None, DEFAULT_SHARD_BYTES, progress, should_stop, base_id, list(finetuned_ids))


def _check_data_free(settings: Settings) -> None:
    method = REGISTRY[settings.method]
    if method.needs_calibration:
        data_free = ", ".join(n for n, m in REGISTRY.items() if not m.needs_calibration)
        raise UserError(f"{method.label} needs calibration data; stream only the data-free "
                        f"methods ({data_free})")


def _run(job: _Job, start: float, out_dir: str | Path | None, max_shard_bytes: int,
         progress: Progress | None, should_stop: StopCheck | None, base_id: str,
         finetuned_ids: list[str]) -> dict[str, Any]:
    """Merge every tensor of an opened job (`_write`), with its memory metered; its report."""
    job.clock.add("plan", start)
    release_large_frees()  # what the threads free goes back, so the memory bound holds
    meter = PeakMemory([job.device]).start()  # stopped in `finally`; planning holds no tensors
    try:
        files = _write(job, out_dir, max_shard_bytes, progress or no_progress, should_stop or never_stop)
    finally:
        job.base.close()
        for c in job.tuned:
            c.close()
        meter.stop()
    if job.patch is not None:
        job.patch.metadata = patch_metadata(job.settings, base_id, finetuned_ids, job.patch)
    return _report(job, meter, files, time.perf_counter() - start, base_id, finetuned_ids)


def _open(base_dir: str | Path, dirs: Sequence[str | Path], settings: Settings, device: torch.device,
          chunk_elems: int, patch: Patch | PatchWriter | None) -> _Job:
    """Open the checkpoints and check that their tensors can be merged name by name."""
    base = Checkpoint(base_dir)
    names = key_map(base.folder, base.keys)
    tuned = [open_finetuned(d, base, names) for d in dirs]  # a model folder, or an adapter on the base
    check_same_keys(base, tuned)
    bad = [k for k in names.converted if any(not _same_bytes(base, t, k) for t in tuned)]
    if bad:
        raise UserError(f"transformers converts {bad[0]} when loading (not a 1:1 tensor), and the "
                        "fine-tuned model changed it; merge this model in memory instead")
    return _Job(settings, base, tuned, names, device, chunk_elems, patch)


def _write(job: _Job, out_dir: str | Path | None, max_shard_bytes: int, progress: Progress,
           should_stop: StopCheck) -> list[str]:
    """Merge every tensor in checkpoint order, writing each to the output as it comes;
    returns the files written. Reading, merging and writing overlap: a reader thread
    reads tensor i + 1 and a writer thread writes tensor i − 1 while tensor i is merged,
    one tensor in flight per stage (file reads and writes, and torch's kernels, release
    the GIL)."""
    keys, items = job.base.keys, job.items()
    layout = [(k, job.base.tensors[k].dtype, job.base.tensors[k].shape) for k in keys]
    with atomic_path(out_dir) if out_dir is not None else nullcontext() as tmp:
        writer = ShardedWriter(tmp, layout, max_shard_bytes) if tmp is not None else None

        def write(key: str, value: torch.Tensor, entries: MaskedPatch | None) -> None:
            t0 = time.perf_counter()
            if writer is not None:
                writer.write(key, value)
            if entries is not None:
                job.patch.add(job.names.param_of[key], entries)
                job.written(entries)
            job.clock.add("write", t0)

        with ThreadPoolExecutor(1) as reads, ThreadPoolExecutor(1) as writes:
            ahead: Future | None = reads.submit(job.read_item, items[0]) if items else None
            written: Future | None = None
            for i, item in enumerate(items):
                if should_stop():
                    raise Cancelled
                progress(f"merging {item.key}", i, len(items))
                b, ts = ahead.result()
                ahead = reads.submit(job.read_item, items[i + 1]) if i + 1 < len(items) else None
                value, entries = job.merge_item(item, b, ts)
                del b, ts
                if written is not None:
                    written.result()  # one write in flight; its error surfaces here
                written = writes.submit(write, item.key, value, entries)
                del value, entries
            if written is not None:
                written.result()
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
    numel = sum(torch.Size(t.shape).numel() for t in tensors.values())
    # what goes through the pipeline at once: tensors, or their parts
    items = job.items()
    sizes = [(item.end - item.start, tensors[item.key].dtype.itemsize, item.numel) for item in items]
    entries = sum(t["changed"] for t in tally.per_tensor.values())
    largest_numel, largest_size, _ = max(sizes, key=lambda s: s[0] * s[1], default=(0, 0, 0))
    method, n, collects = job.settings.method, len(job.tuned), job.patch is not None
    bound = memory_bound_bytes(largest_numel, largest_size, n, method, job.chunk_elems, collects)
    pipeline = pipeline_bound_bytes(sizes, n, method, job.chunk_elems, collects)
    held = 0.0  # a collected patch (not a file writer) stays in memory: what it grew to
    if isinstance(job.patch, Patch):
        held = sum(tp.index.nbytes + tp.values.nbytes for tp in job.patch.tensors.values()) / 2**20
    memory = {**meter.report(), "largest_tensor_mb": largest_numel * largest_size / 2**20,
              "one_tensor_bound_mb": bound / 2**20, "pipeline_bound_mb": pipeline / 2**20,
              "patch_held_mb": held,
              # the stack (torch, transformers) at start, the three stages in flight, the
              # allocator's slack and the kernels' code, the patch held
              "predicted_peak_mb": predicted_peak_mb(meter.rss_at_start_mb, pipeline / 2**20 + held)}
    return {"settings": job.settings.to_dict(), "base": base_id, "finetuned": finetuned_ids,
            "streamed": True, "device": str(job.device), "tensors_total": len(keys),
            "tensors_in_parts": len({i.key for i in items if not i.whole}),
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
