"""XᵀX for the Hessians: the full product against its upper triangle mirrored
(`tailor_ui.gram`), timed at the widths of the 1b pair's inputs and checked equal bit for bit.

    python bench/gram_sums.py --threads 2 --results bench/results/gram_sums.json
    python bench/gram_sums.py --widths 8192 11008 13824 18944 --rows 7 664 --repeat 1

Each width is summed over three batches of `--rows` rows, as calibration sums its batches
into one accumulator; time is the best of `--repeat` runs, the mirror included.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tailor_ui.gram import add_gram_upper, mirror_upper  # noqa: E402

BATCHES = 3


def full_sums(batches: list[torch.Tensor]) -> torch.Tensor:
    acc = batches[0].T @ batches[0]
    for x in batches[1:]:
        acc.add_(x.T @ x)
    return acc


def upper_sums(batches: list[torch.Tensor]) -> torch.Tensor:
    acc = batches[0].new_zeros(batches[0].shape[1], batches[0].shape[1])
    for x in batches:
        add_gram_upper(acc, x)
    return mirror_upper(acc)


def best_of(fn, repeat: int) -> tuple[float, torch.Tensor]:
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[2048, 5632])
    p.add_argument("--rows", type=int, nargs="+", default=[664], help="rows (tokens) per batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--results", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    for width in args.widths:
        for rows in args.rows:
            batches = [torch.randn(rows, width, generator=gen) for _ in range(BATCHES)]
            full_s, full = best_of(lambda b=batches: full_sums(b), args.repeat)
            upper_s, upper = best_of(lambda b=batches: upper_sums(b), args.repeat)
            rows_out.append({"width": width, "rows": rows, "full_s": round(full_s, 4), "upper_s": round(upper_s, 4),
                             "ratio": round(upper_s / full_s, 3), "equal": torch.equal(full, upper)})
            print(json.dumps(rows_out[-1]), flush=True)
            del full, upper, batches
    result = {"threads": args.threads, "batches": BATCHES, "torch": torch.__version__,
              "blas": torch.backends.mkl.is_available() and "mkl" or "other", "rows": rows_out}
    if args.results is not None:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
