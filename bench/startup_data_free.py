"""Start-up of the data-free command on a small pair: this tree against an older checkout,
runs interleaved, each a fresh process.

    python bench/make_random_model.py --preset llava-tiny --finetuned 1 --out /tmp/bench/llava-tiny
    python bench/startup_data_free.py --models /tmp/bench/llava-tiny --old-tree /tmp/old \
        --repeats 3 --results bench/results/startup_data_free.json

On a tiny model the command is all start-up. Per tree: the wall time and sampled peak
anonymous memory of `tailor --method task_arithmetic --save-model --no-patch`
(`merge_vs_mergekit.measure`), the report's plan stage (key map, headers), and from one
`python -X importtime` run the self time of the imports by top-level package (the model
classes transformers imports lazily do not show there; tests/test_stream.py checks that
none is imported); and RssAnon before the first tensor is read, stage by stage, with either
key map (`stages`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from merge_vs_mergekit import measure  # noqa: E402


def command(models: Path, out: Path, importtime: bool = False) -> list[str]:
    return [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "tailor_ui", "tailor",
            "--base", str(models / "base"), "--finetuned", str(models / "ft1"), "--out", str(out),
            "--method", "task_arithmetic", "--save-model", "--no-patch"]


def imports(models: Path, out: Path, env: dict, cwd: Path) -> dict:
    """Self time (s) of the imports by top-level package."""
    subprocess.run(["rm", "-rf", str(out)], check=True)
    done = subprocess.run(command(models, out, importtime=True), env=env, cwd=cwd, capture_output=True,
                          text=True, check=True)
    by_package: Counter[str] = Counter()
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        own, _, name = line[len("import time:"):].split("|")
        module = name.strip()
        by_package[module.split(".")[0]] += int(own) / 1e6
    top = dict(sorted(((k, round(v, 2)) for k, v in by_package.items()), key=lambda kv: -kv[1])[:8])
    return {"self_seconds_by_package": top, "total_import_seconds": round(sum(by_package.values()), 2)}


STAGES = """
import json, sys
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
out = {"interpreter": anon()}
import torch
out["import torch"] = anon()
import tailor_ui.cli, tailor_ui.stream
out["our modules"] = anon()
from tailor_ui import checkpoint
c = checkpoint.Checkpoint(sys.argv[1])
getattr(checkpoint, sys.argv[2])(c.folder, c.keys)
out[sys.argv[2]] = anon()
print(json.dumps(out))
"""


def stages(models: Path) -> dict:
    """RssAnon (MB) before the first tensor is read, stage by stage, with the key map from the
    headers (`key_map`) and from the model class (`class_key_map`), each in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return {how: json.loads(subprocess.run([sys.executable, "-c", STAGES, str(models / "base"), how],
                                           env=env, capture_output=True, text=True, check=True).stdout)
            for how in ("key_map", "class_key_map")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--old-tree", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/bench/startup"))
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    trees = {"new": (ROOT, env), "old": (args.old_tree, dict(env, PYTHONPATH=str(args.old_tree)))}
    runs = []
    for r in range(args.repeats):
        for tree in (("new", "old") if r % 2 == 0 else ("old", "new")):
            cwd, tree_env = trees[tree]
            out = args.out / tree
            subprocess.run(["rm", "-rf", str(out)], check=True)
            row = {"tree": tree, "repeat": r, "load_avg_1m_before": os.getloadavg()[0],
                   **measure(command(args.models, out), tree_env, cwd)}
            row.pop("output_tail")
            row["plan_s"] = json.loads((out / "report.json").read_text())["timings_s"]["plan"]
            runs.append(row)
            print(json.dumps(row), flush=True)
    results = {"command": " ".join(command(args.models, Path("OUT"))), "runs": runs,
               "imports": {tree: imports(args.models, args.out / tree, tree_env, cwd)
                           for tree, (cwd, tree_env) in trees.items()},
               "rss_anon_mb_before_the_first_read": stages(args.models),
               "summary": {tree: {"median_seconds": sorted(r["seconds"] for r in runs if r["tree"] == tree)[
                   args.repeats // 2], "max_sampled_peak_anon_mb": max(
                   r["sampled_peak_anon_mb"] for r in runs if r["tree"] == tree)} for tree in trees}}
    print(json.dumps(results["summary"]), json.dumps(results["imports"]),
          json.dumps(results["rss_anon_mb_before_the_first_read"]))
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
