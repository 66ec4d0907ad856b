"""Model Tailor on a GPU at LLaVA-1.5-7B's shape: the user's `tailor` command, timed, with
its peak GPU memory against the targets (< 5 min; GPU peak ≤ 0.35 × the model's bytes,
which needs the base onloaded layer by layer: with the base resident it is ≥ 1 ×).

    python bench/gpu_tailor_7b.py --results bench/results/gpu_tailor_7b.json
    python bench/gpu_tailor_7b.py --size tiny --device cpu      # the same path, in seconds

1. Builds a random base + one fine-tune from transformers configs (make_random_model.py's
   presets; `7b` is a CLIP ViT-L/14-336 tower + a Llama-2-7B decoder), drawing the values on
   `--device` in `--dtype`; the fine-tune is the base plus N(0, 0.002²) on every entry of the
   decoder layers (a dense full fine-tune). Nothing is downloaded.
2. Saves the demo's offline LlavaProcessor (word tokenizer, CLIP image processor at the
   tower's size, one <image> token per patch) with both models, and writes `--calib`
   synthetic examples (random-noise PNGs + short question/answer rows) in the project's JSONL.
3. Times, in a fresh process, `python -m tailor_ui tailor --method tailor --hessians
   sequential --scope block --device DEVICE --dtype DTYPE`, and reads the run's peak GPU
   memory (torch.cuda.max_memory_allocated, summed over GPUs) from its report.json. The
   command calibrates layer by layer (the front of the model once per batch, then each
   decoder layer on its cached inputs); the results carry the report's `pipeline` (which
   path ran, and why), its stage timings and its predicted memory terms.

With `--device cuda` and no CUDA GPU it stops at once with one line.
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

from make_random_model import TEXT, VISION, build  # noqa: E402

WORDS = ("what", "is", "in", "the", "image", "a", "photo", "of", "colour", "shape", "red", "blue",
         "green", "circle", "square", "left", "right", "describe", "it", "there", "how", "many")
TARGET_S = 300.0
TARGET_GPU_RATIO = 0.35


def require_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("gpu_tailor_7b: no CUDA GPU on this machine (use --size tiny --device cpu "
                         "to run the same path on the CPU)")


def make_pair(out: Path, size: str, dtype: str, device: str, depth: int = 1) -> dict:
    """Base + one dense fine-tune of the decoder layers, with a processor saved in both
    (`depth`: times the preset's decoder layers)."""
    from tailor_ui.demo.processor import build_processor

    info = build(out, "llava", size, 1, r"language_model\.layers\.", 0.002, dtype, 2000, 0, device, depth=depth)
    processor = build_processor(WORDS, image_size=VISION[size]["image"], patch_size=VISION[size]["patch"])
    for folder in info["folders"]:
        processor.save_pretrained(folder)
    return info


def write_calibration(folder: Path, n: int, image_size: int, seed: int = 0) -> Path:
    """`n` rows of {image, question, answers} with random-noise PNGs at the tower's size."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        pixels = torch.randint(0, 256, (image_size, image_size, 3), generator=gen, dtype=torch.uint8)
        Image.fromarray(pixels.numpy()).save(folder / "images" / f"{i:04d}.png")
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (12,), generator=gen)]
        rows.append({"image": f"images/{i:04d}.png", "question": " ".join(words[:8]) + "?",
                     "answers": [" ".join(words[8:])]})
    path = folder / "calib.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tailor_command(base: Path, ft: Path, calib: Path, out: Path, args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "tailor_ui", "tailor", "--base", str(base), "--finetuned", str(ft),
            "--calib", str(calib), "--out", str(out), "--method", "tailor", "--hessians", "sequential",
            "--scope", "block", "--keep", str(args.keep), "--batch-size", str(args.batch_size),
            "--device", args.device, "--dtype", args.dtype]


def run_tailor(cmd: list[str], out: Path) -> dict:
    """The command in a fresh process: wall time from outside, peaks from its report.json."""
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gpu_tailor_7b: tailor failed:\n{text[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": round(wall, 1), "load_avg_before": load, "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "timings_s": report["timings_s"], "memory": report["memory"], "pipeline": report.get("pipeline"),
            "memory_terms_mb": report.get("memory_terms_mb"), "output_tail": text[-1500:]}


def run_options(p: argparse.ArgumentParser, *, calib: int, threads: tuple[int, str], work: Path) -> None:
    """The options of a timed `tailor` run that this script and tailor_layerwise.py share."""
    p.add_argument("--calib", type=int, default=calib, help="calibration examples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=threads[0], help=threads[1])
    p.add_argument("--work", type=Path, default=work)
    p.add_argument("--results", type=Path, default=None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="7b", choices=sorted(TEXT), help="make_random_model.py preset")
    p.add_argument("--device", default="cuda", help="cuda | cpu (tailor's --device, and where the pair is drawn)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    run_options(p, calib=128, threads=(0, "torch threads for the CPU (0: torch's default)"),
                work=Path("/tmp/bench/gpu_tailor"))
    p.add_argument("--keep-models", action="store_true")
    args = p.parse_args(argv)
    require_device(args.device)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the tailor process's torch threads
    shutil.rmtree(args.work, ignore_errors=True)
    start = time.perf_counter()
    info = make_pair(args.work / "pair", args.size, args.dtype, "cuda" if args.device.startswith("cuda") else "cpu")
    build_s = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the drawing's cached blocks would crowd the measured process
    calib = write_calibration(args.work / "calib", args.calib, VISION[args.size]["image"])
    cmd = tailor_command(Path(info["folders"][0]), Path(info["folders"][1]), calib, args.work / "out", args)
    run = run_tailor(cmd, args.work / "out")
    model_mb = info["parameters"] * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size() / 2**20
    gpu_mb = run["memory"].get("gpu_peak_allocated_mb")
    result = {
        "size": args.size, "device": args.device, "dtype": args.dtype, "parameters": info["parameters"],
        "changed_parameters": info["changed_parameters"], "model_mb": round(model_mb, 1),
        "calibration_examples": args.calib, "build_pair_s": round(build_s, 1),
        "command": " ".join(cmd), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpus": os.cpu_count(), **run,
        "targets": {"time_s": TARGET_S, "gpu_peak_over_model": TARGET_GPU_RATIO,
                    "time_met": run["wall_s"] < TARGET_S,
                    "gpu_peak_over_model_measured": None if gpu_mb is None else round(gpu_mb / model_mb, 3),
                    "gpu_memory_met": None if gpu_mb is None else gpu_mb < TARGET_GPU_RATIO * model_mb},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "output_tail"}, indent=2))
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2))
    if not args.keep_models:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
