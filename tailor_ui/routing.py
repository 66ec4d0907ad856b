"""Which way each changed tensor goes in a data-free merge, written once for the in-memory
engine and the streaming merge (so the two agree bit for bit).

Selected linears (and, with others="linear", every other changed tensor) go through the
method's per-tensor merge; other changed tensors follow the `others` policy; methods that
are not multi-task native run once per fine-tuned model and their patches are combined by
`patch.union`. Everything a method contributes comes from its `Method` in the registry.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tailor_ui.methods import REGISTRY
from tailor_ui.patch import Patch, TensorPatch, tensor_patch, union
from tailor_ui.settings import Settings


def route_tensor(name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor], s: Settings,
                 selected: bool, chunk_elems: int | None = None) -> torch.Tensor | None:
    """One tensor's merged value in the base dtype, or None where it stays the base.

    With `chunk_elems`, where the value of each entry depends on that entry alone, the
    merge runs on flat chunks (`merged_chunks`): bit for bit the same result and a working
    set bounded by the chunk.
    """
    chunks = merged_chunks(name, base, tuned, s, selected, chunk_elems)
    if chunks is None:
        return None
    out = None
    for start, values in chunks:
        if start == 0 and values.numel() == base.numel():
            return values.reshape(base.shape)
        out = torch.empty_like(base) if out is None else out
        out.view(-1)[start:start + values.numel()] = values
    return out


def runs_elementwise(s: Settings, selected: bool) -> bool:
    """Whether each merged entry of a tensor depends on that entry alone: an element-wise
    method, or a tensor the method leaves to the `others` policy."""
    return REGISTRY[s.method].elementwise or not (selected or s.others == "linear")


def merged_chunks(name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor], s: Settings,
                  selected: bool, chunk_elems: int | None = None, changed: bool | None = None
                  ) -> Iterator[tuple[int, torch.Tensor]] | None:
    """None where the tensor stays the base; else its merged values in the base dtype as
    (flat start, flat values) pieces, lazily: chunks of `chunk_elems` entries where each
    entry depends on that entry alone (an element-wise method, the fine-tuned values, and
    the union of such patches) or the method runs by chunks itself (`Method.chunks`: TIES's
    cut, DARE's draws), one piece for the whole tensor otherwise. A chunk is computed only
    when asked for (what a method reads of the whole tensor, before the first), so a caller
    may overwrite the base's entries of a chunk it has taken. (Chunks are large on purpose:
    on a busy CPU every parallel torch op pays for waking its threads, so a million small
    ops cost more than the arithmetic.)

    `changed`: where `base` and `tuned` are flat parts of their tensors (an element-wise
    merge, `runs_elementwise`), whether the whole tensors differ (torch.equal), which
    decides as it does for a whole tensor; None: they are whole, and this is found here.
    """
    if not (changed if changed is not None else any(not torch.equal(base, t) for t in tuned)):
        return None
    if not selected and s.others == "base":
        return None
    method = REGISTRY[s.method]
    by_method = selected or s.others == "linear"
    own_chunks = by_method and method.chunks is not None  # walks the tensor itself first
    elementwise = runs_elementwise(s, selected)
    step = chunk_elems if chunk_elems is not None and (elementwise or own_chunks) else base.numel()
    flat_base, flat_tuned = base.reshape(-1), [t.reshape(-1) for t in tuned]

    def pieces() -> Iterator[tuple[int, torch.Tensor]]:
        if step >= base.numel():
            yield 0, _merge_values(name, base, tuned, s, by_method).reshape(-1)
        elif own_chunks:
            streams = [method.chunks(flat_base, [flat_tuned[k] for k in group], name, s, step)
                       for group in _groups(s, len(tuned))]
            for i, parts in zip(range(0, base.numel(), step), zip(*streams)):
                yield i, _combine(name, flat_base[i:i + step], list(parts), s)
        else:
            for i in range(0, base.numel(), step):
                j = i + step
                yield i, _merge_values(name, flat_base[i:j], [t[i:j] for t in flat_tuned], s, by_method)

    return pieces()


def _groups(s: Settings, models: int) -> list[list[int]]:
    """The fine-tuned models merged together: all at once, or one by one (then united)."""
    return [list(range(models))] if REGISTRY[s.method].multi_task_native else [[k] for k in range(models)]


def _merge_values(name: str, base: torch.Tensor, tuned: Sequence[torch.Tensor], s: Settings,
                  by_method: bool) -> torch.Tensor:
    method = REGISTRY[s.method]
    # Every method starts from the float32 values, so converting once up front changes no
    # bit; it saves repeated conversions where the working set is a bounded chunk, while
    # whole-tensor methods (TIES, magnitude, DARE) convert inside, one temporary at a time.
    upcast = method.elementwise or not by_method
    base_in = base.float() if upcast else base
    tuned_in = [t.float() for t in tuned] if upcast else list(tuned)
    parts = []
    for group in _groups(s, len(tuned)):
        models = [tuned_in[k] for k in group]
        if by_method:
            parts.append(method.merge(base_in, models, name, s))
        else:  # others == "finetuned": the fine-tuned values (several models: their mean)
            parts.append(torch.stack([t.float() for t in models]).mean(dim=0))
    del base_in, tuned_in
    return _combine(name, base, parts, s)


def _combine(name: str, base: torch.Tensor, parts: list[torch.Tensor], s: Settings) -> torch.Tensor:
    """The merged values in the base dtype from each group's float32 result (several:
    their patches united by the overlap policy)."""
    if len(parts) == 1:
        # base with tensor_patch(base, new) applied is new cast to the base dtype, bit for bit
        return parts[0].to(base.dtype)
    patches = [Patch(tensors={name: tp}) for tp in (tensor_patch(base, p) for p in parts)
               if tp.index.numel()]
    if not patches:
        return base.clone()
    tp = patches[0].tensors[name] if len(patches) == 1 else \
        union(patches, {name: base}, s.overlap).tensors[name]
    return with_patch(base, tp)


def with_patch(tensor: torch.Tensor, tp: TensorPatch, *, inplace: bool = False) -> torch.Tensor:
    """`tensor` with the patch written in (as `patch.apply_patch` writes it)."""
    out = tensor if inplace else tensor.clone()
    flat = out.view(-1)
    flat[tp.index.to(flat.device)] = tp.values.to(device=flat.device, dtype=flat.dtype)
    return out
