"""Local multiple-choice video QA evaluation: a thin CLI over `modeling_memllava.evaluation.evaluate`.

    python evaluate.py --model PATH_OR_REPO --questions videomme.jsonl --videos /data/videomme \
        --num-frames 32 --output results.json --task videomme

`--model tiny` uses the tiny random model and processor from `modeling_memllava.testing` (a smoke test, offline).
Published numbers come from lmms-eval (`--model memllava`); see the README.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from modeling_memllava.evaluation import DEFAULT_DURATION_BUCKETS, evaluate, parse_buckets


DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id, or 'tiny'")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) to load")
    parser.add_argument("--questions", required=True, help="JSONL file, one question per line")
    parser.add_argument("--videos", required=True, help="folder the questions' video paths are relative to")
    parser.add_argument("--output", required=True, help="results JSON to write")
    parser.add_argument("--task", default="mcq", help="task name used as the key in the results")
    parser.add_argument("--num-frames", type=int, default=32, help="frames sampled uniformly per video")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attn-implementation", default=None, help="e.g. sdpa, flash_attention_2, eager")
    parser.add_argument("--dtype", default="auto", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--buckets",
        type=parse_buckets,
        default=DEFAULT_DURATION_BUCKETS,
        help="duration buckets in seconds, e.g. 'short:0:120,medium:120:900,long:900:inf' (the default)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def load_model_and_processor(args):
    """The model and processor named by `args.model`, ready for inference on `args.device`."""
    if args.model == "tiny":
        from modeling_memllava.testing import tiny_model, tiny_processor

        model = tiny_model()
        return model.to(args.device), tiny_processor(model.config)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs = {"trust_remote_code": True, "revision": args.revision, "dtype": DTYPES[args.dtype]}
    if args.attn_implementation:
        kwargs["attn_implementation"] = args.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(args.model, **kwargs).to(args.device).eval()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True, revision=args.revision)
    return model, processor


def main(argv=None) -> int:
    args = parse_args(argv)
    model, processor = load_model_and_processor(args)
    results = evaluate(
        model,
        processor,
        args.questions,
        args.videos,
        task_name=args.task,
        num_frames=args.num_frames,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        buckets=args.buckets,
        output=args.output,
        command=[sys.executable, *sys.argv] if argv is None else ["evaluate.py", *argv],
        progress=not args.no_progress,
    )
    print(json.dumps(results["results"], indent=2))
    if results["errors"]:
        print(f"{len(results['errors'])} unreadable video(s), counted wrong; see 'errors' in {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
