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


# LLaVA-OneVision's (Qwen2) chat format: images, then videos, then text in each turn; assistant text is marked for
# `return_assistant_tokens_mask`. The real checkpoints ship this template with their tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] }}{% endgeneration %}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A real byte-level Qwen2 tokenizer with a tiny vocabulary: 256 byte tokens and the special tokens above.

    No merges, so every byte is one token: any text round-trips, and token ids are stable across versions.
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    vocab = {byte_chars[byte]: byte for byte in range(256)}
    vocab.update({token: TINY_PAD_TOKEN_ID + offset for offset, token in enumerate(TINY_SPECIAL_TOKENS)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=65536,
    )
    ids = tokenizer.convert_tokens_to_ids(list(TINY_SPECIAL_TOKENS))
    assert ids == list(range(TINY_PAD_TOKEN_ID, TINY_PAD_TOKEN_ID + len(TINY_SPECIAL_TOKENS))), ids
    return tokenizer


def tiny_processor(config: MemLlavaOnevisionConfig | None = None, **fields):
    """A `MemLlavaOnevisionProcessor` matching `tiny_config(**fields)` (or `config`): 64px frames, tiny tokenizer."""
    from transformers import LlavaOnevisionImageProcessorPil

    from .processing_memllava import MemLlavaOnevisionProcessor, MemLlavaOnevisionVideoProcessor

    config = config if config is not None else tiny_config(**fields)
    size = {"height": config.vision_config.image_size, "width": config.vision_config.image_size}
    grid = config.vision_config.image_size // config.vision_config.patch_size
    return MemLlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessorPil(size=size, image_grid_pinpoints=config.image_grid_pinpoints),
        tokenizer=tiny_tokenizer(),
        video_processor=MemLlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=grid * grid,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=CHAT_TEMPLATE,
        use_memory=config.use_memory,
        num_memory_tokens=config.num_memory_tokens,
        num_fine_frames=config.num_fine_frames,
        tokens_per_frame=config.tokens_per_frame,
        num_frames=16,
    )
