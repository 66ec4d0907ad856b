"""Build a randomly initialised Llama- or LLaVA-shaped model and fine-tuned copies of it on
disk, in sharded safetensors, without ever holding a whole model in memory.

    python bench/make_random_model.py --preset llama-1b --finetuned 2 --out /tmp/bench/llama-1b

writes OUT/base, OUT/ft1, OUT/ft2 (config.json + shards + index). The checkpoint keys are
the ones transformers' `save_pretrained` writes (for LLaVA its legacy names), found with
transformers' own `revert_weight_conversion` on a meta-device skeleton. A fine-tuned copy
is the base plus `--delta`·N(0, 1) noise on every tensor whose parameter name matches
`--changed` (default: everything of the language model), every entry moved, or with
`--fraction F` a random share F of each such tensor's entries (a sparse-change fine-tune).

Tensors are written one at a time with `tailor_ui.checkpoint.ShardedWriter`; each value is
derived from a per-tensor seed, so runs are reproducible and the base is never re-read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tailor_ui.stream import ShardedWriter  # noqa: E402

TEXT = {  # Llama text models; 1b is TinyLlama-1.1B's shape
    "tiny": dict(hidden=64, intermediate=172, layers=2, heads=4, kv=2, vocab=1000),
    "s": dict(hidden=512, intermediate=1376, layers=8, heads=8, kv=4, vocab=32000),
    "m": dict(hidden=1024, intermediate=2816, layers=12, heads=16, kv=4, vocab=32000),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv=4, vocab=32000),
    "600m": dict(hidden=2048, intermediate=5632, layers=10, heads=32, kv=4, vocab=32000),  # 1.1 GB fp16
    "7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv=32, vocab=32000),
}
VISION = {  # CLIP towers; small images keep CPU calibration affordable (8x8 = 64 patches)
    "tiny": dict(hidden=64, intermediate=256, layers=2, heads=4, image=32, patch=8),
    "s": dict(hidden=384, intermediate=1536, layers=6, heads=6, image=112, patch=14),
    "m": dict(hidden=768, intermediate=3072, layers=12, heads=12, image=112, patch=14),
    "1b": dict(hidden=768, intermediate=3072, layers=12, heads=12, image=112, patch=14),
    "600m": dict(hidden=768, intermediate=3072, layers=12, heads=12, image=112, patch=14),
    "7b": dict(hidden=1024, intermediate=4096, layers=24, heads=16, image=336, patch=14),
}
IMAGE_TOKEN = 4  # <image>'s id in tailor_ui.demo.processor's vocabulary, so that processor fits


def text_config(size: str, depth: int = 1) -> dict:
    """The preset's text model; `depth` times its decoder layers."""
    t = TEXT[size]
    return dict(model_type="llama", vocab_size=t["vocab"], hidden_size=t["hidden"],
                intermediate_size=t["intermediate"], num_hidden_layers=depth * t["layers"],
                num_attention_heads=t["heads"], num_key_value_heads=t["kv"],
                max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_config(arch: str, size: str, dtype: str, depth: int = 1):
    from transformers import LlamaConfig, LlavaConfig

    if arch == "llama":
        config = LlamaConfig(**{k: v for k, v in text_config(size, depth).items() if k != "model_type"})
        config.architectures = ["LlamaForCausalLM"]
    else:
        v = VISION[size]
        vision = dict(model_type="clip_vision_model", hidden_size=v["hidden"],
                      intermediate_size=v["intermediate"], num_hidden_layers=v["layers"],
                      num_attention_heads=v["heads"], image_size=v["image"], patch_size=v["patch"],
                      projection_dim=v["hidden"])
        config = LlavaConfig(vision_config=vision, text_config=text_config(size, depth),
                             image_token_index=IMAGE_TOKEN,
                             image_seq_length=(v["image"] // v["patch"]) ** 2,
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             tie_word_embeddings=False)
        config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    return config


def checkpoint_layout(config) -> list[tuple[str, str, tuple[int, ...]]]:
    """(checkpoint key, parameter name, shape) as `save_pretrained` would write them."""
    import transformers
    from transformers.core_model_loading import revert_weight_conversion

    cls = getattr(transformers, config.architectures[0])
    with torch.device("meta"):
        model = cls._from_config(config)
    params = dict(model.named_parameters())
    state = {n: p for n, p in model.state_dict().items() if n in params}
    reverted = revert_weight_conversion(model, dict(state))
    if len(reverted) != len(state):
        raise SystemExit("this architecture fuses or splits tensors when saving; not supported here")
    names = _param_names(config, list(reverted))  # and back, as loading maps them
    return [(key, names[key], tuple(t.shape)) for key, t in reverted.items()]


def _param_names(config, keys: list[str]) -> dict[str, str]:
    import tempfile

    from tailor_ui.checkpoint import key_map

    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        return key_map(tmp, keys).param_of


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


def base_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                device: str = "cpu") -> torch.Tensor:
    """A random base tensor; on a GPU (`device`) the values differ from the CPU's, same seed."""
    if len(shape) == 1 and re.search(r"norm|layernorm", name, re.I) and name.endswith("weight"):
        return torch.ones(shape, dtype=dtype, device=device)
    if len(shape) == 1 and name.endswith("bias"):
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator(device=device).manual_seed(_seed(seed, "base", name))
    return (0.02 * torch.randn(shape, generator=gen, device=device)).to(dtype)


def tuned_tensor(base: torch.Tensor, name: str, seed: int, k: int, delta: float,
                 fraction: float = 1.0) -> torch.Tensor:
    """The base moved by delta·N(0, 1) on a random `fraction` of its entries (all: a dense
    fine-tune), each of them moved (rounding may have left some equal)."""
    gen = torch.Generator(device=base.device).manual_seed(_seed(seed, "ft", k, name))
    new = (base.float() + delta * torch.randn(base.shape, generator=gen, device=base.device)).to(base.dtype)
    new = torch.where(new == base, torch.nextafter(base, torch.full_like(base, float("inf"))), new)
    if fraction >= 1.0:
        return new
    moved = torch.rand(base.shape, generator=gen, device=base.device) < fraction
    return torch.where(moved, new, base)


def build(out: Path, arch: str, size: str, finetuned: int, changed: str | None, delta: float,
          dtype: str, shard_mb: int, seed: int, device: str = "cpu", fraction: float = 1.0,
          depth: int = 1) -> dict:
    """`device`: where the random values are drawn (a GPU builds a 7B pair in seconds);
    `depth`: times the preset's decoder layers."""
    torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    config = make_config(arch, size, dtype, depth)
    layout = checkpoint_layout(config)
    pattern = re.compile(changed or (r"language_model|^model\.layers|embed_tokens|^model\.norm|lm_head"))
    folders = [out / "base"] + [out / f"ft{k + 1}" for k in range(finetuned)]
    writers = []
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        writers.append(ShardedWriter(folder, [(key, torch_dtype, shape) for key, _, shape in layout],
                                     shard_mb * 2**20))
    start = time.perf_counter()
    params = changed_params = changed_entries = 0
    for key, name, shape in layout:
        b = base_tensor(name, shape, seed, torch_dtype, device)
        writers[0].write(key, b.cpu())
        hit = bool(pattern.search(name))
        for k, writer in enumerate(writers[1:]):
            tuned = tuned_tensor(b, name, seed, k, delta, fraction) if hit else b
            changed_entries += int((tuned != b).sum()) if k == 0 else 0
            writer.write(key, tuned.cpu())
        params += b.numel()
        changed_params += b.numel() if hit else 0
    for writer in writers:
        writer.close()
    info = {"arch": arch, "size": size, "depth": depth, "dtype": dtype, "parameters": params,
            "changed_parameters": changed_params, "tensors": len(layout), "finetuned": finetuned,
            "fraction": fraction, "changed_entries_ft1": changed_entries,
            "changed_fraction_ft1": changed_entries / params, "delta": delta, "seed": seed,
            "seconds": round(time.perf_counter() - start, 1),
            "folders": [str(f) for f in folders]}
    (out / "model_info.json").write_text(json.dumps(info, indent=2))
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", default="llama-1b",
                   help="ARCH-SIZE with ARCH llama|llava and SIZE " + "|".join(TEXT))
    p.add_argument("--finetuned", type=int, default=2, help="how many fine-tuned copies")
    p.add_argument("--changed", default=None, help="regex over parameter names fine-tuning moves")
    p.add_argument("--delta", type=float, default=0.002, help="std of the fine-tuning noise")
    p.add_argument("--fraction", type=float, default=1.0,
                   help="share of each changed tensor's entries the fine-tune moves (1: all, a dense fine-tune)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--shard-mb", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    arch, _, size = args.preset.partition("-")
    if arch not in ("llama", "llava") or size not in TEXT:
        p.error(f"unknown preset {args.preset!r}")
    info = build(args.out, arch, size, args.finetuned, args.changed, args.delta, args.dtype,
                 args.shard_mb, args.seed, fraction=args.fraction)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
