"""Every model of a session answering one question about one image: the pre-trained and
fine-tuned models, the session's merges and the models fine-tuned in it."""

from __future__ import annotations

from dataclasses import replace

from tailor_ui.methods import REGISTRY
from tailor_ui.control import Progress
from tailor_ui.session import PairHandle, Session, TailorRun


def compare_runs(session: Session, handle: PairHandle, limit: int = 4) -> list[TailorRun]:
    """The latest merge of each method (newest first), or the start-up merge."""
    seen, runs = set(), []
    for run in reversed(list(session.runs.values())):
        if run.handle is not handle:
            continue
        method = run.settings.get("method")
        if method not in seen:
            seen.add(method)
            runs.append(run)
    if not runs and handle.default_run is not None:
        runs.append(replace(handle.default_run, label=f"{handle.default_run.label} (default)"))
    # a calibrated method (Model Tailor) first: it is the "tailored" column
    runs.sort(key=lambda r: not REGISTRY[r.settings.get("method", "tailor")].needs_calibration)
    return runs[:limit]


def answers(handle: PairHandle, runs: list[TailorRun], trained: list[tuple[str, object]], image,
            question: str, max_new_tokens: int, progress: Progress) -> list[tuple[str, str]]:
    """(model label, answer) for the base, each fine-tuned model, each merge (written into
    the shared base under its lock) and each model trained in the session."""
    from tailor_ui.evaluation.generate import answer_one
    from tailor_ui.patch import applied

    pair = handle.pair
    models = [("Pre-trained", pair.base, None)]
    models += [("Fine-tuned" if len(pair.finetuned) == 1 else f"Fine-tuned {pair.finetuned_ids[k]}",
                model, None) for k, model in enumerate(pair.finetuned)]
    models += [(run.label, pair.base, run.get_patch()) for run in runs]
    total = len(models) + len(trained)
    out = []
    with handle.lock:  # the merges are written into the shared base, one at a time
        for i, (name, model, patch) in enumerate(models):
            progress(f"answering with {'the pre-trained model' if i == 0 else name}", i, total)
            with applied(model, patch) as answering:
                out.append((name, answer_one(answering, pair.processor, image, question,
                                             max_new_tokens)))
    for j, (name, model) in enumerate(trained):  # private copies: no lock needed
        progress(f"answering with {name}", len(models) + j, total)
        out.append((name, answer_one(model, pair.processor, image, question, max_new_tokens)))
    return out
