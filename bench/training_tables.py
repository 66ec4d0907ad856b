"""The training tables of docs/results.md from the training sweep's CSVs (bench/training_sweep.py).

Prints, as markdown: (1) each method's front over its learning rates and step counts
(original retention against target gain kept, the points no other setting of the same
method beats on both), (2) the H-score table (per method its best setting by H-score,
and the Dowser / random-mask pairs at each shared setting: which keeps more of each), and
writes the fronts as a sweep-shaped CSV for `bench/plot_front.py`. Several CSVs (parts of one
sweep run separately) are read as one table:

    python bench/training_tables.py bench/results/training_sweep_spatial*.csv \
        --fronts bench/results/training_fronts_spatial.csv
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from continual_demo import markdown  # noqa: E402
from tailor_ui.evaluation.search import pareto_front  # noqa: E402

AXES = ("original_retention", "target_gain")
LABELS = {"full": "full fine-tuning", "dowser": "Model-Dowser", "random_mask": "random mask"}


def read(paths: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(reference rows: base and the story's fine-tune, trained rows averaged over seeds)."""
    table = pd.concat([pd.read_csv(p) for p in paths], ignore_index=True)
    references = table[table["kind"] != "trained"].drop_duplicates("kind")
    trained = table[table["kind"] == "trained"].copy()
    trained["rho"] = trained["rho"].fillna(1.0)
    keys = ["method", "rho", "lr", "steps"]
    columns = ["score:caption", "score:vqa", "score:target", *AXES, "h_score", "patch_fraction"]
    means = trained.groupby(keys)[columns].mean()
    means["seeds"] = trained.groupby(keys)["seed"].nunique()
    return references, means.reset_index()


def label(row) -> str:
    rho = f" ρ={row['rho']:g}" if row["method"] != "full" else ""
    return f"{LABELS[row['method']]}{rho}"


def fronts(trained: pd.DataFrame) -> pd.DataFrame:
    out = []
    for _, group in trained.groupby(["method", "rho"], sort=False):
        front = group[pareto_front(group, *AXES)].sort_values(AXES[0])
        out.append(front)
    return pd.concat(out, ignore_index=True)


def pairs(trained: pd.DataFrame) -> pd.DataFrame:
    """Model-Dowser against the random mask at each setting both ran."""
    keys = ["rho", "lr", "steps"]
    both = trained[trained["method"] == "dowser"].merge(
        trained[trained["method"] == "random_mask"], on=keys, suffixes=(" dowser", " random"))
    rows = []
    for rho, group in both.groupby("rho"):
        d_orig = group["original_retention dowser"] - group["original_retention random"]
        d_gain = group["target_gain dowser"] - group["target_gain random"]
        rows.append({"ρ": rho, "settings": len(group),
                     "Dowser keeps more original": int((d_orig > 0).sum()),
                     "Dowser gains more target": int((d_gain > 0).sum()),
                     "mean Δ original retention": d_orig.mean(), "mean Δ target gain": d_gain.mean(),
                     "Dowser dominates": int(((d_orig >= 0) & (d_gain >= 0) & ((d_orig > 0) | (d_gain > 0))).sum()),
                     "random dominates": int(((d_orig <= 0) & (d_gain <= 0) & ((d_orig < 0) | (d_gain < 0))).sum())})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tables", nargs="+", type=Path)
    parser.add_argument("--fronts", type=Path, default=None, help="write the fronts here (CSV)")
    args = parser.parse_args()
    references, trained = read(args.tables)
    front = fronts(trained)
    shown = front.assign(method=[label(r) for _, r in front.iterrows()],
                         lr=[f"{v:g}" for v in front["lr"]], steps=front["steps"].astype(int))
    print("### Fronts (each method's settings no other of its settings beats on both axes)\n")
    print(markdown(shown[["method", "lr", "steps", *AXES, "h_score", "seeds"]]))
    best = trained.loc[trained.groupby(["method", "rho"], sort=False)["h_score"].idxmax()]
    best = best.assign(setting=[f"{label(r)}, lr {r['lr']:g}, {r['steps']:g} steps"
                                for _, r in best.iterrows()])
    refs = references.assign(setting=references["setting"])
    print("\n### Best H-score per method\n")
    print(markdown(pd.concat([refs, best], ignore_index=True)[
        ["setting", "score:caption", "score:vqa", "score:target", *AXES, "h_score"]]))
    print("\n### Model-Dowser against the random mask, setting by setting\n")
    print(markdown(pairs(trained)))
    if args.fronts is not None:
        plot = shown.assign(kind="merged", setting=shown["method"], keep=shown[AXES[0]])
        pd.concat([references, plot], ignore_index=True).to_csv(args.fronts, index=False,
                                                                 float_format="%.4f")


if __name__ == "__main__":
    main()
