"""Data-free merge: the command users run (`python -m tailor_ui tailor --method …
--save-model`, streamed) against mergekit, side by side in one run, on the same pair.

    python bench/merge_vs_mergekit.py --models /tmp/bench/llama-600m \
        --cases task_arithmetic:1,ties:2 --repeats 2 \
        --results bench/results/merge_vs_mergekit_cli.json

MODELS is a folder from make_random_model.py (base/, ft1/, ft2/…). A case is METHOD:N,
N fine-tuned models. For each case and repeat, every tool runs in a fresh process, on the
CPU, in an order that rotates between repeats: mergekit, ours (`tailor --save-model`,
which also writes the patch), ours with `--no-patch`, and optionally ours at an older
commit (`--old-tree`, a checkout of it). We record the wall time and the peak resident
memory of the process tree (`os.wait4`'s ru_maxrss, exact) plus a 20 Hz sample of its
anonymous and file-backed resident memory (RssAnon / RssFile: memory-mapped checkpoint
pages are file-backed), and the machine's load before each run. Then our model and
mergekit's are compared tensor by tensor: where the method definitions coincide the
values should agree (task arithmetic exactly; TIES up to top-k tie-breaking and
k = round vs int of density·n). DARE drops entries at random, and the two tools draw
different random masks, so its outputs are compared by statistics instead: the fraction
of entries left at the base value (the drop rate) and the RMS of model − base (τ's RMS
/ √density for rescaled survivors), each tool's against the other's.

Settings that make the definitions coincide: every tensor is merged by the method
(our `--others linear`, as mergekit merges every tensor), λ = 1, unit weights, no
normalisation for task arithmetic and DARE (mergekit's `dare_linear`, rescale on, density
= 1 − our drop rate = our --keep), disjoint mean (normalize: true) for TIES, float32
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

CASES = "task_arithmetic:1,task_arithmetic:2,ties:2"
TOOLS = ("mergekit", "ours", "ours --no-patch")
MERGEKIT_METHOD = {"dare": "dare_linear"}  # our name -> mergekit's, where they differ


def mergekit_config(method: str, base: Path, tuned: list[Path], density: float, lam: float) -> str:
    params = {"weight": 1.0} | ({"density": density} if method in ("ties", "dare") else {})
    lines = [f"merge_method: {MERGEKIT_METHOD.get(method, method)}", f"base_model: {base}", "models:"]
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


def measure(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """Run `cmd` in a fresh process; wall time, exact peak RSS, sampled anon/file RSS peaks."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def ours_command(base: Path, tuned: list[Path], method: str, density: float, lam: float, out: Path,
                 no_patch: bool) -> list[str]:
    """The user's command: a streamed merge writing the model (and the patch)."""
    # only the knobs the method reads (the CLI refuses the others): density for TIES and
    # DARE, as in mergekit_config, λ for all but DARE
    cmd = [sys.executable, "-m", "tailor_ui", "tailor", "--base", str(base), "--out", str(out),
           "--method", method, *(["--keep", str(density)] if method in ("ties", "dare") else []),
           *(["--lam", str(lam)] if method != "dare" else []), "--others", "linear", "--save-model"]
    for t in tuned:
        cmd += ["--finetuned", str(t)]
    return cmd + (["--no-patch"] if no_patch else [])


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor, by parameter name (ours keeps the base's checkpoint keys, mergekit
    may save LLaVA under its parameter names): bit-equal entries, differing entries,
    largest absolute difference."""
    from tailor_ui.checkpoint import Checkpoint, key_map

    a, b = Checkpoint(ours), Checkpoint(theirs)
    name_of = key_map(a.folder, a.keys).param_of
    theirs_of = {name: key for key, name in key_map(b.folder, b.keys).param_of.items()}
    only = sorted({name_of.get(k, k) for k in a.tensors} ^ set(theirs_of))
    total = differ = 0
    worst = 0.0
    worst_key = ""
    tensors_differing = 0
    with a, b:
        for key in a.keys:
            other = theirs_of.get(name_of.get(key, key))
            if other is None:
                continue
            x, y = a.read(key), b.read(other)
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


def delta_statistics(model: Path, base: Path) -> dict:
    """Of model − base over all shared tensors: the fraction of entries equal to the base
    (bitwise) and the root mean square."""
    from tailor_ui.checkpoint import Checkpoint

    a, b = Checkpoint(model), Checkpoint(base)
    total = same = 0
    square = 0.0
    with a, b:
        for key in a.keys:
            if key not in b.tensors:
                continue
            x = a.read(key)
            y = b.read(key).to(x.dtype)
            same += int((x == y).sum())
            square += float(((x.float() - y.float()) ** 2).sum(dtype=torch.float64))
            total += x.numel()
    return {"entries": total, "fraction_at_base": same / max(total, 1), "rms_delta": (square / max(total, 1)) ** 0.5}


def run_case(args: argparse.Namespace, method: str, n: int, env: dict, results: dict) -> None:
    base = args.models / "base"
    tuned = sorted(args.models.glob("ft*"))[:n]
    case = f"{method}:{n}"
    yml = args.out / f"{method}-{n}.yml"
    yml.write_text(mergekit_config(method, base, tuned, args.density, args.lam))
    outs = {tool: args.out / f"{tool.replace(' ', '')}-{method}-{n}" for tool in TOOLS + ("ours@old",)}
    commands = {"mergekit": [args.mergekit, str(yml), str(outs["mergekit"]), "--no-cuda",
                             "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                             "--out-shard-size", "1B"]}
    for tool in ("ours", "ours --no-patch"):
        commands[tool] = ours_command(base, tuned, method, args.density, args.lam, outs[tool],
                                      tool.endswith("--no-patch"))
    commands = {tool: cmd for tool, cmd in commands.items() if tool in args.tools}
    envs = {tool: env for tool in commands}
    if args.old_tree:
        commands["ours@old"] = ours_command(base, tuned, method, args.density, args.lam, outs["ours@old"], False)
        envs["ours@old"] = dict(env, PYTHONPATH=str(args.old_tree))
    cwds = {tool: args.old_tree if tool == "ours@old" else ROOT for tool in commands}
    tools = list(commands)
    for r in range(args.repeats):
        for tool in tools[r % len(tools):] + tools[:r % len(tools)]:
            subprocess.run(["rm", "-rf", str(outs[tool])], check=True)
            row = {"tool": tool, "case": case, "repeat": r, "load_avg_1m_before": os.getloadavg()[0],
                   **measure(commands[tool], envs[tool], cwds[tool])}
            row.pop("output_tail")
            if tool != "mergekit":
                report = json.loads((outs[tool] / "report.json").read_text())
                row["report"] = {"timings_s": report["timings_s"], "memory": report["memory"]}
                patch = outs[tool] / "patch.safetensors"
                row["patch_mb"] = round(patch.stat().st_size / 2**20, 1) if patch.exists() else None
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
    mine = outs["ours"] / "model" if "ours" in commands else outs["ours --no-patch"] / "model"
    if method == "dare":  # different random masks: compare the statistics
        results["agreement"][case] = {tool: delta_statistics(out, base) for tool, out in
                                      (("ours", mine), ("mergekit", outs["mergekit"]))}
    else:
        results["agreement"][case] = compare(mine, outs["mergekit"])
    print(case, json.dumps(results["agreement"][case]), flush=True)
    if not args.keep_outputs:
        for out in outs.values():
            subprocess.run(["rm", "-rf", str(out)], check=True)


def summarize(results: dict) -> dict:
    """Per case and tool: best and worst time, peak memory; ratios to mergekit's best."""
    model_mb = results["models"]["parameters"] * 2 / 2**20  # fp16
    summary = {}
    for case in dict.fromkeys(r["case"] for r in results["runs"]):
        rows = [r for r in results["runs"] if r["case"] == case]
        theirs = min(r["seconds"] for r in rows if r["tool"] == "mergekit")
        for tool in dict.fromkeys(r["tool"] for r in rows):
            mine = [r for r in rows if r["tool"] == tool]
            best = min(r["seconds"] for r in mine)
            anon = max(r["sampled_peak_anon_mb"] for r in mine)
            summary[f"{case}/{tool}"] = {
                "seconds": [r["seconds"] for r in mine], "best_seconds": best,
                "time_vs_mergekit_best": round(best / theirs, 3),
                "max_peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                "max_sampled_peak_anon_mb": anon, "anon_vs_model_bytes": round(anon / model_mb, 3)}
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True, help="folder with base/ and ft1/, ft2/, …")
    p.add_argument("--mergekit", default="/work/venvs/mergekit/bin/mergekit-yaml")
    p.add_argument("--out", type=Path, default=Path("/tmp/bench/merges"))
    p.add_argument("--cases", default=CASES, help="METHOD:N,… (N fine-tuned models)")
    p.add_argument("--density", type=float, default=0.2, help="TIES keep fraction")
    p.add_argument("--lam", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tools", type=lambda v: v.split(","), default=list(TOOLS),
                   help=f"which of {','.join(TOOLS)} to run (mergekit always: ratios are to it)")
    p.add_argument("--old-tree", type=Path, default=None, help="a checkout of an older commit, timed too")
    p.add_argument("--threads", type=int, default=None, help="OMP threads for mergekit (default: torch's)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--keep-outputs", action="store_true")
    args = p.parse_args(argv)
    args.tools = list(dict.fromkeys(["mergekit", *args.tools]))
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
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
               "ours": {"torch": torch.__version__}, "command": sys.argv, "runs": [], "agreement": {}}
    for case in args.cases.split(","):
        method, _, n = case.partition(":")
        run_case(args, method, int(n or 1), env, results)
        results["summary"] = summarize(results)
        if args.results:  # after each case: a long run leaves what it measured
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(results, indent=2))
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    print(json.dumps(results["summary"], indent=2))
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
