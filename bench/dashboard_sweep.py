"""The dashboard's default Forgetting sweep on the built-in demo, run as the Run button runs it.

A Studio on the demo pair (`python app.py`'s configuration, on the CPU) takes the
Forgetting tab's default widget values through `ForgettingTab.run`, the handler the button
calls; the table is written as CSV and each baseline's largest lead over Model Tailor's
front is printed (`story.front_gap`: target examples out of 150; ≤ 0: Model Tailor's front
is on or above it from 80 % original retention up). Run from the repository root (about
5 min on 2 cores):

    python bench/dashboard_sweep.py --out bench/results/dashboard_sweep_spatial.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from story import front_gap  # noqa: E402
from tailor_ui.evaluation.evaluate import EvalSet  # noqa: E402
from tailor_ui.app.service.config import StudioConfig  # noqa: E402
from tailor_ui.app.service.studio import Studio  # noqa: E402
from tailor_ui.app.ui import forgetting  # noqa: E402
from tailor_ui.app.ui.blocks import App  # noqa: E402


class _Request:
    session_hash = "bench-default-sweep"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        # the app's defaults (64 calibration examples per run), on the CPU, no start-up merge
        studio = Studio(StudioConfig(workdir=Path(work), device="cpu", warm_up=False))
        studio.start(background=False)
        try:
            app = App(studio)
            app.build()
            request = _Request()
            job_id, _ = app.forgetting.run(forgetting.DEFAULT_METHODS, forgetting.DEFAULT_KEEPS,
                                           forgetting.DEFAULT_LAMS, forgetting.DEFAULT_ALPHA,
                                           forgetting.DEFAULT_EXAMPLES, request=request)
            job = studio.runner.wait(job_id, request.session_hash, 3600)
            if job.error:
                raise SystemExit(job.error)
            table = job.result.table
            args.out.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(args.out, index=False)
            target = next(s for s in studio.demo.eval_sets if s.role == "target")
            print(table[["setting", "original_retention", "target_gain"]].round(3).to_string())
            print("baselines' lead over Model Tailor's front, in target examples:",
                  front_gap(table, EvalSet(target.name, target.task,
                                           target.examples[: forgetting.DEFAULT_EXAMPLES])))
        finally:
            studio.close()


if __name__ == "__main__":
    main()
