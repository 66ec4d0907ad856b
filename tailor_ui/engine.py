"""Run one merge method over a model pair and return the patch with a report.

`run_method(pair, settings, calibration)` is the one entry point the CLI, the dashboard
and the sweep share. The pair's models are left exactly as they were.
"""

from __future__ import annotations

import hashlib
import re
import resource
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from tailor_ui.calibration import Batch, Cancelled, StopCheck, collect_hessians
from tailor_ui.errors import UserError
from tailor_ui.methods import baselines
from tailor_ui.methods.selection import global_threshold, keep_mask
from tailor_ui.methods.tailor import (TensorScores, compensate, inverse_hessian_factor,
                                      merge_without_compensation, tensor_scores)
from tailor_ui.pair import Pair, layer_index
from tailor_ui.patch import Patch, TensorPatch, apply_patch, revert_patch, tensor_patch, union
from tailor_ui.settings import MULTI_TASK_NATIVE, Settings

Progress = Callable[[str, int, int], None]
_GROUP = re.compile(r"^(.*?\.(?:layers|layer|blocks|h)\.\d+)\.")


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
    names = []
    for name, module in pair.base.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        if regex is not None and not regex.search(name):
            continue
        if _changed(pair, f"{name}.weight"):
            names.append(name)
    return names


def _changed(pair: Pair, param: str) -> bool:
    base = pair.base.get_parameter(param)
    return any(not torch.equal(base, ft.get_parameter(param).to(base.device)) for ft in pair.finetuned)


def layer_groups(linears: Sequence[str]) -> list[list[str]]:
    """Linears grouped by the numbered block they live in, blocks in model order."""
    groups: dict[str, list[str]] = {}
    for name in linears:
        match = _GROUP.match(name)
        groups.setdefault(match.group(1) if match else name, []).append(name)
    return list(groups.values())


def run_method(pair: Pair, settings: Settings, calibration: Sequence[Sequence[Batch]] | None = None,
               *, progress: Progress | None = None, should_stop: StopCheck | None = None) -> Result:
    """Merge every fine-tuned model of the pair into its base with the chosen method.

    `calibration[k]` holds the target-task batches of fine-tuned model k (Model Tailor
    needs them; the baselines do not).
    """
    run = _Run(settings, progress or (lambda *_: None), should_stop or (lambda: False))
    if settings.method == "tailor":
        if not calibration or len(calibration) != len(pair.finetuned) or not all(calibration):
            raise UserError("Model Tailor needs calibration data for every fine-tuned model")
    linears = selected_linears(pair, settings.modules)
    if not linears and settings.modules:
        raise UserError(f"no changed linear layer matches {settings.modules!r}")
    _reset_peak_memory()
    start = time.perf_counter()
    if settings.method in MULTI_TASK_NATIVE:
        patch = _data_free(pair, linears, run, models=list(range(len(pair.finetuned))))
    else:
        patches = []
        for k in range(len(pair.finetuned)):
            if settings.method == "tailor":
                patches.append(_tailor(pair, k, linears, calibration[k], run))
            else:
                patches.append(_data_free(pair, linears, run, models=[k]))
        patch = patches[0] if len(patches) == 1 else union(patches, pair.base_params(), settings.overlap)
    seconds = time.perf_counter() - start
    patch.metadata = {"method": settings.method, "settings": settings.to_dict(),
                      "base": pair.base_id, "finetuned": pair.finetuned_ids,
                      "counts": patch.counts()}
    return Result(patch=patch, report=_report(pair, patch, linears, run, seconds))


def _others(pair: Pair, linears: Sequence[str]) -> list[str]:
    chosen = {f"{n}.weight" for n in linears}
    return [n for n, _ in pair.base.named_parameters() if n not in chosen and _changed(pair, n)]


def _finetuned_values(pair: Pair, names: Sequence[str], models: list[int]) -> dict[str, TensorPatch]:
    """The `finetuned` policy: the fine-tuned values (several models' mean, as they cannot
    all be kept)."""
    out = {}
    for name in names:
        base = pair.base.get_parameter(name)
        values = torch.stack([pair.finetuned[k].get_parameter(name).detach().to(base.device).float()
                              for k in models]).mean(dim=0)
        out[name] = tensor_patch(base, values)
    return out


def _merge_tensors(pair: Pair, names: Sequence[str], run: _Run, models: list[int]) -> dict[str, TensorPatch]:
    """Apply a data-free method tensor by tensor."""
    out = {}
    for i, name in enumerate(names):
        run.check()
        run.progress(f"merging {name}", i, len(names))
        base = pair.base.get_parameter(name).detach()
        tuned = [pair.finetuned[k].get_parameter(name).detach().to(base.device) for k in models]
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
    """What the Hessians and scores depend on. In sequential mode a layer's inputs come from
    the already tailored earlier layers, so every setting that shapes them is part of it."""
    key: tuple = ("scores", k, _fingerprint(calib), s.damp, s.block_size, s.sensitivity,
                  s.modules, s.others, sequential)
    if sequential:
        key += (s.keep, s.alpha, s.scope, s.compensate, s.sign)
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


def _tailor_one_pass(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch],
                     cache: dict, run: _Run) -> dict[str, TensorPatch]:
    """Hessians from the fine-tuned model in one pass over the calibration data."""
    s = run.settings
    missing = [n for n in linears if n not in cache]
    if missing:
        run.progress("collecting Hessians (one pass)", 0, 1)
        with run.timed("calibration"):
            hessians = collect_hessians(pair.finetuned[k], missing, calib, should_stop=run.should_stop)
        for i, name in enumerate(missing):
            run.check()
            run.progress(f"scoring {name}", i, len(missing))
            cache[name] = _score(pair, k, name, hessians.pop(name), run)
    threshold = None
    if s.scope == "global":
        threshold = global_threshold([cache[n][1].importance(s.alpha) for n in linears], s.keep)
    out = {}
    for i, name in enumerate(linears):
        run.check()
        run.progress(f"tailoring {name}", i, len(linears))
        out[f"{name}.weight"] = _tailor_tensor(pair, k, name, cache[name], threshold, run)
    return out


def _tailor_sequential(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch],
                       before: dict[str, TensorPatch], cache: dict, run: _Run) -> dict[str, TensorPatch]:
    """The authors' order: each block's inputs come from the model whose earlier blocks are
    already tailored, while the block itself still holds the fine-tuned weights.

    The base model is the working copy: patches are applied to it in place as blocks are
    done and all reverted at the end, so it leaves exactly as it came.
    """
    base, ft = pair.base, pair.finetuned[k]
    applied = [apply_patch(base, Patch(tensors=dict(before)))]
    out: dict[str, TensorPatch] = {}
    groups = layer_groups(linears)
    try:
        for g, group in enumerate(groups):
            run.check()
            todo = [n for n in group if n not in cache]
            if todo:
                run.progress(f"collecting Hessians, block {g + 1}/{len(groups)}", g, len(groups))
                saved = {n: base.get_parameter(f"{n}.weight").detach().clone() for n in todo}
                try:
                    with torch.no_grad():
                        for n in todo:
                            w = base.get_parameter(f"{n}.weight")
                            w.copy_(ft.get_parameter(f"{n}.weight").to(w.device))
                    with run.timed("calibration"):
                        hessians = collect_hessians(base, todo, calib, should_stop=run.should_stop)
                finally:
                    with torch.no_grad():
                        for n, original in saved.items():
                            base.get_parameter(f"{n}.weight").copy_(original)
                for n in todo:
                    cache[n] = _score(pair, k, n, hessians.pop(n), run)
            run.progress(f"tailoring block {g + 1}/{len(groups)}", g, len(groups))
            done = {f"{n}.weight": _tailor_tensor(pair, k, n, cache[n], None, run) for n in group}
            out.update(done)
            applied.append(apply_patch(base, Patch(tensors=done)))
    finally:
        for state in reversed(applied):
            revert_patch(base, state)
    return out


def _score(pair: Pair, k: int, name: str, hessian: torch.Tensor, run: _Run
           ) -> tuple[torch.Tensor, TensorScores]:
    s = run.settings
    w_pre = pair.base.get_parameter(f"{name}.weight").detach()
    w_ft = pair.finetuned[k].get_parameter(f"{name}.weight").detach().to(w_pre.device)
    with run.timed("scores"):
        factor = inverse_hessian_factor(hessian.to(w_pre.device), s.damp)
        return factor, tensor_scores(w_pre, w_ft, factor, s.sensitivity, s.block_size)


def _tailor_tensor(pair: Pair, k: int, name: str, cached: tuple[torch.Tensor, TensorScores],
                   threshold: float | None, run: _Run) -> TensorPatch:
    s = run.settings
    factor, scores = cached
    w_pre = pair.base.get_parameter(f"{name}.weight").detach()
    w_ft = pair.finetuned[k].get_parameter(f"{name}.weight").detach().to(w_pre.device)
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


def _reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _report(pair: Pair, patch: Patch, linears: Sequence[str], run: _Run, seconds: float) -> dict:
    params = pair.base_params()
    per_tensor = {n: {"kept": t.index.numel(), "numel": t.numel, "fraction": t.fraction,
                      "layer": layer_index(n)} for n, t in patch.tensors.items()}
    linear_numel = sum(params[f"{n}.weight"].numel() for n in linears)
    linear_kept = sum(patch.tensors[f"{n}.weight"].index.numel() for n in linears
                      if f"{n}.weight" in patch.tensors)
    memory = {"cpu_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["gpu_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {
        "settings": run.settings.to_dict(), "base": pair.base_id, "finetuned": pair.finetuned_ids,
        "selected_linears": len(linears), "patch_entries": patch.num_entries,
        "linear_fraction": linear_kept / linear_numel if linear_numel else 0.0,
        "model_fraction": patch.num_entries / sum(p.numel() for p in params.values()),
        "tensors": per_tensor, "timings_s": {**run.timings, "total": seconds}, "memory": memory,
    }
