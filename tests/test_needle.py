"""The needle benchmark's machinery: task generation, fair arms, scoring, outputs (quick run; numbers not judged)."""

import json

import numpy as np
import pytest

from modeling_memllava.needle import (
    LETTERS,
    NeedleConfig,
    NeedleVideo,
    build_arms,
    make_needle_set,
    needle_visible_fraction,
    run_needle_benchmark,
    save_result,
)
from modeling_memllava.video import load_video


def test_needle_videos_have_one_coloured_frame_at_the_stated_index(tmp_path):
    videos = make_needle_set(str(tmp_path), 4, 12, size=64, seed=3)
    assert sorted(v.colour for v in videos) == sorted(["red", "green", "blue", "yellow"])
    for video in videos:
        frames = load_video(video.path, num_frames=12).frames.astype(int)
        saturation = (frames.max(-1) - frames.min(-1)).mean(axis=(1, 2))  # grey frames have ~0 saturation
        assert int(np.argmax(saturation)) == video.needle_index
        assert np.sort(saturation)[-2] < 10 < saturation.max()


def test_budget_matched_visibility_is_the_uniform_rule():
    videos = [NeedleVideo("x", 16, index, "red") for index in range(16)]
    # np.linspace(0, 15, 4, dtype=int) = [0, 5, 10, 15]: 4 of 16 positions are seen.
    assert needle_visible_fraction(videos, 4) == pytest.approx(4 / 16)
    assert needle_visible_fraction(videos, 16) == 1.0


def test_arms_share_the_base_and_train_the_same_modules():
    memory, plain = build_arms(NeedleConfig.quick())
    assert memory.model.config.use_memory and not plain.model.config.use_memory
    base_names = {n for n, _ in plain.model.named_parameters()}
    memory_params = dict(memory.model.named_parameters())
    for name, param in plain.model.named_parameters():
        assert np.array_equal(param.detach().numpy(), memory_params[name].detach().numpy()), name
        assert param.data_ptr() != memory_params[name].data_ptr()  # copies, not shared tensors
    trained_plain = {id(p) for p in plain.trainable_parameters()}
    trained_memory = {id(p) for p in memory.trainable_parameters()}
    names_plain = {n for n, p in plain.model.named_parameters() if id(p) in trained_plain}
    names_memory = {n for n, p in memory.model.named_parameters() if id(p) in trained_memory}
    assert names_plain == names_memory & base_names
    assert not any(n.startswith("model.vision_tower.") for n in names_memory)
    # Nearly the same visual budget: F * P + 1 against M + F * P + 1.
    config = memory.model.config
    assert plain.model.config.num_video_tokens(config.num_fine_frames) == config.num_fine_frames * config.tokens_per_frame + 1
    assert config.num_video_tokens(256) - plain.model.config.num_video_tokens(config.num_fine_frames) == config.num_memory_tokens


def test_quick_run_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    config = NeedleConfig.quick()
    result = run_needle_benchmark(config, str(tmp_path / "videos"), log=None)
    assert set(result.accuracy) == {"memllava", "budget_matched"}
    for accuracy in result.accuracy.values():
        assert set(accuracy) == set(config.eval_frames)
        for value in accuracy.values():  # accuracies are counts over eval_videos
            assert 0 <= value <= 1 and (value * config.eval_videos) == pytest.approx(round(value * config.eval_videos))
    paths = save_result(result, str(tmp_path / "out"))
    saved = json.loads(open(paths["json"]).read())
    assert [tuple(stage) for stage in saved["config"]["curriculum"]] == list(config.curriculum)
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(paths["table"]).read()
    assert table.count("\n| ") == len(config.eval_frames) and "chance = 25.0%" in table
    assert LETTERS == "ABCD"
