"""Model Tailor over a model pair: calibration forwards, Hessians, scores, masks and
compensation for every selected linear of one fine-tuned model (the registry's `run` hook).

Two Hessian modes (docs/ARCHITECTURE.md, "The tailor run"): sequential (the authors'
order: a layer's inputs come from the already tailored earlier layers while the layer
itself holds its fine-tuned weights) and one-pass (every Hessian from the fine-tuned
model). Both run layer by layer where the model allows (`calibration.plan_layers`): the
model runs once per batch up to the first tailored layer, then each layer runs on its
cached inputs. Otherwise (and for the reference, `MethodRun.layerwise` off) each block's
Hessians come from a forward of the whole model up to that block; the report's
`pipeline` says which path ran and why.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

import torch

from tailor_ui.calibration import (LayerInputs, LayerPlan, SumsClock, capture_layer_inputs, collect_hessians,
                                   finetuned_model, front_params, plan_layers, run_layer)
from tailor_ui.methods.exact import (anchored_problem, compensate_exact, compensate_in_sparsegpt_order,
                                     tailor_block_scorer)
from tailor_ui.methods.method import Batch, MethodRun
from tailor_ui.methods.selection import global_threshold, keep_mask, layer_keep_budget
from tailor_ui.methods.tailor import (TensorScores, compensate, inverse_hessian_factor,
                                      merge_without_compensation, tensor_scores)
from tailor_ui.memory import layer_activation_bytes, linear_working_bytes, return_freed_heap, scored_bytes
from tailor_ui.names import block_name, layer_groups
from tailor_ui.pair import Pair
from tailor_ui.patch import Patch, TensorPatch, applied, tensor_patch
from tailor_ui.weights import compute_device, holding, onloaded

Hessians = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]  # target, anchor (or empty)
HessiansOf = Callable[[list[str]], Hessians]


def pair_values(pair: Pair, name: str, models: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A parameter's base and fine-tuned values, on the device its layer computes on."""
    device = compute_device(pair.base, name)
    return pair.base_value(name).to(device), [pair.finetuned_value(k, name, device) for k in models]


class Pipeline(StrEnum):
    """Which path a Model Tailor run took (report.json's `pipeline.path`)."""

    LAYER_WISE = "layer-wise"  # the front once, then one decoder layer at a time
    WHOLE_MODEL = "whole model"  # forwards of the whole model (the reference; the fallback)


def run_tailor(pair: Pair, k: int, calib: Sequence[Batch], linears: Sequence[str],
               before: dict[str, TensorPatch], run: MethodRun) -> dict[str, TensorPatch]:
    """The selected linears' patches of fine-tuned model k (`before`: the other tensors'
    patch, written into the working copy in sequential mode)."""
    s = run.settings
    sequential = s.hessians == "sequential" and not needs_every_score(s)
    key = _cache_key(s, k, calib, run.anchor, sequential)
    cache = pair.cache.setdefault(key, {}) if run.keep_scores else {}
    hits = sum(n in cache for n in linears)
    counts = run.report.setdefault("score_cache", {"hits": 0, "misses": 0})
    counts["hits"] += hits
    counts["misses"] += len(linears) - hits
    run.report.setdefault("exact_fallbacks", 0)
    plan = _plan(pair, linears, cache, run, sequential)
    out = _tailored(pair, k, linears, calib, before, cache, run, plan, sequential)
    if hits < len(linears):  # a re-threshold of cached scores computes (and predicts) nothing
        _predict_memory(pair, linears, calib, run, out, before, sequential, plan)
    return out


def _tailored(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch], before: dict[str, TensorPatch],
              cache: dict, run: MethodRun, plan: LayerPlan | None, sequential: bool) -> dict[str, TensorPatch]:
    if sequential and isinstance(plan, LayerPlan):
        return _sequential_layerwise(pair, k, plan, calib, before, cache, run)
    if sequential:
        with ExitStack() as tailored:  # every block's patch stays written in until the end
            tailored.enter_context(applied(pair.base, Patch(tensors=dict(before))))
            return _sequential(pair, k, layer_groups(linears), calib, cache, run, tailored)
    if isinstance(plan, LayerPlan):
        return _one_pass_layerwise(pair, k, plan, calib, cache, run)
    return _one_pass(pair, k, linears, calib, cache, run)


def _predict_memory(pair: Pair, linears: Sequence[str], calib: Sequence[Batch], run: MethodRun,
                    out: dict[str, TensorPatch], before: dict[str, TensorPatch], sequential: bool,
                    plan: LayerPlan | None) -> None:
    """What the run held beyond the loaded models, term by term (`memory_terms_mb`), for
    the path that ran: the cached layer inputs, the largest block's working set while its
    Hessians are gathered (its fine-tuned values written in, the values they displaced,
    its Hessians), the score cache where one is kept, one linear scored and tailored at a
    time (its base and fine-tuned weights, its score entry, the temporaries), one batch
    through one layer, and the patch (with the base values it displaced while written in).
    An onloaded base (`Pair.loading`) holds none of its weights: a linear's base values are
    a fresh read, the largest tensor is read from disk, converted and compared with the
    fine-tuned one's, and nothing displaced is parked; where finished patches go to a file
    as they are made, only the largest layer's is held. A driven layer holds its untailored
    weights (norms, linears left out) for its runs."""
    s = run.settings
    shapes = {n: tuple(pair.base.get_parameter(f"{n}.weight").shape) for n in linears}
    size = pair.base.get_parameter(f"{linears[0]}.weight").element_size()
    sets = 2 if s.anchored else 1
    onloaded = pair.onloaded
    entry = {n: scored_bytes(*shapes[n], hessian=_holds_hessians(s), target=s.anchored) for n in linears}
    layerwise = run.report["pipeline"]["path"] == Pipeline.LAYER_WISE
    if layerwise or sequential:  # one block's fine-tuned values written in, its Hessians
        block = max(size * sum(shapes[n][0] * shapes[n][1] for n in g) + 4 * sets * sum(shapes[n][1] ** 2 for n in g)
                    for g in layer_groups(linears))
    else:  # the whole fine-tuned model's changed values written in, every Hessian alive
        changed = sum(pair.base.get_parameter(n).numel() for n in pair.changed())
        block = size * changed + 4 * sets * sum(shapes[n][1] ** 2 for n in linears)
    # the fine-tuned weights read; onloaded, the base's too, each through a half-precision buffer
    weights = 3 if onloaded else 1
    linear = max(linear_working_bytes(o, i) + weights * size * o * i + entry[n] for n, (o, i) in shapes.items())
    patches = [*out.values(), *before.values()]
    terms = {
        "layer inputs": run.report.pop("inputs_bytes", 0),
        "one block": block,
        "score cache": sum(entry.values()) if run.keep_scores or needs_every_score(s) else 0,
        "one linear": linear,
        "activations": _activations(pair, linears, calib),
        "patch": run.report.pop("patch_bytes_held", 0)
        + sum(tp.index.nbytes + tp.values.nbytes * (2 if sequential and not onloaded else 1) for tp in patches)}
    if onloaded:  # base and fine-tuned values of the largest tensor, and one half-precision read
        terms["one tensor read"] = 2.5 * max(p.element_size() * p.numel() for p in pair.base.parameters())
    if onloaded and layerwise and plan is not None:  # a driven layer's untailored weights, held while it runs
        tailored = {f"{n}.weight" for n in linears}
        layers = pair.base.get_submodule(plan.stack)
        terms["one layer's other weights"] = max(
            sum(p.element_size() * p.numel() for n, p in layers[i].named_parameters(prefix=f"{plan.stack}.{i}")
                if n not in tailored) for i in range(plan.first, plan.last + 1))
    run.report["memory_terms_mb"] = {name: value / 2**20 for name, value in terms.items()}


def _activations(pair: Pair, linears: Sequence[str], calib: Sequence[Batch]) -> int:
    """`memory.layer_activation_bytes` for the widest batch and the widest layer."""
    batch, seq = max((tuple(b["input_ids"].shape) for b in calib), key=lambda bs: bs[0] * bs[1])
    widths = [tuple(pair.base.get_parameter(f"{n}.weight").shape) for n in linears]
    config = getattr(pair.base.config, "text_config", pair.base.config)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    return layer_activation_bytes(batch, seq, max(i for _, i in widths), max(o for o, _ in widths), heads)


def _plan(pair: Pair, linears: Sequence[str], cache: dict, run: MethodRun, sequential: bool
          ) -> LayerPlan | None:
    """The layer-by-layer plan where it applies; the report's `pipeline` says what ran."""
    if all(n in cache for n in linears):
        reason = "every score was cached: no calibration ran"
    elif not run.layerwise:
        reason = "layer by layer was turned off"
    elif not sequential and needs_every_score(run.settings):
        reason = ("a model-wide ranking (global scope or per-layer budget) needs every score "
                  "before the first compensation: one-pass Hessians of the whole model")
    else:
        plan = plan_layers(pair.base, linears)
        if isinstance(plan, LayerPlan):
            run.report["pipeline"] = {"path": Pipeline.LAYER_WISE, "layers": f"{plan.stack}.{plan.first}-{plan.last}",
                                      "whole_model_linears": len(plan.prefix)}
            return plan
        reason = plan
    _fallback(run, reason)
    return None


def _fallback(run: MethodRun, reason: str) -> None:
    run.report["pipeline"] = {"path": Pipeline.WHOLE_MODEL, "reason": reason}


def _cache_key(s: Any, k: int, calib: Sequence[Batch], anchor: Sequence[Batch], sequential: bool) -> tuple:
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


def _holds_hessians(s: Any) -> bool:
    """Exact (and anchored) compensation solves with the Hessian itself, so its entries keep it
    (anchored: the combined one, and the weights it pulls towards)."""
    return s.compensate and s.compensation in ("exact", "anchored")


def needs_every_score(s: Any) -> bool:
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


def _whole_model_hessians(model: torch.nn.Module, calib: Sequence[Batch], run: MethodRun) -> HessiansOf:
    """Each named linear's Hessian on the target batches and, for anchored compensation, on
    the original-task ones (empty otherwise), from forwards of `model` up to those linears."""
    def of(names: list[str]) -> Hessians:
        target = collect_hessians(model, names, calib, should_stop=run.should_stop, clock=_sums_clock(run))
        if not run.settings.anchored:
            return target, {}
        return target, collect_hessians(model, names, run.anchor, should_stop=run.should_stop, clock=_sums_clock(run))
    return of


def _layer_hessians(model: torch.nn.Module, layer: torch.nn.Module, sets: Sequence[LayerInputs],
                    run: MethodRun, advance: bool) -> HessiansOf:
    """The same from one layer run on each set's cached inputs (target, then anchor)."""
    def of(names: list[str]) -> Hessians:
        found = [run_layer(model, layer, inputs, advance=advance, watch=names, should_stop=run.should_stop,
                           clock=_sums_clock(run)) for inputs in sets]
        return found[0], found[1] if len(found) > 1 else {}
    return of


def _sums_clock(run: MethodRun) -> SumsClock:
    """The XᵀX sums' share of calibration, a stage of its own: the rest is forwards."""
    return lambda: run.timed("calibration: XᵀX sums")


def _capture(pair: Pair, plan: LayerPlan, calib: Sequence[Batch], run: MethodRun
             ) -> list[LayerInputs] | str:
    """The first driven layer's inputs for the target batches and, when anchored, the
    original-task ones (or why the model cannot be driven layer by layer)."""
    sets = []
    with run.timed("calibration"), run.timed("calibration: up to the first layer"):
        for batches in [calib, run.anchor] if run.settings.anchored else [calib]:
            found = capture_layer_inputs(pair.base, plan, batches, run.should_stop)
            if isinstance(found, str):
                return found
            sets.append(found)
    run.report["inputs_bytes"] = sum(inputs.nbytes() for inputs in sets)
    return_freed_heap()  # the front's activations, freed among the inputs kept
    return sets


def _sequential(pair: Pair, k: int, groups: Sequence[Sequence[str]], calib: Sequence[Batch], cache: dict,
                run: MethodRun, tailored: ExitStack) -> dict[str, TensorPatch]:
    """The authors' order on the whole model: each block's Hessians from a forward up to
    it, with the earlier blocks' patches written into the base (the working copy; all
    reverted when `tailored` closes) and the block itself holding its fine-tuned weights."""
    out: dict[str, TensorPatch] = {}
    hessians_of = _whole_model_hessians(pair.base, calib, run)
    for g, group in enumerate(groups):
        run.check()
        run.progress(f"tailoring block {g + 1}/{len(groups)}", g, len(groups))
        out.update(_tailor_block(pair, k, list(group), cache, run, hessians_of, tailored))
    return out


def _sequential_layerwise(pair: Pair, k: int, plan: LayerPlan, calib: Sequence[Batch],
                          before: dict[str, TensorPatch], cache: dict, run: MethodRun) -> dict[str, TensorPatch]:
    """The authors' order, one layer at a time: linears before the driven layers go block by
    block on the whole model; then each layer's Hessians come from a run of that layer on
    its cached inputs while it holds its fine-tuned weights, its patch is written in, and
    it runs once more to make the next layer's inputs. What is written in (`before`: the
    other tensors' patch) is written where it runs and taken out once it has run: the
    front's until the first layer's inputs are captured, a layer's until its outputs are
    made (an onloaded base holds no finished layer). An onloaded layer's other weights are
    read from the checkpoint once for both its runs (`weights.onloaded`)."""
    front = set(front_params(pair.base, plan))
    with ExitStack() as written:
        written.enter_context(applied(pair.base, _part(before, front.__contains__)))
        out = _sequential(pair, k, layer_groups(plan.prefix), calib, cache, run, written)
        sets = _capture(pair, plan, calib, run)
        if isinstance(sets, str):
            _fallback(run, sets)
            written.enter_context(applied(pair.base, _part(before, lambda n: n not in front)))
            rest = layer_groups([n for i in sorted(plan.layers) for n in plan.layers[i]])
            return {**out, **_sequential(pair, k, rest, calib, cache, run, written)}
    out = _hand_over(run, out)
    layers = pair.base.get_submodule(plan.stack)
    for i in range(plan.first, plan.last + 1):
        run.check()
        run.progress(f"tailoring layer {i}", i - plan.first, plan.last - plan.first + 1)
        done: dict[str, TensorPatch] = {}
        with ExitStack() as written:
            written.enter_context(applied(pair.base, _part(before, _in_layer(plan, i))))
            tailored = {f"{n}.weight" for n in plan.layers.get(i, [])}  # hold values of their own
            _read(written, run, onloaded(pair.base, _layer_params(plan, i, layers[i], tailored.__contains__)))
            if i in plan.layers:
                hessians_of = _layer_hessians(pair.base, layers[i], sets, run, advance=False)
                done = _tailor_block(pair, k, plan.layers[i], cache, run, hessians_of, written)
            if i < plan.last:
                with run.timed("calibration"), run.timed("calibration: next layer's inputs"):
                    for inputs in sets:
                        run_layer(pair.base, layers[i], inputs, advance=True, should_stop=run.should_stop)
        out.update(_hand_over(run, done))
        return_freed_heap()
    return out


def _read(stack: ExitStack, run: MethodRun, weights: AbstractContextManager) -> None:
    """Enter `weights` (it reads parameters from their files) on `stack`, timed as its own
    stage: reading is not calibration, which counts the forwards and the sums alone."""
    with run.timed("reading weights"):
        stack.enter_context(weights)


def _hand_over(run: MethodRun, done: dict[str, TensorPatch]) -> dict[str, TensorPatch]:
    """Finished patches that nothing reads any more go to `run.sink` where there is one
    (none is returned then); the most bytes of patch held at once is noted for the memory
    prediction (`patch_bytes_held`)."""
    if run.sink is None:
        return done
    held = sum(tp.index.nbytes + tp.values.nbytes for tp in done.values())
    run.report["patch_bytes_held"] = max(run.report.get("patch_bytes_held", 0), held)
    for name, tp in done.items():
        run.sink(name, tp)
    return {}


def _part(patch: dict[str, TensorPatch], keep: Callable[[str], bool]) -> Patch:
    return Patch(tensors={n: tp for n, tp in patch.items() if keep(n)})


def _in_layer(plan: LayerPlan, i: int) -> Callable[[str], bool]:
    return lambda name: name.startswith(f"{plan.stack}.{i}.")


def _layer_params(plan: LayerPlan, i: int, layer: torch.nn.Module, skip: Callable[[str], bool]) -> list[str]:
    """Driven layer i's parameters (full names), less those `skip` names."""
    names = (f"{plan.stack}.{i}.{n}" for n, _ in layer.named_parameters())
    return [n for n in names if not skip(n)]


def _tailor_block(pair: Pair, k: int, group: list[str], cache: dict, run: MethodRun, hessians_of: HessiansOf,
                  tailored: ExitStack) -> dict[str, TensorPatch]:
    """One block of the sequential order: its Hessians (unless cached) while it holds its
    fine-tuned weights, then each linear read, scored and patched in turn (one linear's
    weights and scores held at a time), the block's patch written into the base until
    `tailored` closes."""
    todo = [n for n in group if n not in cache]
    hessians: dict[str, torch.Tensor] = {}
    anchors: dict[str, torch.Tensor] = {}
    if todo:
        with ExitStack() as held:
            _read(held, run, holding(pair.base, [f"{n}.weight" for n in todo],
                                     lambda name: pair.finetuned_value(k, name)))
            with run.timed("calibration"):
                hessians, anchors = hessians_of(todo)
    done = _score_and_tailor(pair, k, group, hessians, anchors, cache, run)
    tailored.enter_context(applied(pair.base, Patch(tensors=done)))
    return done


def _forget(cache: dict, names: Sequence[str], run: MethodRun) -> None:
    """A one-shot run keeps no scores: a linear's entry goes once its patch is made."""
    if not run.keep_scores:
        for n in names:
            cache.pop(n, None)


def _one_pass(pair: Pair, k: int, linears: Sequence[str], calib: Sequence[Batch], cache: dict,
              run: MethodRun) -> dict[str, TensorPatch]:
    """Hessians from the fine-tuned model in one pass of the whole model over the
    calibration data; then each linear is read once, scored (unless cached) and, unless the
    threshold is model-wide (which needs every score first), tailored."""
    missing = [n for n in linears if n not in cache]
    hessians: dict[str, torch.Tensor] = {}
    anchors: dict[str, torch.Tensor] = {}
    if missing:
        run.progress("collecting Hessians (one pass)", 0, 1)
        with run.timed("calibration"), finetuned_model(pair, k) as model:
            hessians, anchors = _whole_model_hessians(model, calib, run)(missing)
    if needs_every_score(run.settings):
        shared = _SharedFactor()
        for name in linears:
            _score_read(pair, k, name, hessians, anchors, cache, run, shared)
        return _ranked(pair, k, linears, cache, run)
    return _score_and_tailor(pair, k, linears, hessians, anchors, cache, run)


def _score_and_tailor(pair: Pair, k: int, linears: Sequence[str], hessians: dict, anchors: dict, cache: dict,
                      run: MethodRun) -> dict[str, TensorPatch]:
    """Each linear read, scored where its Hessian is given (else cached) and tailored."""
    out = {}
    shared = _SharedFactor()
    for name in linears:
        run.check()
        w_pre, w_ft = _score_read(pair, k, name, hessians, anchors, cache, run, shared)
        out[f"{name}.weight"] = _tailor_tensor(w_pre, w_ft, cache[name], run)
        del w_pre, w_ft  # before the next linear's are read
        _forget(cache, [name], run)
    return out


def _score_read(pair: Pair, k: int, name: str, hessians: dict, anchors: dict, cache: dict,
                run: MethodRun, shared: "_SharedFactor") -> tuple[torch.Tensor, torch.Tensor]:
    w_pre, [w_ft] = pair_values(pair, f"{name}.weight", [k])
    if name in hessians:
        cache[name] = _score(w_pre, w_ft, hessians.pop(name), anchors.pop(name, None), run, shared)
    return w_pre, w_ft


class _SharedFactor:
    """The factor of the Hessian last scored. Linears that read the same input (q/k/v,
    gate/up) are given one Hessian tensor and come one after another, so they take one
    factor (the float64 inversions are most of the scoring time); only the last is held,
    and not its Hessian (weak references: a Hessian goes when its last linear is scored)."""

    def __init__(self) -> None:
        self._of: tuple[weakref.ref, weakref.ref | None] | None = None
        self._factor: torch.Tensor | None = None

    def get(self, hessian: torch.Tensor, anchor: torch.Tensor | None,
            make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._holds(hessian, anchor):
            self._of = self._factor = None  # let the last go before the next is made
            self._factor = make()
            self._of = (weakref.ref(hessian), None if anchor is None else weakref.ref(anchor))
        return self._factor

    def _holds(self, hessian: torch.Tensor, anchor: torch.Tensor | None) -> bool:
        if self._of is None:
            return False
        of_hessian, of_anchor = self._of
        return of_hessian() is hessian and (None if of_anchor is None else of_anchor()) is anchor


def _one_pass_layerwise(pair: Pair, k: int, plan: LayerPlan, calib: Sequence[Batch], cache: dict,
                        run: MethodRun) -> dict[str, TensorPatch]:
    """One-pass Hessians one layer at a time: the base holds the fine-tuned values of the
    changed tensors of its front (`front_params`) while the first layer's inputs are
    captured, then of each layer's while it runs (Hessians and its outputs, the next
    layer's inputs, in one run)."""
    value = lambda name: pair.finetuned_value(k, name)  # noqa: E731
    driven = {i: [n for n in pair.changed() if block_name(n) == f"{plan.stack}.{i}"]
              for i in range(plan.first, plan.last + 1)}
    front = set(front_params(pair.base, plan))
    out: dict[str, TensorPatch] = {}
    with holding(pair.base, [n for n in pair.changed() if n in front], value):
        missing = [n for n in plan.prefix if n not in cache]
        with run.timed("calibration"):
            found = _whole_model_hessians(pair.base, calib, run)(missing) if missing else ({}, {})
        sets = _capture(pair, plan, calib, run)
    out.update(_score_and_tailor(pair, k, plan.prefix, *found, cache, run))
    if isinstance(sets, str):
        _fallback(run, sets)
        rest = [n for i in sorted(plan.layers) for n in plan.layers[i]]
        return {**out, **_one_pass(pair, k, rest, calib, cache, run)}
    out = _hand_over(run, out)
    layers = pair.base.get_submodule(plan.stack)
    for i in range(plan.first, plan.last + 1):
        run.check()
        run.progress(f"tailoring layer {i}", i - plan.first, plan.last - plan.first + 1)
        names = plan.layers.get(i, [])
        with ExitStack() as held:
            _read(held, run, holding(pair.base, driven[i], value))
            _read(held, run, onloaded(pair.base, _layer_params(plan, i, layers[i], set(driven[i]).__contains__)))
            with run.timed("calibration"):
                hessians, anchors = _layer_hessians(pair.base, layers[i], sets, run, advance=i < plan.last)(
                    [n for n in names if n not in cache])
        out.update(_hand_over(run, _score_and_tailor(pair, k, names, hessians, anchors, cache, run)))
        return_freed_heap()
    return out


def _ranked(pair: Pair, k: int, linears: Sequence[str], cache: dict, run: MethodRun) -> dict[str, TensorPatch]:
    """Every linear tailored by what a model-wide ranking decided (`_ranked_choices`)."""
    choices = _ranked_choices(pair, linears, cache, run.settings)
    out = {}
    for i, name in enumerate(linears):
        run.check()
        run.progress(f"tailoring {name}", i, len(linears))
        w_pre, [w_ft] = pair_values(pair, f"{name}.weight", [k])
        out[f"{name}.weight"] = _tailor_tensor(w_pre, w_ft, cache[name], run, **choices[name])
        _forget(cache, [name], run)
    return out


def _ranked_choices(pair: Pair, linears: Sequence[str], cache: dict, s: Any) -> dict[str, dict]:
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

    def on_disk(self) -> "_Scored":
        """The same entry, every tensor memory-mapped from an unlinked temporary file (in
        TMPDIR): a kept cache (the dashboard's) is backed by disk, so the kernel pages it
        out when memory runs short instead of it crowding the models; values unchanged."""
        scores = replace(self.scores, salience_z=_mapped(self.scores.salience_z),
                         sensitivity_z=_mapped(self.scores.sensitivity_z))
        return _Scored(_mapped(self.factor), scores, _mapped(self.hessian), _mapped(self.target))


def _mapped(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    handle, path = tempfile.mkstemp(prefix="tailor-scores-")
    os.close(handle)
    try:
        mapped = torch.from_file(path, shared=True, size=tensor.numel(), dtype=tensor.dtype)
    finally:
        os.unlink(path)  # the mapping keeps the data; the file goes with the last reference
    return mapped.copy_(tensor.reshape(-1)).view(tensor.shape)


def _score(w_pre: torch.Tensor, w_ft: torch.Tensor, hessian: torch.Tensor,
           anchor_hessian: torch.Tensor | None, run: MethodRun, shared: _SharedFactor) -> _Scored:
    s = run.settings
    with run.timed("scores"):
        given, hessian, damp = hessian, hessian.to(w_pre.device), s.damp
        if anchor_hessian is not None:
            w_ft, hessian = anchored_problem(w_pre, w_ft.float(), hessian, anchor_hessian,
                                             s.anchor_weight, s.damp)
            damp = 0.0  # A holds the target Hessian's damping already
        factor = shared.get(given, anchor_hessian, lambda: inverse_hessian_factor(hessian, damp))
        scores = tensor_scores(w_pre, w_ft, factor, s.sensitivity, s.block_size)
        entry = _Scored(factor.cpu(), scores.to("cpu"), hessian.cpu() if _holds_hessians(s) else None,
                        w_ft.cpu() if anchor_hessian is not None else None)
    return entry.on_disk() if run.keep_scores else entry


def _tailor_tensor(w_pre: torch.Tensor, w_ft: torch.Tensor, cached: _Scored, run: MethodRun, *,
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
            run.report["exact_fallbacks"] += info.method != "exact"
        else:
            new = compensate(w_pre, w_ft, mask, factor, s.sign, s.block_size)
    return tensor_patch(w_pre, new)
