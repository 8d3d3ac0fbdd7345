"""A small local evaluator for multiple-choice video QA (LongVideoBench, VideoMME, MLVU, NExT-QA, EgoSchema format).

Questions come from a JSONL file, one record per line::

    {"id": "q1", "video": "clips/a.mp4", "question": "What colour ...?",
     "options": ["red", "green"] | {"A": "red", "B": "green"}, "answer": "B", "duration": 95.0}

`video` is relative to a video folder; `duration` (seconds) is optional and otherwise read from the decoded video.
The prompt follows lmms-eval's LLaVA-OV video multiple-choice prompts, the model's reply is parsed into an option
letter with `extract_choice`, and `score` turns predictions into accuracy overall and per duration bucket.
`evaluate` runs the whole loop and writes a results JSON that records how the numbers were produced.

This is for quick, dependency-free checks; the numbers to publish come from lmms-eval itself
(`--model memllava`, see `lmms_eval_plugin.py`), whose prompts and parsers are the reference.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tqdm.auto import tqdm


# lmms-eval's post-prompt for LLaVA-OV video multiple choice (videomme, longvideobench, mlvu, ...).
MCQ_POST_PROMPT = "Answer with the option's letter from the given choices directly."

# VideoMME's split: short < 2 min, medium 2-15 min, long > 15 min. (name, lower bound inclusive, upper exclusive).
DEFAULT_DURATION_BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("short", 0.0, 120.0),
    ("medium", 120.0, 900.0),
    ("long", 900.0, math.inf),
)
UNKNOWN_BUCKET = "unknown"

# How frames are chosen; `generate_answer`/`load_video` sample uniformly like LLaVA-OV's lmms-eval loader.
UNIFORM_SAMPLING = "uniform: num_frames indices evenly spaced over the whole video (LLaVA-OV rule)"


@dataclass
class Question:
    """One multiple-choice question about one video."""

    id: str
    video: str
    question: str
    options: dict[str, str]  # letter -> option text, in letter order
    answer: str
    duration: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_record(cls, record: Mapping) -> "Question":
        missing = {"id", "video", "question", "options", "answer"} - set(record)
        if missing:
            raise ValueError(f"question record {record.get('id', '?')!r} lacks {sorted(missing)}")
        options = normalize_options(record["options"])
        answer = str(record["answer"]).strip().upper()
        if answer not in options:
            raise ValueError(f"question {record['id']!r}: answer {answer!r} is not one of {list(options)}")
        known = {"id", "video", "question", "options", "answer", "duration"}
        duration = record.get("duration")
        return cls(
            id=str(record["id"]),
            video=str(record["video"]),
            question=str(record["question"]),
            options=options,
            answer=answer,
            duration=None if duration is None else float(duration),
            extra={k: v for k, v in record.items() if k not in known},
        )


def normalize_options(options: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """Options as an ordered `{letter: text}`: a list gets letters A, B, ... in order; a dict is kept (upper-cased)."""
    if isinstance(options, Mapping):
        normalized = {str(letter).strip().upper(): str(text) for letter, text in options.items()}
        bad = [letter for letter in normalized if not re.fullmatch(r"[A-Z]", letter)]
        if bad:
            raise ValueError(f"option keys must be single letters, got {bad}")
        return dict(sorted(normalized.items()))
    if len(options) > 26:
        raise ValueError(f"at most 26 options, got {len(options)}")
    return {chr(ord("A") + i): str(text) for i, text in enumerate(options)}


def load_questions(path: str | os.PathLike) -> list[Question]:
    """Read a JSONL question file (blank lines ignored); ids must be unique."""
    questions = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                questions.append(Question.from_record(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as error:
                raise ValueError(f"{path}:{line_number}: {error}") from error
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate question ids")
    return questions


def build_prompt(question: str, options: Mapping[str, str]) -> str:
    """The question, one "A. text" line per option, then lmms-eval's post-prompt."""
    lines = [question.strip()]
    lines += [f"{letter}. {text.strip()}" for letter, text in options.items()]
    lines.append(MCQ_POST_PROMPT)
    return "\n".join(lines)


# --- answer parsing ------------------------------------------------------------------------------------------------

_ANSWER_PHRASE = re.compile(r"(?:answer|option|choice)\s*(?:is|:|：)?\s*[:：]?\s*[\(\[]?([A-Z])\b", re.IGNORECASE)
_PARENTHESISED = re.compile(r"[\(\[]([A-Z])[\)\]]")
_LEADING = re.compile(r"^\W*([A-Z])(?:[.):：,]|\s*$)")
_STANDALONE = re.compile(r"\b([A-Z])\b")
# "A man ..."/"I think ..." use the letter as a word, not as a choice; "A is correct" does not.
_WORD_USE = re.compile(r"\s+(?!is\b|was\b|seems\b)[a-z]")


def extract_choice(text: str | None, letters: Iterable[str], options: Mapping[str, str] | None = None) -> str | None:
    """The option letter a free-form reply picks, or None.

    Tried in order, first hit wins: an explicit "Answer: B" / "the answer is (B)"; a parenthesised "(B)"; a reply
    that starts with the letter ("B", "B.", "B) red"); the first standalone capital letter that is a valid choice and
    not used as a word ("A man ..."); finally the option texts themselves (the longest one contained in the reply,
    so "dark red" beats "red").
    """
    if not text:
        return None
    letters = {letter.upper() for letter in letters}
    text = text.strip()

    for match in _ANSWER_PHRASE.finditer(text):
        if match.group(1).upper() in letters and match.group(1).isupper():
            return match.group(1)
    for pattern in (_PARENTHESISED, _LEADING):
        match = pattern.search(text)
        if match and match.group(1) in letters:
            return match.group(1)
    for match in _STANDALONE.finditer(text):
        letter = match.group(1)
        if letter in letters and not (letter in "AI" and _WORD_USE.match(text, match.end())):
            return letter

    if options:
        lowered = text.lower()
        hits = [(len(t), letter) for letter, t in options.items() if letter in letters and t.strip() and t.strip().lower() in lowered]
        if hits:
            return max(hits)[1]
    return None


# --- scoring -------------------------------------------------------------------------------------------------------


def duration_bucket(duration: float | None, buckets: Sequence[tuple[str, float, float]] = DEFAULT_DURATION_BUCKETS) -> str:
    """Name of the bucket `[low, high)` holding `duration` (seconds), or "unknown"."""
    if duration is None or not math.isfinite(duration):
        return UNKNOWN_BUCKET
    for name, low, high in buckets:
        if low <= duration < high:
            return name
    return UNKNOWN_BUCKET


def _accuracy(correct: int, n: int) -> float | None:
    return correct / n if n else None


def score(
    records: Iterable[Question | Mapping],
    predictions: Mapping[str, str | None],
    *,
    buckets: Sequence[tuple[str, float, float]] = DEFAULT_DURATION_BUCKETS,
    durations: Mapping[str, float | None] | None = None,
) -> dict:
    """Accuracy of `predictions` (question id -> letter or None) against `records`, overall and per duration bucket.

    A question without a prediction (missing id or None, e.g. an unreadable video) counts as wrong. `durations`
    (id -> seconds) fills in durations the records lack. Every configured bucket is reported (accuracy None when
    empty); "unknown" appears only when some question has no duration.
    """
    durations = durations or {}
    totals = {name: [0, 0] for name, _, _ in buckets}  # name -> [correct, n]
    correct_all = n_all = 0
    for record in records:
        q = record if isinstance(record, Question) else Question.from_record(record)
        hit = predictions.get(q.id) == q.answer
        duration = q.duration if q.duration is not None else durations.get(q.id)
        bucket = totals.setdefault(duration_bucket(duration, buckets), [0, 0])
        bucket[0] += hit
        bucket[1] += 1
        correct_all += hit
        n_all += 1
    return {
        "accuracy": _accuracy(correct_all, n_all),
        "n": n_all,
        "correct": correct_all,
        "by_duration": {name: {"accuracy": _accuracy(c, n), "n": n} for name, (c, n) in totals.items()},
    }


# --- reproducibility -----------------------------------------------------------------------------------------------


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# Config entries that are long and say nothing about the run (resolution grids, label maps).
_BULKY_CONFIG_KEYS = ("image_grid_pinpoints", "id2label", "label2id")


def _config_summary(config) -> dict:
    summary = config.to_dict()
    for key in _BULKY_CONFIG_KEYS:
        summary.pop(key, None)
    for sub in ("text_config", "vision_config"):
        if isinstance(summary.get(sub), dict):
            for key in _BULKY_CONFIG_KEYS:
                summary[sub].pop(key, None)
    return summary


def reproducibility_info(model, *, num_frames: int, sampling: str = UNIFORM_SAMPLING, command=None, seed=None) -> dict:
    """What is needed to reproduce a score: versions, model config and revision, frame sampling, seed, command, date."""
    config = model.config
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": _package_version("torch"),
            "transformers": _package_version("transformers"),
            "accelerate": _package_version("accelerate"),
            "av": _package_version("av"),
            "decord": _package_version("decord"),
            "lmms-eval": _package_version("lmms-eval"),
            "memllava": _package_version("memllava"),
        },
        "model": {
            "name_or_path": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
            # Set by from_pretrained when the checkpoint came from the Hub: the exact revision evaluated.
            "commit_hash": getattr(config, "_commit_hash", None),
            "class": type(model).__name__,
            "dtype": str(getattr(model, "dtype", None)),
            "device": str(getattr(model, "device", None)),
            "attn_implementation": getattr(config, "_attn_implementation", None),
            "use_memory": getattr(config, "use_memory", None),
            "num_memory_tokens": getattr(config, "num_memory_tokens", None),
            "num_fine_frames": getattr(config, "num_fine_frames", None),
            "config": _config_summary(config),
        },
        "frames": {"num_frames": num_frames, "sampling": sampling},
        "seed": seed,
        "command": list(sys.argv) if command is None else list(command),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# --- the evaluation loop -------------------------------------------------------------------------------------------


def write_json_atomic(path: str | os.PathLike, payload) -> None:
    """Write JSON to `path` through a temporary file and a rename, so a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, indent=2, ensure_ascii=False, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def evaluate(
    model,
    processor,
    questions: Sequence[Question | Mapping] | str | os.PathLike,
    video_dir: str | os.PathLike,
    *,
    task_name: str = "mcq",
    num_frames: int = 32,
    max_new_tokens: int = 8,
    seed: int = 0,
    buckets: Sequence[tuple[str, float, float]] = DEFAULT_DURATION_BUCKETS,
    output: str | os.PathLike | None = None,
    command: Sequence[str] | None = None,
    progress: bool = True,
) -> dict:
    """Answer every question with greedy decoding, score, and (if `output`) write the results JSON atomically.

    A video that cannot be decoded is an error, not a crash: its prediction is None, it counts as wrong and it is
    listed under "errors". Anything else that fails (a model bug, out of memory) propagates.
    """
    from transformers import set_seed

    from .inference import generate_answer
    from .video import VideoDecodeError, load_video

    if isinstance(questions, (str, os.PathLike)):
        questions = load_questions(questions)
    questions = [q if isinstance(q, Question) else Question.from_record(q) for q in questions]
    # Greedy decoding is deterministic already; the seed pins anything random left (sampling kwargs, dropout bugs).
    set_seed(seed)

    samples, errors, predictions, durations, backends = [], [], {}, {}, set()
    for q in tqdm(questions, desc=f"{task_name}", disable=not progress):
        video_path = Path(video_dir) / q.video
        try:
            clip = load_video(video_path, num_frames=num_frames)
        except (VideoDecodeError, OSError) as error:
            errors.append({"id": q.id, "video": q.video, "error": str(error)})
            text, letter = None, None
        else:
            backends.add(clip.backend)
            durations[q.id] = clip.duration
            prompt = build_prompt(q.question, q.options)
            text = generate_answer(model, processor, clip, prompt, num_frames=num_frames, max_new_tokens=max_new_tokens)
            letter = extract_choice(text, q.options, q.options)
        predictions[q.id] = letter
        duration = q.duration if q.duration is not None else durations.get(q.id)
        samples.append(
            {
                "id": q.id,
                "video": q.video,
                "prediction": text,
                "parsed": letter,
                "answer": q.answer,
                "correct": letter == q.answer,
                "duration": duration,
                "bucket": duration_bucket(duration, buckets),
            }
        )

    task_result = score(questions, predictions, buckets=buckets, durations=durations)
    task_result["n_errors"] = len(errors)
    reproducibility = reproducibility_info(model, num_frames=num_frames, command=command, seed=seed)
    reproducibility["generation"] = {"do_sample": False, "max_new_tokens": max_new_tokens}
    reproducibility["video_backends"] = sorted(backends)
    reproducibility["duration_buckets"] = [[name, low, None if math.isinf(high) else high] for name, low, high in buckets]
    results = {
        "results": {task_name: task_result},
        "samples": samples,
        "errors": errors,
        "reproducibility": reproducibility,
    }
    if output is not None:
        write_json_atomic(output, results)
    return results


def parse_buckets(spec: str) -> tuple[tuple[str, float, float], ...]:
    """Buckets from "short:0:120,medium:120:900,long:900:inf" (seconds)."""
    buckets = []
    for item in spec.split(","):
        name, low, high = item.strip().split(":")
        buckets.append((name, float(low), float(high)))
    return tuple(buckets)
