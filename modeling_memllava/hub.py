"""Publish a MemLlava checkpoint to the Hugging Face Hub: stage exactly what gets uploaded, then upload it.

Staging is an allow-list: only weights (safetensors), configs, the remote-code files, processor/tokenizer files, the
resolved training config and a generated model card are copied; everything else in the checkpoint folder (optimizer
and scheduler states, pickles, Trainer bookkeeping, intermediate `checkpoint-*` folders, secrets) is left out and
reported. Staged text is scanned for strings shaped like Hugging Face tokens, and staging refuses if it finds one.

The staged folder is self-contained: `hf upload REPO DIR` (or `huggingface-cli upload`) uploads it as-is, and
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` loads it where this package is not installed.

This module is NOT remote code (it is never copied into a checkpoint), so it may import the rest of the package.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import tempfile
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import yaml


DEFAULT_BASE_MODEL = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
DEFAULT_DATASETS = ("lmms-lab/LLaVA-Video-178K",)
TRAIN_CONFIG_FILENAME = "memllava_train_config.yaml"  # same name as training.CONFIG_FILENAME (kept import-free)
MODEL_CARD_FILENAME = "README.md"
# Eval results picked up from the checkpoint folder when none is given explicitly.
DEFAULT_EVAL_FILENAMES = ("eval_results.json", "results.json")

# The marker lives under `.cache/huggingface/`, which `upload_folder` and `hf upload` skip by default
# (huggingface_hub's DEFAULT_IGNORE_PATTERNS), so it never reaches the Hub and the folder stays uploadable as-is.
MARKER_RELPATH = os.path.join(".cache", "huggingface", "memllava_staging.json")

# What may be uploaded, as fnmatch patterns on the path relative to the checkpoint folder.
ALLOWED_PATTERNS = (
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    # remote code: the files save_pretrained copies (plus whatever auto_map names, see _remote_code_files)
    "configuration_memllava.py",
    "modeling_memllava.py",
    "processing_memllava.py",
    # processor / tokenizer
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "additional_chat_templates/*.jinja",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    TRAIN_CONFIG_FILENAME,
)

# Left out even if a pattern above were to match, checked first; each with the reason shown in the report.
REFUSED_PATTERNS = (
    # secrets
    (".env", "looks like a secret"),
    (".env.*", "looks like a secret"),
    ("*.env", "looks like a secret"),
    ("token", "looks like a secret"),
    ("*.token", "looks like a secret"),
    ("*credentials*", "looks like a secret"),
    ("*.pem", "looks like a secret"),
    ("*.key", "looks like a secret"),
    ("id_rsa*", "looks like a secret"),
    ("id_ed25519*", "looks like a secret"),
    (".netrc", "looks like a secret"),
    # training state: large, useless for inference, and pickles run code when loaded
    ("optimizer.*", "optimizer state"),
    ("scheduler.*", "scheduler state"),
    ("rng_state*", "RNG state"),
    ("scaler.pt", "AMP scaler state"),
    ("*.bin", "pickle (only safetensors weights are uploaded)"),
    ("*.pt", "pickle (only safetensors weights are uploaded)"),
    ("*.pth", "pickle (only safetensors weights are uploaded)"),
    ("*.pkl", "pickle (only safetensors weights are uploaded)"),
    ("*.pickle", "pickle (only safetensors weights are uploaded)"),
    ("*.ckpt", "pickle (only safetensors weights are uploaded)"),
)

# Hugging Face user access tokens are `hf_` followed by ~34 letters and digits.
HF_TOKEN_PATTERN = re.compile(rb"hf_[A-Za-z0-9]{30,}")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_]\w*)\s+import\b", re.MULTILINE)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class StagingError(ValueError):
    """The checkpoint cannot be published as it is (the message names the problem and the file)."""


class SecretFoundError(StagingError):
    """A staged file contains something shaped like a secret. The message names the file, never the secret."""


@dataclass
class StagedFolder:
    """The result of staging: where it is, what is in it, and what was left out and why."""

    path: Path
    included: list[str] = field(default_factory=list)  # relative posix paths, sorted
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason), sorted
    warnings: list[str] = field(default_factory=list)  # uploadable, but something a user will miss

    def report(self) -> str:
        """A human-readable summary: the staged files, then the "left out" list with reasons."""
        lines = [f"Staged {len(self.included)} file(s) in {self.path}:"]
        lines += [f"  + {name}" for name in self.included]
        if self.left_out:
            lines.append(f"Left out {len(self.left_out)} item(s):")
            lines += [f"  - {name}  ({reason})" for name, reason in self.left_out]
        else:
            lines.append("Left out: nothing")
        lines += [f"Warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


# -- selecting files ---------------------------------------------------------------------------------------------


def _matches(relpath: str, patterns: Iterable[str]) -> bool:
    # Match on the file name too, so `.env` is refused wherever it sits.
    name = relpath.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatchcase(relpath, p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def _refusal(relpath: str) -> str | None:
    name = relpath.rsplit("/", 1)[-1]
    for pattern, reason in REFUSED_PATTERNS:
        if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(relpath, pattern):
            return reason
    return None


def _walk(checkpoint: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """Split the checkpoint folder into candidate files and left-out items (with reasons).

    Subfolders are left out as a whole (typically `checkpoint-N/` from the Trainer, or `runs/`), except those an
    allowed pattern reaches into (`additional_chat_templates/`), whose files are judged one by one.
    """
    allowed_dirs = {p.split("/", 1)[0] for p in ALLOWED_PATTERNS if "/" in p}
    candidates, left_out = [], []
    for entry in sorted(checkpoint.iterdir()):
        if entry.is_dir():
            if entry.name in allowed_dirs:
                for sub in sorted(entry.rglob("*")):
                    if sub.is_file():
                        candidates.append(sub.relative_to(checkpoint).as_posix())
            else:
                left_out.append((entry.name + "/", "subfolder (e.g. an intermediate checkpoint): not uploaded"))
        elif entry.is_file():
            candidates.append(entry.name)
        else:
            left_out.append((entry.name, "not a regular file"))
    return candidates, left_out


def _auto_map_references(data) -> list[str]:
    """Every class reference in every `auto_map` of a JSON document, nested ones included (transformers 5 nests
    the image/video processor configs, each with its own `auto_map`, inside processor_config.json)."""
    found = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "auto_map" and isinstance(value, dict):
                for entry in value.values():
                    found += [r for r in (entry if isinstance(entry, (list, tuple)) else [entry]) if isinstance(r, str)]
            else:
                found += _auto_map_references(value)
    elif isinstance(data, list):
        for item in data:
            found += _auto_map_references(item)
    return found


def _remote_code_files(checkpoint: Path, json_names: Iterable[str]) -> set[str]:
    """The `.py` files that the `auto_map` entries of these JSON files name, plus their relative imports.

    `"modeling_memllava.MemLlavaOnevisionForConditionalGeneration"` -> `modeling_memllava.py`. Entries of the
    form `other/repo--module.Class` point at another repo's code and need no local file. A named file that is
    missing raises: the uploaded repo would not load.
    """
    needed: set[str] = set()
    for json_name in json_names:
        path = checkpoint / json_name
        if not path.is_file():
            continue
        for reference in _auto_map_references(json.loads(path.read_text())):
            if "--" in reference:
                continue
            module = reference.rsplit(".", 1)[0]
            filename = module.replace(".", "/") + ".py"
            if not (checkpoint / filename).is_file():
                raise StagingError(
                    f"{json_name} auto_map names {reference!r} but {filename} is missing from {checkpoint}; "
                    "save the checkpoint with save_pretrained so the remote-code files are copied"
                )
            needed.add(filename)
    # Remote code may import siblings (`from .configuration_memllava import ...`); transformers fetches those too.
    pending = list(needed)
    while pending:
        source = (checkpoint / pending.pop()).read_text()
        for module in _RELATIVE_IMPORT.findall(source):
            filename = module + ".py"
            if filename not in needed and (checkpoint / filename).is_file():
                needed.add(filename)
                pending.append(filename)
    return needed


def _check_checkpoint(checkpoint: Path) -> dict:
    """Fail early and clearly on what would make an unusable upload; return the parsed config.json."""
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint folder {checkpoint} does not exist")
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise StagingError(f"{checkpoint} has no config.json; is it a save_pretrained folder?")
    weights = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in checkpoint.glob("*.bin"))
        hint = f" (found pickle weights {pickles}: re-save with safe_serialization)" if pickles else ""
        raise StagingError(f"{checkpoint} has no safetensors weights (*.safetensors){hint}")
    index_path = checkpoint / "model.safetensors.index.json"
    if index_path.is_file():
        shards = set(json.loads(index_path.read_text()).get("weight_map", {}).values())
        missing = sorted(shards - set(weights))
        if missing:
            raise StagingError(f"model.safetensors.index.json in {checkpoint} names missing shard(s) {missing}")
    config = json.loads(config_path.read_text())
    if not config.get("auto_map"):
        raise StagingError(
            f"config.json in {checkpoint} has no auto_map, so `trust_remote_code=True` could not find the model "
            "code; save it with MemLlavaOnevisionForConditionalGeneration.save_pretrained"
        )
    return config


def select_files(checkpoint_dir) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to stage, [(left-out item, reason)]) for a checkpoint folder, after validating it."""
    checkpoint = Path(checkpoint_dir)
    _check_checkpoint(checkpoint)
    code = _remote_code_files(
        checkpoint, ["config.json", "processor_config.json", "preprocessor_config.json",
                     "video_preprocessor_config.json", "tokenizer_config.json"]
    )
    candidates, left_out = _walk(checkpoint)
    included = []
    for relpath in candidates:
        reason = _refusal(relpath)
        if reason is None and not (relpath in code or _matches(relpath, ALLOWED_PATTERNS)):
            reason = "not on the upload allow-list"
        if relpath == MODEL_CARD_FILENAME:
            reason = "replaced by the generated model card"
        if reason is None:
            included.append(relpath)
        else:
            left_out.append((relpath, reason))
    return sorted(included), sorted(left_out)


# -- secrets scan ------------------------------------------------------------------------------------------------


def _scannable_bytes(path: Path) -> bytes:
    """The part of a file a token could hide in: all of it, except safetensors, where only the JSON header is text."""
    if path.suffix != ".safetensors":
        return path.read_bytes()
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        return handle.read(min(header_size, 100_000_000))


def scan_for_tokens(folder) -> None:
    """Raise SecretFoundError naming every file (and first line) that holds an `hf_...` token-shaped string.

    All offenders are named at once, so one fix-and-retry cycle is enough (the generated README.md repeats the
    training config and eval results, so a token there shows up twice). The token itself is never put in the
    message: error messages end up in CI logs.
    """
    folder = Path(folder)
    offenders = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relpath = path.relative_to(folder).as_posix()
        if relpath == Path(MARKER_RELPATH).as_posix():
            continue
        data = _scannable_bytes(path)
        found = HF_TOKEN_PATTERN.search(data)
        if found:
            line = data.count(b"\n", 0, found.start()) + 1
            offenders.append(f"{relpath} (line {line})")
    if offenders:
        raise SecretFoundError(
            f"refusing to stage: {', '.join(offenders)} contain(s) a string shaped like a Hugging Face token "
            "(hf_...). Remove it from the checkpoint (or the eval results) and stage again."
        )


# -- model card --------------------------------------------------------------------------------------------------


def _looks_like_repo_id(value) -> bool:
    # A local path (`outputs/memllava-short`) is not a Hub id even though it has the same shape.
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and not os.path.exists(value)


def resolve_base_model(base_model=None, train_config=None, config=None) -> str:
    """The card's `base_model`: the explicit value, else the stage config's, else config `_name_or_path`, else the
    default; values that are not Hub repo ids ("tiny", local paths) are skipped."""
    candidates = [base_model, (train_config or {}).get("base_model"), (config or {}).get("_name_or_path")]
    for candidate in candidates:
        if _looks_like_repo_id(candidate):
            return candidate
    return DEFAULT_BASE_MODEL


def load_eval_results(path) -> dict:
    """Read an eval results JSON shaped `{"results": {task: {metric: value}}, "reproducibility": {...}}`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise StagingError(f"eval results file {path} has no 'results' mapping of task -> {{metric: value}}")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _flatten_metrics(metrics: dict, prefix: str = "") -> dict:
    """`{"by_duration": {"short": {"accuracy": 0.5}}}` -> `{"by_duration/short/accuracy": 0.5}` (our evaluator
    nests per-duration scores; lmms-eval's metrics are flat)."""
    flat = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten_metrics(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = value
    return flat


def eval_rows(results: dict) -> list[tuple[str, str, float, float | None]]:
    """(task, metric, value, stderr or None) rows, numeric metrics only.

    lmms-eval names metrics `acc,none` (metric, filter) and puts the standard error in `acc_stderr,none`: the
    filter `none` is dropped from the name and the stderr joins its metric's row instead of getting one of its own.
    """
    rows = []
    for task, metrics in sorted((results.get("results") or {}).items()):
        if not isinstance(metrics, dict):
            continue
        metrics = _flatten_metrics(metrics)
        for name, value in metrics.items():
            base, _, flt = name.partition(",")
            if base.endswith("_stderr") or not _is_number(value):
                continue
            stderr_key = f"{base}_stderr,{flt}" if flt else f"{base}_stderr"
            stderr = metrics.get(stderr_key)
            label = base if flt in ("", "none") else f"{base} ({flt})"
            rows.append((task, label, float(value), float(stderr) if _is_number(stderr) else None))
    return rows


def _format_value(value: float) -> str:
    return f"{value:.4g}" if not float(value).is_integer() else str(int(value))


def _render_eval_section(eval_results: dict) -> str:
    rows = eval_rows(eval_results)
    lines = ["## Evaluation", ""]
    if rows:
        lines += ["| task | metric | value |", "| --- | --- | --- |"]
        for task, metric, value, stderr in rows:
            shown = _format_value(value) + (f" ± {_format_value(stderr)}" if stderr is not None else "")
            lines.append(f"| {task} | {metric} | {shown} |")
    else:
        lines.append("The results file holds no numeric metrics.")
    reproducibility = eval_results.get("reproducibility")
    if reproducibility:
        lines += ["", "Reproducibility (versions and command of the evaluation run):", "", "```yaml",
                  yaml.safe_dump(reproducibility, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines)


def _video_token_summary(checkpoint: Path) -> dict:
    """Memory/fine-frame sizes and the visual-token count per video, computed by the config itself."""
    from .configuration_memllava import MemLlavaOnevisionConfig

    config = MemLlavaOnevisionConfig.from_pretrained(checkpoint)
    return {
        "use_memory": config.use_memory,
        "num_memory_tokens": config.num_memory_tokens,
        "num_fine_frames": config.num_fine_frames,
        "tokens_per_frame": config.tokens_per_frame,
        "video_tokens": config.num_video_tokens(1) if config.use_memory else None,
    }


def render_model_card(
    *,
    repo_id: str,
    base_model: str = DEFAULT_BASE_MODEL,
    summary: dict | None = None,
    train_config: dict | None = None,
    eval_results: dict | None = None,
    revision: str | None = None,
) -> str:
    """The README.md of the Hub repo: YAML front matter (parsed by the Hub) and a body.

    `summary` is `_video_token_summary`'s output; `train_config` the resolved stage config; `eval_results` a loaded
    results file (see `load_eval_results`).
    """
    metadata = {
        "library_name": "transformers",
        "pipeline_tag": "video-text-to-text",
        "license": "apache-2.0",
        "base_model": base_model,
        "datasets": list(DEFAULT_DATASETS),
        "tags": ["memllava", "llava-onevision", "video", "long-video", "custom_code"],
    }
    front = "---\n" + yaml.safe_dump(metadata, sort_keys=False) + "---\n"
    name = repo_id.rsplit("/", 1)[-1]
    sections = [f"# {name}", "", _describe_model(base_model, summary or {}), ""]
    sections += [_render_training_section(train_config), ""]
    sections += [_render_usage(repo_id, revision), ""]
    if eval_results:
        sections += [_render_eval_section(eval_results), ""]
    sections += [
        "## License",
        "",
        "The MemLlava code and the weights it adds are released under Apache-2.0. The weights converted from the "
        f"base model ([{base_model}](https://huggingface.co/{base_model}), LLaVA-OneVision with a Qwen2 language "
        "model and a SigLIP vision tower) remain under the base model's license and terms: check them before use.",
        "",
    ]
    return front + "\n" + "\n".join(sections)


def _describe_model(base_model: str, summary: dict) -> str:
    if summary.get("use_memory") is False:
        budget = (f"Memory is off in this checkpoint: it behaves exactly like LLaVA-OneVision, "
                  f"{summary.get('tokens_per_frame', 'P')} tokens per frame plus one newline token.")
    else:
        m, f, p = (summary.get(k, "?") for k in ("num_memory_tokens", "num_fine_frames", "tokens_per_frame"))
        total = summary.get("video_tokens", "M + F * P + 1")
        budget = (
            f"Each video costs the language model a fixed **{total} visual tokens**, whatever its length: "
            f"M = {m} memory tokens, F = {f} fine frames at full LLaVA-OneVision detail (P = {p} tokens each) and "
            f"one newline token ({m} + {f} x {p} + 1)."
        )
    return textwrap.dedent(
        f"""\
        MemLlava is a memory-augmented [LLaVA-OneVision](https://huggingface.co/{base_model}) for long videos. A
        recurrent memory of learnable tokens reads the video chunk by chunk (streaming, so hours of frames never
        sit in memory at once) and summarises it; a light fuser lets a few uniformly sampled fine frames attend
        to that memory; the language model sees the memory tokens followed by the fine frames.

        {budget}"""
    )


def _render_training_section(train_config: dict | None) -> str:
    if not train_config:
        return "## Training\n\nNo training config was saved with this checkpoint."
    stage = train_config.get("stage", "unknown")
    return "\n".join(
        [
            "## Training",
            "",
            f"Training stage: **{stage}**. Data: LLaVA-Video-178K. The resolved training config "
            f"(`{TRAIN_CONFIG_FILENAME}`, also in this repo):",
            "",
            "```yaml",
            yaml.safe_dump(train_config, sort_keys=False).rstrip(),
            "```",
        ]
    )


def _render_usage(repo_id: str, revision: str | None) -> str:
    rev = f', revision="{revision}"' if revision and revision != "main" else ""
    return "\n".join(
        [
            "## Usage",
            "",
            "```python",
            "import torch",
            "from transformers import AutoModel, AutoProcessor",
            "",
            f'repo = "{repo_id}"',
            f"model = AutoModel.from_pretrained(repo{rev}, trust_remote_code=True, dtype=torch.bfloat16, "
            'device_map="auto")',
            f"processor = AutoProcessor.from_pretrained(repo{rev}, trust_remote_code=True)",
            "",
            'messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens in this video?"}]}]',
            "prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)",
            'inputs = processor(text=[prompt], videos=["video.mp4"], return_tensors="pt").to(model.device)',
            'inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)',
            "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
            'print(processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])',
            "```",
        ]
    )


# -- staging -----------------------------------------------------------------------------------------------------


def _is_previous_staging(folder: Path) -> bool:
    return (folder / MARKER_RELPATH).is_file()


def _check_destination(out_dir: Path, checkpoint: Path) -> None:
    """Refuse a destination whose files we did not write: staging replaces the folder, and must never lose files."""
    if out_dir.resolve() == checkpoint.resolve():
        raise StagingError(f"cannot stage {checkpoint} into itself")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise StagingError(f"staging destination {out_dir} exists and is not a folder")
        if any(out_dir.iterdir()) and not _is_previous_staging(out_dir):
            raise StagingError(
                f"staging destination {out_dir} is not empty and was not created by a previous staging; "
                "choose another folder (nothing was changed)"
            )


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.suffix == ".safetensors":
        # Weights can be tens of GB: hard-link when possible (same filesystem). Nobody edits safetensors in place,
        # so sharing the inode is safe; fall back to a copy across filesystems.
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


def _replace_folder(staged_tmp: Path, out_dir: Path) -> None:
    """Move the finished temp folder into place; an older staging is only deleted after the swap."""
    if not out_dir.exists():
        os.replace(staged_tmp, out_dir)
        return
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
        os.replace(staged_tmp, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    os.replace(out_dir, old / out_dir.name)
    os.replace(staged_tmp, out_dir)
    shutil.rmtree(old)


def _load_train_config(checkpoint: Path) -> dict | None:
    path = checkpoint / TRAIN_CONFIG_FILENAME
    if not path.is_file():
        return None
    config = yaml.safe_load(path.read_text())
    return config if isinstance(config, dict) else None


def _find_eval_results(checkpoint: Path, eval_results) -> dict | None:
    """An explicit results file (path or loaded dict) must be valid; one found in the checkpoint is optional
    (the Trainer writes an `eval_results.json` of its own, without a `results` key)."""
    if isinstance(eval_results, dict):
        if not isinstance(eval_results.get("results"), dict):
            raise StagingError("eval results have no 'results' mapping of task -> {metric: value}")
        return eval_results
    if eval_results is not None:
        return load_eval_results(eval_results)
    for name in DEFAULT_EVAL_FILENAMES:
        path = checkpoint / name
        if path.is_file():
            try:
                return load_eval_results(path)
            except (StagingError, json.JSONDecodeError):
                continue
    return None


def stage_checkpoint(
    checkpoint_dir,
    out_dir,
    *,
    repo_id: str,
    eval_results=None,
    base_model: str | None = None,
    revision: str | None = None,
) -> StagedFolder:
    """Copy the uploadable part of `checkpoint_dir` plus a generated README.md into `out_dir`.

    The folder is built in a temp folder next to `out_dir` and renamed into place, so `out_dir` is either the old
    staging or the complete new one. `out_dir` must be absent, empty, or a previous staging (marker file).
    `eval_results` is a results JSON path or an already loaded dict. Raises StagingError (or FileNotFoundError)
    naming the problem; SecretFoundError if a staged file contains an `hf_...` token.
    """
    checkpoint, out_dir = Path(checkpoint_dir), Path(out_dir)
    config = _check_checkpoint(checkpoint)
    _check_destination(out_dir, checkpoint)
    included, left_out = select_files(checkpoint)
    train_config = _load_train_config(checkpoint)
    card = render_model_card(
        repo_id=repo_id,
        base_model=resolve_base_model(base_model, train_config, config),
        summary=_video_token_summary(checkpoint),
        train_config=train_config,
        eval_results=_find_eval_results(checkpoint, eval_results),
        revision=revision,
    )

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        for relpath in included:
            _copy(checkpoint / relpath, tmp / relpath)
        (tmp / MODEL_CARD_FILENAME).write_text(card)
        scan_for_tokens(tmp)
        files = sorted([*included, MODEL_CARD_FILENAME])
        marker = tmp / MARKER_RELPATH
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"checkpoint": str(checkpoint.resolve()), "repo_id": repo_id, "files": files},
                                     indent=2))
        _replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return StagedFolder(path=out_dir, included=files, left_out=left_out, warnings=_warnings(files))


def _warnings(files: list[str]) -> list[str]:
    warnings = []
    if "processor_config.json" not in files and "tokenizer_config.json" not in files:
        warnings.append("no processor or tokenizer files: AutoProcessor.from_pretrained will fail on this repo "
                        "(save the processor into the checkpoint with processor.save_pretrained)")
    if TRAIN_CONFIG_FILENAME not in files:
        warnings.append(f"no {TRAIN_CONFIG_FILENAME}: the model card cannot say how the model was trained")
    return warnings


# -- upload ------------------------------------------------------------------------------------------------------


def _resolve_token(token: str | None) -> str:
    """The explicit token, else huggingface_hub's (HF_TOKEN or the stored `hf auth login`). Never logged."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            "no Hugging Face token: set HF_TOKEN (or the variable given with --token-env) or run `hf auth login`"
        )
    return token


def push_checkpoint(
    checkpoint_dir,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    eval_results=None,
    dry_run_dir=None,
    base_model: str | None = None,
    commit_message: str | None = None,
    report: Callable[[str], None] | None = print,
) -> str:
    """Stage `checkpoint_dir` and upload it to `repo_id`; return the commit URL.

    With `dry_run_dir`, only stage (into that folder), touch no network, and return the staged path. A non-main
    `revision` is created as a branch first. `report` receives the staging report (None for silence).
    """
    if dry_run_dir is not None:
        staged = stage_checkpoint(checkpoint_dir, dry_run_dir, repo_id=repo_id, eval_results=eval_results,
                                  base_model=base_model, revision=revision)
        if report:
            report(staged.report())
            report(f"Dry run: nothing uploaded. Upload later with: hf upload {repo_id} {staged.path} .")
        return str(staged.path)

    from huggingface_hub import HfApi

    token = _resolve_token(token)
    with tempfile.TemporaryDirectory(prefix="memllava-push-") as scratch:
        staged = stage_checkpoint(checkpoint_dir, Path(scratch) / "staged", repo_id=repo_id,
                                  eval_results=eval_results, base_model=base_model, revision=revision)
        if report:
            report(staged.report())
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(staged.path),
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or f"Upload MemLlava checkpoint {Path(checkpoint_dir).resolve().name}",
            # A re-push with different sharding must not leave stale shards next to the new index.
            delete_patterns=["*.safetensors", "model.safetensors.index.json"],
        )
    url = getattr(info, "commit_url", None) or str(info)
    if report:
        report(f"Uploaded to {repo_id}" + (f" (revision {revision})" if revision else "") + f": {url}")
    return url


__all__ = [
    "ALLOWED_PATTERNS",
    "REFUSED_PATTERNS",
    "SecretFoundError",
    "StagedFolder",
    "StagingError",
    "eval_rows",
    "load_eval_results",
    "push_checkpoint",
    "render_model_card",
    "resolve_base_model",
    "scan_for_tokens",
    "select_files",
    "stage_checkpoint",
]
