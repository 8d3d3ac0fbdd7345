"""`memllava-chat`: the command-line path a user runs first (offline with the embedded tiny model)."""

import importlib.metadata
import subprocess
import sys

import pytest

from modeling_memllava.synthetic import make_video


def run_chat(*args):
    return subprocess.run(
        [sys.executable, "-m", "modeling_memllava.chat", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    return str(make_video(tmp_path_factory.mktemp("chat") / "clip.mp4", num_frames=40, fps=8))


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("memllava-chat") == "modeling_memllava.chat:main"


def test_tiny_model_answers_offline_and_says_it_is_meaningless(video):
    result = run_chat("--video", video, "--num-frames", "12", "--max-new-tokens", "4", "What moves?")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "meaningless" in result.stderr  # the user is told the tiny model's answer means nothing
    assert "decoding" in result.stderr  # progress bar over the sampled frames
    assert "[12 frames over 5.0 s" in result.stderr
    assert len(result.stdout.splitlines()) == 1  # exactly the answer on stdout


def test_missing_video_is_a_clear_error(tmp_path):
    result = run_chat("--video", str(tmp_path / "nope.mp4"), "What?")
    assert result.returncode == 2
    assert "nope.mp4" in result.stderr and "Traceback" not in result.stderr


def test_corrupt_video_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.mp4"
    path.write_bytes(b"definitely not a video" * 100)
    result = run_chat("--video", str(path), "What?")
    assert result.returncode == 2
    assert "broken.mp4" in result.stderr and "Traceback" not in result.stderr


def test_bad_frame_count_is_rejected(video):
    result = run_chat("--video", video, "--num-frames", "0", "What?")
    assert result.returncode == 2 and "--num-frames must be >= 1" in result.stderr
