"""Local MCQ evaluator (parsing, scoring, end to end, CLI) and the lmms-eval plugin, all offline on tiny models."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeling_memllava.evaluation import (
    DEFAULT_DURATION_BUCKETS,
    MCQ_POST_PROMPT,
    Question,
    build_prompt,
    duration_bucket,
    evaluate,
    extract_choice,
    load_questions,
    normalize_options,
    parse_buckets,
    score,
)
from modeling_memllava.synthetic import make_video


REPO_ROOT = Path(__file__).resolve().parents[1]
ABCD = "ABCD"


# --- parsing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"),
        ("B.", "B"),
        ("(C)", "C"),
        ("C) the red ball", "C"),
        ("Answer: D", "D"),
        ("The answer is (A).", "A"),
        ("The best answer is B", "B"),
        ("I think it is C because the ball turns red.", "C"),
        ("A man walks in. The answer is D.", "D"),  # the explicit answer beats an article "A"
        ("A man walks in, so B.", "B"),  # "A" used as a word is skipped
        ("A is correct", "A"),
        ("  \n[B] red", "B"),
        ("E", None),  # not one of the choices
        ("b", None),  # lower-case letters are words, not choices
        ("", None),
        (None, None),
        ("no idea", None),
    ],
)
def test_extract_choice_letters(text, expected):
    assert extract_choice(text, ABCD) == expected


def test_extract_choice_falls_back_to_option_text():
    options = {"A": "red", "B": "dark red", "C": "blue"}
    assert extract_choice("it was dark red", options, options) == "B"  # the longest contained option wins
    assert extract_choice("Blue, clearly", options, options) == "C"
    assert extract_choice("green", options, options) is None


def test_options_and_prompt():
    assert normalize_options(["x", "y"]) == {"A": "x", "B": "y"}
    assert normalize_options({"b": "y", "A": "x"}) == {"A": "x", "B": "y"}
    prompt = build_prompt("What colour?", {"A": "red", "B": "green"})
    assert prompt == f"What colour?\nA. red\nB. green\n{MCQ_POST_PROMPT}"
    with pytest.raises(ValueError, match="answer"):
        Question.from_record({"id": 1, "video": "v", "question": "q", "options": ["x"], "answer": "B"})


# --- scoring -------------------------------------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


HAND_MADE = [
    {"id": "s1", "video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "A", "duration": 30},
    {"id": "s2", "video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "B", "duration": 119.9},
    {"id": "m1", "video": "b.mp4", "question": "q", "options": ["x", "y", "z"], "answer": "C", "duration": 120},
    {"id": "m2", "video": "b.mp4", "question": "q", "options": {"A": "x", "B": "y"}, "answer": "A", "duration": 600},
    {"id": "m3", "video": "b.mp4", "question": "q", "options": ["x", "y"], "answer": "B", "duration": 899},
    {"id": "l1", "video": "c.mp4", "question": "q", "options": ["x", "y"], "answer": "A", "duration": 3600},
    {"id": "u1", "video": "d.mp4", "question": "q", "options": ["x", "y"], "answer": "A"},
]


def test_score_hand_made_answer_file(tmp_path):
    questions = load_questions(_write_jsonl(tmp_path / "q.jsonl", HAND_MADE))
    # right: s1, m1, m3, u1; wrong: s2 (wrong letter), m2 (unparsed), l1 (missing prediction).
    predictions = {"s1": "A", "s2": "A", "m1": "C", "m2": None, "m3": "B", "u1": "A"}
    result = score(questions, predictions)
    assert result["n"] == 7 and result["correct"] == 4
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["by_duration"] == {
        "short": {"accuracy": 0.5, "n": 2},
        "medium": {"accuracy": pytest.approx(2 / 3), "n": 3},
        "long": {"accuracy": 0.0, "n": 1},
        "unknown": {"accuracy": 1.0, "n": 1},
    }
    # Durations from decoding fill the gaps, and buckets are configurable: brief = s1, u1; rest = s2 m1 m2 m3 l1.
    two = parse_buckets("brief:0:60,rest:60:inf")
    result = score(questions, predictions, buckets=two, durations={"u1": 10.0})
    assert result["by_duration"] == {"brief": {"accuracy": 1.0, "n": 2}, "rest": {"accuracy": 0.4, "n": 5}}
    assert duration_bucket(900.0, DEFAULT_DURATION_BUCKETS) == "long"
    assert duration_bucket(None) == "unknown"


# --- end to end ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    """Three short generated videos and one file that is not a video."""
    root = tmp_path_factory.mktemp("videos")
    for i in range(3):
        make_video(root / f"clip{i}.mp4", num_frames=8, seed=i)
    (root / "broken.mp4").write_bytes(b"this is not a video")
    return root


@pytest.fixture(scope="module")
def questions_file(video_dir):
    records = [
        {"id": "q0", "video": "clip0.mp4", "question": "Colour?", "options": ["red", "green"], "answer": "A"},
        {"id": "q1", "video": "clip1.mp4", "question": "Count?", "options": ["1", "2", "3"], "answer": "C", "duration": 300},
        {"id": "q2", "video": "clip2.mp4", "question": "Shape?", "options": {"A": "box", "B": "ball"}, "answer": "B"},
        {"id": "bad", "video": "broken.mp4", "question": "Colour?", "options": ["red", "green"], "answer": "B"},
    ]
    return _write_jsonl(video_dir / "questions.jsonl", records)


@pytest.fixture(scope="module")
def tiny():
    from modeling_memllava.testing import tiny_model, tiny_processor

    model = tiny_model()
    return model, tiny_processor(model.config)


def _check_consistent(results, task):
    """The task's numbers must be recomputable from the per-question samples."""
    samples, task_result = results["samples"], results["results"][task]
    assert task_result["n"] == len(samples)
    assert task_result["correct"] == sum(s["correct"] for s in samples)
    for bucket, entry in task_result["by_duration"].items():
        in_bucket = [s for s in samples if s["bucket"] == bucket]
        assert entry["n"] == len(in_bucket)
        if in_bucket:
            assert entry["accuracy"] == pytest.approx(sum(s["correct"] for s in in_bucket) / len(in_bucket))


def test_evaluate_end_to_end(tiny, video_dir, questions_file, tmp_path):
    model, processor = tiny
    output = tmp_path / "out" / "results.json"
    results = evaluate(
        model, processor, questions_file, video_dir, task_name="toy", num_frames=8, max_new_tokens=4,
        output=output, command=["pytest"], progress=False,
    )
    assert json.loads(output.read_text()) == json.loads(json.dumps(results))
    assert [s["id"] for s in results["samples"]] == ["q0", "q1", "q2", "bad"]
    _check_consistent(results, "toy")
    assert results["results"]["toy"]["n_errors"] == 1

    # The unreadable video is an error counted wrong, not a crash.
    bad = results["samples"][-1]
    assert bad["prediction"] is None and bad["parsed"] is None and bad["correct"] is False
    assert [e["id"] for e in results["errors"]] == ["bad"]
    assert results["results"]["toy"]["by_duration"]["unknown"]["n"] == 1
    for sample in results["samples"][:3]:
        assert isinstance(sample["prediction"], str)
        assert sample["duration"] > 0  # from the record, or from the decoded video
    assert results["samples"][1]["bucket"] == "medium"

    info = results["reproducibility"]
    assert set(info) >= {"versions", "model", "frames", "seed", "command", "date"}
    assert set(info["versions"]) >= {"python", "torch", "transformers", "lmms-eval", "memllava"}
    assert {"use_memory", "num_memory_tokens", "num_fine_frames", "commit_hash", "config"} <= set(info["model"])
    assert info["model"]["num_fine_frames"] == model.config.num_fine_frames
    assert info["frames"]["num_frames"] == 8 and "uniform" in info["frames"]["sampling"]
    assert info["command"] == ["pytest"]

    # Seeded greedy decoding: the same run gives the same answers.
    again = evaluate(model, processor, questions_file, video_dir, task_name="toy", num_frames=8, max_new_tokens=4, progress=False)
    assert [s["prediction"] for s in again["samples"]] == [s["prediction"] for s in results["samples"]]


def test_evaluate_cli_with_tiny_model(video_dir, questions_file, tmp_path):
    output = tmp_path / "cli.json"
    command = [
        sys.executable, str(REPO_ROOT / "evaluate.py"), "--model", "tiny", "--questions", str(questions_file),
        "--videos", str(video_dir), "--num-frames", "8", "--max-new-tokens", "4", "--task", "cli_toy",
        "--output", str(output), "--no-progress",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(output.read_text())
    assert results["results"]["cli_toy"]["n"] == 4
    _check_consistent(results, "cli_toy")
    assert "--model" in results["reproducibility"]["command"]
    assert "unreadable" in completed.stderr


# --- lmms-eval plugin ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tiny, tmp_path_factory):
    model, processor = tiny
    path = tmp_path_factory.mktemp("tiny_ckpt")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _instances(video_dir, request_type, arguments_for):
    """lmms-eval `Instance`s over a fake task whose docs each point at one video, plus the task_dict to attach."""
    from lmms_eval.api.instance import Instance

    docs = [{"video": str(video_dir / "clip0.mp4"), "target": "A"}, {"video": str(video_dir / "clip1.mp4"), "target": "B"}]
    task_dict = {"toy_video": {"test": docs}}
    doc_to_visual = lambda doc: [doc["video"]]  # noqa: E731 - the shape lmms-eval video tasks use
    instances = [
        Instance(
            request_type=request_type,
            arguments=(*arguments_for(doc_id), doc_to_visual, doc_id, "toy_video", "test"),
            idx=0,
            metadata={"task": "toy_video", "doc_id": doc_id, "repeats": 1},
        )
        for doc_id in range(len(docs))
    ]
    return instances, task_dict


@pytest.fixture(scope="module")
def plugin_model(saved_tiny):
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install -e .[eval])")
    from modeling_memllava.lmms_eval_plugin import MemLlava

    return MemLlava.create_from_arg_string(f"pretrained={saved_tiny},max_frames_num=8", {"batch_size": 1, "device": "cpu"})


def test_plugin_generate_until(plugin_model, video_dir):
    prompt = build_prompt("Colour?", {"A": "red", "B": "green"})
    gen_kwargs = {"until": ["\n\n"], "max_new_tokens": 4, "temperature": 0, "do_sample": False, "image_aspect_ratio": "pad"}
    instances, task_dict = _instances(video_dir, "generate_until", lambda _: (prompt, dict(gen_kwargs)))
    plugin_model.task_dict = task_dict
    outputs = plugin_model.generate_until(instances)
    assert len(outputs) == 2 and all(isinstance(text, str) for text in outputs)
    assert plugin_model.rank == 0 and plugin_model.world_size == 1
    with pytest.raises(NotImplementedError, match="multi-round"):
        plugin_model.generate_until_multi_round(instances)


def test_plugin_loglikelihood(plugin_model, video_dir):
    instances, task_dict = _instances(video_dir, "loglikelihood", lambda _: ("Colour?", lambda doc: doc["target"]))
    plugin_model.task_dict = task_dict
    results = plugin_model.loglikelihood(instances)
    assert len(results) == 2
    for logprob, is_greedy in results:
        assert logprob < 0 and isinstance(is_greedy, bool)


def test_plugin_stop_strings_and_sampling_flags():
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install -e .[eval])")
    from modeling_memllava.lmms_eval_plugin import generation_kwargs, truncate_at_stop

    kwargs, until = generation_kwargs({"until": "\n", "temperature": 0, "top_p": 1.0, "num_beams": 1}, 16)
    assert kwargs == {"max_new_tokens": 16, "num_beams": 1, "do_sample": False} and until == ["\n"]
    kwargs, _ = generation_kwargs({"temperature": 0.7, "max_new_tokens": 3}, 16)
    assert kwargs == {"temperature": 0.7, "max_new_tokens": 3, "do_sample": True}
    assert truncate_at_stop("B.\n\nbecause", ["\n\n"]) == "B."


def test_plugin_manifest_resolves_in_lmms_eval_registry():
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install -e .[eval])")
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from modeling_memllava.lmms_eval_plugin import MANIFEST, MemLlava

    registry = ModelRegistryV2()
    registry.register_manifest(MANIFEST)
    # get_model_class also validates the class: an lmms subclass whose is_simple matches the manifest.
    assert registry.get_model_class("memllava") is MemLlava


ENTRY_POINT = "modeling_memllava.lmms_eval_plugin:MANIFEST"


def test_plugin_entry_point_value_loads_through_lmms_eval(tmp_path):
    """The setup.cfg entry point value works with lmms-eval's own loader (checked with a throw-away dist-info, so
    it does not depend on this checkout having been reinstalled after the entry point was added)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install -e .[eval])")
    dist_info = tmp_path / "memllava_entry_point_probe-0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: memllava-entry-point-probe\nVersion: 0\n")
    (dist_info / "entry_points.txt").write_text(f"[lmms_eval.models]\nmemllava = {ENTRY_POINT}\n")
    code = "from lmms_eval.models import get_model; print(get_model('memllava').__module__, get_model('memllava').__name__)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["modeling_memllava.lmms_eval_plugin", "MemLlava"]


def test_plugin_entry_point_is_registered():
    """The installed metadata carries the entry point, and `lmms_eval` finds it the way `python -m lmms_eval` does:
    lmms-eval imported first (in a fresh process, as importing our plugin first would build its registry mid-import)."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is an optional extra (pip install -e .[eval])")
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="lmms_eval.models")}
    assert "memllava" in entry_points, "the lmms_eval.models entry point is missing: re-run `pip install -e .`"
    assert entry_points["memllava"].value == ENTRY_POINT
    code = "from lmms_eval.models import get_model; cls = get_model('memllava'); print(cls.__module__, cls.__name__)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["modeling_memllava.lmms_eval_plugin", "MemLlava"]
