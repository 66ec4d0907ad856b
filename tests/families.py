"""Tiny, randomly initialised MLLMs of several families, with inputs their forward accepts.

Families: LLaVA (CLIP + Llama), Qwen2-VL, InstructBLIP (Llama), BLIP-2 (OPT, tied
lm_head) and Idefics3 (SigLIP-style + Llama, several images per sample).

Helpers for the tests (not a conftest): everything is built from transformers configs,
offline, in well under a second per model.

`FAMILIES[name]` is a `Family`:

- `build(seed=0, *, hidden=32, intermediate=64, layers=2)`: the model, in eval mode;
  the keyword arguments make models of other sizes (for mismatch tests).
- `batches(config, n=2, *, batch_size=2, seed=0)`: `n` calibration batches, plain dicts of
  model kwargs laid out as the family's processor lays them out (image placeholder counts,
  pixel shapes, `image_grid_thw`/`mm_token_type_ids`, `qformer_input_ids`, padding
  images…), right-padded with attention masks that have zeros.
- `finetuned`: regex (re.search on parameter names) of what a fine-tuning of this family
  changes: the last language-decoder layer, or for InstructBLIP the last Q-Former layer
  (the part InstructBLIP fine-tunes and docs/methods.md#tensors tailors). Use with `finetune_like`.
- `processor()`: the family's real processor, matching the model's token ids and image
  geometry.

All families share one tiny word-level vocabulary (`VOCAB`), so token ids in configs,
processors and synthetic batches agree.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tailor_ui.pair import Pair

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach the hub

Batch = dict[str, torch.Tensor]

# ---------------------------------------------------------------------------- vocabulary

PAD, BOS, EOS, UNK, USER, ASSISTANT, COLON = 0, 1, 2, 3, 4, 5, 6
FIRST_WORD, NUM_WORDS = 7, 83  # ordinary text tokens "w0".."w82" are ids 7..89
IMAGE = 90  # "<image>" (LLaVA, InstructBLIP, Idefics3)
QWEN_IMAGE, QWEN_VIDEO, VISION_START, VISION_END = 91, 92, 93, 94
FAKE_AROUND_IMAGE, END_OF_UTTERANCE, GLOBAL_IMG = 95, 96, 97
VOCAB_SIZE = 100  # the models' embedding size (≥ the tokenizer's 98 entries)

VOCAB: dict[str, int] = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK,
                         "user": USER, "assistant": ASSISTANT, ":": COLON}
VOCAB.update({f"w{i}": FIRST_WORD + i for i in range(NUM_WORDS)})
SPECIAL_TOKENS = {"<image>": IMAGE, "<|image_pad|>": QWEN_IMAGE, "<|video_pad|>": QWEN_VIDEO,
                  "<|vision_start|>": VISION_START, "<|vision_end|>": VISION_END,
                  "<fake_token_around_image>": FAKE_AROUND_IMAGE,
                  "<end_of_utterance>": END_OF_UTTERANCE, "<global-img>": GLOBAL_IMG}
VOCAB.update(SPECIAL_TOKENS)

# user: <image> question \n assistant: answer </s>   (the image marker is per family)
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %} IMAGE"
    "{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %} </s>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}")


def chat_template(image_marker: str) -> str:
    return _CHAT_TEMPLATE.replace("IMAGE", image_marker)


def tokenizer() -> Any:
    """A word-level fast tokenizer over `VOCAB`, with the multimodal specials marked special."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<s>", eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    assert all(tok.convert_tokens_to_ids(t) == i for t, i in SPECIAL_TOKENS.items())
    return tok


# ------------------------------------------------------------------------ shared bits

IMAGE_SIZE, PATCH = 16, 4
MIN_TEXT_LEN = 24  # longer than any vision/Q-Former sequence here (see `_pad_rows`)


def _llama(hidden: int, intermediate: int, layers: int, **extra: Any) -> dict:
    return dict(model_type="llama", vocab_size=VOCAB_SIZE, hidden_size=hidden,
                intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False, **extra)


def _vision(hidden: int, intermediate: int, layers: int) -> dict:
    """CLIP / SigLIP / BLIP-style vision tower: 16×16 images in 4×4 patches (16 patches)."""
    return dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH)


def _build(model_class: type, config: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_class(config).eval()


def _words(gen: torch.Generator, low: int, high: int) -> list[int]:
    n = int(torch.randint(low, high + 1, (1,), generator=gen))
    return (FIRST_WORD + torch.randint(0, NUM_WORDS, (n,), generator=gen)).tolist()


def _chat(gen: torch.Generator, image_part: list[int]) -> list[int]:
    """user: <image part> question \\n assistant: answer </s> (as the chat template writes it)."""
    return [USER, COLON] + image_part + _words(gen, 2, 6) + [ASSISTANT, COLON] + _words(gen, 1, 5) + [EOS]


def _pad_rows(rows: list[list[int]], min_len: int = MIN_TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a common length (at least `min_len`, and always with some padding).

    The minimum keeps the text length distinct from every vision / Q-Former sequence length
    of these tiny models (≤ 17), so no layer's input can be mistaken for the text's.
    """
    length = max(max(len(r) for r in rows) + 1, min_len)
    ids = torch.full((len(rows), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


# ------------------------------------------------------------------------------ LLaVA

def build_llava(seed: int = 0, *, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision = dict(_vision(hidden, intermediate, layers), model_type="clip_vision_model",
                  projection_dim=hidden)
    config = LlavaConfig(vision_config=vision, text_config=_llama(hidden, intermediate, layers),
                         image_token_index=IMAGE, image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return _build(LlavaForConditionalGeneration, config, seed)


def _llava_image_tokens(config: Any) -> int:
    """Patches, plus CLS unless the "default" strategy drops it."""
    vc = config.vision_config
    tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    return tokens - 1 if config.vision_feature_select_strategy == "default" else tokens


def llava_batches(config: Any, n: int = 2, *, batch_size: int = 2, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    image = [config.image_token_id] * _llava_image_tokens(config)
    size = config.vision_config.image_size
    out = []
    for _ in range(n):
        ids, mask = _pad_rows([_chat(gen, image) for _ in range(batch_size)])
        out.append({"input_ids": ids, "attention_mask": mask,
                    "pixel_values": _pixels(gen, batch_size, 3, size, size)})
    return out


def llava_processor() -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=chat_template("<image>"))


# ---------------------------------------------------------------------------- Qwen2-VL

QWEN_TEMPORAL_PATCH, QWEN_MERGE = 2, 2


def build_qwen2_vl(seed: int = 0, *, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    head_dim = hidden // 4
    # M-RoPE splits the rotary half-dimension over (temporal, height, width)
    half = head_dim // 2
    section = [half - 2 * (half // 4), half // 4, half // 4]
    text = _llama(hidden, intermediate, layers,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    text.pop("model_type")
    vision = dict(depth=layers, embed_dim=hidden, hidden_size=hidden, num_heads=4,
                  mlp_ratio=max(1, intermediate // hidden), patch_size=PATCH, spatial_merge_size=QWEN_MERGE,
                  temporal_patch_size=QWEN_TEMPORAL_PATCH, in_channels=3)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=QWEN_IMAGE,
                           video_token_id=QWEN_VIDEO, vision_start_token_id=VISION_START,
                           vision_end_token_id=VISION_END)
    return _build(Qwen2VLForConditionalGeneration, config, seed)


# (t, h, w) patch grids; h and w divisible by the merge size. Images of different sizes.
_QWEN_GRIDS = [(1, 4, 4), (1, 4, 6), (1, 2, 4)]


def qwen2_vl_batches(config: Any, n: int = 2, *, batch_size: int = 2, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    vc = config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    out = []
    for b in range(n):
        grids = [_QWEN_GRIDS[(b + i) % len(_QWEN_GRIDS)] for i in range(batch_size)]
        rows = []
        for t, h, w in grids:
            tokens = t * h * w // vc.spatial_merge_size ** 2
            rows.append(_chat(gen, [config.vision_start_token_id] + [config.image_token_id] * tokens
                              + [config.vision_end_token_id]))
        ids, mask = _pad_rows(rows)
        patches = sum(t * h * w for t, h, w in grids)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "mm_token_type_ids": (ids == config.image_token_id).int(),
                    "pixel_values": _pixels(gen, patches, patch_dim),
                    "image_grid_thw": torch.tensor(grids, dtype=torch.long)})
    return out


def qwen2_vl_processor() -> Any:
    """Qwen2-VL's own processor at the tiny model's geometry: patch 4, merge 2, and a pixel
    budget that keeps small images at a few patches (its video processor needs torchvision)."""
    from transformers import Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    geometry = dict(patch_size=PATCH, merge_size=QWEN_MERGE, temporal_patch_size=QWEN_TEMPORAL_PATCH)
    images = Qwen2VLImageProcessorPil(min_pixels=64, max_pixels=256, **geometry)
    videos = Qwen2VLVideoProcessor(min_pixels=64, max_pixels=256, **geometry)
    return Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer(), video_processor=videos,
                            chat_template=chat_template("<|vision_start|><|image_pad|><|vision_end|>"))


# ------------------------------------------------------------------------- InstructBLIP

INSTRUCTBLIP_QUERIES = 4


def build_instructblip(seed: int = 0, *, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    qformer = dict(vocab_size=VOCAB_SIZE, hidden_size=hidden, num_hidden_layers=layers,
                   num_attention_heads=4, intermediate_size=intermediate, encoder_hidden_size=hidden,
                   max_position_embeddings=64, cross_attention_frequency=1, pad_token_id=PAD)
    config = InstructBlipConfig(vision_config=_vision(hidden, intermediate, layers), qformer_config=qformer,
                                text_config=_llama(hidden, intermediate, layers),
                                num_query_tokens=INSTRUCTBLIP_QUERIES, image_token_index=IMAGE)
    return _build(InstructBlipForConditionalGeneration, config, seed)


def instructblip_batches(config: Any, n: int = 2, *, batch_size: int = 2, seed: int = 0) -> list[Batch]:
    """The processor's layout: num_query_tokens image tokens, then the text; the Q-Former
    reads the instruction (the question) with its own padding mask."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    out = []
    for _ in range(n):
        rows = [[config.image_token_id] * config.num_query_tokens + _chat(gen, [])
                for _ in range(batch_size)]
        ids, mask = _pad_rows(rows)
        questions = [_words(gen, 2, 6) for _ in range(batch_size)]
        q_ids, q_mask = _pad_rows(questions, min_len=0)
        out.append({"input_ids": ids, "attention_mask": mask,
                    "qformer_input_ids": q_ids, "qformer_attention_mask": q_mask,
                    "pixel_values": _pixels(gen, batch_size, 3, size, size)})
    return out


def instructblip_processor() -> Any:
    from transformers import InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    images = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = InstructBlipProcessor(image_processor=images, tokenizer=tokenizer(),
                                      qformer_tokenizer=tokenizer(), num_query_tokens=INSTRUCTBLIP_QUERIES)
    # InstructBlipProcessor.__init__ takes no chat_template (it is lost on reload, too)
    processor.chat_template = chat_template("")
    return processor


# ------------------------------------------------------------------------------ BLIP-2

def build_blip2(seed: int = 0, *, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> torch.nn.Module:
    """BLIP-2 with an OPT decoder (fc1/fc2, biases everywhere, lm_head tied to the embeddings)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    qformer = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                   intermediate_size=intermediate, encoder_hidden_size=hidden, cross_attention_frequency=1)
    text = dict(model_type="opt", vocab_size=VOCAB_SIZE, hidden_size=hidden, ffn_dim=intermediate,
                num_hidden_layers=layers, num_attention_heads=4, word_embed_proj_dim=hidden,
                max_position_embeddings=256, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    config = Blip2Config(vision_config=_vision(hidden, intermediate, layers), qformer_config=qformer,
                         text_config=text, num_query_tokens=INSTRUCTBLIP_QUERIES, image_token_index=IMAGE)
    return _build(Blip2ForConditionalGeneration, config, seed)


def blip2_batches(config: Any, n: int = 2, *, batch_size: int = 2, seed: int = 0) -> list[Batch]:
    """num_query_tokens image tokens, then the text (the Q-Former reads no text)."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    out = []
    for _ in range(n):
        ids, mask = _pad_rows([[config.image_token_id] * config.num_query_tokens + _chat(gen, [])
                               for _ in range(batch_size)])
        out.append({"input_ids": ids, "attention_mask": mask,
                    "pixel_values": _pixels(gen, batch_size, 3, size, size)})
    return out


def blip2_processor() -> Any:
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    images = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Blip2Processor(image_processor=images, tokenizer=tokenizer(),
                               num_query_tokens=INSTRUCTBLIP_QUERIES)
    processor.chat_template = chat_template("")  # dropped by __init__ and on reload, as InstructBLIP's
    return processor


# ----------------------------------------------------------------------------- Idefics3

IDEFICS3_SCALE = 2


def build_idefics3(seed: int = 0, *, hidden: int = 32, intermediate: int = 64, layers: int = 2) -> torch.nn.Module:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    config = Idefics3Config(vision_config=_vision(hidden, intermediate, layers),
                            text_config=_llama(hidden, intermediate, layers),
                            image_token_id=IMAGE, scale_factor=IDEFICS3_SCALE, pad_token_id=PAD)
    return _build(Idefics3ForConditionalGeneration, config, seed)


def _idefics3_image_tokens(config: Any) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 // config.scale_factor ** 2


def idefics3_batches(config: Any, n: int = 2, *, batch_size: int = 2, seed: int = 0) -> list[Batch]:
    """One image per sample except the first, which has two; missing images are the
    all-zero padding images (and zero pixel masks) that the processor writes."""
    gen = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    image = ([FAKE_AROUND_IMAGE, GLOBAL_IMG] + [config.image_token_id] * _idefics3_image_tokens(config)
             + [FAKE_AROUND_IMAGE])
    counts = [2] + [1] * (batch_size - 1)
    out = []
    for _ in range(n):
        ids, mask = _pad_rows([_chat(gen, image * c) for c in counts])
        pixels = torch.zeros(batch_size, max(counts), 3, size, size)
        pixel_mask = torch.zeros(batch_size, max(counts), size, size, dtype=torch.long)
        for i, c in enumerate(counts):
            pixels[i, :c] = _pixels(gen, c, 3, size, size)
            pixel_mask[i, :c] = 1
        out.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
                    "pixel_attention_mask": pixel_mask})
    return out


def idefics3_processor() -> Any:
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    images = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                       max_image_size={"longest_edge": IMAGE_SIZE})
    return Idefics3Processor(image_processor=images, tokenizer=tokenizer(),
                             image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // IDEFICS3_SCALE ** 2,
                             chat_template=chat_template("<image>"))


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Family:
    build: Callable[..., torch.nn.Module]
    batches: Callable[..., list[Batch]]
    finetuned: str
    processor: Callable[[], Any]


FAMILIES: dict[str, Family] = {
    "llava": Family(build=build_llava, batches=llava_batches,
                    finetuned=r"^model\.language_model\.layers\.1\.", processor=llava_processor),
    "qwen2_vl": Family(build=build_qwen2_vl, batches=qwen2_vl_batches,
                       finetuned=r"^model\.language_model\.layers\.1\.", processor=qwen2_vl_processor),
    "instructblip": Family(build=build_instructblip, batches=instructblip_batches,
                           finetuned=r"^qformer\.encoder\.layer\.1\.", processor=instructblip_processor),
    "blip2": Family(build=build_blip2, batches=blip2_batches,
                    finetuned=r"^language_model\.model\.decoder\.layers\.1\.", processor=blip2_processor),
    "idefics3": Family(build=build_idefics3, batches=idefics3_batches,
                       finetuned=r"^model\.text_model\.layers\.1\.", processor=idefics3_processor),
}


# -------------------------------------------------------------------- fine-tuning stand-in

def matching(model: torch.nn.Module, pattern: str) -> list[str]:
    """Parameter names that `pattern` finds (re.search), in model order."""
    regex = re.compile(pattern)
    return [n for n, _ in model.named_parameters() if regex.search(n)]


def finetune_like(model: torch.nn.Module, pattern: str, scale: float = 0.02, seed: int = 0) -> torch.nn.Module:
    """A deep copy whose parameters matching `pattern` moved by `scale`·N(0, 1) noise.

    Every entry of every matching tensor changes (an entry the noise left equal, by
    rounding, takes the next float up), so "changed" is exactly the matching tensors.
    """
    names = matching(model, pattern)
    if not names:
        raise ValueError(f"no parameter matches {pattern!r}")
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for name in names:
            p = params[name]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)
            new = p + scale * noise
            new = torch.where(new == p, torch.nextafter(p, torch.full_like(p, float("inf"))), new)
            p.copy_(new)
    return tuned


def tiny_demo_model(seed: int = 0):
    """The demo's own LLaVA recipe and processor at test size (training tests use it)."""
    from tailor_ui.demo import world
    from tailor_ui.demo.model import DemoArch, make_model
    from tailor_ui.demo.processor import build_processor

    processor = build_processor(world.vocabulary(), image_size=32, patch_size=16)
    torch.manual_seed(seed)
    arch = DemoArch(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1,
                    text_hidden=32, text_layers=2, heads=2)
    return make_model(processor, arch).eval(), processor


def tiny_llava(processor: Any, seed: int = 0, *, intermediate: int = 128) -> torch.nn.Module:
    """A tiny LLaVA (CLIP + Llama) whose token ids and image geometry fit `processor` (the
    demo's offline processor at 32 px, patch 8): saved with it, a loadable model folder."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       vocab_size=len(processor.tokenizer), max_position_embeddings=128,
                       pad_token_id=processor.tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="default",
                         image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"))
    return LlavaForConditionalGeneration(config).eval()


def tuned_decoder_pair() -> Pair:
    """A tiny LLaVA and a fine-tune of its decoder layers (Model Tailor's engine tests)."""
    tuned = finetune_like(build_llava(seed=0), r"^model\.language_model\.layers\.\d\.", seed=1)
    return Pair(base=build_llava(seed=0), finetuned=[tuned], processor=None)


def patched_weight(pair: Pair, patch, name: str) -> torch.Tensor:
    """Linear `name`'s base weight with the patch's entries written in."""
    w = pair.base.get_parameter(f"{name}.weight").detach().clone().reshape(-1)
    tp = patch.tensors[f"{name}.weight"]
    w[tp.index] = tp.values
    return w.reshape(pair.base.get_parameter(f"{name}.weight").shape)

