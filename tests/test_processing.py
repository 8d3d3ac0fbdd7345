"""MemLlavaOnevisionProcessor: token accounting agrees with the model, every input form, batching, save/load."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaOnevisionImageProcessorPil

from modeling_memllava import MemLlavaOnevisionProcessor, MemLlavaOnevisionVideoProcessor
from modeling_memllava.synthetic import make_video, moving_square_frames
from modeling_memllava.testing import (
    TINY_VIDEO_TOKEN_ID,
    tiny_base_model,
    tiny_config,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)


QUESTION = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]}]


def frames(num_frames, height=48, width=80, seed=0):
    return np.stack(list(moving_square_frames(num_frames, height, width, seed=seed)))


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def processor(model):
    return tiny_processor(model.config)


def prompt(processor, add_generation_prompt=True):
    return processor.apply_chat_template(QUESTION, add_generation_prompt=add_generation_prompt, tokenize=False)


def test_chat_template_is_llava_onevision_format(processor):
    messages = QUESTION + [{"role": "assistant", "content": [{"type": "text", "text": "A square."}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\n<video>\nWhat moves?<|im_end|>\n<|im_start|>assistant\nA square.<|im_end|>\n"
    assert prompt(processor).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("fields", [{}, {"num_memory_tokens": 3, "num_fine_frames": 2}, {"use_memory": False}])
@pytest.mark.parametrize("num_frames", [1, 5, 40])
def test_formula_agrees_with_config(fields, num_frames):
    config = tiny_config(**fields)
    processor = tiny_processor(config)
    assert processor.num_video_tokens(num_frames) == config.num_video_tokens(num_frames)
    output = processor(text=["<video>"], videos=[frames(num_frames)], return_tensors="pt")
    assert int((output["input_ids"] == TINY_VIDEO_TOKEN_ID).sum()) == config.num_video_tokens(num_frames)


@pytest.mark.parametrize("num_frames", [1, 7, 16, 300])
def test_file_to_forward_round_trip(tmp_path, model, processor, num_frames):
    path = make_video(tmp_path / f"clip_{num_frames}.mp4", num_frames=max(num_frames, 2), fps=10)
    output = processor(text=[prompt(processor)], videos=[str(path)], num_frames=num_frames, return_tensors="pt")
    assert output["pixel_values_videos"].shape == (1, num_frames, 3, 64, 64)
    assert output["video_frame_mask"].all()
    placeholders = int((output["input_ids"] == TINY_VIDEO_TOKEN_ID).sum())
    assert placeholders == model.config.num_video_tokens(num_frames)
    with torch.no_grad():
        logits = model(**output).logits
    assert logits.shape[:2] == output["input_ids"].shape and torch.isfinite(logits).all()


def test_file_sampling_is_llava_onevision_uniform_rule(tmp_path, processor):
    path = make_video(tmp_path / "clip.mp4", num_frames=20, fps=10)
    output = processor(text=["<video>"], videos=[str(path)], num_frames=6, return_tensors="pt")
    expected = np.linspace(0, 19, 6, dtype=int)
    np.testing.assert_allclose(output["video_timestamps"][0].numpy(), expected / 10, atol=1e-4)


def test_every_input_form_gives_the_same_pixels(processor):
    video = frames(5)
    reference = processor(text=["<video>"], videos=[video], return_tensors="pt")["pixel_values_videos"]
    forms = {
        "torch THWC": torch.from_numpy(video),
        "torch TCHW": torch.from_numpy(video).permute(0, 3, 1, 2),
        "PIL list": [Image.fromarray(frame) for frame in video],
        "float 0..1": video.astype(np.float32) / 255,
        "single video unwrapped": video,
    }
    for name, form in forms.items():
        videos = form if name == "single video unwrapped" else [form]
        got = processor(text=["<video>"], videos=videos, return_tensors="pt")["pixel_values_videos"]
        torch.testing.assert_close(got, reference, msg=f"{name} differs")


def test_video_clip_timestamps_are_kept(processor):
    class Clip:  # duck-typed like modeling_memllava.video.VideoClip
        frames = frames(4)
        timestamps = np.array([0.0, 0.5, 3.25, 7.0])

    output = processor(text=["<video>"], videos=[Clip()], return_tensors="pt")
    assert output["video_timestamps"].dtype == torch.float32
    np.testing.assert_allclose(output["video_timestamps"][0].numpy(), Clip.timestamps)


def test_batches_videos_of_different_lengths(model, processor):
    videos = [frames(3, seed=1), frames(9, seed=2)]
    text = [prompt(processor), prompt(processor)]
    batch = processor(text=text, videos=videos, return_tensors="pt", padding=True)
    assert batch["pixel_values_videos"].shape[:2] == (2, 9)
    assert batch["video_frame_mask"].sum(1).tolist() == [3, 9]
    assert (batch["pixel_values_videos"][0, 3:] == 0).all()
    with torch.no_grad():
        batched = model(**batch).logits
        single = model(**processor(text=[text[0]], videos=[videos[0]], return_tensors="pt")).logits
    # Both prompts have the same length (fixed visual budget), so row 0 lines up with the single run.
    torch.testing.assert_close(batched[0], single[0], atol=1e-5, rtol=1e-4)


def test_memory_off_needs_equal_lengths():
    processor = tiny_processor(use_memory=False)
    with pytest.raises(ValueError, match=r"same frame count, got \[3, 4\]"):
        processor(text=["<video>", "<video>"], videos=[frames(3), frames(4)])


def test_mismatched_processor_and_model_error_names_both_numbers(model):
    processor = tiny_processor(num_memory_tokens=3)  # the model has 8 memory tokens
    output = processor(text=[prompt(processor)], videos=[frames(4)], return_tensors="pt")
    with pytest.raises(ValueError) as error:
        model(**output)
    message = str(error.value)
    assert str(model.config.num_video_tokens(4)) in message
    assert str(processor.num_video_tokens(4)) in message


@pytest.mark.parametrize(
    "text, videos, match",
    [
        (["<video> and <video>"], [frames(2)], r"2 <video> markers but 1 videos"),
        (["no marker"], [frames(2)], r"0 <video> markers but 1 videos"),
        (["<video>"], None, r"1 <video> markers but no videos"),
        (["<video>"], [np.zeros((0, 8, 8, 3), np.uint8)], r"at least one frame, got 0"),
        (["<video>"], [np.zeros((8, 8, 3, 2, 2), np.uint8)], r"must be 4-D"),
        (["<video>"], [np.zeros((2, 8, 8, 5), np.uint8)], r"1, 3 or 4 channels"),
    ],
)
def test_bad_inputs_are_named(processor, text, videos, match):
    with pytest.raises(ValueError, match=match):
        processor(text=text, videos=videos)


def test_missing_file_is_named(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        processor(text=["<video>"], videos=[str(tmp_path / "nope.mp4")])


@pytest.mark.parametrize("field, value", [("num_memory_tokens", 0), ("num_fine_frames", -1), ("tokens_per_frame", 1.5)])
def test_bad_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"MemLlavaOnevisionProcessor: {field} must be a positive integer"):
        MemLlavaOnevisionProcessor(
            tokenizer=tiny_tokenizer(),
            image_processor=LlavaOnevisionImageProcessorPil(),
            video_processor=MemLlavaOnevisionVideoProcessor(),
            **{field: value},
        )


def test_video_processor_matches_llava_onevision_pil_image_path():
    """Without torchvision, the nearest stock reference is LLaVA-OV's PIL image processor on the same frame."""
    frame = frames(1, height=240, width=427)[0]
    ours = MemLlavaOnevisionVideoProcessor()(frame[None])["pixel_values_videos"][0][0]
    reference = LlavaOnevisionImageProcessorPil(do_pad=False, image_grid_pinpoints=[[384, 384]])
    stock = torch.from_numpy(np.asarray(reference(Image.fromarray(frame), return_tensors="np")["pixel_values"][0][0]))
    assert ours.shape == stock.shape == (3, 384, 384)
    difference = (ours - stock).abs()
    # Same bicubic family and normalisation; PIL and torch kernels differ by at most a few uint8 levels.
    assert difference.mean() < 0.01 and difference.max() < 4 * 2 / 255 / 0.5 + 1e-4


def test_video_processor_matches_torchvision_llava_onevision():
    pytest.importorskip("torchvision")
    from transformers import LlavaOnevisionVideoProcessor

    video = frames(3, height=240, width=427)
    stock = LlavaOnevisionVideoProcessor()(video, return_tensors="pt")["pixel_values_videos"][0]
    ours = MemLlavaOnevisionVideoProcessor()(video)["pixel_values_videos"][0]
    torch.testing.assert_close(ours, stock)


def test_save_and_reload_in_clean_subprocess(tmp_path, processor, isolated_python):
    video = frames(6)
    expected = processor(text=[prompt(processor)], videos=[video], return_tensors="pt")
    processor.save_pretrained(tmp_path / "ckpt")
    np.save(tmp_path / "video.npy", video)
    torch.save(dict(expected), tmp_path / "expected.pt")
    saved = json.loads((tmp_path / "ckpt" / "processor_config.json").read_text())
    assert saved["auto_map"]["AutoProcessor"] == "processing_memllava.MemLlavaOnevisionProcessor"
    assert (tmp_path / "ckpt" / "processing_memllava.py").exists()
    out = isolated_python(
        f"""
        import numpy as np, torch
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        messages = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": "What moves?"}}]}}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        got = processor(text=[text], videos=[np.load({str(tmp_path / "video.npy")!r})], return_tensors="pt")
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert sorted(got) == sorted(expected), (sorted(got), sorted(expected))
        for key in expected:
            assert torch.equal(got[key], expected[key]), key
        print("OK", type(processor).__name__, processor.num_memory_tokens)
        """
    )
    assert out.split() == ["OK", "MemLlavaOnevisionProcessor", str(processor.num_memory_tokens)]


def test_auto_processor_with_model_checkpoint(tmp_path, model, processor):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert loaded.num_video_tokens(50) == model.config.num_video_tokens(50)


def test_from_llava_onevision_base_folder(tmp_path):
    """A base folder laid out like llava-hf/llava-onevision-*: config, tokenizer, image and video processor files."""
    base = tiny_base_model()
    base.save_pretrained(tmp_path)
    stock = tiny_processor()
    stock.tokenizer.save_pretrained(tmp_path)
    stock.image_processor.save_pretrained(tmp_path)
    (tmp_path / "video_preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 64, "width": 64}, "video_processor_type": "LlavaOnevisionVideoProcessor"})
    )
    (tmp_path / "chat_template.jinja").write_text(stock.chat_template)
    processor = MemLlavaOnevisionProcessor.from_llava_onevision(str(tmp_path), num_memory_tokens=5, num_fine_frames=3)
    config = tiny_config(num_memory_tokens=5, num_fine_frames=3)
    assert processor.tokens_per_frame == config.tokens_per_frame == math.ceil((64 // 8) / 2) ** 2
    assert processor.num_video_tokens(100) == config.num_video_tokens(100)
    assert processor.video_processor.size == {"height": 64, "width": 64}
    assert processor.apply_chat_template(QUESTION, tokenize=False) == stock.apply_chat_template(QUESTION, tokenize=False)


def test_update_memory_settings_follows_model_config():
    processor = tiny_processor()
    config = tiny_config(num_memory_tokens=2, num_fine_frames=5)
    processor.update_memory_settings(config)
    assert processor.num_video_tokens(9) == config.num_video_tokens(9)


def test_images_still_work_like_llava_onevision(processor):
    image = Image.fromarray(frames(1, 64, 64)[0])
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], tokenize=False
    )
    output = processor(images=[image], text=[text], return_tensors="pt")
    assert "pixel_values" in output and "image_sizes" in output
