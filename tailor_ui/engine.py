"""Run one merge method over a model pair and return the patch with a report.

`run_method(pair, settings, calibration)` is the one entry point the CLI, the dashboard
and the sweep share. The pair's models are left exactly as they were.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tailor_ui.control import Progress, StopCheck, never_stop, no_progress
from tailor_ui.errors import UserError
from tailor_ui.memory import PeakMemory, predicted_peak_mb, release_large_frees
from tailor_ui.methods import REGISTRY
from tailor_ui.methods.method import Method, MethodRun
from tailor_ui.methods.tailor_run import pair_values
from tailor_ui.names import layer_index
from tailor_ui.pair import Pair
from tailor_ui.patch import (Patch, PatchFile, TensorPatch, header_room, patch_writer, save_patch, tensor_patch,
                             union)
from tailor_ui.prompts import Batch
from tailor_ui.routing import route_tensor
from tailor_ui.settings import Settings
from tailor_ui.weights import release

@dataclass
class Result:
    patch: Patch | PatchFile  # a file: a merge that wrote its patch as it went (pair_stream)
    report: dict[str, Any]


def selected_linears(pair: Pair, pattern: str | None = None) -> list[str]:
    """Linear modules whose weight some fine-tuned model changed, in model order.

    The output embedding (lm_head) is left to the policy for other tensors, as docs/methods.md#tensors
    lists it with embeddings and norms. A pattern narrows the choice (regex search).
    """
    output = pair.base.get_output_embeddings() if hasattr(pair.base, "get_output_embeddings") else None
    regex = re.compile(pattern) if pattern else None
    changed = set(pair.changed())
    names = []
    for name, module in pair.base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if regex is not None and not regex.search(name):
            continue
        if f"{name}.weight" in changed:
            names.append(name)
    return names


def chosen_linears(pair: Pair, pattern: str | None) -> list[str]:
    """`selected_linears`, refusing a pattern that selects none."""
    linears = selected_linears(pair, pattern)
    if not linears and pattern:
        raise UserError(f"no changed linear layer matches {pattern!r}")
    return linears


def patch_metadata(settings: Settings, base_id: str, finetuned_ids: Sequence[str], patch: Patch) -> dict:
    """What a patch file records about how it was made (shared with the streaming merge)."""
    return {"method": settings.method, "settings": settings.to_dict(), "base": base_id,
            "finetuned": list(finetuned_ids), "counts": patch.counts()}


def run_method(pair: Pair, settings: Settings, calibration: Sequence[Sequence[Batch]] | None = None,
               *, anchor: Sequence[Batch] | None = None, progress: Progress | None = None,
               should_stop: StopCheck | None = None, keep_scores: bool = True,
               layerwise: bool = True, patch_path: Path | None = None) -> Result:
    """Merge every fine-tuned model of the pair into its base with the chosen method.

    `calibration[k]` holds the target-task batches of fine-tuned model k (methods that
    need calibration: Model Tailor; the baselines do not). `anchor` holds original-task
    batches, the skills of the base that anchored compensation keeps (one set for every
    fine-tuned model). `keep_scores`: per-tensor scores stay in the pair's cache for a
    later re-threshold (the dashboard's slider); a one-shot run (the CLI) keeps none.
    `layerwise` off runs calibration on the whole model per block (the reference path).
    `patch_path` (one fine-tuned model): the patch is written to that file as it is made,
    none of it held once finished (`_merged_to_file`); the result's patch is the file.
    """
    run = MethodRun(settings, progress or no_progress, should_stop or never_stop, anchor=tuple(anchor or ()),
                    keep_scores=keep_scores, layerwise=layerwise)
    method = REGISTRY[settings.method]
    if method.needs_calibration:
        if not calibration or len(calibration) != len(pair.finetuned) or not all(calibration):
            raise UserError(f"{method.label} needs calibration data for every fine-tuned model")
        if settings.anchored and not run.anchor:
            raise UserError("anchored compensation needs original-task calibration data "
                            "(examples of the skills the base should keep)")
    reads_before = _lazy_reads(pair)
    release_large_frees()  # what a run frees goes back to the system, so its memory bound holds
    start = time.perf_counter()
    try:
        with PeakMemory() as meter:
            linears = chosen_linears(pair, settings.modules)
            patch = (_merged(pair, method, linears, calibration, run) if patch_path is None
                     else _merged_to_file(pair, method, linears, calibration, run, patch_path))
    finally:
        release(pair.base)  # every value written into the base is reverted by now
    seconds = time.perf_counter() - start
    patch.metadata = patch_metadata(settings, pair.base_id, pair.finetuned_ids, patch)
    report = _report(pair, patch, linears, run, seconds)
    report["memory"] = meter.report()
    terms = report.get("memory_terms_mb")
    if terms is not None:  # the run's terms, on what the process held when it started
        report["memory"]["predicted_peak_mb"] = predicted_peak_mb(meter.rss_at_start_mb, sum(terms.values()))
    if reads_before is not None:
        report["finetuned_reads"] = _lazy_reads(pair) - reads_before
    return Result(patch=patch, report=report)


def _merged(pair: Pair, method: Method, linears: Sequence[str],
            calibration: Sequence[Sequence[Batch]] | None, run: MethodRun) -> Patch:
    """The pair's patch: tensor by tensor (routing runs per model and unites where it
    must), or, for a method with a `run` hook, that hook per fine-tuned model on the
    selected linears after the other tensors were routed, the patches united."""
    if method.run is None:
        models = list(range(len(pair.finetuned)))
        return _nonempty(_routed(pair, pair.changed(), linears, run, models))
    patches = []
    for k in range(len(pair.finetuned)):
        # the tensors outside the selected linears go as in a data-free merge of model k
        patch = _routed(pair, _others(pair, linears), [], run, [k])
        patch.update(method.run(pair, k, calibration[k] if calibration else (), linears, dict(patch), run))
        patches.append(_nonempty(patch))
    return patches[0] if len(patches) == 1 else union(
        patches, _overlapping_base_values(pair, patches), run.settings.overlap)


def _merged_to_file(pair: Pair, method: Method, linears: Sequence[str],
                    calibration: Sequence[Sequence[Batch]] | None, run: MethodRun, path: Path) -> PatchFile:
    """`_merged` written to a patch file: what the method's run hook finishes goes to the
    file at once (`MethodRun.sink`), the rest when the run ends. Several fine-tuned models
    are united at the end, so their patches are written then."""
    if len(pair.finetuned) > 1:
        merged = _merged(pair, method, linears, calibration, run)
        merged.metadata = patch_metadata(run.settings, pair.base_id, pair.finetuned_ids, merged)
        save_patch(merged, path)
        return PatchFile(path)
    with patch_writer(path, header_room(pair.changed())) as writer:
        run.sink = lambda name, tp: writer.add(name, tp) if tp.index.numel() else None
        try:
            patch = _merged(pair, method, linears, calibration, run)
        finally:
            run.sink = None
        for name, tp in patch.tensors.items():
            writer.add(name, tp)
        writer.metadata = patch_metadata(run.settings, pair.base_id, pair.finetuned_ids, writer)
    return PatchFile(path)


def _lazy_reads(pair: Pair) -> int | None:
    """Tensors read so far from fine-tuned checkpoints that are not loaded (None: all loaded)."""
    lazy = [ft for ft in pair.finetuned if not isinstance(ft, torch.nn.Module)]
    return sum(sum(ft.reads.values()) for ft in lazy) if lazy else None


def _overlapping_base_values(pair: Pair, patches: Sequence[Patch]) -> dict[str, torch.Tensor]:
    """The base values `union` needs: those of tensors that several patches touch."""
    counts = Counter(name for p in patches for name in p.tensors)
    return {name: pair.base_value(name) for name, n in counts.items() if n > 1}


def _others(pair: Pair, linears: Sequence[str]) -> list[str]:
    chosen = {f"{n}.weight" for n in linears}
    return [n for n in pair.changed() if n not in chosen]


def _routed(pair: Pair, names: Sequence[str], linears: Sequence[str], run: MethodRun,
            models: list[int]) -> dict[str, TensorPatch]:
    """Data-free merge of the named tensors of the given models, each routed by
    `routing.route_tensor` (the streaming merge's routing too)."""
    selected = {f"{n}.weight" for n in linears}
    out = {}
    for i, name in enumerate(names):
        run.check()
        run.progress(f"merging {name}", i, len(names))
        base, tuned = pair_values(pair, name, models)
        with run.timed("merge"):
            new = route_tensor(name, base, tuned, run.settings, name in selected)
        if new is not None:
            out[name] = tensor_patch(base, new)
    return out


def _nonempty(tensors: dict[str, TensorPatch]) -> Patch:
    return Patch(tensors={n: t for n, t in tensors.items() if t.index.numel()})


def _report(pair: Pair, patch: Patch, linears: Sequence[str], run: MethodRun, seconds: float) -> dict:
    return {**patch_report(pair, patch, linears, run.settings, {**run.timings, "total": seconds}),
            **run.report}


def patch_report(pair: Pair, patch: Patch | PatchFile, linears: Sequence[str], settings: Settings,
                 timings: dict[str, float]) -> dict:
    """What a merge's report says about its patch (counted from the patch's header where
    it is a file: nothing is read)."""
    params = pair.base_params()
    counts, shapes = patch.counts(), patch.shapes
    per_tensor = {}
    for n, kept in counts.items():
        numel = int(torch.Size(shapes[n]).numel())
        per_tensor[n] = {"kept": kept, "numel": numel, "fraction": kept / max(numel, 1),
                         "layer": layer_index(n)}
    linear_numel = sum(params[f"{n}.weight"].numel() for n in linears)
    linear_kept = sum(counts.get(f"{n}.weight", 0) for n in linears)
    return {
        "settings": settings.to_dict(), "base": pair.base_id, "finetuned": pair.finetuned_ids,
        "finetuned_loading": ["in memory" if isinstance(ft, torch.nn.Module) else "lazy"
                              for ft in pair.finetuned],
        "base_loading": pair.loading,
        "selected_linears": len(linears), "patch_entries": patch.num_entries,
        "linear_fraction": linear_kept / linear_numel if linear_numel else 0.0,
        "model_fraction": patch.num_entries / sum(p.numel() for p in params.values()),
        "tensors": per_tensor, "timings_s": timings,
    }
