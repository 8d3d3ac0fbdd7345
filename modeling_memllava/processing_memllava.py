"""Processor for MemLlava: text + video frames in, exactly what `MemLlavaOnevisionForConditionalGeneration` consumes out.

Remote code: this file imports only torch, numpy and transformers, because it is copied flat into checkpoints and
loaded with `AutoProcessor.from_pretrained(path, trust_remote_code=True)`. It cannot use the package's `video.py`;
decoded frames (numpy, torch or PIL; a `VideoClip` directly) are the main input, and a file path is decoded with
`transformers.video_utils.load_video` using LLaVA-OV's uniform sampling rule.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling
from transformers.video_processing_utils import VideoProcessorMixin


DEFAULT_NUM_FRAMES = 128  # frames sampled from a file path when no count is given (the seed's setting)


def uniform_sample_indices(num_total: int, num_frames: int) -> np.ndarray:
    """LLaVA-OV / lmms-eval's rule: `np.linspace(0, N - 1, n, dtype=int)`; repeats indices when n > N."""
    if num_total < 1:
        raise ValueError(f"cannot sample from a video with {num_total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, num_total - 1, num_frames, dtype=int)


# -- video preprocessing --------------------------------------------------------------------------------------------


class MemLlavaOnevisionVideoProcessor(VideoProcessorMixin):
    r"""LLaVA-OneVision's video preprocessing (RGB, bicubic resize to 384x384, CLIP normalisation) without torchvision.

    transformers' `LlavaOnevisionVideoProcessor` is a torchvision backend class; torchvision is not installable
    next to every torch build (CPU-only machines, for one). This class reproduces its tensor path with torch alone:
    on CPU torchvision resizes uint8 frames with torch's native antialiased bicubic kernel, which is what
    `resize_frames` calls, followed by the same fused rescale-and-normalise. Frames are processed in slices of
    `resize_batch_size` so a long video never needs a second full-size float copy.

    Returns one float32 tensor `[T, 3, H, W]` per video under `pixel_values_videos`.
    """

    model_input_names = ["pixel_values_videos"]
    resample = PILImageResampling.BICUBIC
    size = {"height": 384, "width": 384}
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    rescale_factor = 1 / 255
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    resize_batch_size = 32

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.resample not in (PILImageResampling.BICUBIC, int(PILImageResampling.BICUBIC)):
            raise ValueError(f"MemLlavaOnevisionVideoProcessor implements bicubic resampling only, got {self.resample!r}")
        if self.do_resize and (self.size.get("height", 0) < 1 or self.size.get("width", 0) < 1):
            raise ValueError(f"size must give a positive height and width, got {self.size}")

    def preprocess(self, videos, return_tensors=None, **kwargs) -> BatchFeature:
        if kwargs:
            unknown = sorted(k for k, v in kwargs.items() if v is not None)
            if unknown:
                raise TypeError(f"{type(self).__name__} got unexpected options {unknown}")
        if not isinstance(videos, (list, tuple)) or (len(videos) and _is_single_frame(videos[0])):
            videos = [videos]
        pixel_values = [self.preprocess_frames(frames_to_tensor(video)) for video in videos]
        if return_tensors == "pt" and len({tuple(v.shape) for v in pixel_values}) == 1:
            return BatchFeature({"pixel_values_videos": torch.stack(pixel_values)})
        return BatchFeature({"pixel_values_videos": pixel_values})

    def preprocess_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 `[T, 3, h, w]` -> normalised float32 `[T, 3, H, W]`."""
        slices = [
            self._process_slice(frames[start : start + self.resize_batch_size])
            for start in range(0, frames.shape[0], self.resize_batch_size)
        ]
        return torch.cat(slices)

    def _process_slice(self, frames: torch.Tensor) -> torch.Tensor:
        if self.do_resize:
            frames = resize_frames(frames, (self.size["height"], self.size["width"]))
        if self.do_rescale and self.do_normalize:
            # Fused as in transformers' torch backends: (x - mean / s) / (std / s) with s the rescale factor.
            mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
            return frames.to(torch.float32).sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))
        frames = frames.to(torch.float32)
        if self.do_rescale:
            frames = frames * self.rescale_factor
        if self.do_normalize:
            frames = (frames - torch.tensor(self.image_mean).view(-1, 1, 1)) / torch.tensor(self.image_std).view(-1, 1, 1)
        return frames


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 frames `[T, 3, h, w]`, as torchvision does them on CPU."""
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    if frames.dtype == torch.uint8 and frames.device.type == "cpu":
        return F.interpolate(frames, size=size, mode="bicubic", align_corners=False, antialias=True)
    # torchvision's float path for other devices: resize in float, clamp and round back to uint8.
    resized = F.interpolate(frames.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
    return resized.clamp_(0, 255).round_().to(torch.uint8)


def _is_single_frame(item) -> bool:
    """True for one frame (PIL image or a 3-D array), False for a whole video."""
    if hasattr(item, "convert") and hasattr(item, "size"):  # PIL.Image
        return True
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 3


def frames_to_tensor(video) -> torch.Tensor:
    """A video as decoded frames -> uint8 tensor `[T, 3, H, W]`, RGB.

    Accepts a `VideoClip`-like object (`.frames`), a `[T, H, W, C]` or `[T, C, H, W]` array or tensor, or a list of
    PIL images / `[H, W, C]` arrays. Float input is taken as 0..1 when its maximum is <= 1, else 0..255.
    """
    video = getattr(video, "frames", video)
    if isinstance(video, (list, tuple)):
        if not video:
            raise ValueError("a video needs at least one frame, got an empty list")
        video = np.stack([np.asarray(frame.convert("RGB")) if hasattr(frame, "convert") else np.asarray(frame) for frame in video])
    tensor = torch.as_tensor(np.asarray(video)) if not isinstance(video, torch.Tensor) else video
    if tensor.ndim != 4:
        raise ValueError(f"a video must be 4-D frames [T, H, W, C] or [T, C, H, W], got shape {tuple(tensor.shape)}")
    if tensor.shape[0] == 0:
        raise ValueError("a video needs at least one frame, got 0")
    channels_last = tensor.shape[-1] in (1, 3, 4) and tensor.shape[1] not in (1, 3, 4)
    if channels_last or (tensor.shape[-1] in (1, 3, 4) and tensor.shape[1] > 4):
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] == 1:
        tensor = tensor.expand(-1, 3, -1, -1)
    elif tensor.shape[1] == 4:
        tensor = tensor[:, :3]
    elif tensor.shape[1] != 3:
        raise ValueError(f"frames must have 1, 3 or 4 channels, got shape {tuple(tensor.shape)}")
    if tensor.is_floating_point():
        scale = 255.0 if tensor.numel() and tensor.max() <= 1.0 else 1.0
        tensor = (tensor * scale).round().clamp(0, 255).to(torch.uint8)
    return tensor.to(torch.uint8).contiguous()


# -- the processor --------------------------------------------------------------------------------------------------


class MemLlavaOnevisionProcessor(LlavaOnevisionProcessor):
    r"""LLaVA-OneVision's processor with MemLlava's video token accounting, batching and a torchvision-free video path.

    Each `<video>` in the text becomes `num_video_tokens(T)` placeholders, the same formula as
    `MemLlavaOnevisionConfig.num_video_tokens`: `num_memory_tokens + num_fine_frames * tokens_per_frame + 1` with the
    memory on (for any T), `T * tokens_per_frame + 1` with it off (stock LLaVA-OV). Videos of different lengths are
    padded along time; `video_frame_mask` marks the real frames and `video_timestamps` gives their times in seconds.
    Images go through LLaVA-OV's image path unchanged.

    Args:
        image_processor, tokenizer, video_processor, num_image_tokens, vision_feature_select_strategy, chat_template,
        image_token, video_token, vision_aspect_ratio: as in `LlavaOnevisionProcessor`.
        use_memory (`bool`): mirror of the model config's `use_memory`.
        num_memory_tokens (`int`), num_fine_frames (`int`): mirrors of the model config's fields.
        tokens_per_frame (`int`): P, the visual tokens of one frame after LLaVA-OV's pooling
            (`ceil((image_size // patch_size) / 2) ** 2`, 196 for the released checkpoints).
        num_frames (`int`): frames sampled uniformly when a video is given as a file path.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        use_memory: bool = True,
        num_memory_tokens: int = 64,
        num_fine_frames: int = 16,
        tokens_per_frame: int = 196,
        num_frames: int = DEFAULT_NUM_FRAMES,
        **kwargs,
    ):
        self.use_memory = bool(use_memory)
        self.num_memory_tokens = num_memory_tokens
        self.num_fine_frames = num_fine_frames
        self.tokens_per_frame = tokens_per_frame
        self.num_frames = num_frames
        self._validate_memory_settings()
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kwargs,
        )

    def _validate_memory_settings(self):
        for name in ("num_memory_tokens", "num_fine_frames", "tokens_per_frame", "num_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive integer, got {value!r}")

    # -- token accounting -----------------------------------------------------------------------------------------

    def num_video_tokens(self, num_frames: int) -> int:
        """Placeholders for one video of `num_frames` frames (same formula as the model config)."""
        if num_frames < 1:
            raise ValueError(f"num_video_tokens needs a frame count >= 1, got {num_frames!r}")
        if self.use_memory:
            return self.num_memory_tokens + self.num_fine_frames * self.tokens_per_frame + 1
        return num_frames * self.tokens_per_frame + 1

    def update_memory_settings(self, config) -> None:
        """Copy the token-accounting fields from a `MemLlavaOnevisionConfig`, so processor and model agree."""
        self.use_memory = bool(config.use_memory)
        self.num_memory_tokens = config.num_memory_tokens
        self.num_fine_frames = config.num_fine_frames
        self.tokens_per_frame = config.tokens_per_frame
        self._validate_memory_settings()

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * self.num_video_tokens(int(video_inputs["video_num_frames"][video_idx]))

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, **kwargs)
        if video_sizes is not None:
            data["num_video_tokens"] = [self.num_video_tokens(num_frames) for num_frames, _, _ in video_sizes]
        return data

    # -- inputs ---------------------------------------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs) -> BatchFeature:
        """Tokenise `text` (one string or a list, one per sample) with its `<image>`/`<video>` markers expanded.

        `videos`: one video or a list (one per `<video>` marker, in order over the batch); each is a file path, a
        `VideoClip` (its timestamps are kept), a `[T, H, W, 3]` array/tensor or a list of PIL frames. Extra keyword
        `num_frames` sets the frames sampled from file paths. Output adds `pixel_values_videos [B, T, 3, H, W]`,
        `video_frame_mask [B, T]` and `video_timestamps [B, T]` (float32 seconds; keep it float32 when casting).
        """
        if videos is None:
            texts = [text] if isinstance(text, str) else (text or [])
            markers = sum(sample.count(self.video_token) for sample in texts)
            if markers:
                raise ValueError(f"the text has {markers} {self.video_token} markers but no videos were given")
            return super().__call__(images=images, text=text, audio=audio, **kwargs)
        num_frames = kwargs.pop("num_frames", None) or self.num_frames
        return_tensors = kwargs.get("return_tensors")
        decoded = [self._decode_video(video, num_frames) for video in _as_video_list(videos)]
        video_inputs = self._batch_videos(decoded, return_tensors)
        if text is None:
            return BatchFeature({k: v for k, v in video_inputs.items() if k != "video_num_frames"}, tensor_type=return_tensors)
        text = [text] if isinstance(text, str) else list(text)
        text = self._expand_video_markers(text, video_inputs)
        output = super().__call__(images=images, text=text, audio=audio, **kwargs)
        for key in ("pixel_values_videos", "video_frame_mask", "video_timestamps"):
            output[key] = video_inputs[key]
        return output

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        # `__call__` expands and checks the video markers itself (one per video) before the text arrives here, so
        # the stock check, which counts markers against the videos argument, only sees the other modalities.
        if text is not None:
            text = [sample.replace(self.video_token, "") for sample in ([text] if isinstance(text, str) else text)]
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _decode_video(self, video, num_frames: int) -> tuple[torch.Tensor, np.ndarray]:
        """One video -> (uint8 frames `[T, 3, H, W]`, timestamps in seconds)."""
        if isinstance(video, (str, os.PathLike)):
            from transformers.video_utils import load_video

            # transformers' reader (PyAV by default) decodes up to the last sampled frame; for long videos decode with
            # `modeling_memllava.video.load_video` (seeking) and pass the `VideoClip` here instead.
            def sample_indices_fn(metadata, **_):
                return uniform_sample_indices(metadata.total_num_frames, num_frames)

            if not os.path.isfile(video):
                raise FileNotFoundError(f"{video}: no such video file")
            frames, metadata = load_video(os.fspath(video), sample_indices_fn=sample_indices_fn)
            timestamps = np.asarray(metadata.timestamps, dtype=np.float64)
            return frames_to_tensor(frames), timestamps
        frames = frames_to_tensor(video)
        timestamps = getattr(video, "timestamps", None)
        if timestamps is None:
            timestamps = np.arange(frames.shape[0], dtype=np.float64)  # unknown times: frame index, as the model does
        timestamps = np.asarray(timestamps, dtype=np.float64)
        if timestamps.shape != (frames.shape[0],):
            raise ValueError(f"{frames.shape[0]} frames but {timestamps.shape[0]} timestamps")
        return frames, timestamps

    def _batch_videos(self, decoded, return_tensors) -> dict:
        lengths = [frames.shape[0] for frames, _ in decoded]
        if not self.use_memory and len(set(lengths)) > 1:
            raise ValueError(
                f"with use_memory=False (stock LLaVA-OV) videos in a batch must have the same frame count, got {lengths}"
            )
        pixels = [self.video_processor(frames)["pixel_values_videos"][0] for frames, _ in decoded]
        if len({tuple(p.shape[1:]) for p in pixels}) > 1:
            raise ValueError(f"processed frames differ in size: {[tuple(p.shape) for p in pixels]}")
        batch, longest = len(pixels), max(lengths)
        pixel_values = pixels[0].new_zeros((batch, longest, *pixels[0].shape[1:]))
        frame_mask = torch.zeros((batch, longest), dtype=torch.bool)
        timestamps = torch.zeros((batch, longest), dtype=torch.float32)
        for row, (values, (_, times)) in enumerate(zip(pixels, decoded)):
            pixel_values[row, : values.shape[0]] = values
            frame_mask[row, : values.shape[0]] = True
            timestamps[row, : values.shape[0]] = torch.from_numpy(times).float()
        inputs = {
            "pixel_values_videos": pixel_values,
            "video_frame_mask": frame_mask,
            "video_timestamps": timestamps,
            "video_num_frames": lengths,
        }
        if return_tensors not in (None, "pt"):
            raise ValueError(f"MemLlavaOnevisionProcessor returns video tensors as 'pt' only, got {return_tensors!r}")
        return inputs

    def _expand_video_markers(self, text: list[str], video_inputs: dict) -> list[str]:
        markers = sum(sample.count(self.video_token) for sample in text)
        num_videos = len(video_inputs["video_num_frames"])
        if markers != num_videos:
            raise ValueError(
                f"the text has {markers} {self.video_token} markers but {num_videos} videos were given; "
                "put one marker per video (apply_chat_template with a {'type': 'video'} item adds it)"
            )
        per_sample = [sample.count(self.video_token) for sample in text]
        if video_inputs["pixel_values_videos"].shape[0] != len(text) and any(n != 1 for n in per_sample):
            raise ValueError(f"give one video per sample (markers per sample: {per_sample})")
        expanded, index = [], 0
        for sample in text:
            pieces = sample.split(self.video_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.replace_video_token(video_inputs, index) + piece
                index += 1
            expanded.append(out)
        return expanded

    # -- construction and loading ---------------------------------------------------------------------------------

    def check_argument_for_proper_class(self, argument_name, argument):
        # transformers looks the video base class up in its top-level namespace, where it is only exported when
        # torchvision is installed; check it directly so the processor also builds on torchvision-free machines.
        if argument_name == "video_processor":
            if not isinstance(argument, VideoProcessorMixin):
                raise TypeError(f"Received a {type(argument).__name__} for video_processor, expected a video processor")
            return VideoProcessorMixin
        return super().check_argument_for_proper_class(argument_name, argument)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # ProcessorMixin loads the video processor through AutoVideoProcessor, which refuses to run without
        # torchvision even for a torch-only class; load ours directly (its file is this one). The Auto classes
        # still get trust_remote_code: they read the checkpoint's config.json, whose classes are remote code.
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        own_kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
        video_processor = MemLlavaOnevisionVideoProcessor.from_pretrained(pretrained_model_name_or_path, **own_kwargs)
        by_name = {"image_processor": image_processor, "tokenizer": tokenizer, "video_processor": video_processor}
        return [by_name[name] for name in cls.get_attributes()]

    @classmethod
    def from_llava_onevision(cls, base, *, revision: str | None = None, **config_fields) -> MemLlavaOnevisionProcessor:
        """The processor for a model made by `MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(base, ...)`.

        `base` is a LLaVA-OneVision checkpoint folder or Hub repo id (e.g. `llava-hf/llava-onevision-qwen2-0.5b-ov-hf`):
        its tokenizer, chat template and image processor are reused; its video preprocessing settings carry over
        to the torchvision-free video processor. `config_fields` are the same memory fields given to the model
        (unspecified ones take the config defaults), so processor and model agree on the token count.
        """
        from transformers import AutoConfig
        from transformers.utils import cached_file

        from_pretrained_kwargs = {"revision": revision} if revision else {}
        tokenizer = AutoTokenizer.from_pretrained(base, **from_pretrained_kwargs)
        image_processor = AutoImageProcessor.from_pretrained(base, **from_pretrained_kwargs)
        video_settings = {}
        config_file = cached_file(
            base, "video_preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **from_pretrained_kwargs
        )
        if config_file:
            video_settings = MemLlavaOnevisionVideoProcessor.get_video_processor_dict(config_file)[0]
        video_settings = {
            key: video_settings[key]
            for key in ("size", "image_mean", "image_std", "rescale_factor", "do_resize", "do_rescale", "do_normalize")
            if key in video_settings
        }
        base_config = AutoConfig.from_pretrained(base, **from_pretrained_kwargs)
        vision = base_config.vision_config
        tokens_per_frame = math.ceil((vision.image_size // vision.patch_size) / 2) ** 2
        defaults = {"use_memory": True, "num_memory_tokens": 64, "num_fine_frames": 16}
        memory = {key: config_fields.get(key, value) for key, value in defaults.items()}
        chat_template = getattr(tokenizer, "chat_template", None)
        base_processor_file = cached_file(
            base, "processor_config.json", _raise_exceptions_for_missing_entries=False, **from_pretrained_kwargs
        )
        base_settings = {}
        if base_processor_file:
            import json

            with open(base_processor_file) as handle:
                base_settings = json.load(handle)
        template_file = cached_file(
            base, "chat_template.jinja", _raise_exceptions_for_missing_entries=False, **from_pretrained_kwargs
        )
        if template_file:
            with open(template_file) as handle:
                chat_template = handle.read()
        chat_template = base_settings.get("chat_template", chat_template)
        return cls(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=MemLlavaOnevisionVideoProcessor(**video_settings),
            num_image_tokens=base_settings.get("num_image_tokens", (vision.image_size // vision.patch_size) ** 2),
            vision_feature_select_strategy=base_settings.get(
                "vision_feature_select_strategy", base_config.vision_feature_select_strategy
            ),
            chat_template=chat_template,
            vision_aspect_ratio=base_settings.get("vision_aspect_ratio", "anyres_max_9"),
            tokens_per_frame=tokens_per_frame,
            **memory,
        )


def _as_video_list(videos) -> list:
    """One video or a list of videos -> a list of videos (a list of frames counts as one video)."""
    if isinstance(videos, (str, os.PathLike)) or hasattr(videos, "frames"):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        return [videos] if videos.ndim == 4 else list(videos)
    if isinstance(videos, Sequence) and videos and _is_single_frame(videos[0]):
        return [videos]
    return list(videos)


MemLlavaOnevisionProcessor.register_for_auto_class("AutoProcessor")
MemLlavaOnevisionVideoProcessor.register_for_auto_class("AutoVideoProcessor")

__all__ = ["MemLlavaOnevisionProcessor", "MemLlavaOnevisionVideoProcessor", "uniform_sample_indices"]
