"""docs/cli.md is the parser's reference: regenerate it (`python tools/cli_docs.py`) when a
command or an option changes."""

from pathlib import Path

from tailor_ui.cli import reference

ROOT = Path(__file__).resolve().parents[1]


def test_docs_cli_is_current():
    written = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert written == reference(), "docs/cli.md is stale: run python tools/cli_docs.py"


def test_reference_lists_every_command_and_declared_option():
    text = reference()
    for command in ("inspect", "tailor", "apply", "compare", "eval", "sweep", "find-settings",
                    "finetune", "demo"):
        assert f"\n## {command}\n" in text
    # a declared knob, with its words and readers, and a fine-tuning method's option
    assert "| `--gamma GAMMA` | fraction of the largest \\|τ\\| removed" in text
    assert "block: per 128-column block" in text and "(ema; default 0.99)" in text
