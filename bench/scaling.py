"""Prompt length, prefill time and forward memory vs number of frames: MemLlava against transformers' LLaVA-OV.

    python bench/scaling.py                 # T = 16, 64, 256, 1024; baseline up to 256 frames
    python bench/scaling.py --frames 16 64 --baseline-max-frames 64   # quicker

Both models share the same random weights (MemLlava is converted from the LLaVA-OV instance), 384px frames and
small widths. Every (model, T) point runs in a fresh subprocess so its peak RSS is its own. "Forward memory" is the
growth of the process's resident set during the prefill forward beyond what it held before (model + input tensor),
read from /proc (VmHWM after resetting it through /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from peak_rss import read_status_kib, reset_peak


def build_models(args):
    import torch
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from modeling_memllava import MemLlavaOnevisionForConditionalGeneration
    from modeling_memllava.testing import tiny_base_config

    config: LlavaOnevisionConfig = tiny_base_config(
        text=dict(hidden_size=args.llm_width, num_hidden_layers=args.llm_layers),
        vision=dict(hidden_size=args.vision_width, num_hidden_layers=2, image_size=384, patch_size=14),
        image_grid_pinpoints=[[384, 384]],
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    base = LlavaOnevisionForConditionalGeneration(config).eval()
    model = MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(
        base, num_memory_tokens=args.memory_tokens, num_fine_frames=args.fine_frames, memory_num_heads=4
    ).eval()
    return base, model


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    base, model = build_models(args)  # MemLlava shares the base's tensors: one copy of the weights
    net = model if args.which == "memllava" else base
    return measure(net, args)


def measure(net, args) -> dict:
    import torch

    from modeling_memllava import MemLlavaOnevisionConfig

    config, frames = net.config, args.num_frames
    if isinstance(config, MemLlavaOnevisionConfig):
        video_tokens = config.num_video_tokens(frames)
    else:  # stock LLaVA-OV: every frame's pooled tokens plus the newline
        side = config.vision_config.image_size // config.vision_config.patch_size
        video_tokens = frames * ((side + 1) // 2) ** 2 + 1
    ids = torch.tensor([[1, 2, 3] + [config.video_token_id] * video_tokens + [4, 5, 6, 7]])
    pixels = torch.randn(1, frames, 3, 384, 384)
    rss_before = read_status_kib("VmRSS")
    reset_peak()
    start = time.perf_counter()
    with torch.inference_mode():
        net(input_ids=ids, pixel_values_videos=pixels, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    return {
        "prompt_tokens": ids.shape[1],
        "prefill_s": seconds,
        "forward_mib": (read_status_kib("VmHWM") - rss_before) / 1024,
        "input_mib": pixels.numel() * 4 / 2**20,
    }


def run_point(which: str, frames: int, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", which, "--num-frames", str(frames)] + shared_flags(args)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if result.returncode != 0:
        print(f"  {which} at {frames} frames failed: {result.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def shared_flags(args) -> list[str]:
    return [
        "--llm-width", str(args.llm_width), "--llm-layers", str(args.llm_layers),
        "--vision-width", str(args.vision_width), "--memory-tokens", str(args.memory_tokens),
        "--fine-frames", str(args.fine_frames), "--threads", str(args.threads),
    ]  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--baseline-max-frames", type=int, default=256, help="largest T the baseline is run at")
    parser.add_argument("--llm-width", type=int, default=256)
    parser.add_argument("--llm-layers", type=int, default=4)
    parser.add_argument("--vision-width", type=int, default=64)
    parser.add_argument("--memory-tokens", type=int, default=64)
    parser.add_argument("--fine-frames", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--worker", choices=["memllava", "llava_ov"], help=argparse.SUPPRESS)
    parser.add_argument("--num-frames", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        args.which = args.worker
        print(json.dumps(worker(args)))
        return

    print(
        f"LLM width {args.llm_width} x {args.llm_layers} layers, SigLIP 384px width {args.vision_width}, "
        f"M={args.memory_tokens}, F={args.fine_frames}, {args.threads} threads"
    )
    header = (
        f"{'frames':>6} | {'MemLlava tok':>12} {'prefill s':>9} {'fwd MiB':>8} | {'LLaVA-OV tok':>12} "
        f"{'prefill s':>9} {'fwd MiB':>8} | {'tok ratio':>9} {'speedup':>7}"
    )
    print(header)
    print("-" * len(header))
    results = {}
    for frames in args.frames:
        ours = run_point("memllava", frames, args)
        theirs = run_point("llava_ov", frames, args) if frames <= args.baseline_max_frames else None
        results[frames] = (ours, theirs)
        row = f"{frames:>6} | "
        row += f"{ours['prompt_tokens']:>12} {ours['prefill_s']:>9.2f} {ours['forward_mib']:>8.0f} | " if ours else f"{'failed':>32} | "
        if theirs:
            row += f"{theirs['prompt_tokens']:>12} {theirs['prefill_s']:>9.2f} {theirs['forward_mib']:>8.0f} | "
            if ours:
                row += f"{theirs['prompt_tokens'] / ours['prompt_tokens']:>8.1f}x {theirs['prefill_s'] / ours['prefill_s']:>6.1f}x"
        else:
            row += f"{'(not run)':>32} |"
        print(row, flush=True)

    mem = {t: r[0]["forward_mib"] for t, r in results.items() if r[0]}
    if 64 in mem and 1024 in mem:
        print(f"\nMemLlava forward memory 1024 vs 64 frames: {mem[1024] / mem[64]:.2f}x (target <= 1.5x)")
    if 256 in results and all(results[256]):
        ours, theirs = results[256]
        print(
            f"At 256 frames: {theirs['prompt_tokens'] / ours['prompt_tokens']:.1f}x fewer prompt tokens "
            f"(target >= 10x), {theirs['prefill_s'] / ours['prefill_s']:.1f}x faster prefill (target >= 3x)"
        )


if __name__ == "__main__":
    main()
