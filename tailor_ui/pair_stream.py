"""A loaded pair's data-free merge written to a patch file tensor by tensor, never held.

The dashboard's pairs are loaded models, not folders: their tensors are handed to the
streamed merge (`stream.stream_sources`, the per-tensor code the command line's
`stream_merge` runs) through Checkpoint's reading interface, one tensor at a time, and
each tensor's changed entries go straight into the patch file (`patch.PatchWriter`). So
the result equals the in-memory engine's patch and the command line's streamed one bit
for bit, while what the merge holds is one tensor's working set.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from tailor_ui.checkpoint import KeyMap
from tailor_ui.control import Progress, StopCheck
from tailor_ui.engine import Result, chosen_linears, patch_report, selected_linears
from tailor_ui.pair import Pair
from tailor_ui.patch import PatchFile, header_room, patch_writer
from tailor_ui.settings import Settings
from tailor_ui.stream import stream_sources
from tailor_ui.weights import compute_device


class PairTensors:
    """One model of a loaded pair read by parameter name (Checkpoint's reading interface):
    the base (`model=None`) as a fresh copy, which the merge may overwrite; fine-tuned
    model k as the pair reads it (a loaded model's own tensor, or a lazy model's read)."""

    def __init__(self, pair: Pair, model: int | None, keys: Sequence[str], device: torch.device) -> None:
        self.pair, self.model, self.device = pair, model, device
        self.keys = list(keys)
        self.tensors = dict(pair.base.named_parameters())  # dtype and shape of each

    def read(self, name: str) -> torch.Tensor:
        if self.model is None:
            return self.pair.base_value(name).to(self.device, copy=True)
        return self.pair.finetuned_value(self.model, name, self.device)

    def close(self) -> None:
        pass  # the pair stays loaded


def merge_to_file(pair: Pair, settings: Settings, path: Path, *, progress: Progress,
                  should_stop: StopCheck) -> Result:
    """Merge the pair with a data-free method into the patch file at `path`, tensor by
    tensor; the result's patch is that file (read lazily) and its report is the engine's."""
    start = time.perf_counter()
    linears = chosen_linears(pair, settings.modules)
    changed = pair.changed()
    # where the engine computes: the device of the pair's (first changed) layer
    device = compute_device(pair.base, changed[0]) if changed else torch.device("cpu")
    identity = {n: n for n in changed}
    names = KeyMap(param_of=identity, key_of=identity,
                   linears={f"{n}.weight" for n in selected_linears(pair)})
    base = PairTensors(pair, None, changed, device)
    tuned = [PairTensors(pair, k, changed, device) for k in range(len(pair.finetuned))]
    with patch_writer(path, header_room(changed)) as writer:
        streamed = stream_sources(base, tuned, names, settings, writer, device, progress=progress,
                                  should_stop=should_stop, base_id=pair.base_id,
                                  finetuned_ids=pair.finetuned_ids)
    patch = PatchFile(path)
    report = patch_report(pair, patch, linears, settings,
                          {**streamed["timings_s"], "total": time.perf_counter() - start})
    report.update(streamed=True, memory=streamed["memory"])
    return Result(patch=patch, report=report)
