"""A real `LlavaProcessor` for the shapes world, made offline.

Word-level tokenizer (the world has a few dozen words), a CLIP image processor sized for
the world's images, and a plain "USER: <image> question ASSISTANT: answer</s>" chat template.
Saved with `save_pretrained`, it loads back through `AutoProcessor` like a hub processor.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
CHAT_WORDS = ("user", "assistant", ":")

# Roles as "USER:" / "ASSISTANT:"; content is a string or a list of image/text items.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'USER:' }}"
    "{%- else -%}{{ ' ASSISTANT:' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ ' ' + message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ ' <image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ ' ' + item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """Whole-word vocabulary: special tokens first (ids 0-4), then the chat words and `words`."""
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *CHAT_WORDS, *words]))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()  # users may type "What colour..."
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words, and "?" / ":" on their own
    core.decoder = decoders.WordPiece(cleanup=True)  # words joined by spaces, "circle?" kept tight
    # Like Llama's tokenizer: <s> in front of every encoded text.
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=256)
    return tokenizer


def build_processor(words: Sequence[str], *, image_size: int, patch_size: int) -> LlavaProcessor:
    """The processor the demo models ship with; one `<image>` token per vision patch."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=build_tokenizer(words), patch_size=patch_size,
        vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        image_token=IMAGE, num_additional_image_tokens=1)  # CLIP's CLS, dropped by "default"
