"""Seconds and peak memory per training step: MemLlava's memory path against plain LLaVA-OV (every frame as tokens).

    python bench/train_step.py              # CPU: tiny and small shapes, 32 and 128 frames, both arms
    python bench/train_step.py --quick      # CPU: tiny at 32 frames only
    python bench/train_step.py --gpu-0p5b   # GPU: random weights shaped like llava-onevision-qwen2-0.5b-ov-hf

A training step is forward with labels (loss on the answer tokens only) + backward + AdamW step, with gradient
checkpointing on in both arms (`model.gradient_checkpointing_enable()`), `use_cache=False`, batch 1.

* MemLlava ("ours"): stage-short freezing, `configure_trainable(model, train_llm=False)`: the memory modules train;
  the LLM, vision tower and projector are frozen (the loss still back-propagates through the frozen LLM).
* LLaVA-OV ("base"): transformers' `LlavaOnevisionForConditionalGeneration` has no memory modules, so it cannot be
  frozen the same way. `--baseline-train projector` (default) trains the multimodal projector only: like ours, the
  loss back-propagates through a frozen LLM to its inputs, and the optimizer state stays small, so the difference
  between the arms is the number of video tokens. `--baseline-train llm` trains the LLM (embeddings, decoder, head)
  instead, as a stage that fine-tunes the LLM would; that adds the LLM's gradients and AdamW state.

Both arms share the same random base weights (MemLlava is converted from the LLaVA-OV instance with
`from_llava_onevision`). Inputs are tensors built directly (no video decoding): `input_ids` with
`config.num_video_tokens(T)` placeholders for MemLlava and `T * P + 1` for the base (P tokens per frame after
LLaVA-OV's pooling), and `pixel_values_videos` of shape [1, T, 3, S, S].

CPU: as in `bench/scaling.py`, every (shape, T, arm) point runs in a fresh subprocess, so its peak RSS is its own.
Each point runs 1 warm-up step then 3 measured steps; s/step is the median of the 3. "Peak MiB" is the growth of
the resident set over the 4 steps beyond what the process held before them (weights + inputs): VmHWM (reset
through /proc/self/clear_refs) minus VmRSS before, so it includes gradients, AdamW state and activations. A point
whose warm-up step exceeds --max-step-s (or whose 32-frame point times 4 already does) is reported as skipped.

GPU (`--gpu-0p5b`): same protocol in bf16 with sdpa attention on one CUDA device, 64 frames; reports tokens/s
(prompt tokens per second of training step), s/step and peak GPU memory (torch.cuda.max_memory_allocated over the
4 steps, absolute, i.e. weights + optimizer state + activations).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from peak_rss import read_status_kib, reset_peak


# -- shapes -------------------------------------------------------------------------------------------------------

# Memory fields per shape. "tiny" uses testing.TINY_MEMORY_DEFAULTS through `tiny_model`.
SMALL_MEMORY = dict(num_memory_tokens=32, num_fine_frames=8, memory_num_heads=4)
GPU_MEMORY = dict(num_memory_tokens=64, num_fine_frames=16)  # the config defaults: M=64, F=16

QWEN2_0P5B_TEXT = dict(
    model_type="qwen2",
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4864,
    # The tokenizer has 151646 entries before <image> (151646) and <video> (151647); the checkpoint's embedding is
    # padded to 152000 rows. With vocab_size=151646 the placeholder ids would index past the embedding.
    vocab_size=152000,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
)
SIGLIP_SO400M = dict(
    model_type="siglip_vision_model",
    hidden_size=1152,
    num_hidden_layers=27,
    num_attention_heads=16,
    intermediate_size=4304,
    image_size=384,
    patch_size=14,
    layer_norm_eps=1e-6,
    vision_use_head=False,
)


def base_config(shape: str):
    from transformers import LlavaOnevisionConfig

    from modeling_memllava.testing import tiny_base_config

    if shape == "tiny":
        return tiny_base_config(attn_implementation="sdpa")
    if shape == "small":  # 224px / 14 -> 16x16 patches -> pooled 8x8 = 64 tokens per frame
        return tiny_base_config(
            text=dict(hidden_size=256, num_hidden_layers=4),
            vision=dict(hidden_size=128, num_hidden_layers=4, image_size=224, patch_size=14),
            image_grid_pinpoints=[[224, 224]],
            attn_implementation="sdpa",
        )
    if shape == "0p5b":
        return LlavaOnevisionConfig(
            text_config=QWEN2_0P5B_TEXT,
            vision_config=SIGLIP_SO400M,
            image_token_index=151646,
            video_token_index=151647,
            image_grid_pinpoints=[[384, 384]],
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
    raise ValueError(f"unknown shape {shape!r}")


def build_model(shape: str, which: str, dtype, device):
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from modeling_memllava import MemLlavaOnevisionForConditionalGeneration
    from modeling_memllava.testing import TINY_MEMORY_DEFAULTS

    torch.manual_seed(0)
    with torch.device(device):
        base = LlavaOnevisionForConditionalGeneration(base_config(shape)).to(dtype)
    if which == "llava_ov":
        return base
    fields = {"tiny": TINY_MEMORY_DEFAULTS, "small": SMALL_MEMORY, "0p5b": GPU_MEMORY}[shape]
    torch.manual_seed(1)
    return MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(base, **fields)


def set_trainable(model, which: str, baseline_train: str) -> int:
    """Freeze per arm; returns the number of trainable parameters."""
    from modeling_memllava.training import configure_trainable, is_llm_parameter

    if which == "memllava":
        counts = configure_trainable(model, train_llm=False)
        return counts["memory"]
    trainable = 0
    for name, param in model.named_parameters():
        train = is_llm_parameter(name) if baseline_train == "llm" else name.startswith("model.multi_modal_projector.")
        param.requires_grad_(train)
        trainable += param.numel() if train else 0
    if trainable == 0:
        raise RuntimeError(f"no trainable parameters for the baseline with --baseline-train {baseline_train}")
    return trainable


def build_inputs(config, frames: int, device):
    """`input_ids` = system text, the video placeholders, a question, the answer; labels on the answer only."""
    import torch

    from modeling_memllava import MemLlavaOnevisionConfig

    if isinstance(config, MemLlavaOnevisionConfig):
        video_tokens = config.num_video_tokens(frames)
    else:  # stock LLaVA-OV: every frame's pooled tokens plus the newline
        side = config.vision_config.image_size // config.vision_config.patch_size
        video_tokens = frames * ((side + 1) // 2) ** 2 + 1
    generator = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(0, 256, (n,), generator=generator)  # byte tokens: valid in every vocab here
    prefix, question, answer = text(8), text(16), text(16)
    video = torch.full((video_tokens,), config.video_token_id)
    ids = torch.cat([prefix, video, question, answer])[None]
    labels = torch.full_like(ids, -100)
    labels[0, -len(answer) :] = answer
    size = config.vision_config.image_size
    pixels = torch.randn(1, frames, 3, size, size, generator=generator)
    return ids.to(device), labels.to(device), pixels.to(device)


# -- one point ----------------------------------------------------------------------------------------------------


def worker(args) -> dict:
    import torch

    gpu = args.shape == "0p5b"
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(args.threads)
    model = build_model(args.shape, args.which, dtype, device)
    trainable = set_trainable(model, args.which, args.baseline_train)
    model.gradient_checkpointing_enable()
    if args.no_input_require_grads:
        # gradient_checkpointing_enable() also calls enable_input_require_grads(), which hooks the input embeddings
        # of every sub-model, the SigLIP patch embedding included: the frozen vision tower's activations then
        # require grad, are kept for backward and are back-propagated through for nothing. Remove those hooks.
        model.disable_input_require_grads()
    model.train()
    ids, labels, pixels = build_inputs(model.config, args.num_frames, device)
    pixels = pixels.to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    def step() -> float:
        sync = torch.cuda.synchronize if gpu else (lambda: None)
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, pixel_values_videos=pixels, labels=labels, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
        return time.perf_counter() - start

    result = {"prompt_tokens": ids.shape[1], "trainable": trainable}
    if gpu:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        rss_before = read_status_kib("VmRSS")
        reset_peak()
    warmup = step()
    if warmup > args.max_step_s:
        return {**result, "skipped": f"warm-up step took {warmup:.0f} s > cap {args.max_step_s:.0f} s"}
    times = [step() for _ in range(args.steps)]
    result["s_step"] = statistics.median(times)
    result["warmup_s"] = warmup
    result["tokens_per_s"] = ids.shape[1] / result["s_step"]
    if gpu:
        result["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["growth_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        result["peak_mib"] = (read_status_kib("VmHWM") - rss_before) / 1024
    return result


def run_point(shape: str, which: str, frames: int, args) -> dict:
    cmd = [
        sys.executable, __file__, "--worker", which, "--shape", shape, "--num-frames", str(frames),
        "--threads", str(args.threads), "--max-step-s", str(args.max_step_s), "--steps", str(args.steps),
        "--baseline-train", args.baseline_train,
    ] + (["--no-input-require-grads"] if args.no_input_require_grads else [])  # fmt: skip
    # Generous wall-clock limit: build + 1 warm-up (capped at max_step_s, then it stops) + the measured steps.
    timeout = 120 + args.max_step_s * (2 + args.steps)
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"point exceeded {timeout:.0f} s"}
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines()
        return {"skipped": f"failed: {lines[-1] if lines else result.returncode}"}
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- table --------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shape at 32 frames only")
    parser.add_argument("--gpu-0p5b", action="store_true", help="0.5B-shaped random model, 64 frames, bf16, CUDA")
    parser.add_argument("--baseline-train", choices=["projector", "llm"], default="projector",
                        help="what the LLaVA-OV baseline trains (it has no memory modules)")  # fmt: skip
    parser.add_argument("--no-input-require-grads", action="store_true",
                        help="undo the enable_input_require_grads() that gradient_checkpointing_enable() applies")  # fmt: skip
    parser.add_argument("--max-step-s", type=float, default=120.0, help="skip a point whose step takes longer")
    parser.add_argument("--shapes", nargs="+", choices=["tiny", "small"], help="CPU shapes to run (default: both)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps after the warm-up (median reported)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--worker", choices=["memllava", "llava_ov"], help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=["tiny", "small", "0p5b"], help=argparse.SUPPRESS)
    parser.add_argument("--num-frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.which = args.worker
        print(json.dumps(worker(args)))
        return

    if args.gpu_0p5b:
        import torch

        if not torch.cuda.is_available():
            parser.error("--gpu-0p5b needs a CUDA device")
        points = [("0p5b", 64)]
        print(f"0.5B shapes (Qwen2-0.5B + SigLIP so400m 384px), random weights, bf16, sdpa, {torch.cuda.get_device_name()}")
    else:
        points = [("tiny", 32)] if args.quick else [("tiny", 32), ("tiny", 128), ("small", 32), ("small", 128)]
        if args.shapes:
            points = [point for point in points if point[0] in args.shapes]
        print(f"CPU fp32, sdpa, {args.threads} threads{', input-require-grads hooks removed' if args.no_input_require_grads else ''}, batch 1, gradient checkpointing, 1 warm-up + median of {args.steps}")
    print(
        "ours = MemLlava, use_memory=True, memory modules train (LLM/vision/projector frozen); "
        f"base = LLaVA-OV, no memory modules: trains the {'LLM' if args.baseline_train == 'llm' else 'projector only'}"
    )
    mem_col = "peak GPU MiB" if args.gpu_0p5b else "peak MiB"
    header = f"{'shape':>5} {'frames':>6} {'arm':>4} {'tokens':>6} {'trainable':>10} {'s/step':>8} {'tok/s':>8} {mem_col:>12}"
    print(header)
    print("-" * len(header))
    ratios = []
    for shape, frames in points:
        rows = {}
        for which, arm in (("memllava", "ours"), ("llava_ov", "base")):
            # The step time grows at least linearly in T: skip a 128-frame point whose 32-frame point predicts > cap.
            smaller = rows_by_point.get((shape, 32, which)) if frames > 32 else None
            if smaller and "s_step" in smaller and smaller["s_step"] * frames / 32 > args.max_step_s:
                est = smaller["s_step"] * frames / 32
                result = {"skipped": f"32-frame step x{frames // 32} predicts >= {est:.0f} s > cap {args.max_step_s:.0f} s"}
            else:
                result = run_point(shape, which, frames, args)
            rows_by_point[(shape, frames, which)] = rows[which] = result
            if "skipped" in result:
                tokens = result.get("prompt_tokens", "")
                print(f"{shape:>5} {frames:>6} {arm:>4} {tokens:>6} {'':>10} skipped: {result['skipped']}", flush=True)
            else:
                print(
                    f"{shape:>5} {frames:>6} {arm:>4} {result['prompt_tokens']:>6} {result['trainable']:>10} "
                    f"{result['s_step']:>8.3f} {result['tokens_per_s']:>8.0f} {result['peak_mib']:>12.0f}",
                    flush=True,
                )
        ours, base = rows["memllava"], rows["llava_ov"]
        if "s_step" in ours and "s_step" in base:
            ratios.append(
                f"{shape:>5} {frames:>6}  tokens {ours['prompt_tokens'] / base['prompt_tokens']:.3f}  "
                f"s/step {ours['s_step'] / base['s_step']:.3f}  peak mem {ours['peak_mib'] / max(base['peak_mib'], 1e-9):.3f}"
            )
        else:
            ratios.append(f"{shape:>5} {frames:>6}  (no ratio: an arm was skipped)")
    print("\nratios ours / base (lower is better for ours)")
    for line in ratios:
        print(line)


rows_by_point: dict = {}

if __name__ == "__main__":
    main()
