"""Training pieces behind `train.py`: stage configs, freezing, samples -> features, collation and the Trainer.

We use `transformers.Trainer`, not TRL's `SFTTrainer`: SFTTrainer's value is its dataset preparation (chat
formatting, packing, image collators) for text and image datasets, while our samples are videos streamed from tar
archives that must be decoded, sampled and expanded with the memory-aware placeholder count. That work lives here
(`VideoSFTExamples`, `VideoSFTCollator`), after which SFTTrainer would add nothing over the Trainer it subclasses.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainerCallback

from .configuration_memllava import MEMORY_FIELDS
from .data import SkipCounter, gather_counts
from .video import VideoDecodeError, load_video


logger = logging.getLogger(__name__)

CONFIG_FILENAME = "memllava_train_config.yaml"
REPORT_FILENAME = "data_report.json"
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# -- stage configs ------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"training.max_steps=5"` -> (["training", "max_steps"], 5); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ValueError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"--set has an empty key in {text!r}")
    return key.split("."), yaml.safe_load(value)


def load_stage_config(stage_or_path: str, overrides: Iterable[str] = ()) -> dict:
    """Load `configs/stage_<stage>.yaml` (or a YAML path) and apply `key.sub=value` overrides.

    An override may only set keys that exist in the file, except under `model` (any memory field) and `training`
    (any TrainingArguments field): a typo fails loudly instead of being silently ignored.
    """
    path = stage_or_path if stage_or_path.endswith((".yaml", ".yml")) else os.path.join(CONFIG_DIR, f"stage_{stage_or_path}.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no stage config at {path} (stages: short, long, or a .yaml path)")
    with open(path) as handle:
        config = yaml.safe_load(handle)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise KeyError(f"--set {text!r}: {'.'.join(keys[: depth + 1])} is not a section of {path}")
            node = node[key]
        open_section = keys[0] in ("model", "training") and len(keys) == 2
        if keys[-1] not in node and not open_section:
            raise KeyError(f"--set {text!r}: unknown key {'.'.join(keys)} (not in {path})")
        node[keys[-1]] = value
    validate_stage_config(config)
    return config


def validate_stage_config(config: dict):
    if config.get("stage") not in ("short", "long"):
        raise ValueError(f"stage must be 'short' or 'long', got {config.get('stage')!r}")
    unknown = sorted(set(config.get("model") or {}) - set(MEMORY_FIELDS))
    if unknown:
        raise ValueError(f"model: unknown memory field(s) {unknown}; known: {list(MEMORY_FIELDS)}")
    if config["stage"] == "long" and not config.get("init_from"):
        raise ValueError("stage long starts from a checkpoint: set init_from (the stage short output)")
    for name in ("memory", "llm"):
        rate = config["learning_rates"][name]
        if not isinstance(rate, (int, float)) or rate <= 0:
            raise ValueError(f"learning_rates.{name} must be a positive number, got {rate!r}")
    data = config["data"]
    if not isinstance(data.get("num_frames"), int) or data["num_frames"] < 1:
        raise ValueError(f"data.num_frames must be a positive integer, got {data.get('num_frames')!r}")
    if not isinstance(data.get("max_length"), int) or data["max_length"] < 1:
        raise ValueError(f"data.max_length must be a positive integer, got {data.get('max_length')!r}")


def save_stage_config(config: dict, folder: str):
    """Write the resolved config next to the checkpoint (atomically: a crash never leaves half a file)."""
    os.makedirs(folder, exist_ok=True)
    target = os.path.join(folder, CONFIG_FILENAME)
    with open(target + ".tmp", "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    os.replace(target + ".tmp", target)


# -- model and processor -----------------------------------------------------------------------------------------

# Fields a later stage may change on a trained checkpoint: they move no weights.
RUNTIME_FIELDS = ("num_fine_frames", "fine_frame_dropout", "vision_chunk_size", "memory_bptt_chunks")


def build_model_and_processor(config: dict):
    """Stage short: convert `base_model` (a LLaVA-OV checkpoint, or "tiny" for the embedded random model) with the
    config's memory fields. Stage long: load the `init_from` MemLlava checkpoint and apply the runtime fields."""
    from .modeling_memllava import MemLlavaOnevisionForConditionalGeneration
    from .processing_memllava import MemLlavaOnevisionProcessor

    fields = dict(config.get("model") or {})
    dtype = config.get("dtype")
    if config["stage"] == "short":
        if config["base_model"] == "tiny":
            from .testing import tiny_base_model, tiny_processor

            model = MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(tiny_base_model(), dtype=dtype, **fields)
            return model, tiny_processor(config=model.config)
        model = MemLlavaOnevisionForConditionalGeneration.from_llava_onevision(config["base_model"], dtype=dtype, **fields)
        return model, MemLlavaOnevisionProcessor.from_llava_onevision(config["base_model"], **fields)

    model = MemLlavaOnevisionForConditionalGeneration.from_pretrained(config["init_from"], dtype=dtype)
    structural = {k: v for k, v in fields.items() if k not in RUNTIME_FIELDS and getattr(model.config, k) != v}
    if structural:
        raise ValueError(
            f"stage long cannot change {sorted(structural)} of the checkpoint {config['init_from']} (they shape "
            f"weights); only {list(RUNTIME_FIELDS)} may differ"
        )
    for key, value in fields.items():
        setattr(model.config, key, value)
    model.config._validate_memory_fields()
    processor = MemLlavaOnevisionProcessor.from_pretrained(config["init_from"])
    processor.update_memory_settings(model.config)
    return model, processor


# -- freezing and optimiser groups --------------------------------------------------------------------------------


def is_llm_parameter(name: str) -> bool:
    return name.startswith(("model.language_model.", "lm_head."))


def configure_trainable(model, train_llm: bool) -> dict[str, int]:
    """Stage freezing: memory modules always train; the LLM (and its head) only when `train_llm`; the vision tower,
    projector and image newline never. Returns parameter counts for the log and the asserts of train.py."""
    memory = set(model.memory_parameter_names())
    counts = {"memory": 0, "llm": 0, "frozen": 0}
    for name, param in model.named_parameters():
        train = name in memory or (train_llm and is_llm_parameter(name))
        param.requires_grad_(train)
        group = "memory" if name in memory else "llm" if train else "frozen"
        counts[group] += param.numel()
    if counts["memory"] == 0:
        raise ValueError("the model has no memory modules to train (use_memory=False?)")
    return counts


def optimizer_groups(model, learning_rates: dict, weight_decay: float) -> list[dict]:
    """Parameter groups with per-module learning rates; no weight decay on biases, norms and embeddings."""
    memory = set(model.memory_parameter_names())
    groups: dict[tuple[str, bool], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "memory" if name in memory else "llm"
        decay = param.ndim >= 2 and "norm" not in name and "embedding" not in name and "memory_tokens" not in name
        groups.setdefault((kind, decay), []).append(param)
    return [
        {"params": params, "lr": learning_rates[kind], "weight_decay": weight_decay if decay else 0.0, "name": f"{kind}{'' if decay else '_no_decay'}"}
        for (kind, decay), params in sorted(groups.items())
    ]


# -- samples -> features ------------------------------------------------------------------------------------------


class MalformedSample(ValueError):
    pass


class SampleTooLong(ValueError):
    pass


SKIP_REASONS = {MalformedSample: "malformed_conversation", SampleTooLong: "too_long"}

VISUAL_MARKERS = ("<image>", "<video>")


def conversation_to_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA's `[{"from": "human"|"gpt", "value": ...}]` -> chat messages with the video in the first user turn.

    LLaVA-Video-178K marks the visual input with `<image>` in the first human turn; it becomes a video content item.
    """
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise MalformedSample("conversation needs at least one human and one gpt turn")
    messages = []
    for index, turn in enumerate(conversations):
        role = {"human": "user", "gpt": "assistant"}.get(turn.get("from") if isinstance(turn, dict) else None)
        value = turn.get("value") if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise MalformedSample(f"turn {index} is not a {{from: human|gpt, value: str}} record")
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise MalformedSample(f"turn {index} is from {role}, expected {expected}")
        text = value
        for marker in VISUAL_MARKERS:
            text = text.replace(marker, "")
        content = [{"type": "text", "text": text.strip()}]
        if index == 0:
            content.insert(0, {"type": "video"})
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "assistant":
        raise MalformedSample("conversation does not end with a gpt turn")
    return messages


def assistant_label_mask(input_ids: list[int], start: list[int], end: int) -> list[bool]:
    """True on the tokens the loss is computed on: each assistant reply and its end-of-turn token.

    `start` is the token sequence opening an assistant turn (`<|im_start|>assistant\\n` in the Qwen2 format).
    """
    mask = [False] * len(input_ids)
    width, index = len(start), 0
    while index < len(input_ids):
        if input_ids[index : index + width] == start:
            index += width
            while index < len(input_ids):
                mask[index] = True
                if input_ids[index] == end:
                    break
                index += 1
        index += 1
    return mask


@dataclass
class VideoSFTExamples(IterableDataset):
    """Raw samples (`id`, `video_bytes`, `conversations`) -> model features, one sample at a time.

    Samples whose video cannot be decoded, whose conversation is malformed or whose token count exceeds
    `max_length` are skipped and counted in `counter` (never truncated: a cut sequence could lose its answer or
    split a video's placeholders, and over-long sequences are a known cause of multi-GPU hangs).
    """

    source: Iterable[dict]
    processor: Any
    num_frames: int
    max_length: int
    counter: SkipCounter = field(default_factory=SkipCounter)

    def __post_init__(self):
        tokenizer = self.processor.tokenizer
        self._turn_start = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
        self._turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def set_epoch(self, epoch: int):
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def encode(self, sample: dict) -> dict:
        messages = conversation_to_messages(sample.get("conversations"))
        clip = load_video(sample["video_bytes"], num_frames=self.num_frames)
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        features = self.processor(text=[text], videos=[clip], return_tensors="pt")
        input_ids = features["input_ids"][0]
        if input_ids.shape[0] > self.max_length:
            raise SampleTooLong(f"{input_ids.shape[0]} tokens > max_length {self.max_length}")
        keep = torch.tensor(assistant_label_mask(input_ids.tolist(), self._turn_start, self._turn_end))
        if not keep.any():
            raise MalformedSample("no assistant tokens to learn from")
        return {
            "id": sample.get("id"),
            "input_ids": input_ids,
            "labels": torch.where(keep, input_ids, -100),
            "pixel_values_videos": features["pixel_values_videos"][0],
            "video_timestamps": features["video_timestamps"][0],
            "video_frame_mask": features["video_frame_mask"][0],
        }

    def __iter__(self) -> Iterator[dict]:
        # Skips travel with the next yielded feature ("skipped": [(reason, id), ...]) and are counted where the
        # batch arrives (MemLlavaTrainer), so counts made inside dataloader worker processes are not lost.
        pending: list[tuple[str, str]] = []
        for sample in self.source:
            sample_id = str(sample.get("id", "<no id>"))
            try:
                feature = self.encode(sample)
            except (VideoDecodeError, MalformedSample, SampleTooLong) as error:
                reason = SKIP_REASONS[type(error)] if type(error) in SKIP_REASONS else "undecodable_video"
                logger.warning("skipping sample %s (%s): %s", sample_id, reason, error)
                pending.append((reason, sample_id))
                continue
            feature["skipped"], pending = pending, []
            yield feature
        if pending and torch.utils.data.get_worker_info() is None:
            for reason, sample_id in pending:  # nothing left to carry them: count them here
                self.counter.skip(reason, sample_id)
        elif pending:
            logger.warning("%d skipped samples at the end of a worker's stream are logged but not counted", len(pending))


@dataclass
class VideoSFTCollator:
    """Pads a list of `VideoSFTExamples` features into a batch (right padding for training)."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict:
        length = max(f["input_ids"].shape[0] for f in features)
        frames = max(f["pixel_values_videos"].shape[0] for f in features)
        batch = len(features)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        pixels = features[0]["pixel_values_videos"]
        pixel_values = pixels.new_zeros((batch, frames, *pixels.shape[1:]))
        frame_mask = torch.zeros((batch, frames), dtype=torch.bool)
        timestamps = torch.zeros((batch, frames), dtype=torch.float32)
        for row, feature in enumerate(features):
            n, t = feature["input_ids"].shape[0], feature["pixel_values_videos"].shape[0]
            input_ids[row, :n] = feature["input_ids"]
            labels[row, :n] = feature["labels"]
            attention_mask[row, :n] = 1
            pixel_values[row, :t] = feature["pixel_values_videos"]
            frame_mask[row, :t] = feature["video_frame_mask"]
            timestamps[row, :t] = feature["video_timestamps"]
        return {
            "skipped": [event for feature in features for event in feature.get("skipped", ())],
            "ids": [feature.get("id") for feature in features],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values_videos": pixel_values,
            "video_frame_mask": frame_mask,
            "video_timestamps": timestamps,
        }


# -- trainer ------------------------------------------------------------------------------------------------------


class DataReportCallback(TrainerCallback):
    """At the end of training, gather skip counts and matched ids from every rank and report them once."""

    def __init__(self, counter: SkipCounter, reader=None):
        self.counter = counter
        self.reader = reader

    def on_train_end(self, args, state, control, **kwargs):
        report = gather_counts(self.counter, self.reader)
        report["world_size"] = args.world_size
        if state.is_world_process_zero:
            logger.warning("data report: %s", json.dumps(report, sort_keys=True))
            os.makedirs(args.output_dir, exist_ok=True)
            target = os.path.join(args.output_dir, REPORT_FILENAME)
            with open(target + ".tmp", "w") as handle:
                json.dump(report, handle, indent=2, sort_keys=True)
            os.replace(target + ".tmp", target)


class StageConfigCallback(TrainerCallback):
    """Keep the resolved stage config inside every checkpoint folder, so each one documents how it was made."""

    def __init__(self, config: dict):
        self.config = copy.deepcopy(config)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            save_stage_config(self.config, os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))


class MemLlavaTrainer(Trainer):
    """`Trainer` with per-module learning rates, a data loader that shards itself and a record of what it read.

    Every micro-batch's sample ids are appended to `output_dir/samples_rank<R>.jsonl` with the optimizer step they
    belong to, so a run can be audited (and a resumed run checked) sample by sample.

    The streaming reader already splits archives across ranks and workers; `accelerator.prepare` would shard
    the stream a second time (every rank would read every archive and keep every k-th batch), so the train
    loader is built here and handed to the loop unprepared. The Trainer still moves each batch to the device.
    """

    def __init__(self, *args, learning_rates: dict, skip_counter: SkipCounter, **kwargs):
        self.learning_rates = learning_rates
        self.skip_counter = skip_counter
        super().__init__(*args, **kwargs)

    def _prepare_inputs(self, inputs):
        for reason, sample_id in inputs.pop("skipped", ()):
            self.skip_counter.skip(reason, sample_id)
        ids = inputs.pop("ids", None)
        if ids is not None and self.model.training:
            self._record_samples(ids)
        return super()._prepare_inputs(inputs)

    def _record_samples(self, ids: list):
        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, f"samples_rank{self.args.process_index}.jsonl")
        with open(path, "a") as handle:
            handle.write(json.dumps({"step": self.state.global_step + 1, "ids": ids}) + "\n")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model or self.model)
            optimizer_kwargs.pop("lr", None)
            groups = optimizer_groups(self.model, self.learning_rates, self.args.weight_decay)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        return DataLoader(
            self.train_dataset,
            batch_size=args.per_device_train_batch_size,
            collate_fn=self.data_collator,
            num_workers=args.dataloader_num_workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_num_workers > 0 and args.dataloader_persistent_workers,
        )
