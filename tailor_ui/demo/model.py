"""The demo's model architecture: a LLaVA in miniature, built from configs.

A small CLIP vision tower, LLaVA's two-layer MLP projector and a small Llama decoder; the
same classes and tensor names as `llava-hf` checkpoints, so every code path the product
runs on a real LLaVA (layer naming, hooks, patching) runs on the demo too.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)


@dataclass(frozen=True)
class DemoArch:
    image_size: int = 48
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 3
    text_hidden: int = 128
    text_layers: int = 4
    heads: int = 4


def make_model(processor: LlavaProcessor, arch: DemoArch) -> LlavaForConditionalGeneration:
    """A freshly initialised model whose vocabulary and image tokens match `processor`."""
    tok = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.heads,
        image_size=arch.image_size, patch_size=arch.patch_size, hidden_act="gelu")
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=arch.text_hidden,
        intermediate_size=int(8 / 3 * arch.text_hidden) // 16 * 16,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
        image_seq_length=(arch.image_size // arch.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1)  # the tower is shallow: use all of it
    model = LlavaForConditionalGeneration(config)
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    gen.do_sample, gen.max_new_tokens = False, 32
    return model
