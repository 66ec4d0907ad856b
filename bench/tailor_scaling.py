"""Model Tailor's cost against model size on the CPU, stage by stage, with its memory bound.

    python bench/tailor_scaling.py --sizes demo,tiny,s,m,1b --results bench/results/tailor_scaling.json

Sizes: `demo` is the built-in demo pair (assets/demo, its own calibration set); the others
are random LLaVA-shaped pairs from make_random_model.py (CLIP tower + Llama decoder;
112x112 images -> 64 image tokens; fine-tuning moved the last half of the decoder layers,
as in the demo recipe), with synthetic calibration batches of the same token layout.
Each size runs in a fresh subprocess, so its peak RSS (os.wait4's ru_maxrss) is its own.

Loading (`--loading`): `lazy` loads the base only and reads the fine-tuned weights from
their shards when a block needs them (what `python -m tailor_ui tailor` does); `memory`
loads both models (the dashboard's pair, `--in-memory`); `both` runs each.

Stages (seconds): load (the loaded models, float32), forward (one plain pass over the
calibration batches, no hooks), calibration (the engine's hooked passes: forward + Hessian
accumulation; Hessians ~= calibration - forward in one-pass mode), scores (damped Cholesky
inverse factor + z-scored salience/sensitivity), selection, compensation, writing (the patch
file, then the tailored model streamed from base + patch).

Memory bound (bytes), checked against the measured peak for every size:

    M0 + W + Σ_lin (8·d_out·d_in + 4·d_in²) + 4·Σ_H d_in² + keep·P_lin·(8 + b) + A

    W = (1 + n)·P·b                      both models loaded (memory)
    W = P·b + C·b                         lazy, one-pass: the base holds the fine-tuned values
                                          of the C changed entries, their base values wait
    W = P·b + 2·B·b                       lazy, sequential: one block's B linear entries read,
                                          and their base values parked while it calibrates

M0 the software stack (peak RSS up to the end of loading, less the loaded weights), P
parameters, b bytes per parameter as loaded, n fine-tuned models, C entries of the changed
tensors, B entries of the largest block's tailored linears, Σ_lin over the tailored linears (cached
float32 salience and sensitivity z-scores, float32 inverse-Hessian factor), Σ_H over the
distinct layer inputs whose Hessians are alive at once (one-pass: all of them; sequential:
one block's), the patch (int64 index + value per kept entry), and A one batch's
activations at their widest, 4·(2·N·V + 3·N·d_ff + N·T·h) for N tokens in the batch (T
per row), V the vocabulary, d_ff the MLP width, h attention heads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def synthetic_batches(config, n: int, batch_size: int, text_tokens: int, seed: int = 0) -> list[dict]:
    """LLaVA inputs: <s> <image>×seq text… with real image-token placement, right padding."""
    gen = torch.Generator().manual_seed(seed)
    vision = config.vision_config
    image_tokens = config.image_seq_length
    vocab = config.text_config.vocab_size
    batches = []
    for start in range(0, n, batch_size):
        rows = min(batch_size, n - start)
        lengths = torch.randint(text_tokens // 2, text_tokens + 1, (rows,), generator=gen)
        width = 1 + image_tokens + int(lengths.max())
        ids = torch.zeros((rows, width), dtype=torch.long)
        mask = torch.zeros((rows, width), dtype=torch.long)
        for r in range(rows):
            n_text = int(lengths[r])
            text = torch.randint(10, vocab, (n_text,), generator=gen)
            row = torch.cat([torch.tensor([1]), torch.full((image_tokens,), config.image_token_index), text])
            ids[r, :len(row)] = row
            mask[r, :len(row)] = 1
        pixels = torch.randn(rows, 3, vision.image_size, vision.image_size, generator=gen)
        batches.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels})
    return batches


def _distinct_inputs(linears: list[str]) -> list[str]:
    """Linears that own a Hessian accumulator (q/k/v share one, gate/up share one)."""
    shared = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    return [n for n in linears if n.rsplit(".", 1)[-1] not in shared]


def child(args: argparse.Namespace) -> None:
    from tailor_ui.calibration import calibration_batches
    from tailor_ui.weights import to_model
    from tailor_ui.data import read_examples
    from tailor_ui.engine import run_method, selected_linears
    from tailor_ui.pair import load_pair
    from tailor_ui.patch import save_patch
    from tailor_ui.settings import Settings
    from tailor_ui.memory import current_rss_mb, peak_rss_mb
    from tailor_ui.stream import stream_apply_patch

    torch.set_num_threads(args.threads)
    out: dict = {"size": args.size, "hessians": args.hessians, "loading": args.loading,
                 "rss_before_load_mb": current_rss_mb()}
    start = time.perf_counter()
    pair = load_pair(str(args.base), str(args.ft), dtype="float32", lazy=args.loading == "lazy")
    out["load_s"] = time.perf_counter() - start
    loaded = [m for m in (pair.base, *pair.finetuned) if isinstance(m, torch.nn.Module)]
    held = sum(t.numel() * t.element_size() for m in loaded for t in (*m.parameters(), *m.buffers()))
    # the software stack: the peak so far (loading's transients included) less the weights
    m0 = peak_rss_mb() - held / 2**20
    out["rss_after_load_mb"] = current_rss_mb()
    out["peak_after_load_mb"] = peak_rss_mb()
    if args.calib_jsonl:
        batches = calibration_batches(pair.processor, read_examples(args.calib_jsonl)[: args.calib], 8)
    else:
        batches = synthetic_batches(pair.base.config, args.calib, args.batch_size, args.text_tokens)
    out["calibration_examples"] = sum(int(b["input_ids"].shape[0]) for b in batches)
    out["calibration_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
    start = time.perf_counter()
    with torch.inference_mode():  # the base: the same architecture, so the same cost
        for b in batches:
            pair.base(**to_model(b, pair.base))
    out["forward_s"] = time.perf_counter() - start
    settings = Settings(method="tailor", keep=0.1, hessians=args.hessians)
    result = run_method(pair, settings, [batches])
    out["engine_timings_s"] = result.report["timings_s"]
    out["engine_memory"] = result.report["memory"]
    patch_dir = Path(args.work) / "patch"
    patch_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    save_patch(result.patch, patch_dir / "patch.safetensors")
    out["write_patch_s"] = time.perf_counter() - start
    start = time.perf_counter()
    stream_apply_patch(args.base, result.patch, Path(args.work) / "tailored")
    out["write_model_s"] = time.perf_counter() - start
    # the bound's terms, from the model itself
    params = dict(pair.base.named_parameters())
    linears = selected_linears(pair)
    b = 4  # float32 as loaded
    P = sum(p.numel() for p in params.values())
    p_lin = sum(params[f"{n}.weight"].numel() for n in linears)
    cache = sum(8 * params[f"{n}.weight"].numel() + 4 * params[f"{n}.weight"].shape[1] ** 2 for n in linears)
    owners = _distinct_inputs(linears)
    hess_all = sum(4 * params[f"{n}.weight"].shape[1] ** 2 for n in owners)
    if args.hessians == "sequential":
        from tailor_ui.names import layer_groups

        hess = max(sum(4 * params[f"{n}.weight"].shape[1] ** 2 for n in _distinct_inputs(g))
                   for g in layer_groups(linears))
    else:
        hess = hess_all
    # one batch's activations at their widest: logits (float32, and the copy the loss-free
    # head still makes), the MLP's three intermediate tensors, attention scores
    text = pair.base.config.text_config if hasattr(pair.base.config, "text_config") else pair.base.config
    rows = max(int(x["input_ids"].numel()) for x in batches)
    width = max(int(x["input_ids"].shape[1]) for x in batches)
    heads = text.num_attention_heads
    activations = 4 * (2 * rows * text.vocab_size + 3 * rows * text.intermediate_size
                       + rows * width * heads)
    if args.loading == "memory":
        weights = 2 * P * b
    elif args.hessians == "sequential":
        from tailor_ui.names import layer_groups

        weights = P * b + 2 * b * max(sum(params[f"{n}.weight"].numel() for n in g) for g in layer_groups(linears))
    else:
        weights = P * b + b * sum(params[n].numel() for n in pair.changed())
    terms = {"M0": m0 * 2**20, "models": weights, "cache": cache, "hessians": hess,
             "patch": 0.1 * p_lin * (8 + b), "activations": activations}
    out.update(parameters=P, tailored_linears=len(linears), tailored_parameters=p_lin,
               bound_terms_mb={k: round(v / 2**20, 1) for k, v in terms.items()},
               bound_mb=round(sum(terms.values()) / 2**20, 1), peak_rss_self_mb=peak_rss_mb())
    print("RESULT " + json.dumps(out), flush=True)


def ensure_model(size: str, root: Path) -> tuple[Path, Path, Path | None]:
    if size == "demo":
        demo = ROOT / "assets" / "demo"
        return demo / "base", demo / "finetuned", demo / "target_calib.jsonl"
    from make_random_model import TEXT, build

    folder = root / f"llava-{size}"
    if not (folder / "model_info.json").exists():
        layers = TEXT[size]["layers"]
        half = "|".join(str(i) for i in range(layers // 2, layers))
        build(folder, "llava", size, 1, rf"language_model\.layers\.({half})\.", 0.002, "float16", 1000, 0)
    return folder / "base", folder / "ft1", None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="demo,tiny,s,m,1b")
    p.add_argument("--hessians", default="one-pass", help="one-pass | sequential | both")
    p.add_argument("--loading", default="lazy", help="lazy | memory | both (see above)")
    p.add_argument("--models", type=Path, default=Path("/tmp/bench/scaling"))
    p.add_argument("--calib", type=int, default=8, help="calibration examples")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: steady timings on a shared machine, see docs/results.md)")
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--keep-models", action="store_true")
    # internal: one measured run
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--ft", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--calib-jsonl", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)
    modes = ["one-pass", "sequential"] if args.hessians == "both" else [args.hessians]
    loadings = ["memory", "lazy"] if args.loading == "both" else [args.loading]
    rows = []
    for size in args.sizes.split(","):
        base, ft, calib_jsonl = ensure_model(size, args.models)
        for mode, loading in [(m, lo) for m in modes for lo in loadings]:
            work = args.models / f"work-{size}-{mode}-{loading}"
            subprocess.run(["rm", "-rf", str(work)], check=True)
            cmd = [sys.executable, __file__, "--child", "--size", size, "--base", str(base), "--ft", str(ft),
                   "--work", str(work), "--hessians", mode, "--calib", str(args.calib if size != "demo" else 128),
                   "--batch-size", str(args.batch_size), "--text-tokens", str(args.text_tokens),
                   "--threads", str(args.threads), "--loading", loading]
            if calib_jsonl:
                cmd += ["--calib-jsonl", str(calib_jsonl)]
            load = os.getloadavg()
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            text = proc.stdout.read().decode(errors="replace")
            _, status, usage = os.wait4(proc.pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                raise SystemExit(f"{size} {mode} {loading} failed:\n{text[-3000:]}")
            row = json.loads(next(l for l in text.splitlines() if l.startswith("RESULT "))[7:])
            row.update(wall_s=round(time.perf_counter() - start, 1), load_avg_before=load,
                       peak_rss_mb=round(usage.ru_maxrss / 1024, 1))
            row["within_bound"] = row["peak_rss_mb"] <= row["bound_mb"]
            rows.append(row)
            t = row["engine_timings_s"]
            print(json.dumps({"size": size, "mode": mode, "loading": loading, "P": row["parameters"], "load": round(row["load_s"], 1),
                              "forward": round(row["forward_s"], 2),
                              **{k: round(v, 2) for k, v in t.items()},
                              "write": round(row["write_patch_s"] + row["write_model_s"], 2),
                              "peak_rss_mb": row["peak_rss_mb"], "bound_mb": row["bound_mb"],
                              "engine_peak_mb": round(row["engine_memory"]["cpu_peak_rss_mb"], 1)}), flush=True)
            subprocess.run(["rm", "-rf", str(work)], check=True)
        if not args.keep_models and size != "demo":
            subprocess.run(["rm", "-rf", str(args.models / f"llava-{size}")], check=True)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
