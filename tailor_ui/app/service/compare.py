"""Every model of a session answering one question about one image: the pre-trained and
fine-tuned models, the session's merges and the models fine-tuned in it. The CLI's
`compare` asks the same models the same way, for one prompt or a data set's."""

from __future__ import annotations

from dataclasses import replace

from tailor_ui.methods import REGISTRY
from tailor_ui.control import Progress
from tailor_ui.evaluation.answers import model_answers
from tailor_ui.app.session import PairHandle, Session, TailorRun
from tailor_ui.patch import PatchFile


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
        runs.append(startup_run(handle))
    # a calibrated method (Model Tailor) first: it is the "tailored" column
    runs.sort(key=lambda r: not REGISTRY[r.settings.get("method", "tailor")].needs_calibration)
    return runs[:limit]


def startup_run(handle: PairHandle) -> TailorRun:
    """The pair's start-up merge, labelled as such."""
    return replace(handle.default_run, label=f"{handle.default_run.label} (default)")


def first_example(handle: PairHandle) -> tuple[str, str, list[str]] | None:
    """What Compare opens with: the first example of the pair's first built-in target set
    (image path, question, reference answers); None when it has none."""
    spec = next((s for s in handle.eval_sets if s.role == "target" and s.examples), None)
    if spec is None:
        return None
    chosen = spec.examples[0]
    return str(chosen.image), chosen.question, list(chosen.answers)


def first_answers(handle: PairHandle, max_new_tokens: int, progress: Progress) -> list[tuple[str, str]]:
    """Every model's answer to `first_example`, the start-up merge's included."""
    from tailor_ui.data import load_image

    image, question, _ = first_example(handle)
    return answers(handle, [startup_run(handle)], [], load_image(image), question, max_new_tokens,
                   progress)


def answers(handle: PairHandle, runs: list[TailorRun], trained: list[tuple[str, PatchFile]], image,
            question: str, max_new_tokens: int, progress: Progress) -> list[tuple[str, str]]:
    """(model label, answer) for the base, each fine-tuned model, each merge and each model
    trained in the session (each written into the shared base under its lock in turn)."""
    merges = [(run.label, run.get_patch()) for run in runs] + list(trained)
    return model_answers(handle.pair, merges, [(image, question)], max_new_tokens, progress,
                         lock=handle.lock)[0]


