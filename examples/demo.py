#!/usr/bin/env python
"""The whole MemLlava loop, offline, on the embedded tiny model (`make demo`; about 3-4 minutes on 2 CPU cores).

1. a local mini LLaVA-Video-178K in the Hub's exact layout (tar.gz archives + JSON), with four bad samples
2. stage short: `accelerate launch` with two processes (gloo) -> memory modules only
3. stage long: from the short checkpoint, LLM unfrozen
4. reload with `AutoModel.from_pretrained(..., trust_remote_code=True)` and answer a question (`memllava-chat`)
5. the needle-in-a-video-haystack benchmark: accuracy vs frames, table + plot
6. `push_to_hub.py --dry-run`: the exact folder that would be uploaded

Every step runs the same command a user runs on real data; only `--set` overrides make it tiny. The models are
random and tiny, so answers are meaningless: the demo shows the pipeline, not quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
SUBSETS = ["0_30_s_academic_v0_1", "30_60_s_academic_v0_1"]


def tiny_stage_flags(output_dir: Path, mirror: Path, **extra) -> list[str]:
    settings = {
        "base_model": "tiny",
        "dtype": "float32",
        "data.root": str(mirror),
        "data.subsets": "[" + ",".join(SUBSETS) + "]",
        "data.num_frames": 16,
        "data.shuffle_buffer": 8,
        "model.num_memory_tokens": 8,
        "model.num_fine_frames": 4,
        "learning_rates.memory": 1e-3,
        "learning_rates.llm": 1e-4,
        "training.output_dir": str(output_dir),
        "training.max_steps": 30,
        "training.per_device_train_batch_size": 2,
        "training.gradient_accumulation_steps": 1,
        "training.bf16": "false",
        "training.dataloader_num_workers": 0,
        "training.save_steps": 15,
        "training.logging_steps": 5,
        "training.warmup_steps": 0.1,
        **extra,
    }
    flags = []
    for key, value in settings.items():
        flags += ["--set", f"{key}={value}"]
    return flags


def run(command: list[str], title: str) -> None:
    print(f"\n=== {title}\n$ {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    print(f"--- {title}: done in {time.perf_counter() - start:.0f} s", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="everything the demo produces goes here")
    parser.add_argument("--quick", action="store_true", help="fewer steps and a CI-sized needle run")
    args = parser.parse_args(argv)
    out = (ROOT / args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    mirror, short, long = out / "mirror", out / "stage_short", out / "stage_long"
    steps = {"training.max_steps": 6, "training.save_steps": 3} if args.quick else {}
    start = time.perf_counter()

    run(
        [python, "-m", "modeling_memllava.mirror", str(mirror), "--bad-samples", "--videos-per-subset", "6"],
        "1. local mini LLaVA-Video-178K (Hub layout) with 4 bad samples",
    )
    run(
        [
            python, "-m", "accelerate.commands.launch",
            "--config_file", "configs/accelerate/cpu_ddp_test.yaml", "--num_processes", "2",
            "train.py", "--stage", "short", *tiny_stage_flags(short, mirror, **steps),
        ],
        "2. stage short: memory modules only, 2 processes over gloo",
    )  # fmt: skip
    run(
        [
            python, "train.py", "--stage", "long",
            *tiny_stage_flags(long, mirror, init_from=str(short), **{"data.num_frames": 32}, **steps),
        ],
        "3. stage long: from the short checkpoint, LLM unfrozen",
    )  # fmt: skip

    from modeling_memllava.synthetic import make_needle_video

    question_video = out / "question_video.mp4"
    make_needle_video(question_video, 48, 30, "blue", size=64, fps=8)
    run(
        [python, "-m", "modeling_memllava.chat", "--model", str(long), "--video", str(question_video),
         "--num-frames", "48", "--max-new-tokens", "8", "What colour is the disc that appears?"],
        "4. reload with trust_remote_code and answer a question (memllava-chat)",
    )  # fmt: skip
    needle_out = out / "needle"
    run(
        [python, "bench/needle.py", "--output", str(needle_out), *(["--quick"] if args.quick else [])],
        "5. needle in a video haystack: accuracy vs frames",
    )
    staged = out / "hub_upload"
    run(
        [python, "push_to_hub.py", str(long), "your-name/memllava-tiny-demo", "--dry-run", str(staged)],
        "6. push_to_hub.py --dry-run: the folder that would be uploaded",
    )

    report = json.loads((short / "data_report.json").read_text())
    print("\n" + "=" * 80)
    print(f"MemLlava demo finished in {time.perf_counter() - start:.0f} s. What it produced:")
    print(f"  {mirror}: mini LLaVA-Video-178K in the Hub layout (tar.gz + JSON)")
    print(f"  {short}: stage short checkpoint; data report: {report['skipped_total']} skipped samples {report['skipped']}")
    print(f"  {long}: stage long checkpoint (loads with AutoModel.from_pretrained(..., trust_remote_code=True))")
    print(f"  {needle_out}: needle_table.md, needle_results.json, needle_accuracy.png")
    print(f"  {staged}: exactly what `hf upload your-name/memllava-tiny-demo {staged}` would upload (the CLI formerly called huggingface-cli)")
    print("\nNeedle benchmark:\n" + (needle_out / "needle_table.md").read_text())
    print("The models are tiny and trained for seconds on synthetic clips: the chat answer means nothing; the pipeline is real.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
