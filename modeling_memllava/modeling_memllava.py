"""MemLlava: LLaVA-OneVision with a recurrent video memory and a Memory-Fuser.

The video path streams frames through the vision tower `vision_chunk_size` at a time. Every frame is read once by
the `RecurrentMemory` (gated, GRU-style updates over chunks of `memory_chunk_size` frames); only the
`num_fine_frames` frames chosen uniformly over the video keep their full LLaVA-OV tokens, and the `MemoryFuser`
lets each of them read the memory state of its moment plus the final state. The LLM sees

    [ memory tokens (M) | fused fine-frame tokens (F x P) | image newline ]

for every video, however long. With `use_memory=False` nothing here runs and the model is LLaVA-OneVision.

This file is remote code: it is copied flat into every checkpoint folder, so it imports only torch, transformers and
(relatively) its sibling remote-code files.
"""

from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionPreTrainedModel,
)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

from .configuration_memllava import MEMORY_FIELDS, MemLlavaOnevisionConfig


logger = logging.get_logger(__name__)

# Written into config.json on save so that AutoConfig / AutoModel / AutoModelForImageTextToText resolve to these
# classes with trust_remote_code=True. AutoModel returns the generation-capable class, as remote-code chat models do.
AUTO_MAP = {
    "AutoConfig": "configuration_memllava.MemLlavaOnevisionConfig",
    "AutoModel": "modeling_memllava.MemLlavaOnevisionForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_memllava.MemLlavaOnevisionForConditionalGeneration",
}

# Attributes of MemLlavaOnevisionModel that LLaVA-OneVision does not have (what stage `short` trains).
MEMORY_MODULE_NAMES = ("memory", "memory_fuser", "memory_projector", "memory_type_embedding", "frame_type_embedding")

# Extra video inputs: passed once with the pixels (generate() hands them to get_video_features at prefill).
VIDEO_INPUT_KEYS = ("video_frame_mask", "video_timestamps")


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------


class MemoryAttention(nn.Module):
    """Multi-head attention of `x` over `context` with `scaled_dot_product_attention` (any backend SDPA picks)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None):
        # x: [B, Lq, D], context: [B, Lk, D], context_mask: [B, Lk] bool (True = attend)
        batch, q_len, dim = x.shape
        k_len = context.shape[1]
        head_dim = dim // self.num_heads
        q = self.q_proj(x).view(batch, q_len, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(context).view(batch, k_len, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(context).view(batch, k_len, self.num_heads, head_dim).transpose(1, 2)
        attn_mask = None
        if context_mask is not None:
            # A row with nothing to attend to would give NaN (also in backward); such rows are discarded by the
            # caller, so let them attend to everything instead.
            context_mask = context_mask | ~context_mask.any(dim=-1, keepdim=True)
            attn_mask = context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, q_len, dim))


class MemoryMLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class MemoryBlock(nn.Module):
    """Pre-norm block: self-attention over memory -> cross-attention memory -> chunk tokens -> MLP."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(dim)
        self.self_attn = MemoryAttention(dim, num_heads)
        self.cross_attn_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.cross_attn = MemoryAttention(dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MemoryMLP(dim, 4 * dim)

    def forward(self, memory, context, context_mask):
        normed = self.self_attn_norm(memory)
        memory = memory + self.self_attn(normed, normed)
        memory = memory + self.cross_attn(self.cross_attn_norm(memory), self.context_norm(context), context_mask)
        return memory + self.mlp(self.mlp_norm(memory))


def sinusoidal_encoding(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin/cos encoding of real-valued positions (seconds or frame indices): [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[..., None] * freqs
    encoding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        encoding = F.pad(encoding, (0, 1))
    return encoding


class RecurrentMemory(GradientCheckpointingLayer):
    """Learnable memory tokens updated chunk by chunk: `m_k = (1 - g) * m_{k-1} + g * m~_k`.

    `m~_k` is the previous state refined by `memory_num_layers` weight-shared blocks reading the chunk's tokens
    (plus, with `memory_cache_size > 0`, attention over earlier states); `g = sigmoid(W_g [m_{k-1}; m~_k])`.
    One call of `forward` is one update, so gradient checkpointing (enabled through
    `model.gradient_checkpointing_enable()`) checkpoints each chunk of the recurrence.
    """

    def __init__(self, config: MemLlavaOnevisionConfig):
        super().__init__()
        dim = config.text_config.hidden_size
        self.memory_tokens = nn.Parameter(torch.zeros(config.num_memory_tokens, dim))  # m_0: [M, D]
        self.temporal_proj = nn.Linear(dim, dim) if config.memory_temporal_encoding == "sinusoidal" else None
        self.blocks = nn.ModuleList(MemoryBlock(dim, config.memory_num_heads) for _ in range(config.memory_num_layers))
        if config.memory_cache_size > 0:
            self.history_norm = nn.LayerNorm(dim)
            self.history_attn = MemoryAttention(dim, config.memory_num_heads)
        else:
            self.history_norm = self.history_attn = None
        self.gate = nn.Linear(2 * dim, dim)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return self.memory_tokens[None].expand(batch_size, -1, -1)

    def encode_chunk_tokens(self, tokens: torch.Tensor, timestamps: torch.Tensor) -> torch.Tensor:
        """Add the temporal encoding of each frame's timestamp: [B, C, Pm, D] -> [B, C * Pm, D]."""
        if self.temporal_proj is not None:
            encoding = sinusoidal_encoding(timestamps, tokens.shape[-1]).to(tokens.dtype)
            tokens = tokens + self.temporal_proj(encoding)[:, :, None, :]
        return tokens.flatten(1, 2)

    def forward(self, state, context, context_mask, has_frames, *history):
        # state: [B, M, D]; context: [B, C * Pm, D]; context_mask: [B, C * Pm]; has_frames: [B] bool
        candidate = state
        for block in self.blocks:
            candidate = block(candidate, context, context_mask)
        if self.history_attn is not None and history:
            past = self.history_norm(torch.cat(history, dim=1))
            candidate = candidate + self.history_attn(self.history_norm(candidate), past)
        gate = torch.sigmoid(self.gate(torch.cat([state, candidate], dim=-1)))
        new_state = (1 - gate) * state + gate * candidate
        # A sample whose frames ended before this chunk (batch padding) keeps its state.
        return torch.where(has_frames[:, None, None], new_state, state)


class MemoryFuser(nn.Module):
    """Fine-frame tokens read the memory: `y' = y + tanh(alpha) CrossAttn(LN y, LN mem)`,
    `y'' = y' + tanh(beta) MLP(LN y')`. alpha = beta = 0 at init, so a fresh fuser is exactly the identity."""

    def __init__(self, config: MemLlavaOnevisionConfig):
        super().__init__()
        dim = config.text_config.hidden_size
        self.query_norm = nn.LayerNorm(dim)
        self.memory_norm = nn.LayerNorm(dim)
        self.cross_attn = MemoryAttention(dim, config.memory_num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MemoryMLP(dim, 4 * dim)
        self.attn_gate = nn.Parameter(torch.zeros(1))  # alpha
        self.mlp_gate = nn.Parameter(torch.zeros(1))  # beta

    def forward(self, frames: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # frames: [N, P, D], memory: [N, 2M, D] (recent state ; final state)
        attended = self.cross_attn(self.query_norm(frames), self.memory_norm(memory))
        frames = frames + torch.tanh(self.attn_gate).to(frames.dtype) * attended
        return frames + torch.tanh(self.mlp_gate).to(frames.dtype) * self.mlp(self.mlp_norm(frames))


class MemoryProjector(nn.Module):
    """LayerNorm + MLP taking the final memory state into the LLM's embedding space (the seed's fuser MLP)."""

    def __init__(self, config: MemLlavaOnevisionConfig):
        super().__init__()
        dim = config.text_config.hidden_size
        self.norm = nn.LayerNorm(dim)
        self.mlp = MemoryMLP(dim, dim)

    def forward(self, memory: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(memory))


def uniform_indices(num_total: int, num_samples: int) -> list[int]:
    """LLaVA-OV / lmms-eval's uniform rule `np.linspace(0, N - 1, n, dtype=int)`; repeats indices when n > N.

    Written out (remote code imports no numpy) with numpy's exact arithmetic: `i * step`, truncated, last = N - 1.
    """
    if num_samples == 1:
        return [0]
    step = (num_total - 1) / (num_samples - 1)
    return [int(i * step) for i in range(num_samples - 1)] + [num_total - 1]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


class MemLlavaOnevisionPreTrainedModel(LlavaOnevisionPreTrainedModel):
    """Shared by the MemLlava models: config class, device-map units and the init rule of the memory modules."""

    config: MemLlavaOnevisionConfig
    config_class = MemLlavaOnevisionConfig
    _no_split_modules = ["RecurrentMemory", "MemoryFuser", "MemoryProjector"]

    def _init_weights(self, module):
        super()._init_weights(module)
        init_memory_weights(module, self.config)


def init_memory_weights(module: nn.Module, config: MemLlavaOnevisionConfig):
    """Initialise the memory-specific parameters of `module` (nothing else; linear layers get the base init).

    - the fuser gates and the frame type embedding at 0: fine frames carry exactly LLaVA-OV's features;
    - the temporal projection and the memory type embedding at 0, and m_0 at the LLM's init scale: anything larger
      swamps the content. Projected frame tokens are small (std ~0.01 in a fresh tiny model), and a std-0.1
      timestamp code or m_0 made the memory state 99.98% content-free: red and blue needles gave memory outputs
      0.02% apart, and the memory path did not learn at all (bench/needle.py).
    """
    std = getattr(config.text_config, "initializer_range", 0.02)
    if isinstance(module, RecurrentMemory):
        init.normal_(module.memory_tokens, mean=0.0, std=std)
        if module.temporal_proj is not None:
            init.zeros_(module.temporal_proj.weight)
            init.zeros_(module.temporal_proj.bias)
    elif isinstance(module, MemoryFuser):
        init.zeros_(module.attn_gate)
        init.zeros_(module.mlp_gate)
    elif isinstance(module, MemLlavaOnevisionModel) and config.use_memory:
        init.zeros_(module.memory_type_embedding)
        init.zeros_(module.frame_type_embedding)


class MemLlavaOnevisionModel(MemLlavaOnevisionPreTrainedModel, LlavaOnevisionModel):
    """LLaVA-OneVision whose video features come from a streaming recurrent memory (see module docstring)."""

    def __init__(self, config: MemLlavaOnevisionConfig):
        super().__init__(config)
        if config.use_memory:
            dim = config.text_config.hidden_size
            self.memory = RecurrentMemory(config)
            self.memory_fuser = MemoryFuser(config)
            self.memory_projector = MemoryProjector(config)
            # Token-type embeddings tell memory tokens from frame tokens; the frame one starts at zero so fine
            # frames carry exactly LLaVA-OV's features at conversion.
            self.memory_type_embedding = nn.Parameter(torch.zeros(dim))
            self.frame_type_embedding = nn.Parameter(torch.zeros(dim))
            # LlavaOnevisionModel.__init__ already ran post_init for the base modules; run it again for ours.
            self.post_init()

    # -- video features -------------------------------------------------------------------------------------------

    @merge_with_config_defaults
    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_frame_mask: torch.Tensor | None = None,
        video_timestamps: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> tuple | BaseModelOutputWithPooling:
        r"""
        pixel_values_videos (`torch.Tensor` of shape `(batch_size, num_frames, channels, height, width)`):
            The frames of one video per batch row, padded to the longest video.
        video_frame_mask (`torch.BoolTensor` of shape `(batch_size, num_frames)`, *optional*):
            False marks padding frames: the memory ignores them and they are never fine frames.
        video_timestamps (`torch.Tensor` of shape `(batch_size, num_frames)`, *optional*):
            Timestamp of each frame in seconds, for the memory's temporal encoding (frame index when absent).

        Returns `pooler_output` of shape `(batch_size, config.num_video_tokens(num_frames), hidden_size)`.
        """
        if not self.config.use_memory:
            if video_frame_mask is not None and not bool(video_frame_mask.all()):
                raise ValueError(
                    "use_memory=False is stock LLaVA-OneVision: every video in a batch must have the same number "
                    "of frames, but video_frame_mask marks padding frames"
                )
            return super().get_video_features(
                pixel_values_videos,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                **kwargs,
            )
        features = self._memory_video_features(
            pixel_values_videos, video_frame_mask, video_timestamps, vision_feature_layer, vision_feature_select_strategy
        )
        return BaseModelOutputWithPooling(pooler_output=features)

    def _frame_tokens(self, pixels, vision_feature_layer, vision_feature_select_strategy) -> torch.Tensor:
        """LLaVA-OV's own per-frame tokens (vision tower, projector, `apply_pooling`): [n, 3, H, W] -> [n, P, D]."""
        out = super().get_video_features(
            pixels[None],
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            return_dict=True,
        )
        tokens = out.pooler_output[0, :-1]  # drop the image newline LLaVA-OV appends
        return tokens.view(pixels.shape[0], -1, tokens.shape[-1])

    def _pool_for_memory(self, tokens: torch.Tensor) -> torch.Tensor:
        """Average-pool each frame's token grid by `memory_input_pool`: [B, S, P, D] -> [B, S, Pm, D]."""
        batch, frames, num_tokens, dim = tokens.shape
        side = math.isqrt(num_tokens)
        pool = self.config.memory_input_pool
        if pool == 1:
            return tokens
        grid = tokens.reshape(batch * frames, side, side, dim).permute(0, 3, 1, 2)
        grid = F.avg_pool2d(grid, kernel_size=pool, stride=pool, ceil_mode=True)
        return grid.permute(0, 2, 3, 1).reshape(batch, frames, -1, dim)

    def fine_frame_positions(self, video_frame_mask: torch.Tensor) -> torch.Tensor:
        """Positions of the F fine frames of each video: the uniform rule over its real frames. [B, T] -> [B, F]."""
        positions = []
        for row in video_frame_mask:
            real = row.nonzero().flatten()
            if real.numel() == 0:
                raise ValueError("a video in the batch has no real frames (video_frame_mask is all False)")
            positions.append(real[uniform_indices(real.numel(), self.config.num_fine_frames)])
        return torch.stack(positions)

    def _memory_video_features(
        self, pixel_values_videos, video_frame_mask, video_timestamps, vision_feature_layer, select_strategy
    ):
        cfg = self.config
        batch, num_frames = pixel_values_videos.shape[:2]
        device = pixel_values_videos.device
        if video_frame_mask is None:
            video_frame_mask = torch.ones(batch, num_frames, dtype=torch.bool, device=device)
        video_frame_mask = video_frame_mask.to(device=device, dtype=torch.bool)
        if video_timestamps is None:
            video_timestamps = torch.arange(num_frames, device=device, dtype=torch.float32).expand(batch, -1)
        if video_frame_mask.shape != (batch, num_frames) or video_timestamps.shape != (batch, num_frames):
            raise ValueError(
                f"video_frame_mask {tuple(video_frame_mask.shape)} and video_timestamps "
                f"{tuple(video_timestamps.shape)} must both be (batch, frames) = {(batch, num_frames)}"
            )
        video_timestamps = video_timestamps.to(device, torch.float32)

        fine_pos = self.fine_frame_positions(video_frame_mask)  # [B, F]
        chunk = cfg.memory_chunk_size
        fine_chunk = fine_pos // chunk  # memory update that first sees each fine frame
        needed_chunks = sorted(set(fine_chunk.flatten().tolist()))
        kept_states = {}  # chunk index -> state after it, only for chunks holding a fine frame

        state = self.memory.initial_state(batch)
        history: list[torch.Tensor] = []
        dim, dtype = cfg.text_config.hidden_size, self.image_newline.dtype
        fine_tokens = pixel_values_videos.new_zeros(batch, cfg.num_fine_frames, cfg.tokens_per_frame, dim, dtype=dtype)
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # memory input not yet consumed
        pending_frames = 0
        chunk_index = 0

        for start in range(0, num_frames, cfg.vision_chunk_size):
            stop = min(start + cfg.vision_chunk_size, num_frames)
            valid = video_frame_mask[:, start:stop]
            # Padding frames are not encoded: they stay zero and are masked out of the memory.
            tokens = fine_tokens.new_zeros(batch, stop - start, cfg.tokens_per_frame, dim)
            if valid.any():
                frame_pixels = pixel_values_videos[:, start:stop][valid]
                tokens[valid] = self._frame_tokens(frame_pixels, vision_feature_layer, select_strategy)
            in_window = (fine_pos >= start) & (fine_pos < stop)
            if in_window.any():
                rows, slots = in_window.nonzero(as_tuple=True)
                fine_tokens = fine_tokens.index_put((rows, slots), tokens[rows, fine_pos[rows, slots] - start])

            pending.append((self._pool_for_memory(tokens), valid, video_timestamps[:, start:stop]))
            pending_frames += stop - start
            while pending_frames >= chunk or (stop == num_frames and pending_frames > 0):
                pooled = torch.cat([p[0] for p in pending], dim=1)
                masks = torch.cat([p[1] for p in pending], dim=1)
                times = torch.cat([p[2] for p in pending], dim=1)
                take = min(chunk, pooled.shape[1])
                rest = (pooled[:, take:], masks[:, take:], times[:, take:])
                pending = [rest] if rest[0].shape[1] else []
                pending_frames = rest[0].shape[1]
                state = self._memory_step(state, pooled[:, :take], masks[:, :take], times[:, :take], history, chunk_index)
                if chunk_index in needed_chunks:
                    kept_states[chunk_index] = state
                if cfg.memory_cache_size:
                    history = (history + [state])[-cfg.memory_cache_size :]
                chunk_index += 1

        # Fuse: each fine frame reads [state after its chunk ; final state].
        order = {k: i for i, k in enumerate(needed_chunks)}
        recent_bank = torch.stack([kept_states[k] for k in needed_chunks], dim=1)  # [B, U, M, D]
        slot = torch.tensor([[order[k] for k in row] for row in fine_chunk.tolist()], device=device)
        recent = recent_bank[torch.arange(batch, device=device)[:, None], slot]  # [B, F, M, D]
        final = state[:, None].expand_as(recent)
        memory_context = torch.cat([recent, final], dim=2).flatten(0, 1)  # [B*F, 2M, D]
        fused = self.memory_fuser(fine_tokens.flatten(0, 1), memory_context)
        fused = fused.view(batch, -1, dim) + self.frame_type_embedding.to(fused.dtype)

        memory_out = self.memory_projector(state) + self.memory_type_embedding.to(state.dtype)  # [B, M, D]
        newline = self.image_newline.to(fused.dtype)[None, None].expand(batch, 1, dim)
        return torch.cat([memory_out.to(fused.dtype), fused, newline], dim=1)  # [B, M + F*P + 1, D]

    def _memory_step(self, state, pooled, frame_mask, timestamps, history, chunk_index):
        # pooled: [B, C, Pm, D], frame_mask: [B, C], timestamps: [B, C]
        cfg = self.config
        if cfg.memory_bptt_chunks is not None and chunk_index % cfg.memory_bptt_chunks == 0 and chunk_index > 0:
            state = state.detach()  # truncated back-propagation through time
        context = self.memory.encode_chunk_tokens(pooled, timestamps)
        context_mask = frame_mask[:, :, None].expand(-1, -1, pooled.shape[2]).flatten(1)
        return self.memory(state, context, context_mask, frame_mask.any(dim=1), *history)

    def memory_modules(self) -> list[nn.Module]:
        return [self.memory, self.memory_fuser, self.memory_projector] if self.config.use_memory else []

    def materialize_memory_modules(self, device, dtype):
        """Give the memory modules real, freshly initialised storage (after a build on the meta device whose base
        weights were assigned from a LLaVA-OV model). Base weights are not touched."""
        for module in self.memory_modules():
            module.to_empty(device=device).to(dtype)
            # Children before parents, as post_init's smart_apply does, so a parent's own init has the last word.
            for submodule in reversed(list(module.modules())):
                self._init_weights(submodule)
        for name in ("memory_type_embedding", "frame_type_embedding"):
            setattr(self, name, nn.Parameter(torch.empty(self.config.text_config.hidden_size, device=device, dtype=dtype)))
        init_memory_weights(self, self.config)

    # -- forward ----------------------------------------------------------------------------------------------------

    def check_video_placeholders(self, input_ids: torch.Tensor, num_videos: int, num_frames: int):
        expected = self.config.num_video_tokens(num_frames)
        found = int((input_ids == self.config.video_token_id).sum())
        if found != expected * num_videos:
            formula = (
                f"M + F*P + 1 = {self.config.num_memory_tokens} + {self.config.num_fine_frames}*"
                f"{self.config.tokens_per_frame} + 1"
                if self.config.use_memory
                else f"T*P + 1 = {num_frames}*{self.config.tokens_per_frame} + 1"
            )
            raise ValueError(
                f"The input has {found} <video> placeholders for {num_videos} video(s) of {num_frames} frames, but "
                f"this model expects {expected} per video ({formula}), {expected * num_videos} in all. "
                "Build the inputs with a processor whose settings match the model config."
            )

    def fine_frame_dropout_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """Training only: for samples drawn with p = fine_frame_dropout, hide their fine-frame placeholders from
        attention (the placeholder count never changes), so the LLM must answer from the memory."""
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        is_video = input_ids == cfg.video_token_id
        per_video = cfg.num_video_tokens(1)
        offset = (is_video.long().cumsum(dim=1) - 1) % per_video  # position inside its video's placeholder run
        fine = is_video & (offset >= cfg.num_memory_tokens) & (offset < per_video - 1)
        dropped = torch.rand(input_ids.shape[0], device=input_ids.device) < cfg.fine_frame_dropout
        return attention_mask.masked_fill(fine & dropped[:, None], 0)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        video_frame_mask: torch.Tensor | None = None,
        video_timestamps: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ):
        r"""Same as [`LlavaOnevisionModel.forward`], plus `video_frame_mask` and `video_timestamps` (see
        [`~MemLlavaOnevisionModel.get_video_features`]). Video features are computed here and handed to the parent
        as `mm_encoder_outputs`, the parent's own hook for pre-computed features, so its merge logic is reused."""
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if pixel_values_videos is not None:
            if mm_encoder_outputs.get("video") is not None:
                raise ValueError("Pass either pixel_values_videos or mm_encoder_outputs['video'], not both")
            if input_ids is not None:
                self.check_video_placeholders(input_ids, *pixel_values_videos.shape[:2])
            mm_encoder_outputs["video"] = self.get_video_features(
                pixel_values_videos,
                video_frame_mask=video_frame_mask,
                video_timestamps=video_timestamps,
                vision_feature_layer=kwargs.get("vision_feature_layer"),
                vision_feature_select_strategy=kwargs.get("vision_feature_select_strategy"),
                return_dict=True,
            )
        if (
            self.training
            and self.config.use_memory
            and self.config.fine_frame_dropout > 0
            and input_ids is not None
            and mm_encoder_outputs.get("video") is not None
        ):
            attention_mask = self.fine_frame_dropout_mask(input_ids, attention_mask)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_encoder_outputs=mm_encoder_outputs or None,
            **kwargs,
        )


class MemLlavaOnevisionForConditionalGeneration(MemLlavaOnevisionPreTrainedModel, LlavaOnevisionForConditionalGeneration):
    """MemLlava for generation: LLaVA-OneVision's causal-LM head over [`MemLlavaOnevisionModel`].

    Start from a LLaVA-OneVision checkpoint with [`~MemLlavaOnevisionForConditionalGeneration.from_llava_onevision`];
    load a MemLlava checkpoint with `AutoModel.from_pretrained(path, trust_remote_code=True)`.
    """

    def __init__(self, config: MemLlavaOnevisionConfig):
        # LlavaOnevisionForConditionalGeneration.__init__ would build a plain inner model only to be replaced:
        # build the same two attributes directly around the memory-aware one.
        LlavaOnevisionPreTrainedModel.__init__(self, config)
        self.model = MemLlavaOnevisionModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def enable_input_require_grads(self):
        """As in transformers, except the vision tower when it is frozen (both MemLlava stages freeze it).

        transformers hooks the input embeddings of every sub-model, SigLIP's patch embedding included; with a frozen
        tower that only keeps every frame's activations alive and back-propagates through them for nothing
        (bench/train_step.py: 2.7 -> 1.1 s a step and 405 -> 112 MiB at 128 frames, identical gradients).
        """
        super().enable_input_require_grads()
        if any(p.requires_grad for p in self.model.vision_tower.parameters()):
            return
        for hook in self._require_grads_hooks:
            hook.remove()

        def make_inputs_require_grads(module, input, output):
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(make_inputs_require_grads)]
        self._require_grads_hook = self._require_grads_hooks[0]

    def memory_parameter_names(self) -> list[str]:
        """Names of the parameters that LLaVA-OneVision does not have (memory, fuser, projector, type embeddings)."""
        prefixes = tuple(f"model.{name}" for name in MEMORY_MODULE_NAMES)
        return [name for name, _ in self.named_parameters() if name.startswith(prefixes)]

    @merge_with_config_defaults
    @can_return_tuple
    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        video_frame_mask: torch.Tensor | None = None,
        video_timestamps: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ):
        """See [`MemLlavaOnevisionModel.get_video_features`]."""
        return self.model.get_video_features(
            pixel_values_videos,
            video_frame_mask=video_frame_mask,
            video_timestamps=video_timestamps,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        video_frame_mask: torch.Tensor | None = None,
        video_timestamps: torch.Tensor | None = None,
        **kwargs,
    ):
        r"""[`LlavaOnevisionForConditionalGeneration.forward`] plus `video_frame_mask` (`[batch, frames]` bool,
        False = padding frame) and `video_timestamps` (`[batch, frames]` seconds) for the memory path.
        `generate()` passes them to `get_video_features` once, at prefill."""
        if video_frame_mask is not None:
            kwargs["video_frame_mask"] = video_frame_mask
        if video_timestamps is not None:
            kwargs["video_timestamps"] = video_timestamps
        return super().forward(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            pixel_values_videos=pixel_values_videos,
            image_sizes_videos=image_sizes_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_aspect_ratio=vision_aspect_ratio,
            batch_num_images=batch_num_images,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            mm_encoder_outputs=mm_encoder_outputs,
            **kwargs,
        )

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        model_inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            # The video was encoded at prefill; its frame mask and timestamps must not reach later decode steps.
            for key in VIDEO_INPUT_KEYS:
                model_inputs.pop(key, None)
        return model_inputs

    # -- conversion and saving ----------------------------------------------------------------------------------

    @classmethod
    def from_llava_onevision(
        cls,
        base,
        *,
        dtype: torch.dtype | str | None = None,
        device_map=None,
        revision: str | None = None,
        **config_fields,
    ) -> "MemLlavaOnevisionForConditionalGeneration":
        """Convert a LLaVA-OneVision model (instance, local path or Hub id) into MemLlava.

        Every base weight is reused as is (the same tensors for an instance); only the memory modules are freshly
        initialised, with the fuser at identity. `config_fields` must be `MemLlavaOnevisionConfig` memory fields.
        `device_map` may be a single device or anything `from_pretrained` takes ("auto", a dict).
        """
        unknown = sorted(set(config_fields) - set(MEMORY_FIELDS))
        if unknown:
            raise ValueError(
                f"from_llava_onevision got unknown argument(s) {unknown}; config fields are {list(MEMORY_FIELDS)} "
                "and loading options are dtype, device_map, revision"
            )
        spread = device_map is not None and (isinstance(device_map, dict) or device_map in ("auto", "balanced"))
        if not isinstance(base, LlavaOnevisionForConditionalGeneration):
            base = LlavaOnevisionForConditionalGeneration.from_pretrained(
                base, dtype=dtype, revision=revision, device_map=None if spread else device_map
            )
        elif dtype is not None:
            base = base.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if isinstance(base, cls):
            raise ValueError("from_llava_onevision expects a LLaVA-OneVision model, got a MemLlava model")

        base_config = base.config.to_dict()
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            base_config.pop(key, None)
        config = MemLlavaOnevisionConfig(**{**base_config, **config_fields})
        config._attn_implementation = base.config._attn_implementation

        # Build on the meta device and take the base tensors themselves: no second copy of a 7B model.
        with torch.device("meta"):
            model = cls(config)
        result = model.load_state_dict(base.state_dict(), strict=False, assign=True)
        memory_names = set(model.memory_parameter_names())
        if result.unexpected_keys or set(result.missing_keys) - memory_names:
            raise RuntimeError(
                f"LLaVA-OneVision weights do not fit MemLlava: unexpected {result.unexpected_keys}, "
                f"missing {sorted(set(result.missing_keys) - memory_names)}"
            )
        # Non-persistent buffers (rotary inv_freq, position ids) are not in the state dict: take the base's.
        base_buffers = dict(base.named_buffers())
        for name, buffer in list(model.named_buffers()):
            if buffer.is_meta and name in base_buffers:
                owner, _, leaf = name.rpartition(".")
                model.get_submodule(owner)._buffers[leaf] = base_buffers[name]
        if config.use_memory:
            anchor = base.get_input_embeddings().weight
            model.model.materialize_memory_modules(device=anchor.device, dtype=anchor.dtype)
        leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"from_llava_onevision left tensors without storage: {leftover}")
        model.tie_weights()
        model.generation_config = base.generation_config
        model.eval()
        if spread:
            # Multi-device placement is from_pretrained's job; hand the converted weights to it.
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder)
                return cls.from_pretrained(folder, dtype=dtype, device_map=device_map)
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save weights, config (with `auto_map`) and the remote-code files, so the folder loads anywhere with
        `AutoModel.from_pretrained(folder, trust_remote_code=True)`."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **AUTO_MAP}
        os.makedirs(save_directory, exist_ok=True)
        return super().save_pretrained(save_directory, *args, **kwargs)


# Registering makes save_pretrained copy this file and its relative imports next to the weights.
MemLlavaOnevisionConfig.register_for_auto_class("AutoConfig")
MemLlavaOnevisionForConditionalGeneration.register_for_auto_class("AutoModel")


__all__ = [
    "MemLlavaOnevisionForConditionalGeneration",
    "MemLlavaOnevisionModel",
    "MemoryFuser",
    "RecurrentMemory",
    "uniform_indices",
]
