"""How the fine-tuning recipe of a demo story decides which merge wins.

Fine-tunes the demo's base on a story's target task with each recipe given (examples,
epochs, learning rate, batch; the last half of the decoder, as `demo build` does), then
sweeps Model Tailor and the data-free baselines on the story's evaluation sets with the
shipped calibration set. Same data, same seed and same grid for every recipe. Run from
the repository root (about 5 min per recipe on 2 cores):

    python bench/story_recipes.py --story spatial --recipes 1200:1:1e-3:8,6000:3:1e-3:32 \
        --out bench/results/story_recipes_spatial.csv
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from story import front_gap, open_story, story_parser  # noqa: E402
from tailor_ui.calibration import calibration_batches  # noqa: E402
from tailor_ui.data import read_examples  # noqa: E402
from tailor_ui.demo import world  # noqa: E402
from tailor_ui.demo.build import TRAIN_STREAM, Story, finetune_story, finetuned_layers, train_batches  # noqa: E402
from tailor_ui.training.finetune import encode_epoch  # noqa: E402
from tailor_ui.demo.sets import DEMO_DIR, STORIES, demo_anchor  # noqa: E402
from tailor_ui.evaluation.evaluate import EvalSet  # noqa: E402
from tailor_ui.evaluation.sweep import sweep, sweep_grid  # noqa: E402
from tailor_ui.pair import Pair  # noqa: E402


def grid(keeps: list[float], lams: list[float], compensations: list[str], anchor_weights: list[float]) -> list:
    values = {"keep": keeps, "alpha": [0.8], "lam": lams}
    plain = [c for c in compensations if c != "anchored"]
    tailor = sweep_grid(["tailor"], values, calibrated={"hessians": ["sequential"], "compensation": plain}) \
        if plain else []
    if "anchored" in compensations:
        tailor += sweep_grid(["tailor"], values, calibrated={"hessians": ["sequential"], "compensation": ["anchored"],
                                                             "anchor_weight": anchor_weights})
    return (tailor + sweep_grid(["magnitude", "ties", "dare"], {**values, "lam": [1.0]})
            + sweep_grid(["wise_ft"], values))


def lora_finetune(model, processor, story: Story, samples, layers: int, rank: int, seed: int) -> None:
    """The story's fine-tune as a LoRA of rank `rank` (α = 2r) on every linear of the last
    half of the decoder, merged into `model` afterwards."""
    from peft import LoraConfig, get_peft_model

    tuned = finetuned_layers(layers)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and tuned.search(n)]
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    batches = list(encode_epoch(processor, samples, story.batch, np.random.default_rng(seed)))
    train_batches(peft_model, batches, lambda name: "lora_" in name, lr=story.lr, epochs=story.epochs,
           weight_decay=0.0, warmup_steps=story.warmup, progress=print)
    peft_model.merge_and_unload()


def main() -> None:
    ap = story_parser(__doc__)
    ap.add_argument("--recipes", required=True,
                    help="comma-separated examples:epochs:lr:batch[:LoRA rank], e.g. 1200:1:1e-3:8")
    ap.add_argument("--keep", default="0.02,0.05,0.1,0.2")
    ap.add_argument("--lam", default="0.25,0.5,0.75")
    ap.add_argument("--compensation", default="greedy,exact",
                    help="Model Tailor's compensation forms: greedy, exact, anchored (the demo's "
                         "original-task calibration set)")
    ap.add_argument("--anchor-weight", default="1", help="comma-separated μ of anchored compensation")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    folder, shipped = open_story(args.story)
    processor, base = shipped.processor, shipped.base
    original = [EvalSet(name, name, read_examples(DEMO_DIR / f"{name}_eval.jsonl"))
                for name in ("caption", "vqa")]
    target = [EvalSet("target", "vqa", read_examples(folder / "target_eval.jsonl"))]
    batches = calibration_batches(processor, read_examples(folder / "target_calib.jsonl"), 16)
    settings = grid([float(k) for k in args.keep.split(",")], [float(x) for x in args.lam.split(",")],
                    args.compensation.split(","), [float(x) for x in args.anchor_weight.split(",")])
    anchor = calibration_batches(processor, demo_anchor(DEMO_DIR), 16)
    layers = base.config.text_config.num_hidden_layers
    tables = []
    for text in args.recipes.split(","):
        examples, epochs, lr, batch, *lora = text.split(":")
        story = Story(args.story, examples=int(examples), epochs=int(epochs), lr=float(lr),
                      batch=int(batch), warmup=20)
        tuned = copy.deepcopy(base)
        samples = world.generate(STORIES[args.story].task, story.examples, args.seed, TRAIN_STREAM)
        if lora:
            lora_finetune(tuned, processor, story, samples, layers, int(lora[0]), args.seed)
        else:
            finetune_story(tuned, processor, story, samples, layers, np.random.default_rng(args.seed), print)
        pair = Pair(base=base, finetuned=[tuned.eval()], processor=processor,
                    base_id="demo/base", finetuned_ids=[f"recipe {text}"])
        table = sweep(pair, settings, original, target, [batches], anchor=anchor, batch_size=50,
                      progress=lambda stage, *_: print(f"{text}: {stage}", flush=True))
        tables.append(table.assign(recipe=text, seed=args.seed))
        result = pd.concat(tables, ignore_index=True)
        args.out.write_text(result.to_csv(index=False))  # after each recipe: a long run keeps its rows
        print(table[["setting", "original_retention", "target_gain"]].round(3).to_string())
        print(f"{text}: baselines' lead over Model Tailor's front, in target examples:",
              front_gap(table, target[0]))


if __name__ == "__main__":
    main()
