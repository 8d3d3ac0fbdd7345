"""Configuration of MemLlava: LLaVA-OneVision plus a recurrent video memory.

This file is remote code: it is copied flat into every checkpoint folder, so it imports only torch,
transformers and (relatively) its sibling remote-code files.
"""

import math
from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig


MEMORY_FIELDS = (
    "use_memory",
    "num_memory_tokens",
    "memory_num_layers",
    "memory_num_heads",
    "memory_chunk_size",
    "memory_input_pool",
    "memory_bptt_chunks",
    "num_fine_frames",
    "vision_chunk_size",
    "memory_cache_size",
    "memory_temporal_encoding",
    "fine_frame_dropout",
)


@strict
class MemLlavaOnevisionConfig(LlavaOnevisionConfig):
    r"""
    Configuration of [`MemLlavaOnevisionForConditionalGeneration`]: every field of [`LlavaOnevisionConfig`] plus
    the memory fields below. With `use_memory=False` the model is exactly LLaVA-OneVision.

    Args:
        use_memory (`bool`, defaults to `True`):
            Whether videos go through the recurrent memory. `False` gives plain LLaVA-OneVision.
        num_memory_tokens (`int`, defaults to 64):
            M, the number of learnable memory tokens (the state of the recurrence).
        memory_num_layers (`int`, defaults to 1):
            Blocks (self-attention, cross-attention to the chunk, MLP) applied at every memory update.
        memory_num_heads (`int`, defaults to 8):
            Attention heads of the memory and fuser attention; must divide the LLM width.
        memory_chunk_size (`int`, defaults to 4):
            Frames consumed by one memory update.
        memory_input_pool (`int`, defaults to 2):
            Extra average pooling of each frame's token grid before the memory reads it (2: 14x14 -> 7x7).
        memory_bptt_chunks (`int`, *optional*):
            Truncate back-propagation through time to this many memory updates (`None`: the whole video).
        num_fine_frames (`int`, defaults to 16):
            F, frames kept at full LLaVA-OV detail for the LLM, chosen uniformly over the video.
        vision_chunk_size (`int`, defaults to 8):
            Frames per vision-tower batch while streaming a video.
        memory_cache_size (`int`, defaults to 0):
            Earlier memory states each update attends to ("memory evolution"; the seed used 10).
        memory_temporal_encoding (`str`, defaults to `"sinusoidal"`):
            `"sinusoidal"` adds a learned projection of a sinusoidal encoding of each frame's timestamp
            (its index where no timestamp is known) to the tokens the memory reads; `"none"` adds nothing.
        fine_frame_dropout (`float`, defaults to 0.0):
            Training-time probability of hiding a sample's fine frames from the LLM so it must use the memory.
    """

    model_type = "memllava_onevision"

    use_memory: bool = True
    num_memory_tokens: int = 64
    memory_num_layers: int = 1
    memory_num_heads: int = 8
    memory_chunk_size: int = 4
    memory_input_pool: int = 2
    memory_bptt_chunks: int | None = None
    num_fine_frames: int = 16
    vision_chunk_size: int = 8
    memory_cache_size: int = 0
    memory_temporal_encoding: Literal["sinusoidal", "none"] = "sinusoidal"
    fine_frame_dropout: float = 0.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate_memory_fields()

    def _validate_memory_fields(self):
        positive = (
            "num_memory_tokens",
            "memory_num_layers",
            "memory_num_heads",
            "memory_chunk_size",
            "memory_input_pool",
            "num_fine_frames",
            "vision_chunk_size",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MemLlavaOnevisionConfig.{name} must be a positive integer, got {value!r}")
        if self.memory_bptt_chunks is not None and self.memory_bptt_chunks <= 0:
            raise ValueError(
                f"MemLlavaOnevisionConfig.memory_bptt_chunks must be None or a positive integer, "
                f"got {self.memory_bptt_chunks!r}"
            )
        if self.memory_cache_size < 0:
            raise ValueError(
                f"MemLlavaOnevisionConfig.memory_cache_size must be >= 0, got {self.memory_cache_size!r}"
            )
        if not 0.0 <= self.fine_frame_dropout < 1.0:
            raise ValueError(
                f"MemLlavaOnevisionConfig.fine_frame_dropout must be in [0, 1), got {self.fine_frame_dropout!r}"
            )
        width = self.text_config.hidden_size
        if width % self.memory_num_heads != 0:
            raise ValueError(
                f"MemLlavaOnevisionConfig.memory_num_heads={self.memory_num_heads} must divide the LLM width "
                f"text_config.hidden_size={width}"
            )

    @property
    def tokens_per_frame(self) -> int:
        """P: tokens one frame contributes after LLaVA-OV's `apply_pooling` (196 for the 384px SigLIP).

        The patch grid floors like SigLIP's convolution (384 // 14 = 27); pooling halves it rounding up (14)."""
        side = self.vision_config.image_size // self.vision_config.patch_size
        return math.ceil(side / 2) ** 2

    @property
    def memory_tokens_per_frame(self) -> int:
        """Tokens one frame contributes to the memory's input after the extra `memory_input_pool` pooling."""
        side = math.ceil(self.vision_config.image_size // self.vision_config.patch_size / 2)
        return math.ceil(side / self.memory_input_pool) ** 2

    def num_video_tokens(self, num_frames: int) -> int:
        """Number of `<video>` placeholders the model consumes for one video of `num_frames` frames.

        With memory on it is `M + F * P + 1` for every length (short videos repeat frames to fill the F fine
        slots); with memory off it is LLaVA-OV's `T * P + 1`. The trailing 1 is the image-newline token.
        """
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_video_tokens needs a frame count >= 1, got {num_frames!r}")
        if self.use_memory:
            return self.num_memory_tokens + self.num_fine_frames * self.tokens_per_frame + 1
        return num_frames * self.tokens_per_frame + 1


__all__ = ["MemLlavaOnevisionConfig", "MEMORY_FIELDS"]
