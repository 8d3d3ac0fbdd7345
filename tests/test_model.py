"""Core model: equivalence with LLaVA-OneVision, the memory path, conversion, saving and loading."""

import copy
import math

import pytest
import torch
from transformers import AutoConfig, AutoModel, LlavaOnevisionForConditionalGeneration

from modeling_memllava import MemLlavaOnevisionConfig, MemLlavaOnevisionForConditionalGeneration
from modeling_memllava.modeling_memllava import uniform_indices
from modeling_memllava.testing import (
    TINY_IMAGE_SIZE,
    TINY_IMAGE_TOKEN_ID,
    TINY_VIDEO_TOKEN_ID,
    tiny_base_model,
    tiny_config,
    tiny_model,
)


def video_prompt(config, num_frames, batch=1, prefix=(1, 2), suffix=(3, 4, 5)):
    row = list(prefix) + [TINY_VIDEO_TOKEN_ID] * config.num_video_tokens(num_frames) + list(suffix)
    return torch.tensor([row] * batch)


def frames(num_frames, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, num_frames, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=generator)


@pytest.fixture(scope="module")
def base():
    return tiny_base_model(seed=0)


@pytest.fixture(scope="module")
def memory_model(base):
    return tiny_model(seed=0, base=base)


@pytest.fixture(scope="module")
def plain_model(base):
    return tiny_model(seed=0, base=base, use_memory=False)


# -- configuration ------------------------------------------------------------------------------------------------


def test_token_budget_is_bounded_for_the_default_config():
    config = MemLlavaOnevisionConfig()
    assert config.tokens_per_frame == 196  # 384px SigLIP, 14px patches, LLaVA-OV pooling: ceil(27 / 2) ** 2
    assert config.num_video_tokens(16) == config.num_video_tokens(1024) == 64 + 16 * 196 + 1 == 3201
    assert config.num_video_tokens(3) == 3201  # short videos repeat frames to fill the fine slots
    plain = MemLlavaOnevisionConfig(use_memory=False)
    assert plain.num_video_tokens(32) == 32 * 196 + 1 == 6273  # LLaVA-OV's count for 32 frames
    assert plain.num_video_tokens(256) == 50177


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("num_memory_tokens", 0, "num_memory_tokens must be a positive integer, got 0"),
        ("memory_chunk_size", -2, "memory_chunk_size must be a positive integer, got -2"),
        ("num_fine_frames", 0, "num_fine_frames"),
        ("vision_chunk_size", 0, "vision_chunk_size"),
        ("memory_num_heads", 5, "memory_num_heads=5 must divide the LLM width text_config.hidden_size=64"),
        ("memory_bptt_chunks", 0, "memory_bptt_chunks"),
        ("memory_cache_size", -1, "memory_cache_size must be >= 0, got -1"),
        ("fine_frame_dropout", 1.0, "fine_frame_dropout must be in [0, 1), got 1.0"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**{field: value})


def test_num_video_tokens_rejects_bad_frame_counts():
    config = tiny_config()
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="frame count >= 1"):
            config.num_video_tokens(bad)


def test_uniform_rule_matches_numpy_linspace():
    import numpy as np

    for total in range(1, 80):
        for count in range(1, 50):
            assert uniform_indices(total, count) == np.linspace(0, total - 1, count, dtype=int).tolist()


# -- conversion -----------------------------------------------------------------------------------------------------


def test_conversion_keeps_every_base_weight(base, memory_model):
    base_state = base.state_dict()
    state = memory_model.state_dict()
    for name, tensor in base_state.items():
        assert torch.equal(state[name], tensor), name
    new = set(state) - set(base_state)
    assert new == set(memory_model.memory_parameter_names())
    assert new and all(name.startswith("model.memory") or "type_embedding" in name for name in new)


def test_conversion_without_memory_is_the_base_model(base, plain_model):
    base_state, state = base.state_dict(), plain_model.state_dict()
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[name], base_state[name]) for name in state)


def test_conversion_rejects_unknown_fields(base):
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['num_memory_slots'\]"):
        MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(base, num_memory_slots=4)


def test_conversion_from_a_saved_folder_and_dtype(base, tmp_path):
    base.save_pretrained(tmp_path / "base")
    model = MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(
        str(tmp_path / "base"), dtype=torch.bfloat16, num_memory_tokens=4
    )
    assert model.config.num_memory_tokens == 4
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(
        model.model.language_model.embed_tokens.weight, base.model.language_model.embed_tokens.weight.bfloat16()
    )
    with torch.no_grad():
        logits = model(input_ids=video_prompt(model.config, 5), pixel_values_videos=frames(5).bfloat16()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


# -- memory off == LLaVA-OneVision -------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_memory_off_reproduces_llava_onevision_bitwise(attn):
    base = tiny_base_model(seed=3, attn_implementation=attn)
    model = tiny_model(seed=3, base=base, use_memory=False)
    assert model.config._attn_implementation == attn
    assert model.model.language_model.config._attn_implementation == attn
    assert model.model.vision_tower.config._attn_implementation == attn
    ids, pixels = video_prompt(model.config, 6), frames(6)
    with torch.no_grad():
        expected = base(input_ids=ids, pixel_values_videos=pixels).logits
        got = model(input_ids=ids, pixel_values_videos=pixels).logits
    assert torch.equal(got, expected)
    generated = model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
    reference = base.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, reference)


def test_images_are_untouched_by_the_memory(base, memory_model):
    pixel_values = torch.randn(1, 2, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE)
    image_sizes = torch.tensor([[TINY_IMAGE_SIZE, TINY_IMAGE_SIZE]])
    with torch.no_grad():
        features = base.model.get_image_features(pixel_values, image_sizes).pooler_output
        ids = torch.tensor([[1] + [TINY_IMAGE_TOKEN_ID] * features[0].shape[0] + [2, 3]])
        expected = base(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
        got = memory_model(input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes).logits
    assert torch.equal(got, expected)


# -- memory on --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_frames", [1, 3, 4])
def test_fine_frames_carry_llava_onevision_features_at_init(base, memory_model, num_frames):
    config = memory_model.config
    pixels = frames(num_frames)
    with torch.no_grad():
        features = memory_model.model.get_video_features(pixels).pooler_output
        fine = uniform_indices(num_frames, config.num_fine_frames)  # repeats frames when T < F
        expected = base.model.get_video_features(pixels[:, fine]).pooler_output[:, :-1]
    memory_tokens = config.num_memory_tokens
    assert features.shape == (1, config.num_video_tokens(num_frames), config.text_config.hidden_size)
    assert torch.equal(features[:, memory_tokens:-1], expected)
    assert torch.equal(features[:, -1], base.model.image_newline[None])


def test_bounded_visual_sequence_at_256_frames(memory_model):
    config = memory_model.config
    assert config.num_video_tokens(256) == config.num_video_tokens(config.num_fine_frames)
    ids = video_prompt(config, 256)
    with torch.no_grad():
        logits = memory_model(input_ids=ids, pixel_values_videos=frames(256)).logits
    assert logits.shape == (1, ids.shape[1], config.text_config.vocab_size)
    assert ids.shape[1] == 2 + config.num_video_tokens(256) + 3


def test_memory_sees_frames_that_are_not_fine_frames(memory_model, plain_model):
    config = memory_model.config
    num_frames = 24
    fine = uniform_indices(num_frames, config.num_fine_frames)
    other = next(i for i in range(num_frames) if i not in fine)
    pixels = frames(num_frames)
    perturbed = pixels.clone()
    perturbed[:, other] = torch.randn_like(perturbed[:, other]) * 3
    ids = video_prompt(config, num_frames)
    with torch.no_grad():
        before = memory_model(input_ids=ids, pixel_values_videos=pixels).logits[:, -1]
        after = memory_model(input_ids=ids, pixel_values_videos=perturbed).logits[:, -1]
    assert not torch.allclose(before, after, atol=1e-6)

    # The budget-matched baseline (memory off, the same fine frames) cannot see that frame.
    ids_plain = video_prompt(plain_model.config, len(fine))
    with torch.no_grad():
        before = plain_model(input_ids=ids_plain, pixel_values_videos=pixels[:, fine]).logits[:, -1]
        after = plain_model(input_ids=ids_plain, pixel_values_videos=perturbed[:, fine]).logits[:, -1]
    assert torch.equal(before, after)


def test_timestamps_reach_the_memory(memory_model):
    config = memory_model.config
    pixels, ids = frames(12), video_prompt(config, 12)
    run = lambda model, times=None: model(input_ids=ids, pixel_values_videos=pixels, video_timestamps=times).logits  # noqa: E731
    with torch.no_grad():
        # The temporal projection starts at zero (content first); once trained, timestamps steer the memory.
        assert torch.equal(run(memory_model), run(memory_model, 5 * torch.arange(12.0)[None]))
        trained = copy.deepcopy(memory_model)
        torch.nn.init.normal_(trained.model.memory.temporal_proj.weight, std=0.02)
        a, b = run(trained), run(trained, torch.arange(12.0)[None])
        c = run(trained, 5 * torch.arange(12.0)[None])
    assert torch.equal(a, b)  # no timestamps = frame indices
    assert not torch.allclose(a, c)


def test_batched_videos_of_different_lengths_match_single_runs(memory_model):
    config = memory_model.config
    long, short = frames(13, seed=1)[0], frames(6, seed=2)[0]
    pixels = torch.zeros(2, 13, *long.shape[1:])
    pixels[0], pixels[1, :6] = long, short
    pixels[1, 6:] = 99.0  # padding content must not leak anywhere
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[0], mask[1, :6] = True, True
    with torch.no_grad():
        batched = memory_model.model.get_video_features(pixels, video_frame_mask=mask).pooler_output
        alone_long = memory_model.model.get_video_features(long[None]).pooler_output
        alone_short = memory_model.model.get_video_features(short[None]).pooler_output
    torch.testing.assert_close(batched[0], alone_long[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched[1], alone_short[0], rtol=1e-5, atol=1e-5)

    ids = video_prompt(config, 13, batch=2)
    attention = torch.ones_like(ids)
    with torch.no_grad():
        out = memory_model(input_ids=ids, attention_mask=attention, pixel_values_videos=pixels, video_frame_mask=mask)
    assert out.logits.shape[0] == 2 and torch.isfinite(out.logits).all()


def test_memory_off_rejects_padded_batches(plain_model):
    mask = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="same number of frames"):
        plain_model.model.get_video_features(frames(3), video_frame_mask=mask)


def test_empty_video_in_batch_is_an_error(memory_model):
    with pytest.raises(ValueError, match="no real frames"):
        memory_model.model.get_video_features(frames(4, batch=2), video_frame_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]).bool())


def test_placeholder_mismatch_names_both_numbers(memory_model):
    config = memory_model.config
    expected = config.num_video_tokens(8)
    ids = torch.tensor([[1] + [TINY_VIDEO_TOKEN_ID] * (expected - 5) + [2]])
    with pytest.raises(ValueError, match=rf"has {expected - 5} <video> placeholders .* expects {expected} per video"):
        memory_model(input_ids=ids, pixel_values_videos=frames(8))


# -- streaming and generation -----------------------------------------------------------------------------------


def count_vision_calls(model):
    calls = []
    handle = model.model.vision_tower.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    return calls, handle


def test_vision_streams_in_chunks_and_generate_encodes_once(memory_model):
    config = memory_model.config
    num_frames = 37
    calls, handle = count_vision_calls(memory_model)
    try:
        ids = video_prompt(config, num_frames)
        out = memory_model.generate(input_ids=ids, pixel_values_videos=frames(num_frames), max_new_tokens=4, do_sample=False)
    finally:
        handle.remove()
    assert out.shape[1] == ids.shape[1] + 4
    assert len(calls) == math.ceil(num_frames / config.vision_chunk_size)  # once, at prefill
    assert max(calls) <= config.vision_chunk_size and sum(calls) == num_frames


def test_generate_with_mask_and_timestamps_and_left_padding(memory_model):
    config = memory_model.config
    ids = video_prompt(config, 9, batch=2)
    ids[0, :2] = config.text_config.pad_token_id
    attention = (ids != config.text_config.pad_token_id).long()
    mask = torch.tensor([[True] * 9, [True] * 5 + [False] * 4])
    times = torch.arange(9.0).expand(2, -1) * 0.5
    out = memory_model.generate(
        input_ids=ids,
        attention_mask=attention,
        pixel_values_videos=frames(9, batch=2),
        video_frame_mask=mask,
        video_timestamps=times,
        max_new_tokens=3,
        do_sample=False,
    )
    assert out.shape == (2, ids.shape[1] + 3)


# -- training ---------------------------------------------------------------------------------------------------


def loss_and_grads(model, ids, pixels):
    model.zero_grad()
    labels = ids.clone()
    labels[labels == TINY_VIDEO_TOKEN_ID] = -100
    loss = model(input_ids=ids, pixel_values_videos=pixels, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_through_the_recurrence_gives_the_same_gradients():
    model = tiny_model(seed=5, memory_cache_size=2)
    with torch.no_grad():  # open the fuser gates so gradients reach every memory module
        model.model.memory_fuser.attn_gate.fill_(0.5)
        model.model.memory_fuser.mlp_gate.fill_(0.5)
    model.train()
    for name, param in model.named_parameters():
        param.requires_grad_(name in model.memory_parameter_names())
    ids, pixels = video_prompt(model.config, 20), frames(20)
    loss_plain, grads_plain = loss_and_grads(model, ids, pixels)
    calls = []
    model.model.memory.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    model.gradient_checkpointing_enable()
    assert model.model.memory.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(model, ids, pixels)
    assert len(calls) == 2 * math.ceil(20 / model.config.memory_chunk_size)  # every chunk recomputed in backward
    assert torch.equal(loss_plain, loss_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys() == set(model.memory_parameter_names())
    for name in grads_plain:
        torch.testing.assert_close(grads_ckpt[name], grads_plain[name], rtol=1e-4, atol=1e-6)
    assert grads_plain["model.memory.memory_tokens"].abs().sum() > 0
    # The frozen vision tower is left out of the input-grad hooks checkpointing installs: no graph through it.
    vision_out = []
    model.model.vision_tower.get_input_embeddings().register_forward_hook(lambda m, i, o: vision_out.append(o))
    loss_and_grads(model, ids, pixels)
    assert vision_out and not any(o.requires_grad for o in vision_out)
    assert len(model._require_grads_hooks) == 1


def test_truncated_bptt_cuts_gradients_to_early_chunks():
    model = tiny_model(seed=6, memory_bptt_chunks=1)
    model.train()
    state = model.model.memory.initial_state(1).detach().requires_grad_(True)
    grads = []
    state.register_hook(grads.append)
    pooled = torch.randn(1, 4, 4, model.config.text_config.hidden_size)
    mask, times = torch.ones(1, 4, dtype=torch.bool), torch.arange(4.0)[None]
    s1 = model.model._memory_step(state, pooled, mask, times, [], 0)
    s2 = model.model._memory_step(s1, pooled, mask, times, [], 1)
    s2.sum().backward()
    assert not grads  # chunk 1 detached its input state: nothing flows back to the initial state


def test_fine_frame_dropout_hides_only_fine_frame_positions():
    model = tiny_model(seed=7, fine_frame_dropout=0.5)
    config = model.config
    ids = video_prompt(config, 8, batch=64)
    torch.manual_seed(0)
    mask = model.model.fine_frame_dropout_mask(ids, None)
    hidden = mask == 0
    start = 2 + config.num_memory_tokens
    fine_span = slice(start, start + config.num_fine_frames * config.tokens_per_frame)
    dropped = hidden.any(dim=1)
    assert 10 < int(dropped.sum()) < 54  # about half the samples
    assert hidden[dropped][:, fine_span].all()  # the whole fine span of a dropped sample
    outside = torch.ones(ids.shape[1], dtype=torch.bool)
    outside[fine_span] = False
    assert not hidden[:, outside].any()  # memory tokens, newline and text stay visible

    # Only in training: eval forward with the same inputs is deterministic.
    model.eval()
    pixels = frames(8)
    with torch.no_grad():
        a = model(input_ids=ids[:1], pixel_values_videos=pixels).logits
        b = model(input_ids=ids[:1], pixel_values_videos=pixels).logits
    assert torch.equal(a, b)


def test_no_split_modules_cover_memory_and_backbones(memory_model):
    no_split = set(memory_model._no_split_modules)
    assert {"RecurrentMemory", "MemoryFuser", "MemoryProjector"} <= no_split
    assert any("DecoderLayer" in name for name in no_split) and any("Siglip" in name for name in no_split)


# -- saving and loading -----------------------------------------------------------------------------------------


def test_auto_classes_resolve_in_process(memory_model, tmp_path):
    memory_model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), MemLlavaOnevisionConfig)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is MemLlavaOnevisionForConditionalGeneration
    for (name, a), (_, b) in zip(memory_model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_save_and_load_with_remote_code_in_a_clean_process(memory_model, tmp_path, isolated_python):
    folder = tmp_path / "checkpoint"
    memory_model.save_pretrained(folder)
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_memllava.py", "configuration_memllava.py"} <= files
    import json

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "memllava_onevision"
    assert config["auto_map"]["AutoModel"] == "modeling_memllava.MemLlavaOnevisionForConditionalGeneration"
    assert config["auto_map"]["AutoModelForImageTextToText"] == config["auto_map"]["AutoModel"]

    ids, pixels = video_prompt(memory_model.config, 10), frames(10)
    torch.save({"ids": ids, "pixels": pixels}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected = memory_model(input_ids=ids, pixel_values_videos=pixels).logits
    expected_tokens = memory_model.generate(input_ids=ids, pixel_values_videos=pixels, max_new_tokens=3, do_sample=False)
    torch.save({"logits": expected, "tokens": expected_tokens}, tmp_path / "expected.pt")
    isolated_python(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForImageTextToText
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "MemLlavaOnevisionForConditionalGeneration", type(model)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        with torch.no_grad():
            logits = model(input_ids=inputs["ids"], pixel_values_videos=inputs["pixels"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        tokens = model.generate(input_ids=inputs["ids"], pixel_values_videos=inputs["pixels"], max_new_tokens=3, do_sample=False)
        assert torch.equal(tokens, expected["tokens"])
        other = AutoModelForImageTextToText.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(other).__name__ == "MemLlavaOnevisionForConditionalGeneration"
        print("OK")
        """
    )


def test_model_presets_are_valid_configs():
    """configs/model/*.json hold memory-field presets (e.g. the seed's settings); each must build a valid config."""
    import json
    from pathlib import Path

    presets = sorted((Path(__file__).resolve().parents[1] / "configs" / "model").glob("*.json"))
    assert presets
    for path in presets:
        fields = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        config = tiny_config(**fields)
        assert config.num_video_tokens(10_000) == fields["num_memory_tokens"] + fields["num_fine_frames"] * 16 + 1
