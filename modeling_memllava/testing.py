"""Builders for tiny, randomly initialised models used by the tests, the benchmarks and the offline demo.

One place defines the tiny shapes so nobody rewrites them. Nothing here downloads anything.
"""

from __future__ import annotations

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

from .configuration_memllava import MEMORY_FIELDS, MemLlavaOnevisionConfig


# Token ids of the embedded tiny tokenizer: 256 byte-level tokens, then the special tokens in this order.
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")
TINY_PAD_TOKEN_ID = 256
TINY_EOS_TOKEN_ID = 258  # <|im_end|>, as in Qwen2 chat checkpoints
TINY_IMAGE_TOKEN_ID = 259
TINY_VIDEO_TOKEN_ID = 260
TINY_VOCAB_SIZE = 288  # tokenizer has 261 entries; rounded up like real checkpoints pad their embedding

# Tiny vision tower: 64px frames, 8px patches -> 8x8 patch grid -> LLaVA-OV pooling -> 4x4 = 16 tokens per frame.
TINY_IMAGE_SIZE = 64
TINY_PATCH_SIZE = 8


def tiny_text_config(hidden_size: int = 64, num_hidden_layers: int = 2, **overrides) -> dict:
    config = dict(
        model_type="qwen2",
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=TINY_VOCAB_SIZE,
        max_position_embeddings=65536,
        pad_token_id=TINY_PAD_TOKEN_ID,
        eos_token_id=TINY_EOS_TOKEN_ID,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    return config


def tiny_vision_config(hidden_size: int = 32, num_hidden_layers: int = 2, **overrides) -> dict:
    config = dict(
        model_type="siglip_vision_model",
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        image_size=TINY_IMAGE_SIZE,
        patch_size=TINY_PATCH_SIZE,
        vision_use_head=False,
    )
    config.update(overrides)
    return config


def tiny_base_config(text: dict | None = None, vision: dict | None = None, **overrides) -> LlavaOnevisionConfig:
    """A tiny `LlavaOnevisionConfig` whose special-token ids match the embedded tiny tokenizer."""
    kwargs = dict(
        text_config=tiny_text_config(**(text or {})),
        vision_config=tiny_vision_config(**(vision or {})),
        image_token_index=TINY_IMAGE_TOKEN_ID,
        video_token_index=TINY_VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE], [TINY_IMAGE_SIZE, 2 * TINY_IMAGE_SIZE]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlavaOnevisionConfig(**kwargs)


# Small memory sizes that keep the tiny model fast while exercising every code path (several chunks, caches).
TINY_MEMORY_DEFAULTS = dict(
    num_memory_tokens=8,
    memory_num_heads=4,
    memory_chunk_size=4,
    num_fine_frames=4,
    vision_chunk_size=8,
)


def tiny_config(text: dict | None = None, vision: dict | None = None, **fields) -> MemLlavaOnevisionConfig:
    """A tiny `MemLlavaOnevisionConfig`; `fields` override memory fields or any LLaVA-OV field."""
    base = tiny_base_config(text=text, vision=vision).to_dict()
    base.pop("model_type", None)
    base.pop("transformers_version", None)
    merged = {**TINY_MEMORY_DEFAULTS, **fields}
    return MemLlavaOnevisionConfig(**{**base, **merged})


def tiny_base_model(seed: int = 0, **config_kwargs) -> LlavaOnevisionForConditionalGeneration:
    """A tiny randomly initialised transformers `LlavaOnevisionForConditionalGeneration`, in eval mode."""
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(tiny_base_config(**config_kwargs)).eval()


def tiny_model(seed: int = 0, base=None, **fields):
    """A tiny `MemLlavaOnevisionForConditionalGeneration` converted from a tiny base (or `base`), in eval mode."""
    from .modeling_memllava import MemLlavaOnevisionForConditionalGeneration

    unknown = set(fields) - set(MEMORY_FIELDS)
    if unknown:
        raise ValueError(f"tiny_model takes memory fields only, got {sorted(unknown)}")
    base = base if base is not None else tiny_base_model(seed)
    torch.manual_seed(seed + 1)
    return MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(
        base, **{**TINY_MEMORY_DEFAULTS, **fields}
    ).eval()
