"""`memllava-chat`: ask a question about a video file from the command line.

    memllava-chat --model ./checkpoint --video talk.mp4 "What is the speaker holding?"
    memllava-chat --video clip.mp4 "What happens?"        # no --model: the embedded tiny random model (offline)

Loads the model and processor with `trust_remote_code=True`, samples frames uniformly (decoding only those frames,
with a progress bar), encodes the video once and prints the answer.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .inference import generate_answer
from .video import VideoClip, VideoDecodeError, iter_video_chunks


TINY = "tiny"
TINY_NOTICE = (
    "note: --model tiny is a tiny randomly initialised model built offline; its answer is meaningless and only "
    "shows that the pipeline runs end to end. Pass --model PATH_OR_REPO for a trained checkpoint."
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="memllava-chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("question", help="the question to ask about the video")
    parser.add_argument("--video", required=True, help="path to a video file")
    parser.add_argument("--model", default=TINY, help="checkpoint folder or Hub repo id (default: the tiny offline model)")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument("--num-frames", type=int, default=64, help="frames sampled uniformly over the video")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"])
    parser.add_argument("--chunk-size", type=int, default=16, help="frames decoded per step (progress granularity)")
    args = parser.parse_args(argv)
    if args.num_frames < 1:
        parser.error(f"--num-frames must be >= 1, got {args.num_frames}")
    return args


def load_model_and_processor(name: str, *, revision=None, dtype="auto", device=None, attn_implementation="sdpa"):
    """A checkpoint (folder or repo id) loaded with trust_remote_code, or the tiny offline model for `tiny`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == TINY:
        from .testing import tiny_model, tiny_processor

        model = tiny_model()
        return model.to(device), tiny_processor(model.config)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(
        name, revision=revision, trust_remote_code=True, dtype=torch_dtype, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=True)
    return model.to(device).eval(), processor


def decode_with_progress(path: str, num_frames: int, chunk_size: int) -> VideoClip:
    """Decode the sampled frames chunk by chunk (seeking, never decoding the whole file) behind a progress bar."""
    chunks = []
    with tqdm(total=num_frames, unit="frame", desc="decoding", file=sys.stderr) as bar:
        for chunk in iter_video_chunks(path, chunk_size=chunk_size, num_frames=num_frames):
            chunks.append(chunk)
            bar.update(len(chunk))
    first = chunks[0]
    return VideoClip(
        frames=np.concatenate([c.frames for c in chunks]),
        indices=np.concatenate([c.indices for c in chunks]),
        timestamps=np.concatenate([c.timestamps for c in chunks]),
        fps=first.fps,
        duration=first.duration,
        backend=first.backend,
        num_total_frames=first.num_total_frames,
        skipped=[index for c in chunks for index in c.skipped],
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.model == TINY:
        print(TINY_NOTICE, file=sys.stderr)
    try:
        clip = decode_with_progress(args.video, args.num_frames, args.chunk_size)
    except (VideoDecodeError, FileNotFoundError) as error:
        print(f"memllava-chat: error: {error}", file=sys.stderr)
        return 2
    model, processor = load_model_and_processor(
        args.model, revision=args.revision, dtype=args.dtype, device=args.device, attn_implementation=args.attn_implementation
    )
    start = time.perf_counter()
    with tqdm(total=1, desc=f"encoding {len(clip)} frames + answering", file=sys.stderr, bar_format="{desc}: {elapsed}") as bar:
        answer = generate_answer(model, processor, clip, args.question, max_new_tokens=args.max_new_tokens)
        bar.update(1)
    print(
        f"[{len(clip)} frames over {clip.duration:.1f} s, decoded with {clip.backend}; "
        f"{model.config.num_video_tokens(len(clip))} visual tokens; {time.perf_counter() - start:.1f} s]",
        file=sys.stderr,
    )
    if not answer:
        print("(the model generated no text: end-of-turn straight away)", file=sys.stderr)
    print(answer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
