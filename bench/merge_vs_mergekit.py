"""Data-free merge, ours (tailor_ui.stream) against mergekit, side by side in one run.

    python bench/merge_vs_mergekit.py --models /tmp/bench/llama-1b \
        --mergekit /tmp/mk/bin/mergekit-yaml --out /tmp/bench/merges \
        --results bench/results/merge_vs_mergekit.json

MODELS is a folder from make_random_model.py (base/, ft1/, ft2/…). For each method
(task_arithmetic, ties) and each repeat, both tools run in a fresh subprocess, in
alternating order, on the CPU; we record the wall time and the peak resident memory of the
process tree (`os.wait4`'s ru_maxrss, exact) plus a 20 Hz sample of its anonymous and
file-backed resident memory (RssAnon / RssFile: memory-mapped checkpoint pages are
file-backed). Then the two outputs are compared tensor by tensor: where the method
definitions coincide the values should agree (task arithmetic exactly up to float32
summation order; TIES up to top-k tie-breaking and k = round vs int of density·n).

Settings that make the definitions coincide: every tensor is merged by the method
(our `others="linear"`, as mergekit merges every tensor), λ = 1, unit weights, no
normalisation for task arithmetic, disjoint mean (normalize: true) for TIES, float32
arithmetic, output in the base dtype.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("task_arithmetic", "ties")


def mergekit_config(method: str, base: Path, tuned: list[Path], density: float, lam: float) -> str:
    params = {"weight": 1.0} | ({"density": density} if method == "ties" else {})
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for t in tuned:
        lines += [f"  - model: {t}", f"    parameters: {json.dumps(params)}"]
    normalize = "true" if method == "ties" else "false"
    lines += [f"parameters: {{normalize: {normalize}, lambda: {lam}}}", "dtype: float32",
              "out_dtype: float16"]
    return "\n".join(lines) + "\n"


def _status_kb(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("RssFile:"):
                    file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


def _tree(pid: int) -> list[int]:
    try:
        import psutil

        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - the process may be gone between samples
        return [pid]


def measure(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` in a fresh process; wall time, exact peak RSS, sampled anon/file RSS peaks."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {"anon": 0, "file": 0, "sum": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon = file = 0
            for pid in _tree(proc.pid):
                a, f = _status_kb(pid)
                anon, file = anon + a, file + f
            peaks["anon"] = max(peaks["anon"], anon)
            peaks["file"] = max(peaks["file"], file)
            peaks["sum"] = max(peaks["sum"], anon + file)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed ({proc.returncode}):\n{output[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "sampled_peak_anon_mb": round(peaks["anon"] / 1024, 1),
            "sampled_peak_file_mb": round(peaks["file"] / 1024, 1), "output_tail": output[-600:]}


def run_ours(args: argparse.Namespace) -> None:
    """Child process: one streamed merge, its report on stdout."""
    from tailor_ui.settings import Settings
    from tailor_ui.stream import stream_merge

    settings = Settings(method=args.method, keep=args.density, lam=args.lam, others="linear")
    report = stream_merge(args.base, args.tuned, settings, args.out_dir, device=args.device)
    print(json.dumps({"timings_s": report["timings_s"], "memory": report["memory"]}))


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor: bit-equal entries, differing entries, largest absolute difference."""
    from tailor_ui.checkpoint import Checkpoint

    a, b = Checkpoint(ours), Checkpoint(theirs)
    only = sorted(set(a.tensors) ^ set(b.tensors))
    total = differ = 0
    worst = 0.0
    worst_key = ""
    tensors_differing = 0
    with a, b:
        for key in a.keys:
            if key not in b.tensors:
                continue
            x, y = a.read(key), b.read(key)
            if x.shape != y.shape:
                only.append(f"{key} (shape)")
                continue
            y = y.to(x.dtype)
            n = int((x.view(torch.int16) != y.view(torch.int16)).sum()) if x.dtype == torch.float16 \
                else int((x != y).sum())
            total += x.numel()
            differ += n
            tensors_differing += bool(n)
            if n:
                d = float((x.float() - y.float()).abs().max())
                if d > worst:
                    worst, worst_key = d, key
    return {"entries": total, "entries_differing": differ, "fraction_differing": differ / max(total, 1),
            "tensors_differing": tensors_differing, "max_abs_diff": worst, "max_abs_diff_at": worst_key,
            "keys_not_in_both": only[:10]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode")
    o = sub.add_parser("ours", help="(internal) one streamed merge in this process")
    o.add_argument("--base", required=True)
    o.add_argument("--tuned", nargs="+", required=True)
    o.add_argument("--method", required=True)
    o.add_argument("--density", type=float, default=0.2)
    o.add_argument("--lam", type=float, default=1.0)
    o.add_argument("--device", default="cpu")
    o.add_argument("--out-dir", required=True)
    p.add_argument("--models", type=Path, help="folder with base/ and ft1/, ft2/, …")
    p.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench/merges"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--density", type=float, default=0.2, help="TIES keep fraction")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args(argv)
    if args.mode == "ours":
        return run_ours(args)
    if args.models is None:
        p.error("--models is required")
    base = args.models / "base"
    tuned = sorted(args.models.glob("ft*"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    mk_python = Path(args.mergekit).parent / "python"
    mk_version = subprocess.run([str(mk_python), "-c", "import importlib.metadata as m;"
                                 "print(m.version('mergekit'), m.version('torch'), m.version('transformers'))"],
                                capture_output=True, text=True).stdout.split()
    results = {"models": json.loads((args.models / "model_info.json").read_text()),
               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                           "load_avg_at_start": os.getloadavg()},
               "mergekit": {"version": mk_version[:1], "torch": mk_version[1:2],
                            "transformers": mk_version[2:3]},
               "ours": {"torch": torch.__version__}, "runs": [], "agreement": {}}
    for method in args.methods.split(","):
        yml = args.out / f"{method}.yml"
        yml.write_text(mergekit_config(method, base, tuned, args.density, args.lam))
        ours_cmd = [sys.executable, str(Path(__file__).resolve()), "ours", "--base", str(base),
                    "--tuned", *map(str, tuned), "--method", method, "--density", str(args.density),
                    "--lam", str(args.lam), "--out-dir", str(args.out / f"ours-{method}")]
        theirs_cmd = [args.mergekit, str(yml), str(args.out / f"mergekit-{method}"), "--no-cuda",
                      "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--out-shard-size", "1B"]
        for r in range(args.repeats):
            order = [("ours", ours_cmd), ("mergekit", theirs_cmd)]
            for tool, cmd in order if r % 2 == 0 else order[::-1]:
                subprocess.run(["rm", "-rf", str(args.out / f"{tool}-{method}")], check=True)
                load = os.getloadavg()[0]
                row = {"tool": tool, "method": method, "repeat": r, "load_avg_1m_before": load,
                       **measure(cmd, env)}
                if tool == "ours":
                    row["report"] = json.loads(row.pop("output_tail").strip().splitlines()[-1])
                else:
                    row.pop("output_tail")
                results["runs"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
        results["agreement"][method] = compare(args.out / f"ours-{method}", args.out / f"mergekit-{method}")
        print(method, json.dumps(results["agreement"][method]), flush=True)
        if not args.keep_outputs:
            for tool in ("ours", "mergekit"):
                subprocess.run(["rm", "-rf", str(args.out / f"{tool}-{method}")], check=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    summary = {}
    for method in args.methods.split(","):
        for tool in ("ours", "mergekit"):
            rows = [r for r in results["runs"] if r["tool"] == tool and r["method"] == method]
            summary[f"{method}/{tool}"] = {"best_seconds": min(r["seconds"] for r in rows),
                                           "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rows)}
    results["summary"] = summary
    print(json.dumps(summary, indent=2))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
