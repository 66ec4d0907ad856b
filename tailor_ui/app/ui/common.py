"""Small pieces every tab uses: sessions from requests, errors, progress bars, tables."""

from __future__ import annotations

import functools
import html
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr
import pandas as pd

from tailor_ui.errors import UserError
from tailor_ui.app.jobs import CANCELLED, DONE, FAILED, RUNNING, Job

_BAR_COLOURS = {RUNNING: "#f97316", DONE: "#16a34a", FAILED: "#dc2626", CANCELLED: "#6b7280"}
# an absolute path on the server: not a URL (://), not owner/name, not 1/2
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])~?/[^\s'\"`,:;()<>\[\]{}]+")
HISTORY_COLUMNS = ["job", "kind", "what", "status", "stage", "progress", "waited (s)", "ran (s)", "started"]


def session_id(request: Any) -> str:
    """The visitor's session: Gradio's session hash (one per page load or API client)."""
    sid = getattr(request, "session_hash", None)
    if not sid:
        raise UserError("no session: reload the page")
    return str(sid)


def public_text(text: str) -> str:
    """A message as a visitor may see it: server paths cut to their last part (what the
    visitor typed or uploaded is named by its file or folder name)."""

    def short(match: re.Match) -> str:
        path = match.group(0)
        stem = path.rstrip(".")  # a sentence's full stop is not part of the name
        return (stem.rstrip("/").rsplit("/", 1)[-1] or path) + path[len(stem):]

    return _SERVER_PATH.sub(short, text)


def user_errors(fn: Callable) -> Callable:
    """Show a `UserError` to the visitor as a Gradio error message (toast / API error)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(public_text(str(exc)), print_exception=False) from None

    return wrapper


def named_errors(component: Any, unreadable: str | None = None) -> Any:
    """The component with its input errors prefixed by its label: Gradio's own ("Value 3
    is greater than maximum value 1") does not say which of an endpoint's inputs it means.
    With `unreadable`, a file it cannot read (an upload that is no image) is refused with
    that message rather than a traceback. (Wrapped, not subclassed: Gradio writes a .pyi
    stub beside every module defining a component.)"""
    check = component.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return check(payload)
        except gr.Error as exc:
            raise gr.Error(f"{component.label}: {exc.message}", print_exception=False) from None
        except (OSError, ValueError):
            if unreadable is None:
                raise
            raise gr.Error(f"{component.label}: {unreadable}", print_exception=False) from None

    component.preprocess = preprocess
    return component


def Slider(*args: Any, **kwargs: Any) -> gr.Slider:
    return named_errors(gr.Slider(*args, **kwargs))


def Number(*args: Any, **kwargs: Any) -> gr.Number:
    return named_errors(gr.Number(*args, **kwargs))


def cancel_unfinished(runner: Any, owner: str, kind: str, job_id: str | None) -> Job | None:
    """Cancel the given job of `kind` if it is still unfinished, else the owner's latest
    unfinished one; the job cancelled, or None when there was none (a Cancel button's
    job id box may hold a finished job, or nothing)."""
    active = runner.active(owner, kind)
    wanted = (job_id or "").strip()
    chosen = next((j for j in active if j.id == wanted), None) or (active[0] if active else None)
    return runner.cancel(chosen.id, owner) if chosen is not None else None


class Tab:
    """A dashboard tab: widgets built by `render`, handlers that hand work to the studio."""

    def __init__(self, studio: Any) -> None:
        self.studio = studio


def cancel_html(runner: Any, owner: str, kind: str, job_id: str | None) -> str:
    """A Cancel button's answer: the cancelled job's progress, or that there was none."""
    return progress_html(cancel_unfinished(runner, owner, kind, job_id), "Nothing to cancel.")


def cancel_button(kind: str) -> Callable:
    """A tab's Cancel handler for its `kind` of job (a method): the given job if unfinished,
    else the visitor's latest unfinished one."""
    @user_errors
    def cancel(self, job_id: str, request: gr.Request):
        return cancel_html(self.studio.runner, session_id(request), kind, job_id)

    return cancel


def queued(session, kind: str, job: Job) -> tuple[str, str]:
    """A job just queued: its id and progress; the next poll shows its progress afresh."""
    session.sent.pop(f"{kind}-progress", None)
    return job.id, progress_html(job)


def latest_progress(runner: Any, session, kind: str, idle: str) -> Any:
    """The progress bar of the session's latest job of `kind`; gr.skip() when the page has it."""
    jobs = runner.history(session.id, kind)
    job = jobs[0] if jobs else None
    return progress_html(job, idle) if changed(session, f"{kind}-progress", job_signature(job)) else gr.skip()


def changed(session, key: str, signature: Any) -> bool:
    """True once per new `signature` of an output: polling sends only what changed."""
    if session.sent.get(key) == signature:
        return False
    session.sent[key] = signature
    return True


def progress_html(job: Job | None, idle: str = "No job yet.") -> str:
    """A progress bar with the job's stage; `data-status` lets tests wait for an outcome."""
    if job is None:
        return (f'<div class="mts-progress" data-status="idle" data-job="">'
                f'<div class="mts-stage">{html.escape(idle)}</div></div>')
    percent = 100 * job.fraction
    colour = _BAR_COLOURS.get(job.status, "#9ca3af")
    detail = job.stage
    if job.status == FAILED and job.error:
        detail = public_text(job.error)
    elif job.status == DONE and job.run_seconds is not None:
        detail = f"done in {job.run_seconds:.1f} s"
    head = f"{html.escape(job.label)} · {job.status}"
    if job.status == RUNNING:
        head += f" · {percent:.0f}%"
    return (
        f'<div class="mts-progress" data-status="{job.status}" data-job="{html.escape(job.id)}">'
        f'<div class="mts-head"><code>{html.escape(job.id)}</code> {head}</div>'
        f'<div class="mts-bar" style="background:#e5e7eb;border-radius:6px;height:12px;overflow:hidden">'
        f'<div class="mts-fill" style="width:{percent:.1f}%;background:{colour};height:100%;'
        f'transition:width .4s"></div></div>'
        f'<div class="mts-stage">{html.escape(detail)}</div></div>')


def job_signature(job: Job | None) -> tuple:
    if job is None:
        return ("none",)
    return (job.id, job.status, job.stage, job.done, job.total, job.error)


def history_table(jobs: Sequence[Job]) -> pd.DataFrame:
    rows = []
    for job in jobs:
        run = job.run_seconds
        rows.append({
            "job": job.id, "kind": job.kind, "what": job.label, "status": job.status,
            "stage": public_text(job.error) if job.status == FAILED and job.error else job.stage,
            "progress": f"{100 * job.fraction:.0f}%",
            "waited (s)": round(job.queued_seconds, 1),
            "ran (s)": None if run is None else round(run, 1),
            "started": time.strftime("%H:%M:%S", time.localtime(job.submitted)),
        })
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def percent(share: float, undefined: str) -> str:
    """A share as a percentage; NaN (its reference model scored 0) as `undefined`, which says so."""
    return f"{100 * share:.0f}%" if share == share else undefined


def fmt_table(table: pd.DataFrame | None, digits: int = 3) -> pd.DataFrame:
    """Round floats for display (the CSV keeps full precision)."""
    if table is None:
        return pd.DataFrame()
    out = table.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = out[col].round(digits)
    return out


def job_result_summary(job: Job) -> dict:
    """What an API client learns about a job: its state and a JSON summary of its result."""
    from tailor_ui.app.session import PairHandle, SearchRun, SweepRun, TailorRun, TrainedModel

    info = job.to_dict()
    if info.get("error"):
        info["error"] = public_text(info["error"])
    result = job.result
    if isinstance(result, TailorRun):
        report = result.report
        info["result"] = {
            "label": result.label, "patch_entries": report.get("patch_entries"),
            "linear_fraction": report.get("linear_fraction"),
            "model_fraction": report.get("model_fraction"),
            "timings_s": report.get("timings_s"), "quick_check": report.get("quick_check"),
            "settings": result.settings}
    elif isinstance(result, SweepRun):
        info["result"] = {"rows": len(result.table), "columns": list(result.table.columns),
                          "seconds": result.seconds}
    elif isinstance(result, SearchRun):
        found = result.result
        info["result"] = {"candidates": len(found.settings), "front": len(found.front),
                          "best": found.best.to_dict(), "best_h": float(found.best_row["h"]),
                          "used": found.used, "seconds": result.seconds}
    elif isinstance(result, TrainedModel):
        info["result"] = result.summary()
    elif isinstance(result, dict):  # a fine-tune once its models moved to the session
        info["result"] = result
    elif isinstance(result, PairHandle):
        info["result"] = {"pair": result.label,
                          "parameters": int(result.summary["numel"].sum())}
    elif isinstance(result, list):
        info["result"] = [list(r) if isinstance(r, tuple) else r for r in result]
    return info
