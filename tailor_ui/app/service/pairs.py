"""The pairs a session works on: a visitor's own (loaded with progress) or the built-in
demo pair (loaded once at start, shared read-only)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tailor_ui.control import Progress
from tailor_ui.errors import UserError
from tailor_ui.app.session import EvalSpec, PairHandle


def split_models(text: str) -> list[str]:
    """The fine-tuned models of a text field: comma- or line-separated."""
    return [s.strip() for s in (text or "").replace("\n", ",").split(",") if s.strip()]


def check_load_request(base: str, finetuned: str, dtype: str, device: str, *,
                       roots: list[Path], has_gpu: bool) -> None:
    """What can be refused before a job is queued, while the session keeps its pair."""
    from tailor_ui.pair import DTYPES, check_local_pair, resolve_source

    resolve_source(base, allowed_roots=roots)
    specs = split_models(finetuned)
    for spec in specs:
        resolve_source(spec, allowed_roots=roots)
    if not specs:
        raise UserError("no fine-tuned model given: enter a hub id (owner/name) or a local folder")
    check_local_pair(base, specs, allowed_roots=roots)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}")
    if device == "cuda" and not has_gpu:
        raise UserError("there is no GPU on this server: choose cpu")


def load_handle(base: str, finetuned: str, lane: str, progress: Progress,
                before_loading: Callable[[], None], **options: Any) -> PairHandle:
    """A visitor's pair, ready to use: `pair.load_pair` (which runs `before_loading` once
    the configs are read) and the summary of what fine-tuning changed. The base is loaded
    once; a fine-tuned model with safetensors (a local folder or a hub repository's, an
    adapter over the base's) stays on disk and is read tensor by tensor where it is used,
    as the command line reads it."""
    from tailor_ui.pair import load_pair

    specs = split_models(finetuned)
    steps = 3 + len(specs)  # load_pair's steps, then the summary

    def loading(stage: str, done: int, _total: int) -> None:
        progress(stage, done, steps)

    pair = load_pair(base.strip(), specs, lazy=True, progress=loading, before_loading=before_loading,
                     **options)
    progress("summarising what fine-tuning changed", steps - 1, steps)
    return PairHandle(pair=pair, label=f"{base.strip()} + {finetuned.strip()}", shared=False,
                      lane=lane, summary=pair.summary())


def load_demo_handle(demo_dir: Path | None, device: str, lane: str, story: str = "spatial") -> PairHandle:
    """A demo story's pair with its calibration and evaluation sets, ready to share."""
    from tailor_ui.demo.sets import (DEMO_SETS, STORIES, demo_anchor, demo_calibration, demo_sets,
                                     example_rows, story_pair)
    pair = story_pair(demo_dir, story, device)
    sets = demo_sets(demo_dir, story)
    return PairHandle(pair=pair, label=f"built-in demo pair: {STORIES[story].title} (shapes world, "
                                       "mini-LLaVA)", shared=True,
                      lane=lane, summary=pair.summary(),
                      calibration=demo_calibration(demo_dir, story), anchor=demo_anchor(demo_dir),
                      eval_sets=tuple(EvalSpec(name=s.name, task=s.task, examples=tuple(s.examples),
                                               role=DEMO_SETS[s.name][1]) for s in sets),
                      examples=tuple(example_rows(sets)))
