"""The `tailor` command before and after layer-by-layer calibration, on the same pair in
the same run: stage by stage, against one plain forward, with peak memory and agreement.

    python bench/tailor_layerwise.py --size s --baseline main --results bench/results/tailor_layerwise_s.json
    python bench/tailor_layerwise.py --size m --baseline none --depth 2 --threads 1
    python bench/tailor_layerwise.py --size m --baseline none --in-memory --calib 16 --threads 1

1. Builds a random LLaVA-shaped pair with make_random_model.py's preset (`--size`, fp16 on
   disk; the fine-tune moved every entry of the decoder layers) with the demo's processor,
   and `--calib` synthetic calibration rows (gpu_tailor_7b.py's helpers).
2. Runs the command a user runs, `python -m tailor_ui tailor --base B --finetuned F --calib
   C --out O` (sequential Hessians, the default), in a fresh process each: the code of
   `--baseline` (a git revision, exported with `git archive`) and the working tree's.
3. Times one plain forward of the base over the same calibration batches (loaded as the
   command loads it) right before each run, and reports the run's calibration stage ÷
   that forward (on a shared machine the load moves between runs: compare ratios).
4. Compares the two patches: kept entries in common per tensor (the smallest share) and
   the largest value difference among them.

5. With `--in-memory`, also runs the working tree's command with `--in-memory` (the base
   loaded whole) on the same pair: the same calibration without onloading, so the two
   runs' calibration stages say what onloading costs. With `--one-pass`, also runs it with
   `--hessians one-pass` (one run of each layer instead of two).

6. With `--depth 2`, also runs the working tree's command on a pair with twice the decoder
   layers (make_random_model.py's `depth`) and reports its peak RSS against the first
   pair's (`depth_peak_ratio`; the target is at most 1.10). `--baseline none` skips the
   baseline run.

Stages come from each run's report.json (`timings_s`: calibration = every forward the run
made and its XᵀX sums, split in `calibration_parts_s`; reading weights = parameters read
from their files while it runs, scores, selection, compensation, merge of the other
tensors); `outside_engine_s` is the command's wall time less the engine's: start-up,
loading and writing the outputs.
Peak RSS is the process's (os.wait4), divided by the checkpoint's bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_tailor_7b import make_pair, run_options, tailor_command, write_calibration  # noqa: E402
from make_random_model import VISION  # noqa: E402

TARGET_CALIBRATION_OVER_FORWARD = 1.5
TARGET_PEAK_OVER_MODEL_BYTES = 1.0
TARGET_DEPTH_PEAK_RATIO = 1.10

_FORWARD = """
import json, sys, time
import torch
from tailor_ui.calibration import calibration_batches
from tailor_ui.data import read_calibration
from tailor_ui.pair import load_model
from tailor_ui.weights import to_model
base, calib, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, processor = load_model(base)
batches = calibration_batches(processor, read_calibration(calib), batch_size)
start = time.perf_counter()
with torch.inference_mode():
    for batch in batches:
        model(**to_model(batch, model), use_cache=False)
print(json.dumps({"forward_s": time.perf_counter() - start, "batches": len(batches),
                  "tokens": sum(int(b["attention_mask"].sum()) for b in batches)}))
"""


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[str, float, float]:
    """A command in a fresh process: its output, wall seconds and peak RSS (MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"tailor_layerwise: {' '.join(cmd[:4])} failed:\n{text[-3000:]}")
    return text, time.perf_counter() - start, usage.ru_maxrss / 1024


def export(revision: str, into: Path) -> Path:
    """The project's code at `revision`, as files (`git archive`)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def agreement(a: Path, b: Path) -> dict:
    """The smallest share of kept entries two patches have in common, over tensors, and the
    largest difference of the values both keep."""
    from tailor_ui.patch import load_patch

    pa, pb = load_patch(a), load_patch(b)
    worst, diff = 1.0, 0.0
    for name, ta in pa.tensors.items():
        tb = pb.tensors.get(name)
        if tb is None:
            return {"same_tensors": False}
        ia, ib = ta.index, tb.index
        shared = torch.isin(ia, ib)
        worst = min(worst, float(shared.sum()) / max(ia.numel(), 1))
        va = dict(zip(ia.tolist(), ta.values.float().tolist()))
        vb = dict(zip(ib.tolist(), tb.values.float().tolist()))
        diff = max([diff] + [abs(va[i] - vb[i]) for i in ia[shared].tolist()])
    return {"same_tensors": pa.tensors.keys() == pb.tensors.keys(), "min_kept_in_common": worst,
            "max_value_difference": diff}


def tailor_run(code: Path, cmd: list[str], out: Path, env: dict[str, str]) -> dict:
    _, wall, peak = run(cmd, code, env)
    report = json.loads((out / "report.json").read_text())
    timings = report["timings_s"]
    return {"code": str(code), "wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "outside_engine_s": round(wall - timings["total"], 2), "pipeline": report.get("pipeline"),
            "base_loading": report.get("base_loading"), "memory": report["memory"],
            "memory_terms_mb": report.get("memory_terms_mb")}


def calibration_parts(timings: dict[str, float]) -> dict[str, float]:
    """The calibration stage in its parts: the front, the XᵀX sums, the runs that make the next
    layer's inputs (sequential mode), and what is left, the forwards that feed the sums
    (one-pass: the same runs also make the next layer's inputs). Empty for a run whose report
    has no sums stage (code before it)."""
    if "calibration: XᵀX sums" not in timings:
        return {}
    parts = {part: timings.get(f"calibration: {part}", 0.0)
             for part in ("up to the first layer", "XᵀX sums", "next layer's inputs")}
    parts["forwards for the Hessians"] = timings["calibration"] - sum(parts.values())
    return {part: round(seconds, 2) for part, seconds in parts.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="s", help="make_random_model.py preset (tiny, s, m, 1b)")
    p.add_argument("--baseline", default="main", help="git revision of the code to compare with (none: no baseline run)")
    p.add_argument("--depth", type=int, default=1,
                   help="also run on a pair with this many times the decoder layers (1: no such run)")
    p.add_argument("--in-memory", action="store_true",
                   help="also run the working tree's command with --in-memory (the base loaded whole)")
    p.add_argument("--one-pass", action="store_true",
                   help="also run the working tree's command with --hessians one-pass")
    run_options(p, calib=32, threads=(2, "OMP_NUM_THREADS of every measured process"),
                work=Path("/tmp/bench/tailor_layerwise"))
    args = p.parse_args(argv)
    args.device, args.dtype = "cpu", "float32"  # what `tailor` loads on a machine without a GPU
    shutil.rmtree(args.work, ignore_errors=True)
    calib = write_calibration(args.work / "calib", args.calib, VISION[args.size]["image"])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    jobs = [] if args.baseline == "none" else [("baseline", export(args.baseline, args.work / "baseline"), 1)]
    jobs += [("layerwise", ROOT, 1)] + ([("layerwise-in-memory", ROOT, 1)] if args.in_memory else [])
    jobs += [("layerwise-one-pass", ROOT, 1)] if args.one_pass else []
    jobs += [(f"layerwise-depth-{args.depth}", ROOT, args.depth)] if args.depth > 1 else []
    pairs: dict[int, tuple[dict, Path, Path, int]] = {}
    runs = {}
    for label, code, depth in jobs:
        if depth not in pairs:
            info = make_pair(args.work / f"pair-{depth}", args.size, "float16", "cpu", depth)
            base, ft = (Path(f) for f in info["folders"])
            pairs[depth] = (info, base, ft, sum(f.stat().st_size for f in base.glob("*.safetensors")))
        info, base, ft, disk = pairs[depth]
        # a plain forward right before each run: on a shared machine the load changes by the minute
        text, _, _ = run([sys.executable, "-c", _FORWARD, str(base), str(calib), str(args.batch_size)], ROOT, env)
        forward = json.loads(text.strip().splitlines()[-1])
        out = args.work / f"out-{label}"
        cmd = tailor_command(base, ft, calib, out, args) + (["--in-memory"] if label.endswith("in-memory") else [])
        if label.endswith("one-pass"):
            cmd[cmd.index("--hessians") + 1] = "one-pass"
        r = runs[label] = {**tailor_run(code, cmd, out, env), "command": " ".join(cmd[1:]), "plain_forward": forward,
                           "parameters": info["parameters"], "model_bytes_on_disk": disk,
                           "load_average_after": os.getloadavg()}
        r["calibration_over_forward"] = round(r["timings_s"].get("calibration", 0.0) / forward["forward_s"], 2)
        r["calibration_parts_s"] = calibration_parts(r["timings_s"])
        r["peak_rss_over_model_bytes"] = round(r["peak_rss_mb"] * 2**20 / disk, 2)
    result = {"size": args.size, "parameters": pairs[1][0]["parameters"], "model_bytes_on_disk": pairs[1][3],
              "calibration_examples": args.calib, "batch_size": args.batch_size, "threads": args.threads,
              "baseline": args.baseline, "runs": runs,
              "target_calibration_over_forward": TARGET_CALIBRATION_OVER_FORWARD,
              "target_peak_over_model_bytes": TARGET_PEAK_OVER_MODEL_BYTES,
              "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    if "baseline" in runs:
        result.update(
            whole_command_speedup=round(runs["baseline"]["wall_s"] / runs["layerwise"]["wall_s"], 2),
            calibration_speedup=round(runs["baseline"]["timings_s"].get("calibration", 0)
                                      / max(runs["layerwise"]["timings_s"].get("calibration", 0), 1e-9), 2),
            agreement=agreement(args.work / "out-baseline" / "patch.safetensors",
                                args.work / "out-layerwise" / "patch.safetensors"))
    if args.depth > 1:
        result.update(depth_peak_ratio=round(runs[f"layerwise-depth-{args.depth}"]["peak_rss_mb"]
                                             / runs["layerwise"]["peak_rss_mb"], 3),
                      target_depth_peak_ratio=TARGET_DEPTH_PEAK_RATIO)
    print(json.dumps(result, indent=2))
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
