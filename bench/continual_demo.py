"""Continual fine-tuning on the demo (CPU, a few minutes): LLaCA against sequential tuning
and a fixed EMA.

A sequence over the shapes world (colour → counting → spatial by default), trained from the
demo base with plain sequential fine-tuning, a fixed-β EMA (β = 0.99), LLaCA in the form of
the authors' released code and in the paper's form, and our per-entry-means variant of the code form; the
same recipe for every method (last half of the decoder, AdamW, batch 8, one epoch, warm-up
10 steps). Accuracy on every task after each stage, average accuracy and forgetting after
the last, and per task the balance weights the EMA chose (mean weight given to the live
weights, mean of the non-fallback ones, share of fallbacks) and its lag at the end of the
task, ‖θ − θ*‖ / ‖θ − θ₀‖. Run from the repository root:

    python bench/continual_demo.py            # full run, writes bench/results/continual_*.csv
    python bench/continual_demo.py --quick    # a smoke run with tiny counts
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tailor_ui.demo.tasks import DEFAULT_SEQUENCE, shapes_sequence  # noqa: E402
from tailor_ui.pair import load_model  # noqa: E402
from tailor_ui.training.continual import EMA_COLUMNS, acc_column, run_continual, summary  # noqa: E402

DEMO = ROOT / "assets" / "demo"
RESULTS = ROOT / "bench" / "results"
METHODS = (("sequential", "full", {}),
           ("EMA β=0.99", "ema", {"ema_beta": 0.99}),
           ("LLaCA (code form)", "llaca", {"llaca_form": "code"}),
           ("LLaCA (paper form)", "llaca", {"llaca_form": "paper"}),
           ("LLaCA (ours: per-entry means)", "llaca", {"llaca_form": "mean"}))


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def run(base, processor, args, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    tasks = shapes_sequence(folder, args.tasks, n_train=args.n, n_eval=args.eval_n, seed=args.seed)
    recipe = dict(lr=args.lr, epochs=args.epochs, batch_size=args.batch, warmup_steps=10, seed=args.seed)
    tables, rows = [], []
    for label, method, extra in METHODS:
        start = time.perf_counter()
        table = run_continual(copy.deepcopy(base), processor, tasks, method=method,
                              max_new_tokens=4, **recipe, **extra)
        seconds = time.perf_counter() - start
        print(f"continual {label}: {seconds:.0f} s", flush=True)
        table["method"] = label
        tables.append(table)
        trained = table[table["stage"] > 0]
        rows.append({"method": label, **summary(table),
                     **{f"final {acc_column(t.name)}": table.iloc[-1][acc_column(t.name)]
                        for t in tasks},
                     **{column: trained[column].mean() for column in EMA_COLUMNS},
                     "seconds": seconds})
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke run)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_SEQUENCE),
                        type=lambda text: tuple(text.split(",")))
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs per task (150 steps each); other than 1 the CSVs are named _eN")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the same bits on any machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.batch = 8
    args.n, args.eval_n = (32, 20) if args.quick else (1200, 150)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    base, processor = load_model(str(DEMO / "base"))
    print(f"recipe: last half of the decoder, AdamW lr {args.lr:g}, batch {args.batch}, {args.epochs} epoch(s), "
          f"warm-up 10 steps; {args.n} examples per task, {args.eval_n} evaluation examples per "
          f"task; {args.threads} thread(s)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        stages, summary_table = run(base, processor, args, Path(tmp))
    print(f"\n### Continual: {' → '.join(args.tasks)}\n")
    print(markdown(summary_table))
    print("\nPer stage:\n")
    print(markdown(stages))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        tag = "" if args.epochs == 1 else f"_e{args.epochs}"
        summary_table.to_csv(args.out / f"continual_summary{tag}.csv", index=False, float_format="%.4f")
        stages.to_csv(args.out / f"continual_stages{tag}.csv", index=False, float_format="%.4f")
        print(f"wrote {args.out}/continual_summary{tag}.csv, continual_stages{tag}.csv")


if __name__ == "__main__":
    main()
