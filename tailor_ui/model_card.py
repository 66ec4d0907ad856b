"""Model cards: the README.md that every saved model, patch and adapter carries.

A card holds the Hub's metadata (`base_model`, `library_name`, `pipeline_tag`, tags), the
method with every setting, the command that rebuilds the output, and the scores known for
it with the sets they were measured on. It is plain text built from data (a report and
`Settings`), so the CLI, the streaming writers and the dashboard write the same card.
"""

from __future__ import annotations

import math
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from tailor_ui.methods import REGISTRY
from tailor_ui.settings import Settings

CARD_NAME = "README.md"
# every pair loads as AutoModelForImageTextToText (pair.load_model)
PIPELINE_TAG = "image-text-to-text"
PROJECT_TAG = "model-tailor-studio"


class Artifact(str, Enum):
    """What a card describes."""

    MODEL = "model"
    PATCH = "patch"
    ADAPTER = "adapter"


# which library loads each artifact (the Hub shows its snippet)
_LIBRARY = {Artifact.MODEL: "transformers", Artifact.PATCH: "tailor_ui", Artifact.ADAPTER: "peft"}
_WHAT = {
    Artifact.MODEL: "The base model with the patch written in, saved with `save_pretrained`: it loads "
                    "with `transformers.AutoModelForImageTextToText.from_pretrained`.",
    Artifact.PATCH: "A sparse patch: the entries of the fine-tuned model that are written over the "
                    "base (`patch.safetensors`), with the merge's report (`report.json`). Rebuild the "
                    "model with `python -m tailor_ui apply --base BASE --patch patch.safetensors "
                    "--out DIR`.",
    Artifact.ADAPTER: "The patch fitted as a PEFT LoRA adapter on the base (a low-rank fit per changed "
                      "linear; the fit's errors are in `adapter_fit.json`): it loads with "
                      "`peft.PeftModel.from_pretrained(base, folder)`.",
}


@dataclass(frozen=True)
class Scores:
    """One table of scores: a title naming what was measured, rows of column -> value."""

    title: str
    rows: Sequence[Mapping[str, Any]]


def hub_ids(names: Sequence[str]) -> list[str]:
    """The names that are Hub repositories the models were loaded from (in the Hub's local
    cache): the Hub refuses a card whose `base_model` names anything else, so a local
    folder, or the demo pair's own names ("demo/base"), are named in the text only."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    ids = []
    for name in names:
        if not name or Path(name).exists():
            continue
        try:
            validate_repo_id(name)
        except HFValidationError:
            continue
        # a model, or a LoRA adapter as the fine-tuned model
        files = ("config.json", "adapter_config.json")
        if any(isinstance(try_to_load_from_cache(name, f), str) for f in files):
            ids.append(name)
    return ids


def tailor_command(settings: Settings, base: str, finetuned: Sequence[str], *,
                   calib: Sequence[str] = (), anchor: Sequence[str] = (), out: str = "tailored") -> str:
    """The `tailor` command line that merges with these settings: every setting the method
    reads that differs from its default (μ only where anchored compensation reads it), and
    always the patch size, the fusion weight and the compensation form (the command line's
    own default form depends on --anchor)."""
    from tailor_ui.settings import method_knobs

    words = ["--base", base, *[w for f in finetuned for w in ("--finetuned", f)],
             *[w for c in calib for w in ("--calib", c)], "--out", out]
    read, defaults = {"method", *method_knobs(settings.method)}, Settings()
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name not in read or f.name == "compensate":
            continue
        if f.name == "anchor_weight" and not settings.anchored:
            continue
        if f.name in ("keep", "alpha", "compensation") or value != getattr(defaults, f.name):
            text = f"{value:g}" if isinstance(value, float) else str(value)
            words += [f"--{f.name.replace('_', '-')}", text]
    if "compensate" in read and not settings.compensate:
        words.append("--no-compensate")
    if settings.anchored:
        words += [w for a in anchor for w in ("--anchor", a)]
    return "python -m tailor_ui tailor " + " ".join(shlex.quote(w) for w in words)


def model_card(artifact: Artifact, report: Mapping[str, Any], *, command: str | None = None,
               scores: Sequence[Scores] = ()) -> str:
    """The README.md of a saved output, from its merge's report (`settings`, `base`,
    `finetuned`, the patch's size, `quick_check` where the dashboard scored it): Hub
    metadata, what the output is, the models, the method and every setting, the command
    that rebuilds it and the scores known for it (the report's quick check, then `scores`)."""
    from huggingface_hub import ModelCard, ModelCardData

    settings = dict(report.get("settings") or {})
    method = settings.get("method", "unrecorded method")
    base = str(report.get("base") or "")
    finetuned = [str(f) for f in report.get("finetuned") or []]
    label = REGISTRY[method].label if method in REGISTRY else method
    data = ModelCardData(base_model=hub_ids([base, *finetuned]) or None, library_name=_LIBRARY[artifact],
                         pipeline_tag=PIPELINE_TAG,
                         tags=[PROJECT_TAG, "merge", re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-"),
                               artifact.value])
    lines = [f"# {label}: {_short(finetuned)} tailored onto {_short([base])}", "", _WHAT[artifact], "",
             "## Models", "", _table(["role", "model"], [["base", f"`{base}`"]]
                                     + [["fine-tuned", f"`{f}`"] for f in finetuned]), ""]
    lines += ["## Method and settings", ""]
    if settings:
        lines += [f"**{label}**" + (f": {REGISTRY[method].summary}" if method in REGISTRY else ""), "",
                  _settings_table(method, settings), ""]
    else:  # a patch file written without its settings
        lines += ["The settings that made this output are not recorded with it.", ""]
    size = _patch_size(report)
    if size:
        lines += ["## The patch", "", size, ""]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    tables = [*_quick_check(report), *scores]
    lines += ["## Scores", ""]
    if not tables:
        lines += ["No scores were measured for this output (the dashboard's quick check and "
                  "Forgetting sweep score a merge on evaluation sets).", ""]
    for table in tables:
        columns = list(dict.fromkeys(k for row in table.rows for k in row))
        lines += [f"### {table.title}", "",
                  _table(columns, [[_value(row.get(c)) for c in columns] for row in table.rows]), ""]
    lines.append(f"Made with Model Tailor Studio (`{PROJECT_TAG}`).")
    body = "\n".join(lines) + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_card(folder: str | Path, artifact: Artifact, report: Mapping[str, Any], *,
               command: str | None = None, scores: Sequence[Scores] = ()) -> Path:
    """`model_card` written as folder/README.md (replacing a card copied from the base)."""
    path = Path(folder) / CARD_NAME
    path.write_text(model_card(artifact, report, command=command, scores=scores), encoding="utf-8")
    return path


def sweep_scores(table, settings: Settings, sets: Sequence[str]) -> list[Scores]:
    """The forgetting sweep's row of a merge with these settings (none when the sweep did
    not run them), as one score table naming its sets."""
    from tailor_ui.evaluation.sweep import setting_label

    if table is None or "setting" not in table:
        return []
    rows = table[(table["kind"] == "merged") & (table["setting"] == setting_label(settings))]
    if rows.empty:
        return []
    columns = [c for c in ("setting", "original_retention", "target_retention", "target_gain", "h_score",
                           "patch_fraction") if c in rows]
    columns += [c for c in rows.columns if c.startswith("score:")]
    return [Scores(f"Forgetting sweep (sets: {', '.join(sets)})", rows[columns].to_dict(orient="records"))]


def _quick_check(report: Mapping[str, Any]) -> list[Scores]:
    rows = report.get("quick_check")
    if not rows:
        return []
    sets = [c for c in rows[0] if c not in ("model", "original retention", "target retention")]
    examples = (report.get("quick_examples") and f" on {report['quick_examples']} examples per set") or ""
    return [Scores(f"Quick check{examples} (sets: {', '.join(sets)})", rows)]


def _settings_table(method: str, settings: Mapping[str, Any]) -> str:
    """Every `Settings` field: its value, whether this method reads it, and its help where
    the fields declare one."""
    from tailor_ui.settings import method_knobs

    read = {"method", *method_knobs(method)} if method in REGISTRY else set()
    helps = [" ".join(str(f.metadata.get("help", "")).split()) for f in fields(Settings)]
    rows = [[f"`{f.name}`", _value(settings.get(f.name, getattr(Settings, f.name, None))),
             "yes" if f.name in read else "no", *([_value(h)] if any(helps) else [])]
            for f, h in zip(fields(Settings), helps)]
    return _table(["setting", "value", f"read by {method}", *(["meaning"] if any(helps) else [])], rows)


def _patch_size(report: Mapping[str, Any]) -> str:
    if "patch_entries" not in report:
        return ""
    text = f"{int(report['patch_entries']):,} entries"
    if "model_fraction" in report:
        text += f", {100 * report['model_fraction']:.2f}% of the model"
    if "linear_fraction" in report and report.get("selected_linears") is not None:
        text += (f" ({100 * report['linear_fraction']:.2f}% of the {report['selected_linears']} "
                 "selected linear weights)")
    return text + "."


def _short(names: Sequence[str]) -> str:
    return ", ".join(f"`{Path(n).name or n}`" for n in names) or "`?`"


def _value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
