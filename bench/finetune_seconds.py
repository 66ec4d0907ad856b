"""How long the Fine-tune tab's default run takes per method on the demo pair (CPU).

Each method runs as the tab runs it (32 examples, one epoch, the last half of the decoder,
the method's default learning rate and knobs) through the dashboard's Studio; the job's
run time is the figure the tab's hint states.

    python bench/finetune_seconds.py [--examples 32] [--out bench/results/finetune_seconds.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tailor_ui.app.jobs import DONE  # noqa: E402
from tailor_ui.app.service.finetune import METHOD_DEFAULTS  # noqa: E402
from tailor_ui.app.service.studio import Studio, StudioConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "finetune_seconds.json")
    args = parser.parse_args()
    studio = Studio(StudioConfig(workdir=Path(tempfile.mkdtemp()), demo_dir=ROOT / "assets" / "demo",
                                 device="cpu", warm_up=False))
    studio.start(background=False)
    session = studio.session("bench")
    seconds = {}
    for method, defaults in METHOD_DEFAULTS.items():
        job = studio.submit_finetune(session, method, examples=args.examples, lr=defaults["lr"],
                                     rho=defaults.get("rho", 0.1), ema_beta=defaults.get("ema_beta", 0.99))
        job = studio.runner.wait(job.id, session.id, 1800)
        assert job.status == DONE, job.error
        seconds[method] = round(job.run_seconds, 1)
        print(f"{method}: {seconds[method]} s", flush=True)
    studio.close()
    args.out.write_text(json.dumps({"examples": args.examples, "epochs": 1, "seconds": seconds,
                                    "machine": platform.processor() or platform.machine(),
                                    "note": "2 shared cores, other work running"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
