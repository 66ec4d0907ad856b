"""Slider round trip on the demo pair: a new keep / alpha -> the patched model ready.

    python bench/slider_roundtrip.py --results bench/results/slider_roundtrip.json

What the dashboard does when a slider moves: revert the previous patch, run Model Tailor
with the new setting (one-pass Hessians: the cached inverse-Hessian factors and z-scored
scores are reused, so only the threshold and the compensation are redone), and write the
new patch into the base model in place. The first run (calibration, Hessians, scores)
is timed separately. Sequential mode recomputes on every move (its later blocks see
inputs shaped by keep/alpha), so it is timed too, for contrast. Goal: under 0.5 s per
move on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from dataclasses import replace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MOVES = [(0.05, 0.8), (0.10, 0.8), (0.20, 0.8), (0.20, 0.5), (0.01, 0.5), (0.10, 0.9),
         (0.30, 0.9), (0.10, 0.8), (0.05, 0.2), (0.50, 0.8), (0.15, 0.7), (0.10, 0.8)]


def main(argv: list[str] | None = None) -> None:
    from tailor_ui.calibration import calibration_batches
    from tailor_ui.data import read_examples
    from tailor_ui.engine import run_method
    from tailor_ui.pair import load_pair
    from tailor_ui.patch import apply_patch, revert_patch
    from tailor_ui.settings import Settings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--assets", type=Path, default=ROOT / "assets" / "demo")
    p.add_argument("--calib-limit", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sequential-moves", type=int, default=3)
    p.add_argument("--compensation", default="greedy",
                   help="greedy | exact | anchored (the demo's original_calib.jsonl as its anchor)")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    pair = load_pair(str(args.assets / "base"), str(args.assets / "finetuned"))
    examples = read_examples(args.assets / "target_calib.jsonl")[: args.calib_limit]
    calib = [calibration_batches(pair.processor, examples)]
    anchor = calibration_batches(pair.processor, read_examples(args.assets / "original_calib.jsonl")) \
        if args.compensation == "anchored" else None
    out: dict = {"compensation": args.compensation, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                 "load_avg_at_start": os.getloadavg(), "calibration_examples": len(examples),
                 "parameters": sum(p.numel() for p in pair.base.parameters())}

    def move(settings: Settings, applied):
        start = time.perf_counter()
        if applied is not None:
            revert_patch(pair.base, applied)
        result = run_method(pair, replace(settings, compensation=args.compensation), calib, anchor=anchor)
        applied = apply_patch(pair.base, result.patch)
        return time.perf_counter() - start, applied, result

    start = time.perf_counter()
    _, applied, result = move(Settings(method="tailor", hessians="one-pass"), None)
    out["first_run_s"] = round(time.perf_counter() - start, 3)
    out["first_run_timings_s"] = result.report["timings_s"]
    times = []
    for keep, alpha in MOVES:
        seconds, applied, result = move(Settings(method="tailor", hessians="one-pass", keep=keep,
                                                 alpha=alpha), applied)
        times.append({"keep": keep, "alpha": alpha, "seconds": round(seconds, 4),
                      "entries": result.patch.num_entries,
                      "stages_s": {k: round(v, 4) for k, v in result.report["timings_s"].items()}})
        print(json.dumps(times[-1]), flush=True)
    revert_patch(pair.base, applied)
    values = [t["seconds"] for t in times]
    out["one_pass_moves"] = times
    out["one_pass_summary"] = {"median_s": round(statistics.median(values), 4),
                               "max_s": round(max(values), 4), "min_s": round(min(values), 4),
                               "under_0_5_s": all(v < 0.5 for v in values)}
    seq = []
    applied = None
    for keep, alpha in MOVES[: args.sequential_moves]:
        seconds, applied, _ = move(Settings(method="tailor", keep=keep, alpha=alpha), applied)
        seq.append({"keep": keep, "alpha": alpha, "seconds": round(seconds, 3)})
    if applied is not None:
        revert_patch(pair.base, applied)
    out["sequential_moves"] = seq
    out["load_avg_at_end"] = os.getloadavg()
    print(json.dumps({k: v for k, v in out.items() if k not in ("one_pass_moves",)}, indent=2))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
