"""Video decoding for MemLlava: sample frame indices, then decode only those frames.

Two backends return the same `VideoClip` for the same request:

* **decord** (`VideoReader.get_batch` on the sampled indices), used when importable and it opens the file;
* **PyAV**, our own seeking reader: one cheap demux pass (no decoding) builds the presentation-order table of
  every frame's pts, then each sampled frame is reached by seeking to the keyframe before it (only when it is not
  reachable by decoding forward from where we are) and decoding forward to exactly that pts.

Why not `transformers.video_utils.load_video`: its PyAV reader decodes every frame up to the last sampled index
(a 10-minute video is decoded almost entirely to keep 32 frames) and it needs the container's frame count, which
webm, mkv and MPEG-TS do not store, so it fails on them. The processor (remote code) still uses transformers'
loader with our sampling rule; this module is for the training data pipeline, evaluation and benchmarks.

This module is deliberately NOT imported by the model's remote-code files.
"""

from __future__ import annotations

import io
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Union

import av
import numpy as np


logger = logging.getLogger(__name__)

DEFAULT_NUM_FRAMES = 128  # the seed's setting: with neither num_frames nor fps, 128 uniform frames

VideoSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO]


class VideoDecodeError(ValueError):
    """A video that cannot be decoded. The message starts with the path (or `<bytes>` / `<file object>`)."""


@dataclass
class VideoClip:
    """Decoded frames plus where they come from.

    `frames` is uint8 `[T, H, W, 3]` RGB in displayed orientation (or whatever `transform` returned, for
    `iter_video_chunks`); `indices` are frame numbers in presentation order; `timestamps` are seconds relative to
    the first frame of the video. `skipped` lists requested frame indices that could not be decoded (they are not
    in `indices`).
    """

    frames: Any
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    duration: float
    backend: str
    num_total_frames: int
    skipped: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` reports: frame count, average frame rate, duration (s) and display rotation."""

    num_total_frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int = 0


# -- sampling -------------------------------------------------------------------------------------------------------


def _check_positive(name: str, value, *, integer: bool) -> None:
    if value is None:
        return
    if integer and (isinstance(value, bool) or int(value) != value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _window(num_total: int, video_fps: float | None, start: float | None, end: float | None) -> tuple[int, int]:
    """Inclusive frame range `[lo, hi]` covered by the `[start, end)` seconds window, clipped to the video.

    Frame i is taken to cover `[i / video_fps, (i + 1) / video_fps)` (exact for constant frame rate; an
    approximation for variable frame rate)."""
    lo, hi = 0, num_total - 1
    if start is None and end is None:
        return lo, hi
    if video_fps is None or not video_fps > 0:
        raise ValueError(f"start/end need video_fps > 0, got video_fps={video_fps!r}")
    if start is not None:
        lo = max(lo, int(math.floor(start * video_fps + 1e-9)))
    if end is not None:
        hi = min(hi, int(math.ceil(end * video_fps - 1e-9)) - 1)
    if lo > hi:
        raise ValueError(
            f"empty window: start={start!r}, end={end!r} selects no frame of a {num_total}-frame video "
            f"at {video_fps:g} fps"
        )
    return lo, hi


def sample_frame_indices(
    num_total: int,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
    max_frames: int = 256,
    start: float | None = None,
    end: float | None = None,
) -> np.ndarray:
    """Frame indices to decode, in presentation order (int64, deterministic).

    * `num_frames`: LLaVA-OV / lmms-eval's uniform rule `np.linspace(lo, hi, num_frames, dtype=int)` over the
      window. With more frames requested than the window holds, indices repeat (documented behaviour for
      too-short videos: the clip still has `num_frames` frames). `max_frames` does not apply.
    * `fps`: one frame every `video_fps / fps` frames from the window start (needs `video_fps`); an `fps` above
      the video's returns every frame. If that gives more than `max_frames` frames, `max_frames` uniform frames
      over the window are taken instead.
    * neither: `num_frames = 128` (uniform).
    * `start` / `end`: seconds (need `video_fps`), clipped to the video; a window with no frame is an error.
    """
    _check_positive("num_total", num_total, integer=True)
    _check_positive("num_frames", num_frames, integer=True)
    _check_positive("fps", fps, integer=False)
    _check_positive("max_frames", max_frames, integer=True)
    if num_frames is not None and fps is not None:
        raise ValueError(f"give num_frames or fps, not both (num_frames={num_frames!r}, fps={fps!r})")
    lo, hi = _window(int(num_total), video_fps, start, end)

    if fps is not None:
        if video_fps is None or not video_fps > 0:
            raise ValueError(f"fps={fps!r} sampling needs video_fps > 0, got video_fps={video_fps!r}")
        step = max(1.0, video_fps / fps)  # in frames; never finer than one frame
        length = hi - lo + 1
        count = int(math.ceil(length / step - 1e-9))
        if count > max_frames:
            return np.linspace(lo, hi, max_frames, dtype=int).astype(np.int64)
        return (lo + np.floor(np.arange(count) * step + 1e-9)).astype(np.int64)

    n = DEFAULT_NUM_FRAMES if num_frames is None else int(num_frames)
    return np.linspace(lo, hi, n, dtype=int).astype(np.int64)


# -- sources --------------------------------------------------------------------------------------------------------


class _Source:
    """A path, bytes or file object, reopenable from the start for each backend that tries it."""

    def __init__(self, source: VideoSource):
        self._path: str | None = None
        self._data: bytes | None = None
        self._file = None
        if isinstance(source, (str, os.PathLike)):
            self._path = os.fspath(source)
            self.label = self._path
            if not os.path.exists(self._path):
                raise VideoDecodeError(f"{self.label}: file not found")
            if os.path.isdir(self._path):
                raise VideoDecodeError(f"{self.label}: is a directory, not a video file")
            if os.path.getsize(self._path) == 0:
                raise VideoDecodeError(f"{self.label}: empty file (0 bytes)")
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self._data = bytes(source)
            self.label = "<bytes>"
            if not self._data:
                raise VideoDecodeError(f"{self.label}: empty input (0 bytes)")
        elif hasattr(source, "read"):
            self._file = source
            self.label = "<file object>"
            self._origin = source.tell() if _seekable(source) else None
            if self._origin is None:
                # A pipe or socket cannot be rewound for a second backend: read it once.
                self._data, self._file = source.read(), None
            if self._data is not None and not self._data:
                raise VideoDecodeError(f"{self.label}: empty input (0 bytes)")
        else:
            raise TypeError(f"source must be a path, bytes or a binary file object, got {type(source).__name__}")

    def open(self):
        """Something `av.open` and `decord.VideoReader` accept, positioned at the start of the video."""
        if self._path is not None:
            return self._path
        if self._data is not None:
            return io.BytesIO(self._data)
        self._file.seek(self._origin)
        return self._file


def _seekable(fileobj) -> bool:
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError):
        return False


# -- PyAV backend ---------------------------------------------------------------------------------------------------


class _PyAVReader:
    """Seeking PyAV reader over one video stream.

    A demux pass (packets only, no decoding) builds the sorted pts table of all frames: that gives the frame count
    even for containers that store none (webm, mkv, ts) and the exact index -> pts map, also for variable frame
    rate (decord indexes the same way). Reading then seeks to the keyframe before a target only when the target
    cannot be reached by decoding forward within the current GOP.
    """

    backend = "pyav"

    def __init__(self, source: _Source):
        self.label = source.label
        try:
            self.container = av.open(source.open(), mode="r")
        except (av.error.FFmpegError, OSError, ValueError) as error:
            raise VideoDecodeError(f"{self.label}: not a readable video ({_reason(error)})") from error
        try:
            self._index(source)
        except BaseException:
            self.container.close()
            raise
        self._frames: Iterator | None = None  # decoded frames since the last seek
        self._pending = None  # a frame pulled from _frames but not consumed yet
        self._last_pts: int | None = None  # pts of the last frame pulled from the decoder

    def _index(self, source: _Source) -> None:
        if not self.container.streams.video:
            raise VideoDecodeError(f"{self.label}: no video stream")
        self.stream = self.container.streams.video[0]
        # Decoding threads help on long GOPs; "AUTO" lets FFmpeg pick frame/slice threading.
        self.stream.thread_type = "AUTO"
        pts, keys, last_duration = [], [], 0
        try:
            for packet in self.container.demux(self.stream):
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is None or packet.size == 0:
                    continue  # the flush packet at the end, or a packet that cannot be placed
                pts.append(stamp)
                if packet.is_keyframe:
                    keys.append(stamp)
                last_duration = packet.duration or last_duration
        except av.error.FFmpegError as error:
            # A truncated or damaged tail: keep the frames indexed so far.
            logger.warning("%s: demuxing stopped early (%s); using %d frames", self.label, _reason(error), len(pts))
        if not pts:
            raise VideoDecodeError(f"{self.label}: video stream has 0 frames")
        self.pts = np.sort(np.asarray(pts, dtype=np.int64))
        self.key_pts = np.sort(np.asarray(keys or [self.pts[0]], dtype=np.int64))
        self.time_base = float(self.stream.time_base)
        self.num_total = len(self.pts)
        span = float(self.pts[-1] - self.pts[0]) * self.time_base
        rate = self.stream.average_rate or self.stream.guessed_rate
        if rate:
            self.fps = float(rate)
        else:
            self.fps = (self.num_total - 1) / span if span > 0 else 1.0
        tail = last_duration * self.time_base if last_duration else 1.0 / self.fps
        self.duration = span + tail
        self.width, self.height = self.stream.codec_context.width, self.stream.codec_context.height

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        return (self.pts[indices] - self.pts[0]).astype(np.float64) * self.time_base

    # -- decoding

    def _decoded(self) -> Iterator:
        """Decoded frames from the current container position; a packet that fails to decode is skipped."""
        for packet in self.container.demux(self.stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                logger.debug("%s: packet at pts %s failed to decode: %s", self.label, packet.pts, _reason(error))
                continue
            yield from frames

    def _seek(self, target_pts: int, attempt: int) -> None:
        """Seek to the `attempt`-th keyframe at or before `target_pts` (0 = the nearest)."""
        position = int(np.searchsorted(self.key_pts, target_pts, side="right")) - 1 - attempt
        keyframe = int(self.key_pts[max(position, 0)])
        self.container.seek(keyframe, stream=self.stream, backward=True, any_frame=False)
        self._frames, self._pending, self._last_pts = self._decoded(), None, None

    def _next_frame(self):
        if self._pending is not None:
            frame, self._pending = self._pending, None
            return frame
        for frame in self._frames:
            if frame.pts is not None:
                self._last_pts = frame.pts
                return frame
        return None

    def _must_seek(self, target_pts: int) -> bool:
        if self._frames is None or self._last_pts is None:
            return True
        if self._pending is not None and target_pts <= self._pending.pts:
            # Either the pending frame is the target, or the decoder went past the target without producing it.
            return False
        if target_pts <= self._last_pts:
            return True  # behind the decoder (a repeated index in the next chunk)
        # A keyframe between here and the target: seeking to it skips decoding the rest of this GOP.
        keyframe = self.key_pts[np.searchsorted(self.key_pts, target_pts, side="right") - 1]
        return bool(keyframe > self._last_pts)

    def _read_one(self, target_pts: int):
        """The decoded frame with exactly `target_pts`, or None when the decoder never produces it."""
        for attempt in range(3):
            seeked = attempt > 0 or self._must_seek(target_pts)
            if seeked:
                self._seek(target_pts, attempt)
            frame, first = self._next_frame(), True
            while frame is not None and frame.pts < target_pts:
                frame, first = self._next_frame(), False
            if frame is None:
                return None  # end of stream
            if frame.pts == target_pts:
                return frame
            self._pending = frame  # past the target; it may be the next target
            if not (seeked and first):
                return None  # decoded through the target's slot without getting it: corrupt or dropped
            # The seek landed after the target (e.g. B-frames shown before their keyframe, or a damaged
            # keyframe): retry from an earlier keyframe.
        return None

    def read(self, indices: Sequence[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        """Decode sorted unique `indices`; returns `{index: rgb uint8}` and the indices that failed."""
        frames, failed = {}, []
        for index in indices:
            frame = self._read_one(int(self.pts[index]))
            if frame is None:
                failed.append(int(index))
                continue
            try:
                frames[int(index)] = _rotate(frame.to_ndarray(format="rgb24"), frame.rotation)
            except (av.error.FFmpegError, ValueError) as error:
                logger.debug("%s: frame %d could not be converted: %s", self.label, index, _reason(error))
                failed.append(int(index))
        return frames, failed

    def close(self) -> None:
        self.container.close()


def _rotate(array: np.ndarray, rotation) -> np.ndarray:
    """Apply the display matrix's rotation (degrees counter-clockwise, as FFmpeg and PyAV report it)."""
    quarter_turns = int(round((rotation or 0) / 90)) % 4
    return np.ascontiguousarray(np.rot90(array, k=quarter_turns)) if quarter_turns else array


def _reason(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:200]


# -- decord backend -------------------------------------------------------------------------------------------------


class _DecordReader:
    """decord's `VideoReader`, decoding only the sampled indices with `get_batch`.

    decord ignores the display rotation, so it is read with PyAV (one decoded frame) and applied here.
    """

    backend = "decord"

    def __init__(self, source: _Source, decord_module, rotation: int, retry_with_pyav: bool = False):
        self.label = source.label
        self.rotation = rotation
        # backend="auto": frames decord cannot decode (it gives up on the rest of a damaged GOP where FFmpeg's own
        # decoder conceals the damage) are retried with the PyAV reader, opened only when needed.
        self._source = source if retry_with_pyav else None
        self._pyav: _PyAVReader | None = None
        try:
            # One decoding thread: with FFmpeg frame threading (num_threads=0) decord can deadlock in VideoReader.__del__
            # (seen inside Trainer loops); the sampled frames are few, so threads buy little here.
            self.reader = decord_module.VideoReader(source.open(), ctx=decord_module.cpu(0), num_threads=1)
            self.num_total = len(self.reader)
        except Exception as error:  # decord raises its own DECORDError / RuntimeError for anything it dislikes
            raise VideoDecodeError(f"{self.label}: decord cannot open it ({_reason(error)})") from error
        if self.num_total <= 0:
            raise VideoDecodeError(f"{self.label}: video stream has 0 frames")
        self.fps = float(self.reader.get_avg_fps())
        spans = self.reader.get_frame_timestamp([0, self.num_total - 1])
        self._origin = float(spans[0, 0])
        self.duration = float(spans[1, 1]) - self._origin

    def timestamps(self, indices: np.ndarray) -> np.ndarray:
        if len(indices) == 0:
            return np.zeros(0, dtype=np.float64)
        return self.reader.get_frame_timestamp(list(map(int, indices)))[:, 0].astype(np.float64) - self._origin

    def read(self, indices: Sequence[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        indices = [int(i) for i in indices]
        if not indices:
            return {}, []
        try:
            batch = self.reader.get_batch(indices).asnumpy()
        except Exception as error:
            # decord fails a whole batch on one bad frame: retry one by one to find which.
            logger.debug("%s: decord batch failed (%s); decoding frame by frame", self.label, _reason(error))
            return self._retry(*self._read_each(indices))
        return {index: _rotate(frame, self.rotation) for index, frame in zip(indices, batch)}, []

    def _retry(self, frames: dict[int, np.ndarray], failed: list[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        if not failed or self._source is None:
            return frames, failed
        logger.debug("%s: retrying %d frame(s) decord could not decode with PyAV", self.label, len(failed))
        if self._pyav is None:
            self._pyav = _PyAVReader(self._source)
        if self._pyav.num_total != self.num_total:
            return frames, failed  # the backends disagree on frame numbering: do not mix them
        recovered, failed = self._pyav.read(failed)
        frames.update(recovered)
        return frames, failed

    def _read_each(self, indices: list[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        frames, failed = {}, []
        for index in indices:
            try:
                frames[index] = _rotate(self.reader[index].asnumpy(), self.rotation)
            except Exception:
                failed.append(index)
        return frames, failed

    def close(self) -> None:
        del self.reader
        if self._pyav is not None:
            self._pyav.close()


def _import_decord():
    try:
        import decord
    except ImportError:
        return None
    return decord


# -- opening --------------------------------------------------------------------------------------------------------


def _probe_rotation(source: _Source) -> int:
    """Display rotation (degrees counter-clockwise) read from the first decoded frame; 0 when unknown.

    Opening with PyAV first also validates unknown bytes before they reach decord."""
    try:
        container = av.open(source.open(), mode="r")
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise VideoDecodeError(f"{source.label}: not a readable video ({_reason(error)})") from error
    with container:
        if not container.streams.video:
            raise VideoDecodeError(f"{source.label}: no video stream")
        try:
            for frame in container.decode(video=0):
                return int(round(frame.rotation or 0))
        except av.error.FFmpegError:
            pass  # a damaged first frame is the reader's problem, not the probe's
    return 0


def _open_reader(source: _Source, backend: str):
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    if backend == "pyav":
        return _PyAVReader(source)
    decord = _import_decord()
    if decord is None:
        if backend == "decord":
            raise ImportError("backend='decord' needs the decord package (pip install decord)")
        logger.debug("%s: decord is not installed; using PyAV", source.label)
        return _PyAVReader(source)
    try:
        rotation = _probe_rotation(source)
        reader = _DecordReader(source, decord, rotation, retry_with_pyav=backend == "auto")
    except VideoDecodeError as error:
        if backend == "decord":
            raise
        logger.debug("%s: decord unusable (%s); falling back to PyAV", source.label, error)
        return _PyAVReader(source)
    logger.debug("%s: decoding with decord", source.label)
    return reader


def probe_video(source: VideoSource, *, backend: str = "pyav") -> VideoInfo:
    """Frame count, average fps, duration and size without decoding pixels (PyAV demuxes packets only)."""
    src = _Source(source)
    reader = _open_reader(src, backend)
    try:
        if isinstance(reader, _PyAVReader):
            return VideoInfo(reader.num_total, reader.fps, reader.duration, reader.width, reader.height)
        height, width = reader.reader[0].shape[:2]
        return VideoInfo(reader.num_total, reader.fps, reader.duration, width, height, reader.rotation)
    finally:
        reader.close()


# -- public loaders -------------------------------------------------------------------------------------------------


def _sample(reader, label: str, **sampling) -> np.ndarray:
    try:
        return sample_frame_indices(reader.num_total, video_fps=reader.fps, **sampling)
    except ValueError as error:
        raise VideoDecodeError(f"{label}: {error}") from error


def _decode(reader, indices: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, list[int]]:
    """Decode `indices` (any order, repeats allowed); returns frames, the kept indices and the failed ones."""
    unique = np.unique(indices)
    decoded, failed = reader.read(unique)
    keep = np.fromiter((int(i) in decoded for i in indices), dtype=bool, count=len(indices))
    kept = indices[keep]
    frames = np.stack([decoded[int(i)] for i in kept]) if len(kept) else None
    return frames, kept, sorted(failed)


def _too_many_failed(label: str, failed: int, requested: int) -> None:
    if failed and failed == requested:
        raise VideoDecodeError(f"{label}: none of the {requested} requested frames could be decoded")
    if failed * 2 > requested:
        raise VideoDecodeError(f"{label}: {failed} of {requested} requested frames could not be decoded")


def _warn_skipped(label: str, skipped: list[int]) -> None:
    if skipped:
        logger.warning("%s: %d frame(s) could not be decoded and were skipped: %s", label, len(skipped), skipped[:20])


def load_video(
    source: VideoSource,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = 256,
    start: float | None = None,
    end: float | None = None,
    backend: str = "auto",
) -> VideoClip:
    """Decode the frames `sample_frame_indices` selects from a path, bytes or binary file object.

    `backend="auto"` uses decord when it is installed and opens the video, else PyAV. A video shorter than the
    request gives repeated frames (the linspace rule). Frames that fail to decode are dropped and listed in
    `clip.skipped` (with a warning); more than half of the requested frames failing raises `VideoDecodeError`.
    Decoders that conceal damage (output a patched frame instead of an error) give that frame, not a skip.
    """
    src = _Source(source)
    reader = _open_reader(src, backend)
    try:
        indices = _sample(reader, src.label, num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
        frames, kept, skipped = _decode(reader, indices)
        _too_many_failed(src.label, len(skipped), len(np.unique(indices)))
        _warn_skipped(src.label, skipped)
        return _clip(reader, frames, kept, skipped)
    finally:
        reader.close()


def _clip(reader, frames, kept: np.ndarray, skipped: list[int]) -> VideoClip:
    return VideoClip(
        frames=frames,
        indices=kept,
        timestamps=reader.timestamps(kept),
        fps=reader.fps,
        duration=reader.duration,
        backend=reader.backend,
        num_total_frames=reader.num_total,
        skipped=skipped,
    )


def iter_video_chunks(
    source: VideoSource,
    *,
    chunk_size: int,
    num_frames: int | None = None,
    fps: float | None = None,
    max_frames: int = 256,
    start: float | None = None,
    end: float | None = None,
    backend: str = "auto",
    transform: Callable[[np.ndarray], Any] | None = None,
) -> Iterator[VideoClip]:
    """Yield `VideoClip`s of at most `chunk_size` frames: consecutive slices of the indices `load_video` would
    decode, decoded chunk by chunk so a long video's pixels never sit in memory at once.

    `transform(frames_uint8)` is applied per chunk and its result is the chunk's `.frames`. Failed frames are
    skipped per chunk as in `load_video`; the "more than half failed" error is raised as soon as the failures
    exceed half of the whole request (possibly after some chunks were yielded).
    """
    _check_positive("chunk_size", chunk_size, integer=True)
    src = _Source(source)
    reader = _open_reader(src, backend)
    try:
        indices = _sample(reader, src.label, num_frames=num_frames, fps=fps, max_frames=max_frames, start=start, end=end)
        requested, failed_total = len(np.unique(indices)), set()
        for begin in range(0, len(indices), chunk_size):
            frames, kept, skipped = _decode(reader, indices[begin : begin + chunk_size])
            failed_total.update(skipped)
            _too_many_failed(src.label, len(failed_total), requested)
            _warn_skipped(src.label, skipped)
            if frames is not None and transform is not None:
                frames = transform(frames)
            yield _clip(reader, frames, kept, skipped)
    finally:
        reader.close()
