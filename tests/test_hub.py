"""Publishing to the Hub: staging (allow-list, secrets, atomic replace), the model card, the upload calls, the CLI.

No network: uploads are intercepted at the huggingface_hub boundary (HfApi methods).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml

from modeling_memllava import hub
from modeling_memllava.testing import tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]
FAKE_TOKEN = "hf_" + "Ab3dEfGh1jKlMn0pQrStUvWxYz12345678"  # token-shaped, not a real token
MODEL_FILES = {
    "config.json",
    "configuration_memllava.py",
    "generation_config.json",
    "model.safetensors",
    "modeling_memllava.py",
}
TRAIN_CONFIG = {
    "stage": "short",
    "base_model": "llava-hf/llava-onevision-qwen2-7b-ov-hf",
    "model": {"num_memory_tokens": 8, "num_fine_frames": 4},
    "training": {"output_dir": "outputs/memllava-short", "max_steps": 10},
}
EVAL_RESULTS = {
    "results": {
        "videomme": {"alias": "videomme", "videomme_perception_score,none": 55.5, "videomme_perception_score_stderr,none": 1.25},
        "mlvu": {"accuracy": 0.625, "note": "not a number", "samples": 32,
                 "by_duration": {"short": {"accuracy": 0.75, "n": 4}, "long": {"accuracy": None, "n": 0}}},
    },
    "reproducibility": {"versions": {"transformers": "5.24.0", "memllava": "0.1.0"}, "command": "memllava-eval --tasks mlvu"},
}


def _save_processor(folder, model):
    """Save the tiny processor next to the model. Falls back to a minimal tokenizer_config.json if the package
    has no `tiny_processor` (it was being written concurrently); returns the processor-only file names."""
    try:
        from modeling_memllava.testing import tiny_processor
    except ImportError:
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 65536}))
        return {"tokenizer_config.json"}
    before = set(os.listdir(folder))
    tiny_processor(config=model.config).save_pretrained(folder)
    return set(os.listdir(folder)) - before


def _add_junk(folder: Path):
    """What a Trainer output folder holds besides the model, plus secrets that must never be uploaded."""
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "pytorch_model.bin"):
        torch.save({"x": torch.zeros(2)}, folder / name)
    (folder / ".env").write_text(f"HF_TOKEN={FAKE_TOKEN}\n")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "model.safetensors").write_bytes(b"not really")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A saved tiny checkpoint with processor, training config and junk; the in-process model; processor files."""
    folder = tmp_path_factory.mktemp("ckpt") / "memllava-short"
    model = tiny_model()
    model.save_pretrained(folder)
    processor_files = _save_processor(folder, model)
    (folder / hub.TRAIN_CONFIG_FILENAME).write_text(yaml.safe_dump(TRAIN_CONFIG, sort_keys=False))
    _add_junk(folder)
    return folder, model, processor_files


@pytest.fixture
def checkpoint(built):
    return built[0]


def _expected_files(processor_files):
    return sorted(MODEL_FILES | processor_files | {hub.TRAIN_CONFIG_FILENAME, "README.md"})


def _uploaded_files(folder: Path):
    """What `upload_folder` / `hf upload` would send: every file except huggingface_hub's default ignores."""
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

    files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(filter_repo_objects(files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# -- staging -----------------------------------------------------------------------------------------------------


def test_dry_run_stages_exactly_the_allow_list(built, tmp_path):
    checkpoint, _, processor_files = built
    staged = hub.stage_checkpoint(checkpoint, tmp_path / "staged", repo_id="me/memllava-tiny")

    expected = _expected_files(processor_files)
    assert staged.included == expected
    assert _uploaded_files(tmp_path / "staged") == expected
    left_out = dict(staged.left_out)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state_0.pth", "pytorch_model.bin", ".env", "trainer_state.json",
                 "checkpoint-5/"):
        assert name in left_out, name
    assert left_out[".env"] == "looks like a secret"
    assert "optimizer" in left_out["optimizer.pt"] and "pickle" in left_out["pytorch_model.bin"]
    report = staged.report()
    assert "Left out" in report and "optimizer.pt" in report and FAKE_TOKEN not in report
    assert staged.warnings == []
    # Copies are faithful and nothing staged holds a pickle or a token.
    assert (tmp_path / "staged" / "config.json").read_bytes() == (checkpoint / "config.json").read_bytes()
    for path in (tmp_path / "staged").rglob("*"):
        assert path.suffix not in (".pt", ".pth", ".bin", ".pkl")
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes()


def test_model_card_front_matter_and_body(checkpoint, tmp_path):
    hub.stage_checkpoint(checkpoint, tmp_path / "staged", repo_id="me/memllava-tiny")
    card = (tmp_path / "staged" / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "video-text-to-text"
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == TRAIN_CONFIG["base_model"]  # from the stage config
    assert meta["datasets"] == ["lmms-lab/LLaVA-Video-178K"]
    assert {"memllava", "llava-onevision", "video", "long-video", "custom_code"} <= set(meta["tags"])
    # tiny: M = 8, F = 4, P = ceil((64 // 8) / 2) ** 2 = 16 -> 8 + 4 * 16 + 1 = 73 visual tokens.
    assert "73 visual tokens" in card
    assert "trust_remote_code=True" in card and 'repo = "me/memllava-tiny"' in card
    assert "Training stage: **short**" in card and "max_steps: 10" in card
    assert "base model's license" in card
    assert "## Evaluation" not in card  # no results file given or present


def test_base_model_fallbacks():
    assert hub.resolve_base_model("org/explicit", TRAIN_CONFIG) == "org/explicit"
    assert hub.resolve_base_model(None, {"base_model": "tiny"}, {"_name_or_path": "org/from-config"}) == "org/from-config"
    assert hub.resolve_base_model(None, None, {"_name_or_path": "/some/local/path"}) == hub.DEFAULT_BASE_MODEL


def test_eval_table_and_reproducibility(checkpoint, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(EVAL_RESULTS))
    staged = hub.stage_checkpoint(checkpoint, tmp_path / "staged", repo_id="me/m", eval_results=results)
    card = (staged.path / "README.md").read_text()
    assert "| task | metric | value |" in card
    assert "| videomme | videomme_perception_score | 55.5 ± 1.25 |" in card
    assert "| mlvu | accuracy | 0.625 |" in card and "| mlvu | samples | 32 |" in card
    assert "| mlvu | by_duration/short/accuracy | 0.75 |" in card and "by_duration/long/accuracy" not in card
    assert "not a number" not in card and "alias" not in card and "_stderr" not in card
    assert "memllava-eval --tasks mlvu" in card and "5.24.0" in card
    _front_matter(card)  # still parses


def test_bad_eval_results_file_is_refused(checkpoint, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"eval_loss": 1.0}))
    with pytest.raises(hub.StagingError, match="results"):
        hub.stage_checkpoint(checkpoint, tmp_path / "staged", repo_id="me/m", eval_results=results)
    assert not (tmp_path / "staged").exists()


def test_token_in_a_staged_file_is_refused_without_printing_it(built, tmp_path):
    source = _copy_checkpoint(built[0], tmp_path / "ckpt")
    train_config = {**TRAIN_CONFIG, "training": {**TRAIN_CONFIG["training"], "hub_token": FAKE_TOKEN}}
    (source / hub.TRAIN_CONFIG_FILENAME).write_text(yaml.safe_dump(train_config))
    with pytest.raises(hub.SecretFoundError) as error:
        hub.stage_checkpoint(source, tmp_path / "staged", repo_id="me/m")
    assert hub.TRAIN_CONFIG_FILENAME in str(error.value)
    assert FAKE_TOKEN not in str(error.value) and FAKE_TOKEN not in repr(error.value)
    # Nothing was left behind: no staged folder, no temp folder.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_token_in_eval_results_is_refused(checkpoint, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({**EVAL_RESULTS, "reproducibility": {"command": f"eval --token {FAKE_TOKEN}"}}))
    with pytest.raises(hub.SecretFoundError, match="README.md") as error:
        hub.stage_checkpoint(checkpoint, tmp_path / "staged", repo_id="me/m", eval_results=results)
    assert FAKE_TOKEN not in str(error.value)


def _copy_checkpoint(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


def test_missing_folder_weights_and_auto_map_fail_clearly(built, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.stage_checkpoint(tmp_path / "nope", tmp_path / "staged", repo_id="me/m")

    no_weights = _copy_checkpoint(built[0], tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(hub.StagingError, match="no safetensors weights.*pytorch_model.bin"):
        hub.stage_checkpoint(no_weights, tmp_path / "staged", repo_id="me/m")

    no_auto_map = _copy_checkpoint(built[0], tmp_path / "no_auto_map")
    config = json.loads((no_auto_map / "config.json").read_text())
    del config["auto_map"]
    (no_auto_map / "config.json").write_text(json.dumps(config))
    with pytest.raises(hub.StagingError, match="auto_map"):
        hub.stage_checkpoint(no_auto_map, tmp_path / "staged", repo_id="me/m")

    no_code = _copy_checkpoint(built[0], tmp_path / "no_code")
    (no_code / "modeling_memllava.py").unlink()
    with pytest.raises(hub.StagingError, match="modeling_memllava.py is missing"):
        hub.stage_checkpoint(no_code, tmp_path / "staged", repo_id="me/m")
    assert not (tmp_path / "staged").exists()


def test_restaging_replaces_and_unrelated_folder_is_untouched(checkpoint, tmp_path):
    out = tmp_path / "staged"
    first = hub.stage_checkpoint(checkpoint, out, repo_id="me/m")
    second = hub.stage_checkpoint(checkpoint, out, repo_id="me/m2")
    assert first.included == second.included == _uploaded_files(out)
    assert 'repo = "me/m2"' in (out / "README.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["staged"]  # no temp or old folders left

    unrelated = tmp_path / "my_stuff"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("precious")
    with pytest.raises(hub.StagingError, match="not empty"):
        hub.stage_checkpoint(checkpoint, unrelated, repo_id="me/m")
    assert [p.name for p in unrelated.iterdir()] == ["notes.txt"]
    assert (unrelated / "notes.txt").read_text() == "precious"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert hub.stage_checkpoint(checkpoint, empty, repo_id="me/m").included == first.included


# -- upload ------------------------------------------------------------------------------------------------------


@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi.create_repo / create_branch / upload_folder calls instead of touching the network.

    upload_folder also snapshots the folder it is given: the staged folder is a temp folder removed afterwards.
    """
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        kwargs["files"] = _uploaded_files(Path(kwargs["folder_path"]))
        kwargs["readme"] = (Path(kwargs["folder_path"]) / "README.md").read_text()
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return huggingface_hub.CommitInfo(
            commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc123",
            commit_message=kwargs["commit_message"], commit_description="", oid="abc123",
        )

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_the_staged_folder(built, hub_calls, capsys):
    checkpoint, _, processor_files = built
    url = hub.push_checkpoint(checkpoint, "me/memllava-tiny", private=True, token=FAKE_TOKEN)
    assert url == "https://huggingface.co/me/memllava-tiny/commit/abc123"
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][2]["private"] is True and hub_calls[0][2]["exist_ok"] is True
    upload = hub_calls[1][2]
    assert upload["files"] == _expected_files(processor_files)
    assert upload["repo_id"] == "me/memllava-tiny" and upload["revision"] is None and upload["commit_message"]
    assert not Path(upload["folder_path"]).exists()  # the temp staging is cleaned up
    out = capsys.readouterr().out
    assert "optimizer.pt" in out and FAKE_TOKEN not in out


def test_push_to_a_branch_creates_it(checkpoint, hub_calls):
    hub.push_checkpoint(checkpoint, "me/m", revision="stage-short", token=FAKE_TOKEN, report=None)
    assert [c[0] for c in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub_calls[1][2]["branch"] == "stage-short" and hub_calls[1][2]["exist_ok"] is True
    assert hub_calls[2][2]["revision"] == "stage-short"
    assert 'revision="stage-short"' in hub_calls[2][2]["readme"]


def test_push_without_a_token_fails_before_any_call(checkpoint, hub_calls, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="token"):
        hub.push_checkpoint(checkpoint, "me/m", report=None)
    assert hub_calls == []


def test_dry_run_makes_no_hub_calls(checkpoint, hub_calls, tmp_path):
    path = hub.push_checkpoint(checkpoint, "me/m", dry_run_dir=tmp_path / "staged", report=None)
    assert Path(path) == tmp_path / "staged" and (tmp_path / "staged" / "README.md").is_file()
    assert hub_calls == []


# -- the staged folder works where the package is not installed ------------------------------------------------


def test_staged_folder_loads_with_remote_code(built, tmp_path, isolated_python):
    checkpoint, model, _ = built
    staged = hub.stage_checkpoint(checkpoint, tmp_path / "staged", repo_id="me/m").path
    input_ids = [[1, 5, 42, 7, 99, 258]]
    processor_config = str(staged / "processor_config.json")
    code = f"""
        import json, os, sys, torch
        from transformers import AutoModel, AutoProcessor
        sys.stdin = open(os.devnull)  # a remote-code prompt must answer at once, never wait on a terminal
        model = AutoModel.from_pretrained({str(staged)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor({input_ids})).logits
        names = [type(model).__name__]
        if os.path.exists({processor_config!r}):
            names.append(type(AutoProcessor.from_pretrained({str(staged)!r}, trust_remote_code=True)).__name__)
        print("RESULT " + json.dumps({{"names": names, "logits": logits.tolist()}}))
    """
    output = isolated_python(code)
    result = json.loads(output[output.index("RESULT ") + len("RESULT "):].splitlines()[0])
    assert result["names"][0] == "MemLlavaOnevisionForConditionalGeneration"
    if (staged / "processor_config.json").exists():
        assert result["names"][1] == "MemLlavaOnevisionProcessor"
    with torch.no_grad():
        expected = model(input_ids=torch.tensor(input_ids)).logits
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-4, atol=1e-5)


# -- CLI ---------------------------------------------------------------------------------------------------------


def test_cli_dry_run(built, tmp_path):
    checkpoint, _, processor_files = built
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "push_to_hub.py"), str(checkpoint), "me/memllava-tiny",
         "--dry-run", str(tmp_path / "staged")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Left out" in result.stdout and "optimizer.pt" in result.stdout and FAKE_TOKEN not in result.stdout
    assert _uploaded_files(tmp_path / "staged") == _expected_files(processor_files)


def test_cli_reports_problems_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "push_to_hub.py"), str(tmp_path / "missing"), "me/m",
         "--dry-run", str(tmp_path / "staged")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "does not exist" in result.stderr
