"""Run one merge method over a model pair and return the patch with a report.

`run_method(pair, settings, calibration)` is the one entry point the CLI, the dashboard
and the sweep share. The pair's models are left exactly as they were.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from tailor_ui.calibration import collect_hessians
from tailor_ui.control import Cancelled, Progress, StopCheck, never_stop, no_progress
from tailor_ui.errors import UserError
from tailor_ui.memory import PeakMemory
from tailor_ui.methods import baselines
from tailor_ui.methods.selection import global_threshold, keep_mask
from tailor_ui.methods.tailor import (TensorScores, compensate, inverse_hessian_factor,
                                      merge_without_compensation, tensor_scores)
from tailor_ui.names import layer_groups, layer_index
from tailor_ui.pair import Pair
from tailor_ui.patch import Patch, TensorPatch, applied, tensor_patch, union
from tailor_ui.prompts import Batch
from tailor_ui.settings import MULTI_TASK_NATIVE, Settings
from tailor_ui.weights import compute_device, release, writable_param



@dataclass
class Result:
    patch: Patch
    report: dict[str, Any]


@dataclass
class _Run:
    """What one run carries around: settings, callbacks, timings."""

    settings: Settings
    progress: Progress
    should_stop: StopCheck
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - start

    def check(self) -> None:
        if self.should_stop():
            raise Cancelled


def selected_linears(pair: Pair, pattern: str | None = None) -> list[str]:
    """Linear modules whose weight some fine-tuned model changed, in model order.

    The output embedding (lm_head) is left to the policy for other tensors, as METHODS.md
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


def patch_metadata(settings: Settings, base_id: str, finetuned_ids: Sequence[str], patch: Patch) -> dict:
    """What a patch file records about how it was made (shared with the streaming merge)."""
    return {"method": settings.method, "settings": settings.to_dict(), "base": base_id,
            "finetuned": list(finetuned_ids), "counts": patch.counts()}


def run_method(pair: Pair, settings: Settings, calibration: Sequence[Sequence[Batch]] | None = None,
               *, progress: Progress | None = None, should_stop: StopCheck | None = None) -> Result:
    """Merge every fine-tuned model of the pair into its base with the chosen method.

    `calibration[k]` holds the target-task batches of fine-tuned model k (Model Tailor
    needs them; the baselines do not).
    """
    run = _Run(settings, progress or no_progress, should_stop or never_stop)
    if settings.method == "tailor":
        if not calibration or len(calibration) != len(pair.finetuned) or not all(calibration):
            raise UserError("Model Tailor needs calibration data for every fine-tuned model")
    reads_before = _lazy_reads(pair)
    start = time.perf_counter()
    try:
        with PeakMemory() as meter:
            linears = selected_linears(pair, settings.modules)
            if not linears and settings.modules:
                raise UserError(f"no changed linear layer matches {settings.modules!r}")
            if settings.method in MULTI_TASK_NATIVE:
                patch = _data_free(pair, linears, run, models=list(range(len(pair.finetuned))))
            else:
                patches = []
                for k in range(len(pair.finetuned)):
                    if settings.method == "tailor":
                        patches.append(_tailor(pair, k, linears, calibration[k], run))
                    else:
                        patches.append(_data_free(pair, linears, run, models=[k]))
                patch = patches[0] if len(patches) == 1 else union(
                    patches, _overlapping_base_values(pair, patches), settings.overlap)
    finally:
        release(pair.base)  # every value written into the base is reverted by now
    seconds = time.perf_counter() - start
    patch.metadata = patch_metadata(settings, pair.base_id, pair.finetuned_ids, patch)
    report = _report(pair, patch, linears, run, seconds)
    report["memory"] = meter.report()
    if reads_before is not None:
        report["finetuned_reads"] = _lazy_reads(pair) - reads_before
    return Result(patch=patch, report=report)


def _lazy_reads(pair: Pair) -> int | None:
    """Tensors read so far from fine-tuned checkpoints that are not loaded (None: all loaded)."""
    lazy = [ft for ft in pair.finetuned if not isinstance(ft, torch.nn.Module)]
    return sum(sum(ft.reads.values()) for ft in lazy) if lazy else None


def _overlapping_base_values(pair: Pair, patches: Sequence[Patch]) -> dict[str, torch.Tensor]:
    """The base values `union` needs: those of tensors that several patches touch."""
    counts = Counter(name for p in patches for name in p.tensors)
    return {name: pair.base_value(name) for name, n in counts.items() if n > 1}


def _values(pair: Pair, name: str, models: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A parameter's base and fine-tuned values, on the device its layer computes on."""
    device = compute_device(pair.base, name)
    return pair.base_value(name).to(device), [pair.finetuned_value(k, name, device) for k in models]


def _others(pair: Pair, linears: Sequence[str]) -> list[str]:
    chosen = {f"{n}.weight" for n in linears}
    return [n for n in pair.changed() if n not in chosen]


def _finetuned_values(pair: Pair, names: Sequence[str], models: list[int]) -> dict[str, TensorPatch]:
    """The `finetuned` policy: the fine-tuned values (several models' mean, as they cannot
    all be kept)."""
    out = {}
    for name in names:
        base, tuned = _values(pair, name, models)
        out[name] = tensor_patch(base, torch.stack([t.float() for t in tuned]).mean(dim=0))
    return out


def _merge_tensors(pair: Pair, names: Sequence[str], run: _Run, models: list[int]) -> dict[str, TensorPatch]:
    """Apply a data-free method tensor by tensor."""
    out = {}
    for i, name in enumerate(names):
        run.check()
        run.progress(f"merging {name}", i, len(names))
        base, tuned = _values(pair, name, models)
        with run.timed("merge"):
            out[name] = tensor_patch(base, merge_tensor(base, tuned, name, run.settings))
    return out


def _nonempty(tensors: dict[str, TensorPatch]) -> Patch:
    return Patch(tensors={n: t for n, t in tensors.items() if t.index.numel()})


def _data_free(pair: Pair, linears: Sequence[str], run: _Run, models: list[int]) -> Patch:
    others = _others(pair, linears)
    out: dict[str, TensorPatch] = {}
    if run.settings.others == "finetuned":
        out.update(_finetuned_values(pair, others, models))
    merged = [f"{n}.weight" for n in linears] + (others if run.settings.others == "linear" else [])
    out.update(_merge_tensors(pair, merged, run, models))
    return _nonempty(out)


def merge_tensor(base: torch.Tensor, tuned: list[torch.Tensor], name: str, s: Settings) -> torch.Tensor:
    """One tensor merged by a data-free method (float32); shared with the streaming merge."""
    lam = s.effective_lambda
    # magnitude also stands in for tailor on tensors without a Hessian (others "like linears")
    if s.method in ("magnitude", "tailor"):
        return baselines.magnitude(base, tuned[0], s.keep, _local_scope(s), s.block_size)
    taus = [t.float() - base.float() for t in tuned]
    if s.method == "wise_ft":
        return baselines.wise_ft(base, taus[0], lam)
    if s.method == "task_arithmetic":
        return baselines.task_arithmetic(base, taus, lam)
    if s.method == "ties":
        return baselines.ties(base, taus, s.keep, lam)
    if s.method == "dare":
        return baselines.dare(base, taus[0], s.effective_drop, s.seed, name)
    raise UserError(f"unknown method {s.method!r}")


def _local_scope(s: Settings) -> str:
    # a tensor with no Hessian has no place in the model-wide ranking: fall back to per tensor
    return "tensor" if s.scope == "global" else s.scope


def _cache_key(s: Settings, k: int, calib: Sequence[Batch], sequential: bool) -> tuple:
    """What the Hessians and scores depend on (entries are per linear). One-pass Hessians
    come from the fine-tuned model alone. In sequential mode a layer's inputs come from the
    already tailored earlier layers, so every setting that shapes them is part of it: which
    linears are tailored and how, and what the other tensors hold."""
    key: tuple = ("scores", k, _fingerprint(calib), s.damp, s.block_size, s.sensitivity, sequential)
    if sequential:
        key += (s.modules, s.others, s.keep, s.alpha, s.scope, s.compensate, s.sign)
    return key


def _fingerprint(batches: Sequence[Batch]) -> str:
    digest = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            t = batch[key].detach().cpu().contiguous()
            digest.update(key.encode() + str(tuple(t.shape)).encode())
            digest.update(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def _tailor(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch], run: _Run) -> Patch:
    s = run.settings
    others = _others(pair, linears)
    patch: dict[str, TensorPatch] = {}
    if s.others == "finetuned":
        patch.update(_finetuned_values(pair, others, [k]))
    elif s.others == "linear":
        patch.update(_merge_tensors(pair, others, run, [k]))
    # a model-wide threshold needs every score before the first layer is compensated
    sequential = s.hessians == "sequential" and s.scope != "global"
    cache = pair.cache.setdefault(_cache_key(s, k, calib, sequential), {})
    if sequential:
        patch.update(_tailor_sequential(pair, k, linears, calib, patch, cache, run))
    else:
        patch.update(_tailor_one_pass(pair, k, linears, calib, cache, run))
    return _nonempty(patch)


@contextmanager
def _holding(model: torch.nn.Module, names: Sequence[str], value_of: Callable[[str], torch.Tensor]
             ) -> Iterator[torch.nn.Module]:
    """`model` with the named parameters set to `value_of(name)`; the values they held are
    parked on the CPU meanwhile and written back at the end, bit for bit."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name in names:
                storage = writable_param(model, name)
                saved[name] = storage.to("cpu", copy=True)
                storage.copy_(value_of(name))
        yield model
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                writable_param(model, name).copy_(original)


@contextmanager
def _finetuned_model(pair: Pair, k: int) -> Iterator[torch.nn.Module]:
    """A model that computes as fine-tuned model k does: the loaded model, or, for one read
    lazily, the base holding fine-tuned values in every changed tensor (one read each)."""
    tuned = pair.finetuned[k]
    if isinstance(tuned, torch.nn.Module):
        yield tuned
        return
    with _holding(pair.base, pair.changed(), lambda name: pair.finetuned_value(k, name)) as model:
        yield model


def _tailor_one_pass(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch],
                     cache: dict, run: _Run) -> dict[str, TensorPatch]:
    """Hessians from the fine-tuned model in one pass over the calibration data; then each
    linear is read once, scored (unless cached) and, unless the threshold is model-wide
    (which needs every score first), tailored."""
    s = run.settings
    missing = [n for n in linears if n not in cache]
    hessians: dict[str, torch.Tensor] = {}
    if missing:
        run.progress("collecting Hessians (one pass)", 0, 1)
        with run.timed("calibration"), _finetuned_model(pair, k) as model:
            hessians = collect_hessians(model, missing, calib, should_stop=run.should_stop)
    model_wide = s.scope == "global"
    out = {}
    for i, name in enumerate(linears):
        run.check()
        run.progress(f"tailoring {name}", i, len(linears))
        w_pre, [w_ft] = _values(pair, f"{name}.weight", [k])
        if name in hessians:
            cache[name] = _score(w_pre, w_ft, hessians.pop(name), run)
        if not model_wide:
            out[f"{name}.weight"] = _tailor_tensor(w_pre, w_ft, cache[name], None, run)
    if model_wide:
        threshold = global_threshold([cache[n][1].importance(s.alpha) for n in linears], s.keep)
        for i, name in enumerate(linears):
            run.check()
            run.progress(f"tailoring {name}", i, len(linears))
            w_pre, [w_ft] = _values(pair, f"{name}.weight", [k])
            out[f"{name}.weight"] = _tailor_tensor(w_pre, w_ft, cache[name], threshold, run)
    return out


def _tailor_sequential(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch],
                       before: dict[str, TensorPatch], cache: dict, run: _Run) -> dict[str, TensorPatch]:
    """The authors' order: each block's inputs come from the model whose earlier blocks are
    already tailored, while the block itself still holds the fine-tuned weights.

    The base model is the working copy: patches are applied to it in place as blocks are
    done and all reverted at the end, so it leaves exactly as it came. Of the fine-tuned
    model only the current block's linears are held (read once each), and that block's
    Hessians only until they are scored.
    """
    base = pair.base
    out: dict[str, TensorPatch] = {}
    groups = layer_groups(linears)
    with ExitStack() as tailored:  # every block's patch stays written in until the end
        tailored.enter_context(applied(base, Patch(tensors=dict(before))))
        for g, group in enumerate(groups):
            run.check()
            tuned = {n: _values(pair, f"{n}.weight", [k]) for n in group}  # (w_pre, [w_ft])
            todo = [n for n in group if n not in cache]
            if todo:
                run.progress(f"collecting Hessians, block {g + 1}/{len(groups)}", g, len(groups))
                fine = {f"{n}.weight": tuned[n][1][0] for n in todo}
                with run.timed("calibration"), _holding(base, list(fine), fine.__getitem__):
                    hessians = collect_hessians(base, todo, calib, should_stop=run.should_stop)
                del fine
                for n in todo:
                    cache[n] = _score(tuned[n][0], tuned[n][1][0], hessians.pop(n), run)
                del hessians
            run.progress(f"tailoring block {g + 1}/{len(groups)}", g, len(groups))
            done = {f"{n}.weight": _tailor_tensor(tuned[n][0], tuned[n][1][0], cache[n], None, run)
                    for n in group}
            del tuned  # this block's fine-tuned weights go before the next block's are read
            out.update(done)
            tailored.enter_context(applied(base, Patch(tensors=done)))
    return out


Cached = tuple[torch.Tensor, TensorScores]


def _score(w_pre: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor, run: _Run) -> Cached:
    """Inverse-Hessian factor and z-scores of one weight, computed on its device and parked
    on the CPU (the cache outlives the run; a GPU keeps room for the model)."""
    s = run.settings
    with run.timed("scores"):
        factor = inverse_hessian_factor(hessian.to(w_pre.device), s.damp)
        scores = tensor_scores(w_pre, w_ft, factor, s.sensitivity, s.block_size)
        return factor.cpu(), TensorScores(scores.salience_z.cpu(), scores.sensitivity_z.cpu())


def _tailor_tensor(w_pre: torch.Tensor, w_ft: torch.Tensor, cached: Cached,
                   threshold: float | None, run: _Run) -> TensorPatch:
    s = run.settings
    device = w_pre.device
    factor = cached[0].to(device)
    scores = TensorScores(cached[1].salience_z.to(device), cached[1].sensitivity_z.to(device))
    with run.timed("selection"):
        importance = scores.importance(s.alpha)
        keep = importance >= threshold if threshold is not None else keep_mask(
            importance, s.keep, s.scope, s.block_size)
    with run.timed("compensation"):
        if s.compensate:
            new = compensate(w_pre, w_ft, keep, factor, s.sign, s.block_size)
        else:
            new = merge_without_compensation(w_pre, w_ft, keep)
    return tensor_patch(w_pre, new)


def _report(pair: Pair, patch: Patch, linears: Sequence[str], run: _Run, seconds: float) -> dict:
    params = pair.base_params()
    per_tensor = {n: {"kept": t.index.numel(), "numel": t.numel, "fraction": t.fraction,
                      "layer": layer_index(n)} for n, t in patch.tensors.items()}
    linear_numel = sum(params[f"{n}.weight"].numel() for n in linears)
    linear_kept = sum(patch.tensors[f"{n}.weight"].index.numel() for n in linears
                      if f"{n}.weight" in patch.tensors)
    return {
        "settings": run.settings.to_dict(), "base": pair.base_id, "finetuned": pair.finetuned_ids,
        "finetuned_loading": ["in memory" if isinstance(ft, torch.nn.Module) else "lazy"
                              for ft in pair.finetuned],
        "selected_linears": len(linears), "patch_entries": patch.num_entries,
        "linear_fraction": linear_kept / linear_numel if linear_numel else 0.0,
        "model_fraction": patch.num_entries / sum(p.numel() for p in params.values()),
        "tensors": per_tensor, "timings_s": {**run.timings, "total": seconds},
    }
