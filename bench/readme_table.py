"""A saved sweep table as docs/results.md's markdown table (scores, per-set retention, gain kept).

    python bench/readme_table.py bench/results/demo_sweep_spatial.csv
"""

from __future__ import annotations

import argparse

import pandas as pd

COLUMNS = [("score:caption_eval", "caption CIDEr-D", 3), ("score:vqa_eval", "VQA", 3),
           ("score:target_eval", "target", 3), ("retention:caption_eval", "caption kept", 2),
           ("retention:vqa_eval", "VQA kept", 2), ("original_retention", "original kept", 3),
           ("target_gain", "target gain kept", 2)]
NAMES = {"majority": "majority answer", "base": "base", "finetuned": "fine-tuned"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("table")
    table = pd.read_csv(ap.parse_args().table)
    order = pd.concat([table[table["kind"] == "majority"], table[table["kind"] != "majority"]])
    print("| setting | " + " | ".join(name for _, name, _ in COLUMNS) + " | entries changed |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for _, row in order.iterrows():
        name = NAMES.get(row["kind"], row["setting"])
        cells = [f"{row[c]:.{d}f}" for c, _, d in COLUMNS]
        changed = "–" if pd.isna(row["patch_fraction"]) else f"{100 * row['patch_fraction']:.1f}%"
        print(f"| {name} | " + " | ".join(cells) + f" | {changed} |")


if __name__ == "__main__":
    main()
