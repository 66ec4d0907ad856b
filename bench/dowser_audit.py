"""How much the deviations of our Model-Dowser probe from the authors' script change the mask.

The authors' script (`llava_importance_self_gen_prompt.py` in Model-Dowser's repository)
averages, over batches and probes, the full matrix ψ_b ⊗ |W| ⊗ a_b of each batch b; ours
stores only the two vectors, so it multiplies the means, ψ̄ ⊗ |W| ⊗ ā. Its prompts are
sampled at temperature 0.9, top-p 0.9, repetition penalty 1.05, 64 tokens long (ours since
this audit; before it, temperature 1 and 32 tokens). This compares the ρ masks of the story's
trained weights (the last half of the decoder) under each variant with ours, as the share of
entries both masks hold (Jaccard), next to the same share between two probe seeds of ours
(the noise floor):

    python bench/dowser_audit.py --out bench/results/dowser_audit_spatial.csv
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from story import open_story, story_parser  # noqa: E402
from tailor_ui.training.dowser import (DowserScores, dowser_masks, dowser_scores,  # noqa: E402
                                       keep_lowest, linear_weights, probe_statistics,
                                       self_generated_prompts)
from tailor_ui.training.finetune import choose_layers, trainable_parameters  # noqa: E402
from tailor_ui.weights import to_model  # noqa: E402

PLAIN_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}


def product_of_batch_means(model, processor, weights: list[str], seed: int) -> dict[str, torch.Tensor]:
    """The authors' aggregation: the mean over batches of ψ_b ⊗ |W| ⊗ a_b (our prompts)."""
    modules = {n.rsplit(".", 1)[0]: model.get_submodule(n.rsplit(".", 1)[0]) for n in weights}
    for p in model.parameters():
        p.requires_grad_(False)
    batches = self_generated_prompts(model, processor, 64, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    total: dict[str, torch.Tensor] = {}
    for batch in batches:
        scores = probe_statistics(lambda b: model(**to_model(b, model), use_cache=False).logits,
                                  modules, [batch], probes=8, generator=generator)
        for name, module in modules.items():
            total[name] = total.get(name, 0) + scores.importance(name, module.weight)
    return {f"{n}.weight": t / len(batches) for n, t in total.items()}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def main() -> None:
    parser = story_parser(__doc__)
    parser.add_argument("--rhos", default="0.05,0.1,0.2")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    _, pair = open_story(args.story)
    model, processor = pair.base, pair.processor
    weights = linear_weights(model, trainable_parameters(model, choose_layers(model)))
    ours = dowser_scores(model, processor, seed=0)
    variants: dict[str, DowserScores | dict[str, torch.Tensor]] = {
        "ours, probe seed 1 (noise floor)": dowser_scores(model, processor, seed=1),
        "ours before the audit (prompts at T 1, 32 tokens)": dowser_scores(
            model, processor, seed=0, prompt_length=32, sampling=PLAIN_SAMPLING),
        "authors' aggregation (mean of per-batch products)": product_of_batch_means(
            model, processor, weights, 0),
    }
    rows = []
    for rho in [float(x) for x in args.rhos.split(",")]:
        reference = dowser_masks(model, ours, weights, rho)
        for label, variant in variants.items():
            masks = (dowser_masks(model, variant, weights, rho) if isinstance(variant, DowserScores)
                     else {n: keep_lowest(variant[n], rho) for n in weights})
            shares = [jaccard(reference[n], masks[n]) for n in weights]
            rows.append({"rho": rho, "variant": label, "jaccard_mean": sum(shares) / len(shares),
                         "jaccard_min": min(shares)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False, float_format="%.4f")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
