"""Needle in a video haystack: does accuracy hold as videos get longer?

Each video is T grey distractor frames with one short event, a coloured disc shown for `needle_length` frames
(`synthetic.needle_frames`), written with a real codec; the question asks for the disc's colour (four options,
chance = 25%). Two arms start from the same
tiny LLaVA-OV and train the same modules (everything but the vision tower) with the same curriculum of short videos:

- `memllava`: memory on; the LLM sees M memory tokens + F fine frames, and the memory reads every frame.
- `budget_matched`: `use_memory=False` (plain LLaVA-OV) fed F frames sampled uniformly (LLaVA-OV's rule), so
  the LLM gets nearly the same number of visual tokens (F * P + 1 against M + F * P + 1).

Then both are scored on videos of T = 16, 64, 256 frames. The budget-matched arm can only answer when the needle
lands on one of its F frames, which becomes rarer as T grows; the memory arm can carry it from any frame.
Scoring reads the next-token logits of the four option letters (no generation, so no parsing noise).
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from .processing_memllava import uniform_sample_indices
from .synthetic import NEEDLE_COLOURS, make_needle_video
from .testing import tiny_base_model, tiny_model, tiny_processor
from .video import load_video


COLOURS = tuple(NEEDLE_COLOURS)  # red, green, blue, yellow
LETTERS = "ABCD"
# Short on purpose: the tiny tokenizer is byte-level, and a long prompt buries the few visual tokens of a 2-layer
# random LLM under text it must learn to ignore first.
QUESTION = "Colour of the disc? " + " ".join(f"{letter}. {colour}" for letter, colour in zip(LETTERS, COLOURS))


@dataclass
class NeedleConfig:
    """Everything that defines one run of the benchmark (saved with the results)."""

    # Curriculum shared by both arms, (frames per video, steps): short videos first, where the disc is usually among
    # the fine frames, so the random LLM learns what a colour looks like before it must rely on the memory.
    curriculum: tuple[tuple[int, int], ...] = ((8, 200), (16, 400), (32, 400), (64, 400))
    eval_frames: tuple[int, ...] = (16, 64, 256)
    needle_length: int = 4  # frames the disc stays on screen (1 s at 4 fps)
    train_videos: int = 128  # per curriculum stage
    eval_videos: int = 48
    batch_size: int = 8
    learning_rate: float = 3e-3  # LLM, projector, newline: a random tiny LLM learns from scratch
    memory_learning_rate: float = 1e-3  # memory modules: at the LLM's 3e-3 the recurrence collapsed to a constant
    num_memory_tokens: int = 8
    num_fine_frames: int = 4
    memory_chunk_size: int = 4
    fine_frame_dropout: float = 0.5
    frame_size: int = 64
    seed: int = 0
    threads: int | None = None

    @classmethod
    def quick(cls) -> "NeedleConfig":
        """A CI-sized run: same pipeline, few steps and videos (the numbers mean little)."""
        return cls(curriculum=((8, 3), (16, 3)), eval_frames=(16, 64), train_videos=16, eval_videos=8, batch_size=4)


@dataclass
class NeedleVideo:
    path: str
    num_frames: int
    needle_index: int
    colour: str
    length: int = 1

    @property
    def answer(self) -> str:
        return LETTERS[COLOURS.index(self.colour)]


def make_needle_set(
    folder: str, num_videos: int, num_frames: int, *, size: int, seed: int, length: int = 1
) -> list[NeedleVideo]:
    """`num_videos` h264 needle videos of `num_frames` frames; event start and colour drawn uniformly."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(f"{seed}-{num_frames}-{length}")
    videos = []
    for index in range(num_videos):
        needle, colour = rng.randrange(num_frames - length + 1), COLOURS[index % len(COLOURS)]
        path = os.path.join(folder, f"needle_T{num_frames}_L{length}_{index:03d}.mp4")
        if not os.path.exists(path):
            make_needle_video(path, num_frames, needle, colour, size=size, seed=seed * 100003 + index, length=length)
        videos.append(NeedleVideo(path, num_frames, needle, colour, length))
    return videos


class NeedleArm:
    """One model + processor + the rule that turns a decoded video into the frames this arm is given."""

    def __init__(self, name: str, model, processor, frames_per_video: int | None):
        self.name, self.model, self.processor = name, model, processor
        self.frames_per_video = frames_per_video  # None: every frame (memory arm); F: uniform subsample

    def select_frames(self, clip):
        if self.frames_per_video is None:
            return clip
        keep = uniform_sample_indices(len(clip.frames), self.frames_per_video)
        return replace(clip, frames=clip.frames[keep], indices=clip.indices[keep], timestamps=clip.timestamps[keep])

    def batch(self, clips, answers=None) -> dict:
        user = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
        prompt = self.processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        texts = [prompt + (answer if answer else "") for answer in (answers or [None] * len(clips))]
        inputs = self.processor(text=texts, videos=[self.select_frames(c) for c in clips], return_tensors="pt", padding=True)
        if answers is not None:
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[:, -1] = inputs["input_ids"][:, -1]  # the loss is on the answer letter only
            inputs["labels"] = labels
        return inputs

    def trainable_parameters(self):
        """Everything but the vision tower: LLM, projector, newline and (memory arm) the memory modules."""
        params = []
        for name, param in self.model.named_parameters():
            train = not name.startswith("model.vision_tower.")
            param.requires_grad_(train)
            if train:
                params.append(param)
        return params


def build_arms(config: NeedleConfig) -> list[NeedleArm]:
    base = tiny_base_model(config.seed)
    memory_fields = dict(
        num_memory_tokens=config.num_memory_tokens,
        num_fine_frames=config.num_fine_frames,
        memory_chunk_size=config.memory_chunk_size,
        fine_frame_dropout=config.fine_frame_dropout,
    )
    # Each arm gets its own copy of the base weights (conversion shares tensors with the instance it is given).
    memory = tiny_model(config.seed, base=copy.deepcopy(base), **memory_fields)
    plain = tiny_model(config.seed, base=copy.deepcopy(base), use_memory=False)
    return [
        NeedleArm("memllava", memory, tiny_processor(memory.config), None),
        NeedleArm("budget_matched", plain, tiny_processor(plain.config), config.num_fine_frames),
    ]


def train_arm(arm: NeedleArm, stages, config: NeedleConfig, log=print) -> list[float]:
    """Same optimiser, curriculum, steps, batches and order for both arms; returns the loss curve.

    `stages`: one `(clips, answers, steps)` per curriculum stage.
    """
    torch.manual_seed(config.seed)
    trainable = {id(p) for p in arm.trainable_parameters()}
    memory = set(arm.model.memory_parameter_names())
    named = [(name, p) for name, p in arm.model.named_parameters() if id(p) in trainable]
    groups = [
        {"params": [p for name, p in named if name not in memory], "lr": config.learning_rate},
        {"params": [p for name, p in named if name in memory], "lr": config.memory_learning_rate},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0)
    order = np.random.default_rng(config.seed)
    arm.model.train()
    losses = []
    for clips, answers, steps in stages:
        for step in range(steps):
            pick = order.choice(len(clips), size=config.batch_size, replace=False)
            loss = arm.model(**arm.batch([clips[i] for i in pick], [answers[i] for i in pick])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(arm.model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if log and (step + 1) % max(1, steps // 3) == 0:
                frames = len(clips[0].frames)
                log(f"  [{arm.name}] {frames}-frame stage, step {step + 1}/{steps}: loss {np.mean(losses[-50:]):.3f}")
    arm.model.eval()
    return losses


@torch.no_grad()
def evaluate_arm(arm: NeedleArm, clips, answers, batch_size: int = 8) -> float:
    letter_ids = arm.processor.tokenizer.convert_tokens_to_ids(list(LETTERS))
    correct = 0
    for start in range(0, len(clips), batch_size):
        inputs = arm.batch(clips[start : start + batch_size])
        logits = arm.model(**inputs).logits[:, -1, letter_ids]
        predicted = [LETTERS[i] for i in logits.argmax(-1).tolist()]
        correct += sum(p == a for p, a in zip(predicted, answers[start : start + batch_size]))
    return correct / len(clips)


def needle_visible_fraction(videos: list[NeedleVideo], frames_per_video: int) -> float:
    """How often the needle frame is among the uniformly sampled frames: the budget-matched arm's ceiling."""
    hits = [
        any(v.needle_index <= i < v.needle_index + v.length for i in uniform_sample_indices(v.num_frames, frames_per_video))
        for v in videos
    ]
    return float(np.mean(hits))


@dataclass
class NeedleResult:
    config: dict
    accuracy: dict[str, dict[int, float]] = field(default_factory=dict)
    needle_visible: dict[int, float] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        arms = list(self.accuracy)
        lines = ["| frames | " + " | ".join(arms) + " | needle among budget-matched frames |", "|---" * (len(arms) + 2) + "|"]
        for frames in self.config["eval_frames"]:
            cells = [f"{self.accuracy[arm][frames]:.1%}" for arm in arms]
            lines.append(f"| {frames} | " + " | ".join(cells) + f" | {self.needle_visible[frames]:.1%} |")
        return "\n".join(lines) + "\n(chance = 25.0%)"


def run_needle_benchmark(config: NeedleConfig, workdir: str, log=print) -> NeedleResult:
    log = log or (lambda message: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    clip_of = lambda v: load_video(v.path, num_frames=v.num_frames)  # noqa: E731 - every frame of a short video
    stages = []
    for frames, steps in config.curriculum:
        videos = make_needle_set(
            os.path.join(workdir, "train"), config.train_videos, frames,
            size=config.frame_size, seed=config.seed, length=config.needle_length,
        )  # fmt: skip
        stages.append(([clip_of(v) for v in videos], [v.answer for v in videos], steps))
    eval_sets = {
        frames: make_needle_set(
            os.path.join(workdir, "eval"), config.eval_videos, frames,
            size=config.frame_size, seed=config.seed + 1, length=config.needle_length,
        )  # fmt: skip
        for frames in config.eval_frames
    }
    result = NeedleResult(config=asdict(config))
    result.needle_visible = {f: needle_visible_fraction(v, config.num_fine_frames) for f, v in eval_sets.items()}
    arms = build_arms(config)
    for arm in arms:
        log(f"training {arm.name}: curriculum {config.curriculum} (frames, steps), batch {config.batch_size}")
        losses = train_arm(arm, stages, config, log)
        result.final_loss[arm.name] = float(np.mean(losses[-max(1, len(losses) // 10) :]))
    for frames, videos in eval_sets.items():
        clips = [clip_of(v) for v in videos]
        answers = [v.answer for v in videos]
        for arm in arms:
            result.accuracy.setdefault(arm.name, {})[frames] = evaluate_arm(arm, clips, answers)
        log(f"T={frames}: " + ", ".join(f"{arm.name} {result.accuracy[arm.name][frames]:.1%}" for arm in arms))
    result.seconds = time.perf_counter() - start
    return result


def save_result(result: NeedleResult, folder: str, plot: bool = True) -> dict[str, str]:
    """Write results JSON, the markdown table and (with matplotlib) a PNG of accuracy vs frames."""
    os.makedirs(folder, exist_ok=True)
    paths = {"json": os.path.join(folder, "needle_results.json"), "table": os.path.join(folder, "needle_table.md")}
    payload = asdict(result)
    for name, path in ((paths["json"], json.dumps(payload, indent=2)), (paths["table"], result.table() + "\n")):
        with open(name + ".tmp", "w") as handle:
            handle.write(path)
        os.replace(name + ".tmp", name)
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frames = list(result.config["eval_frames"])
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for arm, accuracy in result.accuracy.items():
            axis.plot(frames, [accuracy[f] for f in frames], marker="o", label=arm)
        axis.plot(frames, [result.needle_visible[f] for f in frames], ls=":", color="grey", label="needle among F sampled frames")
        axis.axhline(0.25, ls="--", color="black", lw=0.8, label="chance")
        axis.set_xscale("log", base=2)
        axis.set_xticks(frames, [str(f) for f in frames])
        axis.set_ylim(0, 1.05)
        axis.set_xlabel("frames in the video (T)")
        axis.set_ylabel("accuracy")
        axis.set_title("Needle in a video haystack (tiny models, CPU)")
        axis.legend(fontsize=8, loc="lower left")
        figure.tight_layout()
        paths["plot"] = os.path.join(folder, "needle_accuracy.png")
        figure.savefig(paths["plot"], dpi=120)
        plt.close(figure)
    return paths


__all__ = [
    "NeedleConfig",
    "NeedleResult",
    "build_arms",
    "evaluate_arm",
    "make_needle_set",
    "needle_visible_fraction",
    "run_needle_benchmark",
    "save_result",
    "train_arm",
]
