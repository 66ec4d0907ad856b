"""Learning rate × steps sweep of the training-time methods on a demo story (CPU).

Every run trains a copy of the demo base on the story's task (fresh scenes of the training
stream, world seed 1000 + seed: neither the demo's own fine-tuning set nor its evaluation
or calibration sets), one epoch at batch 16, warm-up 5 steps, the last half of the decoder
(the demo fine-tune's layers): full fine-tuning, Model-Dowser at each ρ (importance probed
once on the base, K = 64 prompts, M = 8 probes), and the random mask of the same ρ (the
control). Scores and retentions are the merge sweep's (`evaluation.sweep.summarize`: the
story's fine-tuned model is the reference of target gain), so the rows sit on the same axes
as the merge tables of docs/results.md. The CSV is rewritten after every run.

`--stats` writes, instead, per trained weight matrix, the share of the story's training
gradient (and of the original skills' gradient: captions and attribute questions) that
each mask holds, and the importance of the masked entries, for the base model:

    python bench/training_sweep.py --steps 15 --seeds 0 --out bench/results/training_sweep_spatial.csv
    (docs/results.md#archive-training lists the other parts of the grid)
    python bench/training_sweep.py --stats --out bench/results/dowser_mask_stats_spatial.csv
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from story import open_story, story_parser  # noqa: E402
from tailor_ui.demo import world  # noqa: E402
from tailor_ui.demo.sets import DEMO_DIR, STORIES, demo_sets  # noqa: E402
from tailor_ui.evaluation.evaluate import evaluate_all  # noqa: E402
from tailor_ui.evaluation.sweep import changed_fraction, score_column, summarize  # noqa: E402
from tailor_ui.prompts import encode_with_answers  # noqa: E402
from tailor_ui.training.dowser import dowser_masks, dowser_scores, linear_weights  # noqa: E402
from tailor_ui.training.finetune import (choose_layers, finetune,  # noqa: E402
                                         trainable_parameters)
from tailor_ui.training.random_mask import random_masks  # noqa: E402

BATCH, WARMUP = 16, 5


def _scores(model, processor, sets) -> dict[str, float]:
    results = evaluate_all(model, processor, sets, batch_size=50)
    return {score_column(name): r.score for name, r in results.items()}


def _runs(methods: list[str], rhos: list[float]) -> list[tuple[str, dict]]:
    runs = [("full", {})] if "full" in methods else []
    for rho in rhos:
        runs += [(m, {"rho": rho}) for m in ("dowser", "random_mask") if m in methods]
    return runs


def sweep(args) -> None:
    folder, pair = open_story(args.story)
    base, processor = pair.base, pair.processor
    sets = demo_sets(DEMO_DIR, args.story)
    original = [s for s in sets if s.name != "target"]
    target = [s for s in sets if s.name == "target"]
    rows = [{"kind": "base", "method": "base", "setting": "base", **_scores(base, processor, sets)},
            {"kind": "finetuned", "method": "finetuned", "setting": "the story's fine-tune",
             **_scores(pair.finetuned[0], processor, sets)}]
    importance = dowser_scores(base, processor, K=64, M=8, seed=0)
    lrs = [float(x) for x in args.lrs.split(",")]
    steps = [int(x) for x in args.steps.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    for seed, n_steps, lr, (method, options) in itertools.product(seeds, steps, lrs,
                                                                   _runs(args.methods, args.rhos)):
        train = world.generate(STORIES[args.story].task, n_steps * BATCH, 1000 + seed, 0)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = finetune(model, processor, train, method=method, lr=lr, batch_size=BATCH,
                          warmup_steps=WARMUP, seed=seed, importance=importance, **options)
        seconds = time.perf_counter() - start
        label = f"{method}{' rho=%g' % options['rho'] if options else ''} lr={lr:g} steps={n_steps}"
        rows.append({"kind": "trained", "method": method, "setting": f"{label} seed={seed}",
                     "rho": options.get("rho"), "lr": lr, "steps": n_steps, "seed": seed,
                     "patch_fraction": changed_fraction(base, model.get_parameter),
                     "final_loss": report.epoch_losses[-1], "seconds": seconds,
                     **_scores(model, processor, sets)})
        print(f"{label} seed={seed}: {seconds:.0f} s, loss {report.epoch_losses[-1]:.3f}",
              flush=True)
        table = pd.DataFrame(rows)
        for column in ("keep", "alpha", "lam", "linear_fraction", "eval_seconds"):
            table[column] = None
        extra = table[["rho", "lr", "steps", "seed", "final_loss"]]
        out = pd.concat([summarize(table, original, target), extra], axis=1)
        out.to_csv(args.out, index=False, float_format="%.4f")


def _gradients(model, processor, samples, names: list[str]) -> dict[str, torch.Tensor]:
    """The summed training gradient of each named parameter over `samples` (batches of 16)."""
    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in names:
        params[n].requires_grad_(True)
        params[n].grad = None
    for start in range(0, len(samples), BATCH):
        chunk = samples[start:start + BATCH]
        batch = encode_with_answers(processor, [s.image for s in chunk], [s.question for s in chunk],
                                    [s.answers[0] for s in chunk])
        model(**batch).loss.backward()
    grads = {n: params[n].grad.detach().clone() for n in names}
    for n in names:
        params[n].requires_grad_(False)
        params[n].grad = None
    return grads


def stats(args) -> None:
    _, pair = open_story(args.story)
    base, processor = pair.base, pair.processor
    weights = linear_weights(base, trainable_parameters(base, choose_layers(base)))
    importance = dowser_scores(base, processor, K=64, M=8, seed=0)
    target = _gradients(base, processor, world.generate(STORIES[args.story].task, 256, 1000, 0),
                        weights)
    skills = world.generate("caption", 128, 1000, 0) + world.generate("vqa", 128, 1000, 0)
    original = _gradients(base, processor, skills, weights)
    modules = dict(base.named_modules())
    rows = []
    for rho in args.rhos:
        masks = {"dowser": dowser_masks(base, importance, weights, rho),
                 "random_mask": random_masks(base, weights, rho, 0)}
        for (method, chosen), name in itertools.product(masks.items(), weights):
            mask = chosen[name]
            imp = importance.importance(name.rsplit(".", 1)[0], modules[name.rsplit(".", 1)[0]].weight)
            t2, o2 = target[name].pow(2), original[name].pow(2)
            rows.append({"rho": rho, "method": method, "weight": name,
                         "target_grad_share": float(t2[mask].sum() / t2.sum()),
                         "original_grad_share": float(o2[mask].sum() / o2.sum()),
                         "importance_share": float(imp[mask].sum() / imp.sum()),
                         "abs_weight_mean_masked": float(base.get_parameter(name).abs()[mask].mean()),
                         "abs_weight_mean": float(base.get_parameter(name).abs().mean())})
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False, float_format="%.5f")
    print(table.groupby(["rho", "method"])[["target_grad_share", "original_grad_share",
                                             "importance_share"]].mean().to_string())


def main() -> None:
    parser = story_parser(__doc__)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3")
    parser.add_argument("--steps", default="15,60", help="optimizer steps (batch 16, one epoch)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rhos", default="0.05,0.1,0.2",
                        type=lambda text: [float(x) for x in text.split(",")])
    parser.add_argument("--methods", default="full,dowser,random_mask",
                        type=lambda text: text.split(","))
    parser.add_argument("--stats", action="store_true", help="mask statistics instead of the sweep")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    (stats if args.stats else sweep)(args)


if __name__ == "__main__":
    main()
