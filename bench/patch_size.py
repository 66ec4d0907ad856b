"""How big a patch file gets against the model, per keep fraction, through the command
users run (`python -m tailor_ui tailor --method magnitude --keep K`, streamed).

    python bench/patch_size.py --models /tmp/bench/llama-600m --keeps 0.01,0.1,0.5,1.0 \
        --results bench/results/patch_size_600m.json

MODELS is a folder from make_random_model.py (base/, ft1/); the pair is dense (every entry
of the language model moved), so keep K keeps round(K·n) entries of every tensor
(`--scope tensor`). For each K: the patch file's bytes, the model's weight bytes, the
encodings the file chose (from its header), and what format 1 (int32 positions + values
per kept entry) would have taken for the same entries.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def measure(models: Path, keep: float, out: Path) -> dict:
    from tailor_ui.checkpoint import Checkpoint
    from tailor_ui.patch import PatchFile

    cmd = [sys.executable, "-m", "tailor_ui", "tailor", "--base", str(models / "base"),
           "--finetuned", str(models / "ft1"), "--method", "magnitude", "--keep", str(keep),
           "--scope", "tensor", "--others", "linear", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    model_bytes = sum(t.nbytes for t in Checkpoint(models / "base").tensors.values())
    patch = PatchFile(out / "patch.safetensors")
    value_bytes = {n: patch.read(n).values.element_size() for n in patch.entries}
    legacy = sum(c * (4 + value_bytes[n]) for n, c in patch.counts().items())
    size = (out / "patch.safetensors").stat().st_size
    return {"keep": keep, "command": " ".join(cmd[1:]), "patch_bytes": size, "model_bytes": model_bytes,
            "patch_vs_model": round(size / model_bytes, 4), "format1_bytes": legacy,
            "format1_vs_model": round(legacy / model_bytes, 4), "entries": patch.num_entries,
            "encodings": dict(Counter(e["encoding"] for e in patch.entries.values()))}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--keeps", default="0.01,0.1,0.5,1.0")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        for keep in map(float, args.keeps.split(",")):
            rows.append(measure(args.models, keep, Path(tmp) / f"keep{keep}"))
            print(json.dumps(rows[-1]), flush=True)
    info = json.loads((args.models / "model_info.json").read_text())
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"models": info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
