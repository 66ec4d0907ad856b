"""What compensation does to each tailored layer of a demo story, on target and on original inputs.

For every linear the demo's fine-tune changed, with Model Tailor's mask (keep, alpha,
block scope, one-pass Hessians of the fine-tuned model), three patches: no compensation,
greedy (SparseGPT's loop, the paper's) and exact (least squares per row); and a fourth,
anchored: Model Tailor on the anchored problem (its own mask and least squares that also
hold the base's outputs on the demo's original-task calibration set, `original_calib.jsonl`,
weight μ). For each:

- target fidelity: 1 − ‖(W − W_ft)X_t‖² / ‖(W_pre − W_ft)X_t‖², the share of the fine-tuned
  layer's output change the patch reproduces on target-task inputs (what compensation
  optimises);
- original drift: ‖(W − W_pre)X_o‖² / ‖(W_ft − W_pre)X_o‖², the share of the fine-tuned
  change it brings back on original-task inputs (captioning and attribute questions),
  where the fine-tune's change is what made the model forget.

Energies are quadratic forms in each input set's H = 2XᵀX/n, summed over layers. Run from
the repository root:

    python bench/compensation_effect.py --story spatial --out bench/results/compensation_spatial.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from story import open_story, story_parser  # noqa: E402
from tailor_ui.calibration import calibration_batches, collect_hessians  # noqa: E402
from tailor_ui.data import read_examples  # noqa: E402
from tailor_ui.demo.sets import DEMO_DIR, demo_anchor  # noqa: E402
from tailor_ui.engine import selected_linears  # noqa: E402
from tailor_ui.methods.exact import anchored_problem, compensate_exact  # noqa: E402
from tailor_ui.methods.selection import keep_mask  # noqa: E402
from tailor_ui.methods.tailor import (compensate, inverse_hessian_factor,  # noqa: E402
                                      merge_without_compensation, tensor_scores)


def energy(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    d = delta.double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))


FORMS = ("none", "greedy", "exact", "anchored")


def patches(w_pre, w_ft, h_target, h_anchor, keep, alpha, weight, damp=0.01):
    factor = inverse_hessian_factor(h_target, damp)
    mask = keep_mask(tensor_scores(w_pre, w_ft, factor).importance(alpha), keep, "block")
    # anchored: Model Tailor on the anchored problem, its own mask included (as the engine)
    target, combined = anchored_problem(w_pre, w_ft, h_target, h_anchor, weight, damp)
    anchored_mask = keep_mask(tensor_scores(w_pre, target, inverse_hessian_factor(combined, 0.0))
                              .importance(alpha), keep, "block")
    return {"none": merge_without_compensation(w_pre, w_ft, mask),
            "greedy": compensate(w_pre, w_ft, mask, factor),
            "exact": compensate_exact(w_pre, w_ft, mask, h_target, damp)[0],
            "anchored": compensate_exact(w_pre, target, anchored_mask, combined, 0.0)[0]}


def main() -> None:
    ap = story_parser(__doc__)
    ap.add_argument("--keep", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=0.8)
    ap.add_argument("--examples", type=int, default=128, help="inputs per set")
    ap.add_argument("--anchor-weight", type=float, default=0.3, help="μ of anchored compensation")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    folder, pair = open_story(args.story)
    tuned = pair.finetuned[0]
    linears = selected_linears(pair)
    target = read_examples(folder / "target_calib.jsonl")[: args.examples]
    half = args.examples // 2
    original = (read_examples(DEMO_DIR / "caption_eval.jsonl")[:half]
                + read_examples(DEMO_DIR / "vqa_eval.jsonl")[:half])
    anchor = list(demo_anchor(DEMO_DIR))  # the original skills' calibration set, not the measured one
    h = {name: collect_hessians(tuned, linears, calibration_batches(pair.processor, examples, 16))
         for name, examples in (("target", target), ("original", original), ("anchor", anchor))}
    rows, totals = [], {}
    for name in linears:
        w_pre = pair.base.get_parameter(f"{name}.weight").detach().float()
        w_ft = tuned.get_parameter(f"{name}.weight").detach().float()
        ft_target, ft_original = energy(w_pre - w_ft, h["target"][name]), energy(w_ft - w_pre, h["original"][name])
        row = {"layer": name}
        for form, w in patches(w_pre, w_ft, h["target"][name], h["anchor"][name], args.keep, args.alpha,
                               args.anchor_weight).items():
            miss, drift = energy(w - w_ft, h["target"][name]), energy(w - w_pre, h["original"][name])
            row[f"target_fidelity:{form}"] = 1 - miss / ft_target
            row[f"original_drift:{form}"] = drift / ft_original
            for key, value in ((f"miss:{form}", miss), (f"drift:{form}", drift)):
                totals[key] = totals.get(key, 0.0) + value
        totals["ft_target"] = totals.get("ft_target", 0.0) + ft_target
        totals["ft_original"] = totals.get("ft_original", 0.0) + ft_original
        rows.append(row)
    summary = {form: {"target_fidelity": 1 - totals[f"miss:{form}"] / totals["ft_target"],
                      "original_drift": totals[f"drift:{form}"] / totals["ft_original"]}
               for form in FORMS}
    print(f"story {args.story}, keep {args.keep}, alpha {args.alpha}, {len(linears)} linears")
    for form, values in summary.items():
        print(f"  {form:7s} target fidelity {values['target_fidelity']:.3f}   "
              f"original drift {values['original_drift']:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)},
                                        "summary": summary, "layers": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
