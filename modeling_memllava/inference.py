"""Ask a question about a video: the one code path shared by `memllava-chat`, the evaluator and the lmms-eval plugin."""

from __future__ import annotations

import torch

from .video import VideoClip, load_video


def video_prompt_messages(question: str) -> list[dict]:
    """A single user turn with the video first, as LLaVA-OV's chat format expects."""
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]


@torch.inference_mode()
def generate_answer(
    model,
    processor,
    video,
    question: str,
    *,
    num_frames: int = 32,
    max_new_tokens: int = 32,
    **generate_kwargs,
) -> str:
    """Greedy answer of `model` to `question` about `video` (a path, bytes or a decoded `VideoClip`).

    Frames are sampled uniformly (LLaVA-OV's rule) unless a `VideoClip` is given; the video is encoded once, at
    prefill, and decoding reuses the KV cache.
    """
    clip = video if isinstance(video, VideoClip) else load_video(video, num_frames=num_frames)
    prompt = processor.apply_chat_template(video_prompt_messages(question), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], videos=[clip], return_tensors="pt").to(model.device)
    # Only the pixels take the model's dtype: bf16 timestamps would be off by seconds an hour into a video.
    inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
    generate_kwargs.setdefault("do_sample", False)
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, **generate_kwargs)
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return processor.batch_decode(new_tokens, skip_special_tokens=True)[0].strip()
