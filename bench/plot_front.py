"""The Forgetting tab's trade-off figure for a saved sweep table, as a PNG for docs/results.md.

The figure is the dashboard's own (`tailor_ui.app.plots.tradeoff`: original retention against
the share of the target gain kept, the front of the merges dotted); the PNG is a headless
chromium screenshot of it (plotly.js inlined, no network), so no image engine is needed
beyond the browser the tests already use. Run from the repository root:

    python bench/plot_front.py bench/results/demo_sweep_spatial.csv docs/front_spatial.png
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tailor_ui.app import plots  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table", type=Path, help="a sweep's CSV")
    ap.add_argument("png", type=Path)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()
    fig = plots.tradeoff(pd.read_csv(args.table))
    fig.update_layout(width=900, height=560, title=args.title or fig.layout.title.text)
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as p:
        html = Path(tmp) / "front.html"
        fig.write_html(html, include_plotlyjs=True, full_html=True)
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 920, "height": 580})
        page.goto(html.as_uri())
        page.wait_for_selector(".js-plotly-plot .main-svg")
        page.locator(".js-plotly-plot").screenshot(path=str(args.png))
        browser.close()


if __name__ == "__main__":
    main()
