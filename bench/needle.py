#!/usr/bin/env python
"""Needle in a video haystack: accuracy vs video length for MemLlava and a budget-matched LLaVA-OV.

    python bench/needle.py                  # the full run (a few minutes on 2 CPU cores): table + PNG
    python bench/needle.py --quick          # CI-sized: same pipeline, numbers meaningless

Both arms start from the same tiny random LLaVA-OV and train the same modules (all but the vision tower) for the
same steps on short videos; see modeling_memllava/needle.py for the task and the arms. Writes needle_results.json,
needle_table.md and needle_accuracy.png to --output.
"""

import argparse
import dataclasses
import sys

from modeling_memllava.needle import NeedleConfig, run_needle_benchmark, save_result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI-sized run")
    parser.add_argument("--output", default="bench/results/needle", help="folder for the table, JSON and plot")
    parser.add_argument("--workdir", default=None, help="where generated videos are cached (default: OUTPUT/videos)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--eval-frames", type=int, nargs="+", default=None)
    parser.add_argument("--curriculum", nargs="+", default=None, metavar="FRAMES:STEPS", help="e.g. 8:200 32:600")
    for field in dataclasses.fields(NeedleConfig):
        if field.name not in ("eval_frames", "curriculum"):
            kind = {"int": int, "float": float, "int | None": int}.get(str(field.type), float)
            parser.add_argument(f"--{field.name.replace('_', '-')}", type=kind, default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    config = NeedleConfig.quick() if args.quick else NeedleConfig()
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(NeedleConfig) if getattr(args, f.name, None) is not None}
    config = dataclasses.replace(config, **overrides)
    config = dataclasses.replace(config, eval_frames=tuple(config.eval_frames))
    if args.curriculum:
        stages = tuple(tuple(int(x) for x in stage.split(":")) for stage in args.curriculum)
        config = dataclasses.replace(config, curriculum=stages)
    print(f"needle benchmark: {config}", file=sys.stderr)
    result = run_needle_benchmark(config, args.workdir or f"{args.output}/videos", log=lambda m: print(m, file=sys.stderr))
    paths = save_result(result, args.output, plot=not args.no_plot)
    print(result.table())
    print(f"\n{result.seconds:.0f} s; " + ", ".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
