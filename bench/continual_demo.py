"""Fine-tuning with forgetting in mind, measured on the demo pair (CPU, a few minutes).

(a) One target task (counting), one recipe: full fine-tuning of the last half of the
    decoder, Model-Dowser (ρ = 0.1) at the same learning rate and at 10×, and Model Tailor
    (keep 0.1, default settings) applied to the fully fine-tuned model. Scores on the
    demo's caption / VQA (original) and counting (target) evaluation sets.
(b) A continual sequence over the shapes world (colour → counting → spatial), trained
    with plain sequential fine-tuning, a fixed-β EMA (β = 0.99) and LLaCA (the authors'
    code form, and the paper's form), each from the demo base with the same recipe;
    accuracy on every task after each stage, average accuracy and forgetting after the
    last, and the mean weight the EMA gave the live weights per update.

Nothing is tuned per method: every row uses the recipe below (the Dowser 10× row is
labelled). Run from the repository root:

    python bench/continual_demo.py            # full run, writes bench/results/*.csv
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

from tailor_ui.calibration import calibration_batches  # noqa: E402
from tailor_ui.data import read_examples  # noqa: E402
from tailor_ui.demo import world  # noqa: E402
from tailor_ui.engine import run_method  # noqa: E402
from tailor_ui.evaluation.evaluate import evaluate  # noqa: E402
from tailor_ui.evaluation.sweep import changed_fraction, h_score  # noqa: E402
from tailor_ui.pair import Pair, load_model  # noqa: E402
from tailor_ui.patch import apply_patch, revert_patch  # noqa: E402
from tailor_ui.settings import Settings  # noqa: E402
from tailor_ui.demo.tasks import shapes_sequence  # noqa: E402
from tailor_ui.training.continual import acc_column, run_continual, summary  # noqa: E402
from tailor_ui.training.dowser import dowser_scores  # noqa: E402
from tailor_ui.training.finetune import finetune  # noqa: E402

DEMO = ROOT / "assets" / "demo"
RESULTS = ROOT / "bench" / "results"
SETS = {"caption": ("caption_eval.jsonl", "caption"), "vqa": ("vqa_eval.jsonl", "vqa"),
        "count": ("counting/target_eval.jsonl", "vqa")}
ORIGINAL, TARGET = ("caption", "vqa"), ("count",)


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.{digits}f}"
        return str(v)
    head = "| " + " | ".join(map(str, table.columns)) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join([head, rule, *rows])


def part_a(base, processor, args) -> pd.DataFrame:
    sets = {name: read_examples(DEMO / file)[:args.eval_n] for name, (file, _) in SETS.items()}

    def scores(model) -> dict[str, float]:
        return {f"score:{name}": evaluate(model, processor, sets[name], SETS[name][1],
                                          batch_size=50).score for name in SETS}

    train = world.generate("count", args.ft_n, args.seed, 0)  # the demo's fine-tuning stream
    recipe = dict(lr=args.lr, epochs=1, batch_size=args.batch, warmup_steps=10, seed=args.seed)
    rows = [{"row": "base (pre-trained)", "train_s": 0.0, "changed": 0.0, **scores(base)}]

    full = copy.deepcopy(base)
    report = finetune(full, processor, train, method="full", **recipe)
    print(f"full fine-tuning: {report.steps} steps, {report.seconds:.0f} s, "
          f"loss {report.epoch_losses[-1]:.3f}", flush=True)
    rows.append({"row": f"full fine-tuning (lr {args.lr:g})", "train_s": report.seconds,
                 "changed": changed_fraction(base, full), **scores(full)})

    start = time.perf_counter()
    importance = dowser_scores(base, processor, K=64, M=8, seed=args.seed)
    probe_s = time.perf_counter() - start
    print(f"Model-Dowser importance: K=64, M=8, {probe_s:.1f} s", flush=True)
    for factor in (1, 10):
        lr = args.lr * factor
        model = copy.deepcopy(base)
        report = finetune(model, processor, train, method="dowser", rho=0.1,
                          importance=importance, **{**recipe, "lr": lr})
        print(f"Model-Dowser lr {lr:g}: {report.seconds:.0f} s, loss "
              f"{report.epoch_losses[-1]:.3f}", flush=True)
        rows.append({"row": f"Model-Dowser ρ=0.1 (lr {lr:g})", "train_s": report.seconds + probe_s,
                     "changed": changed_fraction(base, model), **scores(model)})

    calib = calibration_batches(processor, read_examples(DEMO / "counting" / "target_calib.jsonl"))
    pair = Pair(base=base, finetuned=[full], processor=processor, base_id="demo base",
                finetuned_ids=["full fine-tuning"])
    result = run_method(pair, Settings(method="tailor"), [calib])
    seconds = result.report["timings_s"]["total"]
    print(f"Model Tailor on the fully fine-tuned model: {seconds:.1f} s", flush=True)
    applied = apply_patch(base, result.patch)
    try:
        rows.append({"row": "Model Tailor keep=0.1 on full FT", "train_s": seconds,
                     "changed": result.report["model_fraction"], **scores(base)})
    finally:
        revert_patch(base, applied)

    table = pd.DataFrame(rows)
    b, f = table.iloc[0], table.iloc[1]
    orig_cols = [f"score:{n}" for n in ORIGINAL]
    table["original_retention"] = sum(table[c] / b[c] for c in orig_cols) / len(orig_cols)
    table["target_retention"] = table["score:count"] / f["score:count"]
    original = table[orig_cols].mean(axis=1)
    table["h_score"] = [h_score(o, t) for o, t in zip(original, table["score:count"])]
    return table


def part_b(base, processor, args, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    tasks = shapes_sequence(folder, ("colour", "count", "spatial"), n_train=args.cl_n,
                            n_eval=args.eval_n, seed=args.seed)
    recipe = dict(lr=args.lr, epochs=1, batch_size=args.batch, warmup_steps=10, seed=args.seed)
    tables, rows = [], []
    for label, method, extra in (("sequential", "sequential", {}),
                                 ("EMA β=0.99", "ema", {"ema_beta": 0.99}),
                                 ("LLaCA (code form)", "llaca", {"llaca_form": "code"}),
                                 ("LLaCA (paper form)", "llaca", {"llaca_form": "paper"})):
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
                     "ema_live_weight": trained["ema_live_weight"].mean(),
                     "ema_fallback": trained["ema_fallback"].mean(), "seconds": seconds})
    return pd.concat(tables, ignore_index=True), pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts (smoke run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the same bits on any machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.lr, args.batch = 1e-4, 8
    args.ft_n, args.cl_n, args.eval_n = (48, 32, 20) if args.quick else (1200, 1200, 150)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    base, processor = load_model(str(DEMO / "base"))
    print(f"recipe: last half of the decoder, AdamW lr {args.lr:g}, batch {args.batch}, "
          f"1 epoch, warm-up 10 steps; {args.ft_n} target examples, {args.cl_n} per continual "
          f"task, {args.eval_n} evaluation examples per set; {args.threads} thread(s)", flush=True)

    a = part_a(base, processor, args)
    with tempfile.TemporaryDirectory() as tmp:
        stages, b = part_b(base, processor, args, Path(tmp))

    total = time.perf_counter() - start
    print("\n### (a) One target task: full fine-tuning, Model-Dowser, Model Tailor\n")
    print(markdown(a))
    print("\n### (b) Continual: colour → counting → spatial\n")
    print(markdown(b))
    print("\nPer stage:\n")
    print(markdown(stages))
    print(f"\ntotal {total:.0f} s")
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        a.to_csv(args.out / "dowser_tailor.csv", index=False, float_format="%.4f")
        b.to_csv(args.out / "continual_summary.csv", index=False, float_format="%.4f")
        stages.to_csv(args.out / "continual_stages.csv", index=False, float_format="%.4f")
        print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}/"
              "{dowser_tailor,continual_summary,continual_stages}.csv")


if __name__ == "__main__":
    main()
