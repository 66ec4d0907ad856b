"""Run calibration data through a model and collect each linear layer's Hessian.

For a linear layer with inputs X (rows = tokens, padding excluded) the Hessian of its
squared output error is H = 2·XᵀX / n. Layers that read the same input tensor (q/k/v,
gate/up) share one accumulator. A forward pass stops as soon as every watched layer has
seen its input, so collecting the early layers of a deep model costs only those layers.

Layer by layer (as SparseGPT, GPTQ and llm-compressor run): `capture_layer_inputs` runs
the model once per batch up to the first layer of a list of layers and keeps what that
layer is called with; `run_layer` then runs one layer on those inputs, collecting its
linears' Hessians and, when asked, replacing the inputs by its outputs for the next layer.
`holding` and `finetuned_model` make the base compute with other values meanwhile.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from tailor_ui.control import Cancelled, StopCheck
from tailor_ui.data import Example, load_image
from tailor_ui.gram import add_gram_upper, mirror_upper
from tailor_ui.memory import return_freed_heap
from tailor_ui.names import block_name, component
from tailor_ui.pair import Pair
from tailor_ui.prompts import Batch, encode_with_answers
from tailor_ui.weights import to_model

# examples a command-line merge, sweep or search reads from each calibration file at most
CALIBRATION_LIMIT = 128

# the clock the XᵀX sums are timed on (a run's stage), so a report can tell them from the forwards
SumsClock = Callable[[], AbstractContextManager[None]]


class _ForwardDone(Exception):
    """Raised inside a hook to end a forward pass whose remaining layers are not needed."""


def calibration_batches(processor: Any, examples: Sequence[Example], batch_size: int = 8) -> list[Batch]:
    """Prompt + answer inputs of the target task, as the layers saw them during fine-tuning."""
    batches = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        answers = [ex.answers[0] if ex.answers else "" for ex in chunk]
        batch = encode_with_answers(processor, [load_image(ex.image) for ex in chunk],
                                    [ex.question for ex in chunk], answers)
        batch.pop("labels")
        batches.append(batch)
    return batches


def collect_hessians(model: torch.nn.Module, module_names: Sequence[str], batches: Sequence[Batch],
                     *, stop_early: bool = True, should_stop: StopCheck | None = None,
                     clock: SumsClock | None = None) -> dict[str, torch.Tensor]:
    """Hessians (float32, on each layer's device) of the named nn.Linear modules."""
    with torch.inference_mode(), watching(model, module_names, stop_early, clock) as sums:
        for batch in batches:
            if should_stop is not None and should_stop():
                raise Cancelled
            inputs = to_model(batch, model)
            sums.new_pass(inputs.get("attention_mask"))
            try:
                model(**inputs)
            except _ForwardDone:
                pass
    return sums.hessians()


@contextmanager
def watching(model: torch.nn.Module, module_names: Sequence[str], stop_early: bool,
             clock: SumsClock | None = None) -> Iterator[_InputSums]:
    """Input sums of the named nn.Linear modules of `model` over the forwards run inside
    (start each with `new_pass`); with `stop_early` a forward ends once all have fired.
    The sums' own work is timed on `clock`."""
    modules = dict(model.named_modules())
    watched = {name: modules[name] for name in module_names}
    for name, module in watched.items():
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"{name} is not a linear layer")
    sums = _InputSums(list(watched), stop_early, clock)
    handles = [m.register_forward_pre_hook(sums.hook(n)) for n, m in watched.items()]
    try:
        yield sums
    finally:
        for h in handles:
            h.remove()
        sums.new_pass(None)  # drop the last pass's inputs, also when a pass failed


class _InputSums:
    """XᵀX and row counts per accumulator while batches pass; one accumulator per input."""

    def __init__(self, watched: list[str], stop_early: bool, clock: SumsClock | None) -> None:
        self.watched = watched
        self.stop_early = stop_early
        self.clock = clock
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.owner: dict[str, str] = {}  # layer → the layer whose accumulator it shares
        self.new_pass(None)

    def new_pass(self, mask: torch.Tensor | None) -> None:
        self.mask = mask
        self.seen: dict[int, tuple[torch.Tensor, str]] = {}  # id(input) → (input, first reader)
        self.fired: set[str] = set()

    def hook(self, name: str) -> Callable:
        def pre_hook(_module: torch.nn.Module, args: tuple) -> None:
            self.add(name, args[0])
            if self.stop_early and len(self.fired) == len(self.watched):
                raise _ForwardDone
        return pre_hook

    def add(self, name: str, x: torch.Tensor) -> None:
        if name not in self.owner:
            # the tensor stays referenced in `seen` so its id cannot be reused within this pass
            twin = self.seen.get(id(x))
            self.owner[name] = twin[1] if twin is not None and twin[0] is x else name
        self.seen.setdefault(id(x), (x, name))
        self.fired.add(name)
        if self.owner[name] != name:
            return
        with _timed_on(self.clock, x.device):
            # the attention mask describes the text sequence only: a vision or bridge layer
            # whose input happens to have the same shape must not be masked by it
            rows = _token_rows(x, self.mask if component(name) == "language" else None)
            if name not in self.sums:
                self.sums[name] = rows.new_zeros(rows.shape[1], rows.shape[1])
            add_gram_upper(self.sums[name], rows)  # in place, the upper triangle: half the work
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def hessians(self) -> dict[str, torch.Tensor]:
        """2·XᵀX/n per watched layer; layers sharing an input share one tensor."""
        missing = [n for n in self.watched if self.owner.get(n) not in self.sums]
        if missing:
            raise ValueError(f"calibration never reached: {', '.join(missing[:3])}")
        # in place: the sums are the only copy
        with torch.inference_mode():  # they were made in it
            for name, total in self.sums.items():
                with _timed_on(self.clock, total.device):
                    mirror_upper(total).mul_(2.0).div_(self.counts[name])
        return {n: self.sums[self.owner[n]] for n in self.watched}


@contextmanager
def _timed_on(clock: SumsClock | None, device: torch.device) -> Iterator[None]:
    """`clock` around work on `device`; a GPU's queue is drained on entry and exit, or its
    time would land in whichever stage next waits for it (without a clock, nothing waits)."""
    drain = clock is not None and device.type == "cuda"
    if drain:
        torch.cuda.synchronize(device)
    with (clock or nullcontext)():
        yield
        if drain:
            torch.cuda.synchronize(device)


def _token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Input rows as float32, without the padding positions when the layer sees the text."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1]).float()


# ------------------------------------------------------------------ layer by layer

@dataclass(frozen=True)
class LayerPlan:
    """Where a layer-by-layer run drives the model: the list of layers (`stack`) holding
    the last tailored linears, the tailored linears before it (`prefix`, done on the whole
    model), and each driven layer's linears by index."""

    stack: str
    prefix: tuple[str, ...]
    layers: dict[int, list[str]]

    @property
    def first(self) -> int:
        return min(self.layers)

    @property
    def last(self) -> int:
        return max(self.layers)


def plan_layers(model: torch.nn.Module, linears: Sequence[str]) -> LayerPlan | str:
    """The plan for driving `linears` (in model order) layer by layer, or why it cannot be."""
    block = block_name(linears[-1]) if linears else None
    if block is None:
        return "the last tailored linear is in no numbered layer"
    stack = block.rpartition(".")[0]
    layers = model.get_submodule(stack)
    if not isinstance(layers, torch.nn.ModuleList):
        return f"{stack} is not a list of layers"
    prefix: list[str] = []
    by_layer: dict[int, list[str]] = {}
    for name in linears:
        block = block_name(name)
        if block is not None and block.rpartition(".")[0] == stack:
            by_layer.setdefault(int(block.rpartition(".")[2]), []).append(name)
        elif by_layer:
            return f"{name} comes after the layers of {stack} in the model's order"
        else:
            prefix.append(name)
    order = list(by_layer)
    kinds = {str(getattr(layers[i], "attention_type", "")) for i in range(min(order), max(order) + 1)}
    if order != sorted(order):
        return f"the layers of {stack} are not named in their order"
    if len(kinds) > 1:
        return f"the layers of {stack} differ in attention type ({', '.join(sorted(kinds))})"
    return LayerPlan(stack, tuple(prefix), by_layer)


def front_params(model: torch.nn.Module, plan: LayerPlan) -> list[str]:
    """The parameters registered before the plan's first driven layer: what runs before it
    (vision tower, projector, embeddings, earlier layers). What comes after its last layer
    (final norm, output head) never runs in a layer-by-layer run."""
    first = f"{plan.stack}.{plan.first}."
    out = []
    for name, _ in model.named_parameters():
        if name.startswith(first):
            break
        out.append(name)
    return out


@dataclass
class LayerInputs:
    """One calibration set's inputs to the current layer, batch by batch: the hidden
    states, the other arguments the model calls its layers with (attention mask, position
    ids or embeddings, M-RoPE's included; no cache), and the text's attention mask (which
    token rows count in a Hessian)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    masks: list[torch.Tensor | None] = field(default_factory=list)

    def nbytes(self) -> int:
        """What the cache holds (tensors shared between batches or arguments counted once)."""
        seen: dict[int, int] = {}
        for value in (self.hidden, self.args, self.kwargs, self.masks):
            _tensor_bytes(value, seen)
        return sum(seen.values())


def _tensor_bytes(value: Any, seen: dict[int, int]) -> None:
    if isinstance(value, torch.Tensor):
        seen[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    elif isinstance(value, (tuple, list)):
        for item in value:
            _tensor_bytes(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            _tensor_bytes(item, seen)


def capture_layer_inputs(model: torch.nn.Module, plan: LayerPlan, batches: Sequence[Batch],
                         should_stop: StopCheck | None = None) -> LayerInputs | str:
    """Run `model` on each batch up to the plan's first layer and keep what that layer is
    called with. The first batch runs on to the plan's last layer, checking that every
    layer's input is the previous layer's output and its other arguments the first's: a
    model that does more between its layers (or calls them differently) is refused (the
    reason is returned). Only the first layer computes in that check: the layers after it
    stand in with their input as their output (`_standing_in`), since what is checked
    is what the model does between its layers, and a layer's own work is redone anyway."""
    layers = model.get_submodule(plan.stack)
    found = LayerInputs()
    check: dict[str, Any] = {"on": plan.last > plan.first}

    def keep(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden, rest, options = _layer_call(args, kwargs)
        found.hidden.append(hidden)
        found.args.append(rest)
        found.kwargs.append(options)
        if not check["on"]:
            raise _ForwardDone

    handles = [layers[plan.first].register_forward_pre_hook(keep, with_kwargs=True)]
    if check["on"]:
        handles += _checking_hooks(layers, plan, found, check)
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    try:
        with torch.inference_mode(), _standing_in(layers, range(plan.first + 1, plan.last), check):
            for batch in batches:
                if should_stop is not None and should_stop():
                    raise Cancelled
                inputs = to_model(batch, model)
                found.masks.append(inputs.get("attention_mask"))
                try:
                    model(**inputs, **no_cache)
                except _ForwardDone:
                    pass
                if check["on"]:  # the check's forward went further: its freed activations go back
                    return_freed_heap()
                check["on"] = False
                if "reason" in check:
                    return str(check["reason"])
    finally:
        for h in handles:
            h.remove()
    if len(found.hidden) != len(batches):
        return f"layer {plan.first} of {plan.stack} ran {len(found.hidden)} times for {len(batches)} batches"
    return found


def _checking_hooks(layers: torch.nn.ModuleList, plan: LayerPlan, found: LayerInputs,
                    check: dict[str, Any]) -> list:
    """Hooks that, while `check["on"]`, compare each layer's input with the previous
    layer's output (and its other arguments with the first layer's), stopping the
    forward at the plan's last layer or at the first difference (`check["reason"]`)."""
    def output(_module: torch.nn.Module, _args: tuple, out: Any) -> None:
        check.setdefault("first output", out)
        check["out"] = layer_output(out)

    def compare(index: int) -> Callable:
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not check["on"]:
                return
            hidden, rest, options = _layer_call(args, kwargs)
            before = check.pop("out", None)
            if before is None or before.shape != hidden.shape or not torch.allclose(
                    before.float(), hidden.float(), rtol=1e-3, atol=1e-3 * float(hidden.float().abs().max())):
                check["reason"] = f"the model changes the hidden states between layers {index - 1} and {index}"
            elif not _same((rest, options), (found.args[0], found.kwargs[0])):
                check["reason"] = f"layer {index} is called with other arguments than layer {plan.first}"
            if "reason" in check or index == plan.last:
                raise _ForwardDone
        return hook

    return [h for i in range(plan.first, plan.last) for h in (
        layers[i].register_forward_hook(output),
        layers[i + 1].register_forward_pre_hook(compare(i + 1), with_kwargs=True))]


@contextmanager
def _standing_in(layers: torch.nn.ModuleList, indices: range, check: dict[str, Any]) -> Iterator[None]:
    """The layers at `indices` return their hidden-state input instead of computing, in the
    first checked layer's output's structure (`check["first output"]`: a tensor, or a
    tuple whose other items are kept); their hooks still run."""
    def stand_in(*args: Any, **kwargs: Any) -> Any:
        hidden = _layer_call(args, kwargs)[0]
        out = check["first output"]
        return (hidden, *out[1:]) if isinstance(out, (tuple, list)) else hidden

    # accelerate may have set the layer's own `forward` (its hook's): that is put back
    saved = {i: layers[i].__dict__.get("forward") for i in indices}
    for i in indices:
        layers[i].forward = stand_in
    try:
        yield
    finally:
        for i, forward in saved.items():
            if forward is None:
                del layers[i].forward
            else:
                layers[i].forward = forward


def _layer_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict[str, Any]]:
    """A layer call's hidden states, its other positional arguments and its keyword ones
    (any cache left out: each layer runs once per batch and position)."""
    options = dict(kwargs)
    hidden = args[0] if args else options.pop("hidden_states")
    for key in ("past_key_values", "past_key_value"):
        if key in options:
            options[key] = None
    if "use_cache" in options:
        options["use_cache"] = False
    return hidden, tuple(args[1:]), options


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and (
            a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b


def layer_output(out: Any) -> torch.Tensor:
    """A layer's hidden-state output (layers return it alone or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_layer(model: torch.nn.Module, layer: torch.nn.Module, inputs: LayerInputs, *, advance: bool,
              watch: Sequence[str] = (), should_stop: StopCheck | None = None,
              clock: SumsClock | None = None) -> dict[str, torch.Tensor]:
    """Run one layer on every cached batch: the Hessians of the watched linears (the
    layer's own) and, with `advance`, its outputs become the inputs held for the next
    layer. Without `advance` a batch stops as soon as every watched linear fired."""
    with torch.inference_mode(), watching(model, watch, not advance, clock) as sums:
        for b, hidden in enumerate(inputs.hidden):
            if should_stop is not None and should_stop():
                raise Cancelled
            sums.new_pass(inputs.masks[b])
            try:
                out = layer(hidden, *inputs.args[b], **inputs.kwargs[b])
            except _ForwardDone:
                continue
            if advance:
                inputs.hidden[b] = layer_output(out)
    return sums.hessians()


def finetuned_model(pair: Pair, k: int) -> AbstractContextManager[torch.nn.Module]:
    """A model that computes as fine-tuned model k does (`Pair.finetuned_model`)."""
    return pair.finetuned_model(k)
