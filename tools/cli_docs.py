"""Write docs/cli.md from the command line's parser (tests/test_cli_docs.py keeps it current):
`python tools/cli_docs.py`."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone, not an installed package

from tailor_ui.cli import reference  # noqa: E402

if __name__ == "__main__":
    (ROOT / "docs" / "cli.md").write_text(reference(), encoding="utf-8")
