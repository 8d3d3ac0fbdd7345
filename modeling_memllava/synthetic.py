"""Synthetic videos written with real codecs (PyAV / FFmpeg), for tests, benchmarks and the offline demo.

Nothing here is a mock: the files are real h264/mpeg4/vp9 streams that decord and PyAV decode like any video.
"""

from __future__ import annotations

import fractions
import os
from collections.abc import Iterable

import av
import numpy as np


# Codec -> container suffix that carries it. yuv420p needs even sizes; odd sizes are padded by the encoder setup.
_DEFAULT_CONTAINER = {"h264": "mp4", "libx264": "mp4", "mpeg4": "mp4", "libvpx-vp9": "webm", "libvpx": "webm"}


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    *,
    fps: float = 8.0,
    codec: str = "h264",
    frame_times: Iterable[float] | None = None,
    crf: int | None = 18,
) -> str:
    """Encode RGB uint8 frames `[H, W, 3]` into a video file and return its path.

    `frames` may be a generator, so a 10-minute video never sits in memory. `frame_times` (seconds, increasing)
    gives a variable frame rate: each frame gets its own presentation timestamp instead of `i / fps`.
    h264 in yuv420p needs even sizes (libx264 refuses 427x240); mpeg4 writes odd sizes.
    """
    path = os.fspath(path)
    times = iter(frame_times) if frame_times is not None else None
    time_base = fractions.Fraction(1, 1000) if times is not None else fractions.Fraction(1, int(round(fps * 1000)))
    with av.open(path, mode="w") as container:
        stream = None
        for index, frame in enumerate(frames):
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if stream is None:
                height, width = frame.shape[:2]
                if codec in ("h264", "libx264") and (height % 2 or width % 2):
                    raise ValueError(f"{path}: h264 (yuv420p) needs even frame sizes, got {width}x{height}; use mpeg4")
                stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
                stream.width, stream.height = width, height
                stream.pix_fmt = "yuv420p"
                # Both the codec's and the stream's time base: with only the stream's, the muxer rejects
                # the variable-rate timestamps.
                stream.codec_context.time_base = time_base
                stream.time_base = time_base
                if crf is not None and codec in ("h264", "libx264"):
                    stream.options = {"crf": str(crf), "preset": "ultrafast"}
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if times is not None:
                video_frame.pts = int(round(next(times) / time_base))
            else:
                video_frame.pts = index * int(round(1 / (fps * time_base)))
            video_frame.time_base = time_base
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"{path}: no frames given to write_video")
        for packet in stream.encode():
            container.mux(packet)
    return path


def moving_square_frames(
    num_frames: int, height: int = 64, width: int = 64, *, seed: int = 0
) -> Iterable[np.ndarray]:
    """Frames of a textured background with a bright square moving across it: cheap, deterministic content
    whose every frame differs (so frame-index mix-ups show up in pixel comparisons)."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 160, size=(height, width, 3), dtype=np.uint8)
    side = max(4, min(height, width) // 6)
    for index in range(num_frames):
        frame = background.copy()
        x = (index * 3) % max(1, width - side)
        y = (index * 2) % max(1, height - side)
        frame[y : y + side, x : x + side] = (255, (index * 7) % 256, 40)
        # A per-frame intensity stripe makes neighbouring frames distinguishable even when the square wraps.
        frame[:2, :, :] = index % 256
        yield frame


def make_video(
    path: str | os.PathLike,
    num_frames: int = 16,
    *,
    height: int = 64,
    width: int = 64,
    fps: float = 8.0,
    codec: str = "h264",
    seed: int = 0,
) -> str:
    """Write a `moving_square_frames` video: the one-liner tests and the demo use."""
    return write_video(path, moving_square_frames(num_frames, height, width, seed=seed), fps=fps, codec=codec)


# -- needle in a video haystack -------------------------------------------------------------------------------------

NEEDLE_COLOURS = {"red": (230, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 230), "yellow": (235, 220, 30)}


def needle_frames(
    num_frames: int,
    needle_index: int,
    colour: str,
    height: int = 64,
    width: int = 64,
    *,
    seed: int = 0,
    length: int = 1,
) -> Iterable[np.ndarray]:
    """Grey distractor frames (noise texture and drifting grey blobs, no colour at all) with one event: from frame
    `needle_index` for `length` frames a large disc of `colour` shows, the only coloured thing in the video."""
    if length < 1 or not 0 <= needle_index <= num_frames - length:
        raise ValueError(f"a {length}-frame needle at {needle_index} does not fit a {num_frames}-frame video")
    rng = np.random.default_rng(seed)
    texture = rng.integers(60, 140, size=(height, width), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    blobs = rng.uniform(0, 1, size=(3, 4))  # x, y, speed, phase of each grey blob
    for index in range(num_frames):
        grey = texture.astype(np.int16)
        for x0, y0, speed, phase in blobs:
            cx = (x0 * width + index * speed * 2) % width
            cy = (y0 * height + 10 * np.sin(index * 0.2 + 6 * phase)) % height
            grey[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(height, width) / 8) ** 2] += 70
        frame = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        if index == needle_index:
            cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
        if needle_index <= index < needle_index + length:
            frame[(xx - cx) ** 2 + (yy - cy) ** 2 < (min(height, width) / 3.5) ** 2] = NEEDLE_COLOURS[colour]
        yield frame


def make_needle_video(
    path, num_frames: int, needle_index: int, colour: str, *, size: int = 64, fps: float = 4.0, seed: int = 0, length: int = 1
) -> str:
    """Write a needle video with a real codec (h264)."""
    frames = needle_frames(num_frames, needle_index, colour, size, size, seed=seed, length=length)
    return write_video(path, frames, fps=fps)
