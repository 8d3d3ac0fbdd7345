"""Video I/O benchmark: time and peak memory to sample 32 / 256 frames from a 10-minute 640x360 h264 video.

    python bench/video_io.py [--quick]

Compares, each point in a fresh subprocess (so peak RSS is that point's alone):

* decord       `load_video(..., backend="decord")`  (VideoReader.get_batch on the sampled indices)
* pyav-seek    `load_video(..., backend="pyav")`    (our demux-once, seek-to-keyframe reader)
* decode-all   PyAV decoding every frame and keeping the sampled ones (what a naive reader does)

The video is 10 minutes at 10 fps (6,000 frames; a modest rate keeps writing it to about a minute; --quick: 2
minutes). Seeking readers decode from the keyframe before each target, so their cost depends on the keyframe
interval: the video is written twice, with x264's default GOP (keyint 250 = 25 s at 10 fps) and with a 2 s GOP
(common for streaming/web video). x264 preset "veryfast" (CABAC and deblocking on, as in real uploads; "ultrafast"
videos decode so cheaply that RGB conversion dominates). Files are cached in the system temp directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from peak_rss import read_status_kib, reset_peak


CACHE = os.path.join(tempfile.gettempdir(), "memllava_bench_video")
FPS = 10
WIDTH, HEIGHT = 640, 360
METHODS = ("decord", "pyav-seek", "decode-all")


def _frames(num_frames: int):
    """Cheap frames: a large textured scene panned across (a camera pan: every pixel moves, so decoding costs
    something, unlike a static background), a moving square and a per-frame stripe (every frame differs)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 200, size=(HEIGHT // 8 + 1, WIDTH // 4 + 1, 3), dtype=np.uint8)
    scene = np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:HEIGHT]  # blocky texture, 2x the frame width
    scene = np.ascontiguousarray(scene + rng.integers(0, 40, size=scene.shape, dtype=np.uint8))
    for index in range(num_frames):
        start = (index * 4) % (scene.shape[1] - WIDTH)
        frame = scene[:, start : start + WIDTH].copy()
        x, y = (index * 3) % (WIDTH - 60), (index * 2) % (HEIGHT - 60)
        frame[y : y + 60, x : x + 60] = (255, index % 256, 40)
        frame[:4] = index % 256
        yield frame


def make_bench_video(seconds: int, gop: int | None) -> str:
    """Write (once) a `seconds`-long 640x360 h264 video at 10 fps; `gop` frames between keyframes (None: x264's
    default, 250)."""
    import av

    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"bench_{seconds}s_{WIDTH}x{HEIGHT}_{FPS}fps_gop{gop or 'default'}.mp4")
    if os.path.exists(path):
        return path
    started = time.perf_counter()
    partial = path + ".partial.mp4"
    with av.open(partial, mode="w") as container:
        stream = container.add_stream("h264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast", **({"g": str(gop)} if gop else {})}
        for frame in _frames(seconds * FPS):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(partial, path)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB) in {time.perf_counter() - started:.0f} s", flush=True)
    return path


# -- one measured point (runs in its own interpreter) ----------------------------------------------------------------


def _reset_peak_rss() -> bool:
    """Reset VmHWM so the peak excludes imports; False when not allowed."""
    try:
        reset_peak()
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        return read_status_kib("VmHWM") / 1024
    except (OSError, RuntimeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _decode_all(path: str, num_frames: int) -> np.ndarray:
    """The naive reader: decode every frame in order, keep the sampled ones."""
    import av

    from modeling_memllava.video import sample_frame_indices

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # same threading as our reader, so only the amount of decoding differs
        wanted = sample_frame_indices(stream.frames, num_frames=num_frames)
        counts = {int(i): int(c) for i, c in zip(*np.unique(wanted, return_counts=True))}
        kept = []
        for index, frame in enumerate(container.decode(stream)):
            if index in counts:
                kept.extend([frame.to_ndarray(format="rgb24")] * counts[index])
    return np.stack(kept)


def run_point(method: str, path: str, num_frames: int) -> dict:
    from modeling_memllava.video import load_video

    reset = _reset_peak_rss()
    baseline = _peak_rss_mib()
    started = time.perf_counter()
    if method == "decode-all":
        frames = _decode_all(path, num_frames)
    else:
        frames = load_video(path, num_frames=num_frames, backend="decord" if method == "decord" else "pyav").frames
    seconds = time.perf_counter() - started
    assert frames.shape == (num_frames, HEIGHT, WIDTH, 3), frames.shape
    peak = _peak_rss_mib()
    return {"seconds": seconds, "peak_rss_mib": peak, "growth_mib": peak - baseline, "reset": reset}


def measure(method: str, path: str, num_frames: int) -> dict:
    command = [sys.executable, __file__, "--point", method, path, str(num_frames)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a 2-minute video instead of 10 minutes")
    parser.add_argument("--point", nargs=3, metavar=("METHOD", "PATH", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        method, path, num = args.point
        print(json.dumps(run_point(method, path, int(num))))
        return

    try:
        import decord  # noqa: F401

        methods = METHODS
    except ImportError:
        methods = tuple(m for m in METHODS if m != "decord")
    seconds = 120 if args.quick else 600
    print(f"{seconds // 60}-minute {WIDTH}x{HEIGHT} h264 at {FPS} fps ({seconds * FPS} frames); each point a fresh process")
    for gop in (None, 2 * FPS):
        path = make_bench_video(seconds, gop)
        label = "x264 default GOP (250 frames = 25 s)" if gop is None else f"GOP {gop} frames ({gop / FPS:g} s)"
        print(f"\n{label}")
        print(f"{'frames':>6}  {'method':<11} {'seconds':>8} {'peak RSS MiB':>13} {'growth MiB':>11} {'speed-up vs decode-all':>23}")
        for num_frames in (32, 256):
            results = {method: measure(method, path, num_frames) for method in methods}
            reference = results["decode-all"].get("seconds")
            for method in methods:
                point = results[method]
                if "error" in point:
                    print(f"{num_frames:>6}  {method:<11} failed: {point['error']}")
                    continue
                ratio = f"{reference / point['seconds']:.1f}x" if reference else "-"
                print(f"{num_frames:>6}  {method:<11} {point['seconds']:>8.2f} {point['peak_rss_mib']:>13.0f} {point['growth_mib']:>11.0f} {ratio:>23}")
    print("\npeak RSS: VmHWM of the measuring process (imports included); growth: peak minus RSS after imports")


if __name__ == "__main__":
    main()
