"""What computing a job in a worker process costs, against the lane's thread, on the demo pair.

For each mode (worker processes, then threads, --rounds times in turn): a Studio with the
demo pair warmed up, then --moves slider moves (a merge at a new keep on cached scores,
with its quick check: submit → run filed), timed; in worker mode also the fork alone (the
server's interpreter lock is held while the kernel copies its page tables) and an empty
job's round trip.

    python bench/worker_overhead.py --rounds 2 --moves 8 --out bench/results/worker_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def measure(workers_on: bool, moves: int) -> dict:
    from tailor_ui.app import workers
    from tailor_ui.app.service import tailor
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.studio import Studio, StudioConfig

    studio = Studio(StudioConfig(workdir=Path(tempfile.mkdtemp(prefix="worker-overhead-")), device="cpu",
                                 workers=workers_on))
    studio.start(background=False)
    try:
        assert studio.warm.wait(300), "the start-up merge did not finish"
        session = studio.session("overhead")
        compensation = tailor.default_compensation(studio.demo)
        moves_s = []
        for i in range(moves):
            start = time.perf_counter()
            job = studio.submit_tailor(session, default_settings(keep=0.1 + i / 50, compensation=compensation))
            job = studio.runner.wait(job.id, session.id, 300)
            assert job.status == "done", job.error
            moves_s.append(time.perf_counter() - start)
        out = {"workers": workers_on, "move_s": {"median": round(statistics.median(moves_s), 3),
                                                  "max": round(max(moves_s), 3)},
               "score_cache": job.result.report["score_cache"]}
        if workers_on:
            forks, trips = [], []
            for _ in range(5):
                start = time.perf_counter()
                process = workers._FORK.Process(target=time.sleep, args=(0.1,))
                process.start()
                forks.append(time.perf_counter() - start)
                process.join()
                start = time.perf_counter()
                workers.run_in_worker(lambda p, s: None, threading.Event(), lambda *a: None)
                trips.append(time.perf_counter() - start)
            out["fork_s"] = {"median": round(statistics.median(forks), 3), "max": round(max(forks), 3)}
            out["empty_job_s"] = {"median": round(statistics.median(trips), 3), "max": round(max(trips), 3)}
        return out
    finally:
        studio.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--moves", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "worker_overhead.json")
    args = parser.parse_args()
    runs = [measure(on, args.moves) for _ in range(args.rounds) for on in (True, False)]
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
