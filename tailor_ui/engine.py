"""Run one merge method over a model pair and return the patch with a report.

`run_method(pair, settings, calibration)` is the one entry point the CLI, the dashboard
and the sweep share. The pair's models are left exactly as they were.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from tailor_ui.calibration import collect_hessians
from tailor_ui.control import Cancelled, Progress, StopCheck, never_stop, no_progress
from tailor_ui.errors import UserError
from tailor_ui.memory import PeakMemory
from tailor_ui.methods import REGISTRY
from tailor_ui.methods.exact import (anchored_problem, compensate_exact, compensate_in_sparsegpt_order,
                                     tailor_block_scorer)
from tailor_ui.methods.selection import global_threshold, keep_mask, layer_keep_budget
from tailor_ui.methods.tailor import (TensorScores, compensate, inverse_hessian_factor,
                                      merge_without_compensation, tensor_scores)
from tailor_ui.names import layer_groups, layer_index
from tailor_ui.pair import Pair
from tailor_ui.patch import Patch, PatchFile, TensorPatch, applied, tensor_patch, union
from tailor_ui.prompts import Batch
from tailor_ui.routing import route_tensor
from tailor_ui.settings import Settings
from tailor_ui.weights import compute_device, holding, release

@dataclass
class Result:
    patch: Patch | PatchFile  # a file: a merge that wrote its patch as it went (pair_stream)
    report: dict[str, Any]


@dataclass
class _Run:
    """What one run carries around: settings, callbacks, timings, score-cache lookups."""

    settings: Settings
    progress: Progress
    should_stop: StopCheck
    timings: dict[str, float] = field(default_factory=dict)
    # per linear: its scores were cached (hit) or computed by this run (miss)
    score_cache: dict[str, int] = field(default_factory=lambda: {"hits": 0, "misses": 0})
    fallbacks: int = 0  # linears whose exact compensation went greedy (over its memory bound)
    anchor: Sequence[Batch] = ()  # original-task batches (anchored compensation)

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
               should_stop: StopCheck | None = None) -> Result:
    """Merge every fine-tuned model of the pair into its base with the chosen method.

    `calibration[k]` holds the target-task batches of fine-tuned model k (Model Tailor
    needs them; the baselines do not). `anchor` holds original-task batches, the skills
    of the base that anchored compensation keeps (one set for every fine-tuned model).
    """
    run = _Run(settings, progress or no_progress, should_stop or never_stop, anchor=tuple(anchor or ()))
    method = REGISTRY[settings.method]
    if method.needs_calibration:
        if not calibration or len(calibration) != len(pair.finetuned) or not all(calibration):
            raise UserError(f"{method.label} needs calibration data for every fine-tuned model")
        if settings.anchored and not run.anchor:
            raise UserError("anchored compensation needs original-task calibration data "
                            "(examples of the skills the base should keep)")
    reads_before = _lazy_reads(pair)
    start = time.perf_counter()
    try:
        with PeakMemory() as meter:
            linears = chosen_linears(pair, settings.modules)
            if not method.needs_calibration:  # routing runs per model and unites where it must
                models = list(range(len(pair.finetuned)))
                patch = _nonempty(_routed(pair, pair.changed(), linears, run, models))
            else:
                patches = [_tailor(pair, k, linears, calibration[k], run) for k in range(len(pair.finetuned))]
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


def _routed(pair: Pair, names: Sequence[str], linears: Sequence[str], run: _Run,
            models: list[int]) -> dict[str, TensorPatch]:
    """Data-free merge of the named tensors of the given models, each routed by
    `routing.route_tensor` (the streaming merge's routing too)."""
    selected = {f"{n}.weight" for n in linears}
    out = {}
    for i, name in enumerate(names):
        run.check()
        run.progress(f"merging {name}", i, len(names))
        base, tuned = _values(pair, name, models)
        with run.timed("merge"):
            new = route_tensor(name, base, tuned, run.settings, name in selected)
        if new is not None:
            out[name] = tensor_patch(base, new)
    return out


def _nonempty(tensors: dict[str, TensorPatch]) -> Patch:
    return Patch(tensors={n: t for n, t in tensors.items() if t.index.numel()})


def _cache_key(s: Settings, k: int, calib: Sequence[Batch], anchor: Sequence[Batch],
               sequential: bool) -> tuple:
    """What the Hessians and scores depend on (entries are per linear). One-pass Hessians
    come from the fine-tuned model alone. In sequential mode a layer's inputs come from the
    already tailored earlier layers, so every setting that shapes them is part of it: which
    linears are tailored and how, and what the other tensors hold."""
    key: tuple = ("scores", k, _fingerprint(calib), s.damp, s.block_size, s.sensitivity, sequential,
                  _holds_hessians(s), (_fingerprint(anchor), s.anchor_weight) if s.anchored else None)
    if sequential:
        key += (s.modules, s.others, s.keep, s.alpha, s.scope, s.compensate, s.compensation, s.order,
                s.sign)
    return key


def _holds_hessians(s: Settings) -> bool:
    """Exact (and anchored) compensation solves with the Hessian itself, so its entries keep it
    (anchored: the combined one, and the weights it pulls towards)."""
    return s.compensate and s.compensation in ("exact", "anchored")


def _hessians(model: torch.nn.Module, names: Sequence[str], calib: Sequence[Batch], run: _Run
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each named linear's Hessian on the target batches and, for anchored compensation, on
    the original-task ones (empty otherwise), from the same model."""
    target = collect_hessians(model, names, calib, should_stop=run.should_stop)
    if not run.settings.anchored:
        return target, {}
    return target, collect_hessians(model, names, run.anchor, should_stop=run.should_stop)


def _needs_every_score(s: Settings) -> bool:
    """A model-wide threshold or a per-layer budget ranks layers against each other, so
    every score is needed before the first layer is compensated (one-pass Hessians)."""
    return s.scope == "global" or s.budget == "per-layer"


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
    # the tensors outside the selected linears go as in a data-free merge of model k
    patch = _routed(pair, _others(pair, linears), [], run, [k])
    sequential = s.hessians == "sequential" and not _needs_every_score(s)
    cache = pair.cache.setdefault(_cache_key(s, k, calib, run.anchor, sequential), {})
    hits = sum(n in cache for n in linears)
    run.score_cache["hits"] += hits
    run.score_cache["misses"] += len(linears) - hits
    if sequential:
        patch.update(_tailor_sequential(pair, k, linears, calib, patch, cache, run))
    else:
        patch.update(_tailor_one_pass(pair, k, linears, calib, cache, run))
    return _nonempty(patch)


def finetuned_model(pair: Pair, k: int) -> AbstractContextManager[torch.nn.Module]:
    """A model that computes as fine-tuned model k does (`Pair.finetuned_model`)."""
    return pair.finetuned_model(k)


def _tailor_one_pass(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch],
                     cache: dict, run: _Run) -> dict[str, TensorPatch]:
    """Hessians from the fine-tuned model in one pass over the calibration data; then each
    linear is read once, scored (unless cached) and, unless the threshold is model-wide
    (which needs every score first), tailored."""
    s = run.settings
    missing = [n for n in linears if n not in cache]
    hessians: dict[str, torch.Tensor] = {}
    anchors: dict[str, torch.Tensor] = {}
    if missing:
        run.progress("collecting Hessians (one pass)", 0, 1)
        with run.timed("calibration"), finetuned_model(pair, k) as model:
            hessians, anchors = _hessians(model, missing, calib, run)
    ranked = _needs_every_score(s)
    out = {}
    for i, name in enumerate(linears):
        run.check()
        run.progress(f"tailoring {name}", i, len(linears))
        w_pre, [w_ft] = _values(pair, f"{name}.weight", [k])
        if name in hessians:
            cache[name] = _score(w_pre, w_ft, hessians.pop(name), anchors.pop(name, None), run)
        if not ranked:
            out[f"{name}.weight"] = _tailor_tensor(w_pre, w_ft, cache[name], run)
    if ranked:
        choices = _ranked_choices(pair, linears, cache, s)
        for i, name in enumerate(linears):
            run.check()
            run.progress(f"tailoring {name}", i, len(linears))
            w_pre, [w_ft] = _values(pair, f"{name}.weight", [k])
            out[f"{name}.weight"] = _tailor_tensor(w_pre, w_ft, cache[name], run, **choices[name])
    return out


def _ranked_choices(pair: Pair, linears: Sequence[str], cache: dict, s: Settings) -> dict[str, dict]:
    """Per linear, what a model-wide ranking decided: a threshold on the fused importance
    (global scope), or its own keep fraction (per-layer budget: each layer's share of the
    raw fused score mass, salience and sensitivity each normalised over the model)."""
    if s.scope == "global":
        threshold = global_threshold([cache[n].scores.importance(s.alpha) for n in linears], s.keep)
        return {n: {"threshold": threshold} for n in linears}
    scores = [cache[n].scores for n in linears]
    salience = sum(x.salience_mass for x in scores) or 1.0
    sensitivity = sum(x.sensitivity_mass for x in scores) or 1.0
    masses = [s.alpha * x.salience_mass / salience + (1 - s.alpha) * x.sensitivity_mass / sensitivity
              for x in scores]
    sizes = [pair.base.get_parameter(f"{n}.weight").numel() for n in linears]
    return {n: {"keep": f} for n, f in zip(linears, layer_keep_budget(masses, sizes, s.keep))}


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
                with run.timed("calibration"), holding(base, list(fine), fine.__getitem__):
                    hessians, anchors = _hessians(base, todo, calib, run)
                del fine
                for n in todo:
                    cache[n] = _score(tuned[n][0], tuned[n][1][0], hessians.pop(n), anchors.pop(n, None), run)
                del hessians, anchors
            run.progress(f"tailoring block {g + 1}/{len(groups)}", g, len(groups))
            done = {f"{n}.weight": _tailor_tensor(tuned[n][0], tuned[n][1][0], cache[n], run)
                    for n in group}
            del tuned  # this block's fine-tuned weights go before the next block's are read
            out.update(done)
            tailored.enter_context(applied(base, Patch(tensors=done)))
    return out


@dataclass
class _Scored:
    """One linear's cache entry: the factor of its damped H⁻¹ and its scores, all on the
    CPU (the cache outlives the run; a GPU keeps room for the model); with exact
    compensation also its Hessian. With anchored compensation every part is of the anchored
    problem (`methods.exact.anchored_problem`): its Hessian A, and in `target` the weights c
    it pulls towards, which take the fine-tuned weights' place in scoring and compensation."""

    factor: torch.Tensor
    scores: TensorScores
    hessian: torch.Tensor | None = None
    target: torch.Tensor | None = None


def _score(w_pre: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor,
           anchor_hessian: torch.Tensor | None, run: _Run) -> _Scored:
    s = run.settings
    with run.timed("scores"):
        hessian, damp = hessian.to(w_pre.device), s.damp
        if anchor_hessian is not None:
            w_ft, hessian = anchored_problem(w_pre, w_ft.float(), hessian, anchor_hessian,
                                             s.anchor_weight, s.damp)
            damp = 0.0  # A holds the target Hessian's damping already
        factor = inverse_hessian_factor(hessian, damp)
        scores = tensor_scores(w_pre, w_ft, factor, s.sensitivity, s.block_size)
        return _Scored(factor.cpu(), scores.to("cpu"), hessian.cpu() if _holds_hessians(s) else None,
                       w_ft.cpu() if anchor_hessian is not None else None)


def _tailor_tensor(w_pre: torch.Tensor, w_ft: torch.Tensor, cached: _Scored, run: _Run, *,
                   threshold: float | None = None, keep: float | None = None) -> TensorPatch:
    """One linear's patch: its mask (the top `keep` of its fused importance, or above a
    model-wide threshold), then compensation as the settings say."""
    s = run.settings
    device = w_pre.device
    factor = cached.factor.to(device)
    if s.compensate and s.order == "sparsegpt":
        with run.timed("compensation"):
            scorer = tailor_block_scorer(factor, s.alpha, s.sensitivity)
            new, _ = compensate_in_sparsegpt_order(w_pre, w_ft, factor, scorer, s.keep if keep is None else keep,
                                                   s.sign, s.block_size)
        return tensor_patch(w_pre, new)
    with run.timed("selection"):
        importance = cached.scores.to(device).importance(s.alpha)
        mask = importance >= threshold if threshold is not None else keep_mask(
            importance, s.keep if keep is None else keep, s.scope, s.block_size)
    with run.timed("compensation"):
        if not s.compensate:
            new = merge_without_compensation(w_pre, w_ft, mask)
        elif s.compensation == "exact" or s.anchored:
            target, damp = (cached.target.to(device), 0.0) if s.anchored else (w_ft, s.damp)
            new, info = compensate_exact(w_pre, target, mask, cached.hessian.to(device), damp,
                                         block_size=s.block_size)
            run.fallbacks += info.method != "exact"
        else:
            new = compensate(w_pre, w_ft, mask, factor, s.sign, s.block_size)
    return tensor_patch(w_pre, new)


def _report(pair: Pair, patch: Patch, linears: Sequence[str], run: _Run, seconds: float) -> dict:
    return {**patch_report(pair, patch, linears, run.settings, {**run.timings, "total": seconds}),
            "score_cache": dict(run.score_cache), "exact_fallbacks": run.fallbacks}


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
        "selected_linears": len(linears), "patch_entries": patch.num_entries,
        "linear_fraction": linear_kept / linear_numel if linear_numel else 0.0,
        "model_fraction": patch.num_entries / sum(p.numel() for p in params.values()),
        "tensors": per_tensor, "timings_s": timings,
    }
