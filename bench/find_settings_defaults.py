"""Find settings with the Tailor tab's own defaults on each demo story, as the button runs it
(the dashboard's configuration, on the CPU): the candidates' table per story and the time.

    python bench/find_settings_defaults.py --out bench/results/find_settings_defaults
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from tailor_ui.demo.sets import STORIES
from tailor_ui.evaluation.sweep import LAMBDA_RANGE, parse_numbers
from tailor_ui.app.service.studio import Studio, StudioConfig
from tailor_ui.app.ui.blocks import App

DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="prefix: PREFIX_<story>.csv and PREFIX.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    studio = Studio(StudioConfig(workdir=Path(tempfile.mkdtemp()), demo_dir=DEMO, device="cpu",
                                 warm_up=False))
    studio.start(background=False)
    app = App(studio)
    app.build()
    tab, summary = app.tailor, {}
    for story in STORIES:
        session = studio.session(f"bench-{story}")
        studio.use_demo(session, story)
        first_poll = dict(zip(tab.poll_outputs(), tab.poll(session, studio.handle_for(session))))
        start = time.perf_counter()
        job = studio.submit_search(
            session, parse_numbers(tab.find_keeps.value, "keep"),
            parse_numbers(tab.find_alphas.value, "alpha"),
            {"compensation": first_poll[tab.find_compensation]["value"]}, methods=tab.find_methods.value,
            lams=parse_numbers(tab.find_lams.value, "λ", *LAMBDA_RANGE), examples=tab.find_n.value,
            holdout=tab.find_holdout.value, calib_examples=tab.calib_n.value)
        job = studio.runner.wait(job.id, session.id, 1800)
        assert job.status == "done", job.error
        seconds = time.perf_counter() - start
        result = job.result.result
        result.table.to_csv(f"{args.out}_{story}.csv", index=False)
        best = result.best_row
        summary[story] = {"seconds": round(seconds, 1), "candidates": len(result.candidates),
                          "best": best["setting"], "original_retention": round(best["original_retention"], 3),
                          "target_gain": round(best["target_gain"], 3), "h": round(best["h"], 3),
                          "used": result.used}
        print(story, json.dumps(summary[story]))
    Path(f"{args.out}.json").write_text(json.dumps({"threads": args.threads, **summary}, indent=2))
    studio.close()


if __name__ == "__main__":
    main()
