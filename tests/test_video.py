"""Video decoding: sampling rule, decord/PyAV parity on real codecs, chunked reading and bad input.

Every video is written with a real encoder (PyAV / FFmpeg) into a temporary directory; nothing is mocked.
"""

from __future__ import annotations

import io
import logging

import av
import numpy as np
import pytest

from modeling_memllava.synthetic import make_video, moving_square_frames, write_video
from modeling_memllava.video import (
    VideoClip,
    VideoDecodeError,
    iter_video_chunks,
    load_video,
    probe_video,
    sample_frame_indices,
)


# Frame times (s) of the variable-frame-rate video: bursts of 20 fps separated by 0.3 s gaps.
VFR_TIMES = np.cumsum([0.0] + [0.3 if i % 3 == 0 else 0.05 for i in range(29)])


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """name -> (path, number of frames, width, height) for the shared test videos."""
    root = tmp_path_factory.mktemp("videos")
    out = {}
    # h264 needs even sizes (yuv420p); mpeg4 takes the odd 427x240.
    out["h264"] = (make_video(root / "h264.mp4", 40, height=240, width=426, fps=8, codec="h264"), 40, 426, 240)
    out["mpeg4_odd"] = (make_video(root / "mpeg4.mp4", 40, height=240, width=427, fps=8, codec="mpeg4"), 40, 427, 240)
    # webm stores no frame count: the PyAV reader must count packets and seek by pts.
    out["vp9_webm"] = (make_video(root / "vp9.webm", 40, height=64, width=64, fps=8, codec="libvpx-vp9"), 40, 64, 64)
    out["vfr"] = (
        write_video(root / "vfr.mp4", moving_square_frames(30, 64, 64), fps=8, frame_times=VFR_TIMES),
        30, 64, 64,
    )
    out["one_frame"] = (make_video(root / "one.mp4", 1, height=64, width=64, fps=8), 1, 64, 64)
    # "10 minutes at low resolution": 600 s at 1 fps, 64x36 (x264's default GOP of 250 makes seeking matter).
    out["ten_minutes"] = (make_video(root / "long.mp4", 600, height=36, width=64, fps=1, codec="h264"), 600, 64, 36)
    return out


def _source_frames(name, videos):
    num, width, height = videos[name][1:]
    return np.stack(list(moving_square_frames(num, height, width)))


def _nearest_source_frame(frames, source):
    """For each decoded frame, the index of the source frame it looks most like (robust to codec noise)."""
    diffs = np.abs(frames[:, None].astype(np.int16) - source[None].astype(np.int16)).mean(axis=(2, 3, 4))
    return diffs.argmin(axis=1)


# -- sampling ---------------------------------------------------------------------------------------------------------


def test_uniform_rule_is_linspace():
    assert sample_frame_indices(100, num_frames=8).tolist() == np.linspace(0, 99, 8, dtype=int).tolist()
    assert sample_frame_indices(100, num_frames=8).tolist() == [0, 14, 28, 42, 56, 70, 84, 99]
    assert sample_frame_indices(10, num_frames=1).tolist() == [0]
    assert sample_frame_indices(10, num_frames=10).tolist() == list(range(10))
    assert sample_frame_indices(100, num_frames=8).dtype == np.int64


def test_uniform_repeats_when_video_is_short():
    indices = sample_frame_indices(3, num_frames=7)
    assert indices.tolist() == [0, 0, 0, 1, 1, 1, 2]
    assert sample_frame_indices(1, num_frames=4).tolist() == [0, 0, 0, 0]


def test_default_is_128_uniform_frames():
    assert len(sample_frame_indices(1000)) == 128
    assert sample_frame_indices(1000).tolist() == np.linspace(0, 999, 128, dtype=int).tolist()
    assert len(sample_frame_indices(1000, max_frames=16)) == 128  # max_frames caps fps mode only


def test_fps_mode_and_max_frames_cap():
    assert sample_frame_indices(80, fps=1, video_fps=8).tolist() == list(range(0, 80, 8))
    assert sample_frame_indices(81, fps=1, video_fps=8).tolist() == list(range(0, 81, 8))
    assert sample_frame_indices(30, fps=2, video_fps=30).tolist() == [0, 15]
    # Faster than the video: every frame once, never repeats.
    assert sample_frame_indices(10, fps=100, video_fps=10).tolist() == list(range(10))
    # 600 s at 30 fps sampled at 1 fps is 600 frames > 256: uniform 256 over the window instead.
    capped = sample_frame_indices(18000, fps=1, video_fps=30, max_frames=256)
    assert capped.tolist() == np.linspace(0, 17999, 256, dtype=int).tolist()


def test_start_end_window():
    # 10 s at 10 fps; [2 s, 4 s) is frames 20..39.
    assert sample_frame_indices(100, num_frames=3, video_fps=10, start=2, end=4).tolist() == [20, 29, 39]
    assert sample_frame_indices(100, fps=1, video_fps=10, start=2, end=4).tolist() == [20, 30]
    # Clipped to the video.
    assert sample_frame_indices(100, num_frames=2, video_fps=10, start=-5, end=50).tolist() == [0, 99]
    with pytest.raises(ValueError, match="empty window"):
        sample_frame_indices(100, num_frames=2, video_fps=10, start=20)
    with pytest.raises(ValueError, match="empty window"):
        sample_frame_indices(100, num_frames=2, video_fps=10, start=4, end=3)
    with pytest.raises(ValueError, match="video_fps"):
        sample_frame_indices(100, num_frames=2, start=1)


def test_sampling_is_deterministic():
    a = sample_frame_indices(12345, fps=0.7, video_fps=29.97, start=3.3, end=400.1)
    b = sample_frame_indices(12345, fps=0.7, video_fps=29.97, start=3.3, end=400.1)
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_total=10, num_frames=0), "num_frames"),
        (dict(num_total=10, num_frames=-3), "num_frames"),
        (dict(num_total=10, fps=0, video_fps=8), "fps"),
        (dict(num_total=10, fps=-1.0, video_fps=8), "fps"),
        (dict(num_total=0, num_frames=4), "num_total"),
        (dict(num_total=10, fps=1, video_fps=8, max_frames=0), "max_frames"),
        (dict(num_total=10, num_frames=4, fps=1, video_fps=8), "not both"),
        (dict(num_total=10, fps=1), "video_fps"),
    ],
)
def test_bad_sampling_arguments(kwargs, name):
    num_total = kwargs.pop("num_total")
    with pytest.raises(ValueError, match=name):
        sample_frame_indices(num_total, **kwargs)


# -- decoding ---------------------------------------------------------------------------------------------------------

REQUESTS = {
    "uniform8": dict(num_frames=8),
    "repeat": dict(num_frames=50),  # more than most test videos hold
    "fps2": dict(fps=2),
    "window": dict(num_frames=5, start=1.0, end=3.0),
}
PARITY_VIDEOS = ["h264", "mpeg4_odd", "vp9_webm", "vfr", "one_frame", "ten_minutes"]


# A 0.125 s one-frame video has no frame in the [1 s, 3 s) window: that pair is an error case, tested elsewhere.
PARITY_CASES = [(n, r) for n in PARITY_VIDEOS for r in REQUESTS if not (n == "one_frame" and r == "window")]


@pytest.mark.parametrize("name, request_name", PARITY_CASES)
def test_decord_and_pyav_agree(videos, name, request_name):
    pytest.importorskip("decord")
    path, num, width, height = videos[name]
    kwargs = REQUESTS[request_name]
    clip_d = load_video(path, backend="decord", **kwargs)
    clip_p = load_video(path, backend="pyav", **kwargs)
    assert (clip_d.backend, clip_p.backend) == ("decord", "pyav")
    assert clip_d.num_total_frames == clip_p.num_total_frames == num
    np.testing.assert_array_equal(clip_d.indices, clip_p.indices)
    np.testing.assert_allclose(clip_d.timestamps, clip_p.timestamps, atol=1e-3)
    assert clip_d.fps == pytest.approx(clip_p.fps, rel=1e-3)
    assert clip_d.duration == pytest.approx(clip_p.duration, abs=1e-3)
    assert clip_d.frames.shape == clip_p.frames.shape == (len(clip_p), height, width, 3)
    assert clip_p.frames.dtype == np.uint8
    assert np.abs(clip_d.frames.astype(np.int16) - clip_p.frames.astype(np.int16)).mean() < 3


@pytest.mark.parametrize("name", ["h264", "mpeg4_odd", "vp9_webm", "vfr", "ten_minutes"])
def test_pyav_returns_the_requested_frames(videos, name):
    """The seeking reader returns the right frames, not merely the same ones as decord."""
    path = videos[name][0]
    clip = load_video(path, num_frames=12, backend="pyav")
    assert clip.skipped == []
    assert len(clip) == 12
    assert _nearest_source_frame(clip.frames, _source_frames(name, videos)).tolist() == clip.indices.tolist()


def test_webm_without_frame_count(videos):
    path = videos["vp9_webm"][0]
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0  # the reason transformers' PyAV reader fails here
    clip = load_video(path, num_frames=40, backend="pyav")
    assert clip.num_total_frames == 40
    assert clip.indices.tolist() == list(range(40))


def test_variable_frame_rate_timestamps(videos):
    path = videos["vfr"][0]
    clip = load_video(path, num_frames=30, backend="pyav")
    assert clip.indices.tolist() == list(range(30))
    np.testing.assert_allclose(clip.timestamps, VFR_TIMES, atol=1e-3)
    # Duration = last pts + the last packet's duration (the muxer gives it the nominal 1/8 s).
    assert VFR_TIMES[-1] < clip.duration <= VFR_TIMES[-1] + 0.2
    assert clip.fps == pytest.approx(30 / clip.duration, rel=0.05)


def test_one_frame_video_repeats(videos):
    clip = load_video(videos["one_frame"][0], num_frames=4, backend="pyav")
    assert clip.indices.tolist() == [0, 0, 0, 0]
    assert clip.frames.shape[0] == 4 and np.array_equal(clip.frames[0], clip.frames[3])


def test_ten_minute_video(videos):
    path = videos["ten_minutes"][0]
    info = probe_video(path)
    assert (info.num_total_frames, info.width, info.height) == (600, 64, 36)
    assert info.duration == pytest.approx(600, abs=1)
    clip = load_video(path, fps=0.1, backend="pyav")  # one frame every 10 s
    assert clip.indices.tolist() == list(range(0, 600, 10))
    np.testing.assert_allclose(clip.timestamps, np.arange(0, 600, 10), atol=1e-3)
    window = load_video(path, num_frames=3, start=300, end=360, backend="pyav")
    assert window.indices.tolist() == [300, 329, 359]


def test_auto_backend(videos):
    clip = load_video(videos["h264"][0], num_frames=4)
    try:
        import decord  # noqa: F401

        assert clip.backend == "decord"
    except ImportError:
        assert clip.backend == "pyav"


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
@pytest.mark.parametrize("name", ["h264", "vp9_webm", "ten_minutes"])
def test_chunks_concatenate_to_load_video(videos, name, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    path = videos[name][0]
    whole = load_video(path, num_frames=23, backend=backend)
    chunks = list(iter_video_chunks(path, chunk_size=5, num_frames=23, backend=backend))
    assert [len(chunk) for chunk in chunks] == [5, 5, 5, 5, 3]
    assert all(isinstance(chunk, VideoClip) for chunk in chunks)
    np.testing.assert_array_equal(np.concatenate([c.indices for c in chunks]), whole.indices)
    np.testing.assert_array_equal(np.concatenate([c.timestamps for c in chunks]), whole.timestamps)
    np.testing.assert_array_equal(np.concatenate([c.frames for c in chunks]), whole.frames)


def test_chunks_with_repeats_and_transform(videos):
    path = videos["one_frame"][0]
    chunks = list(iter_video_chunks(path, chunk_size=3, num_frames=7, backend="pyav", transform=lambda f: f.mean()))
    assert [c.indices.tolist() for c in chunks] == [[0, 0, 0], [0, 0, 0], [0]]
    assert all(isinstance(c.frames, np.floating) for c in chunks)


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_bytes_input(videos, backend):
    path = videos["vp9_webm"][0]
    data = open(path, "rb").read()
    clip = load_video(data, num_frames=6, backend=backend)
    reference = load_video(path, num_frames=6, backend="pyav")
    np.testing.assert_array_equal(clip.indices, reference.indices)
    assert np.abs(clip.frames.astype(np.int16) - reference.frames.astype(np.int16)).mean() < 3


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_file_object_input(videos, backend):
    path = videos["h264"][0]
    with open(path, "rb") as handle:
        clip = load_video(handle, num_frames=6, backend=backend)
    chunks = list(iter_video_chunks(io.BytesIO(open(path, "rb").read()), chunk_size=4, num_frames=6, backend=backend))
    reference = load_video(path, num_frames=6, backend="pyav")
    np.testing.assert_array_equal(clip.indices, reference.indices)
    np.testing.assert_array_equal(np.concatenate([c.indices for c in chunks]), reference.indices)
    assert np.abs(clip.frames.astype(np.int16) - reference.frames.astype(np.int16)).mean() < 3


# -- bad input --------------------------------------------------------------------------------------------------------

BACKENDS = ["pyav", "auto"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_file(tmp_path, backend):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match=r"^.*nope\.mp4: file not found"):
        load_video(path, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_file(tmp_path, backend):
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    with pytest.raises(VideoDecodeError, match=r"empty\.mp4: empty file \(0 bytes\)") as info:
        load_video(path, backend=backend)
    assert str(info.value).startswith(str(path))
    with pytest.raises(VideoDecodeError, match=r"^<bytes>: empty input"):
        load_video(b"", backend=backend)


@pytest.mark.parametrize("backend", ["pyav", "decord", "auto"])
def test_non_video_bytes(tmp_path, backend):
    if backend == "decord":
        pytest.importorskip("decord")
    path = tmp_path / "notes.mp4"
    path.write_bytes(b"this is a text file, not a video\n" * 20)
    with pytest.raises(VideoDecodeError) as info:
        load_video(path, backend=backend)
    assert str(info.value).startswith(f"{path}: ")
    assert "not a readable video" in str(info.value) or "cannot open" in str(info.value)
    garbage = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(VideoDecodeError, match=r"^<bytes>: "):
        load_video(garbage, backend=backend)
    with pytest.raises(VideoDecodeError, match=r"^<file object>: "):
        load_video(io.BytesIO(garbage), backend=backend)


def _overwrite_packets(src, dst, select, *, fill):
    """Copy `src` to `dst` with the payload of the packets whose frame number `select` accepts overwritten
    in place (container structure intact, so only decoding fails). Frame numbers count packets in order."""
    data = bytearray(open(src, "rb").read())
    with av.open(src) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    rng = np.random.default_rng(0)
    for number, (pos, size) in enumerate(packets):
        if select(number):
            data[pos : pos + size] = rng.integers(0, 256, size, dtype=np.uint8).tobytes() if fill == "random" else bytes(size)
    open(dst, "wb").write(data)
    return dst


@pytest.fixture(scope="module")
def corrupt_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    # mpeg4 without B-frames: packet order is frame order, and its default GOP of 12 keeps the damage local.
    src = make_video(root / "src.mp4", 48, height=64, width=64, fps=8, codec="mpeg4")
    middle = _overwrite_packets(src, root / "middle.mp4", lambda n: 20 <= n <= 22, fill="random")
    dead = _overwrite_packets(src, root / "dead.mp4", lambda n: True, fill="zeros")
    return {"middle": str(middle), "dead": str(dead)}


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_corrupt_frames_in_the_middle_are_skipped(corrupt_videos, backend, caplog):
    path = corrupt_videos["middle"]
    with caplog.at_level(logging.WARNING, logger="modeling_memllava.video"):
        clip = load_video(path, num_frames=48, backend=backend)
    assert clip.skipped == [20, 21, 22]
    assert clip.indices.tolist() == [i for i in range(48) if i not in (20, 21, 22)]
    assert clip.frames.shape[0] == len(clip.timestamps) == 45
    assert any(path in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    chunks = list(iter_video_chunks(path, chunk_size=16, num_frames=48, backend=backend))
    assert sum((c.skipped for c in chunks), []) == [20, 21, 22]
    # Asking mostly for the damaged frames fails loudly instead of returning a near-empty clip.
    with pytest.raises(VideoDecodeError, match=r"middle\.mp4: 3 of 4 requested frames could not be decoded"):
        load_video(path, num_frames=4, start=20 / 8, end=24 / 8, backend=backend)


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_video_with_no_decodable_frame(corrupt_videos, backend):
    path = corrupt_videos["dead"]
    with pytest.raises(VideoDecodeError) as info:
        load_video(path, num_frames=8, backend=backend)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "none of the 8 requested frames could be decoded" in message or "cannot open" in message


def test_video_stream_without_frames(tmp_path):
    path = tmp_path / "hollow.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
    with pytest.raises(VideoDecodeError, match=r"hollow\.mp4: (no video stream|video stream has 0 frames)"):
        load_video(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_absurd_requests_name_the_file(videos, backend):
    path = videos["h264"][0]
    with pytest.raises(VideoDecodeError, match=r"h264\.mp4: num_frames must be"):
        load_video(path, num_frames=0, backend=backend)
    with pytest.raises(ValueError, match=r"h264\.mp4: num_frames must be"):
        load_video(path, num_frames=-1, backend=backend)
    with pytest.raises(VideoDecodeError, match=r"h264\.mp4: fps must be"):
        load_video(path, fps=0, backend=backend)
    with pytest.raises(VideoDecodeError, match=r"h264\.mp4: empty window"):
        load_video(path, num_frames=4, start=100, backend=backend)
    with pytest.raises(ValueError, match="chunk_size"):
        next(iter_video_chunks(path, chunk_size=0, backend=backend))
