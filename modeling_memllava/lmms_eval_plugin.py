"""lmms-eval model plugin: `lmms_eval --model memllava --model_args pretrained=...,max_frames_num=64`.

lmms-eval 0.7 discovers outside models through the `lmms_eval.models` entry-point group; each entry point must load
to a `ModelManifest` (or an iterable of them, or a callable returning one) naming the class by dotted path. This
package registers `memllava = modeling_memllava.lmms_eval_plugin:MANIFEST` in setup.cfg; lmms-eval imports this
module only when building its registry and the class only when `--model memllava` is asked for.

Answers go through `generate_answer`, the same code path as `memllava-chat` and the local evaluator, so a video is
sampled (uniformly, `max_frames_num` frames), templated and decoded exactly as everywhere else in the package.
Requests are answered one at a time (batch_size 1): each video is a long, differently sized prefill, and the
memory model's cost is dominated by the video, so padding several together saves nothing worth the complexity.
Data parallelism works through `accelerate launch`: every process loads the model on its own GPU and lmms-eval
shards the requests by `rank`/`world_size`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger as eval_logger
from tqdm.auto import tqdm

from .inference import generate_answer, video_prompt_messages
from .video import VideoDecodeError, load_video


# Generation settings lmms-eval task configs set that map one to one onto `generate()` arguments.
_GENERATE_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample")
# Settings that only make sense when sampling; passing them with greedy decoding makes transformers warn.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k")


def _parse_dtype(dtype):
    if dtype in (None, "auto") or isinstance(dtype, torch.dtype):
        return dtype or "auto"
    return getattr(torch, str(dtype).replace("torch.", ""))


def generation_kwargs(gen_kwargs: dict, default_max_new_tokens: int) -> tuple[dict, list[str]]:
    """Split an lmms-eval `gen_kwargs` dict into `generate()` keyword arguments and the `until` stop strings.

    lmms-eval convention: `temperature > 0` means sampling unless `do_sample` says otherwise; unknown keys
    (`image_aspect_ratio`, ...) belong to other models and are dropped.
    """
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    kwargs = {key: gen_kwargs[key] for key in _GENERATE_KEYS if gen_kwargs.get(key) is not None}
    kwargs.setdefault("max_new_tokens", default_max_new_tokens)
    kwargs["do_sample"] = bool(kwargs.get("do_sample", float(kwargs.get("temperature", 0) or 0) > 0))
    if not kwargs["do_sample"]:
        for key in _SAMPLING_KEYS:
            kwargs.pop(key, None)
    return kwargs, [stop for stop in until if stop]


def truncate_at_stop(text: str, until: list[str]) -> str:
    """`text` cut at the first occurrence of any stop string (generation may run past it within one token)."""
    for stop in until:
        index = text.find(stop)
        if index != -1:
            text = text[:index]
    return text.strip()


class MemLlava(lmms):
    """MemLlava (memory-augmented LLaVA-OneVision) for lmms-eval's video tasks, loaded with Transformers Auto classes.

    Args (all via `--model_args`):
        pretrained: checkpoint folder or Hub repo id.
        revision: Hub revision (branch, tag or commit) to pin.
        max_frames_num: frames sampled uniformly from each video (LLaVA-OV's rule).
        attn_implementation: e.g. "sdpa", "flash_attention_2"; None keeps transformers' default.
        dtype: "auto" (the checkpoint's), "bfloat16", "float16" or "float32".
        device: used when running as a single process; under `accelerate launch` each process takes its own GPU.
        batch_size: must be 1 (see the module docstring).
        max_new_tokens: default when a task does not set one (lmms-eval's built-in models use 1024).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: Optional[str] = None,
        max_frames_num: int = 32,
        attn_implementation: Optional[str] = None,
        dtype: str = "auto",
        device: Optional[str] = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 1024,
        trust_remote_code: bool = True,
        max_batch_size: Optional[int] = None,  # passed by lmms-eval's evaluator to every model; unused here
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"unexpected model_args for memllava: {sorted(kwargs)}")
        if int(batch_size) != 1:
            raise ValueError(f"memllava evaluates one request at a time; got batch_size={batch_size}")
        from transformers import AutoModelForImageTextToText, AutoProcessor

        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            # One model per process; no DDP wrapper is needed for inference, so the model is not `prepare`d.
            self._device = accelerator.device
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes

        load_kwargs = {"revision": revision, "trust_remote_code": trust_remote_code, "dtype": _parse_dtype(dtype)}
        if attn_implementation:
            load_kwargs["attn_implementation"] = attn_implementation
        self._model = AutoModelForImageTextToText.from_pretrained(pretrained, **load_kwargs).to(self._device).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision, trust_remote_code=trust_remote_code)
        self.pretrained = pretrained
        self.max_frames_num = int(max_frames_num)
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size_per_gpu = 1
        self.video_errors: list[tuple[str, str]] = []  # (path, reason) of videos that could not be decoded

    @property
    def model(self):
        return self._model

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    # --- helpers ---------------------------------------------------------------------------------------------------

    def _video_path(self, doc_to_visual, doc_id, task, split) -> str:
        """The one video of a request: video tasks' `doc_to_visual(doc)` returns `[path]`."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if not visuals:
            raise NotImplementedError(f"memllava evaluates video tasks; {task} doc {doc_id} has no visual")
        if not isinstance(visuals[0], str):
            raise NotImplementedError(
                f"memllava evaluates video tasks; {task} gave {type(visuals[0]).__name__} visuals, not video paths"
            )
        if len(visuals) > 1:
            eval_logger.warning(f"{task} doc {doc_id}: {len(visuals)} videos given, using the first")
        return visuals[0]

    def _load_clip(self, path: str):
        """Decoded clip, or None (logged and remembered) when the file is unreadable: one bad video must not end a
        multi-hour run; its empty answer scores as wrong, like lmms-eval's other models do."""
        try:
            return load_video(path, num_frames=self.max_frames_num)
        except (VideoDecodeError, OSError) as error:
            eval_logger.error(f"memllava: cannot decode {path}: {error}")
            self.video_errors.append((path, str(error)))
            return None

    # --- lmms API --------------------------------------------------------------------------------------------------

    def generate_until(self, requests: List[Instance]) -> List[str]:
        """Greedy (or sampled, if the task asks) answer per request, cut at the task's `until` strings."""
        outputs = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Responding"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs, until = generation_kwargs(dict(gen_kwargs), self.max_new_tokens)
            clip = self._load_clip(self._video_path(doc_to_visual, doc_id, task, split))
            if clip is None:
                outputs.append("")
                continue
            if until:
                # Stop as soon as a stop string appears instead of running to max_new_tokens.
                kwargs.update(stop_strings=until, tokenizer=self.tokenizer)
            text = generate_answer(self.model, self.processor, clip, context, num_frames=self.max_frames_num, **kwargs)
            text = truncate_at_stop(text, until)
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    @torch.inference_mode()
    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """(sum of log-probabilities of the continuation, whether greedy decoding would produce it) per request."""
        results = []
        for request in tqdm(requests, disable=self.rank != 0, desc="Model Responding"):
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            clip = self._load_clip(self._video_path(doc_to_visual, doc_id, task, split))
            if clip is None:
                results.append((float("-inf"), False))
                continue
            results.append(self._continuation_logprob(clip, context, continuation))
        return results

    def _continuation_logprob(self, clip, context: str, continuation: str) -> Tuple[float, bool]:
        prompt = self.processor.apply_chat_template(
            video_prompt_messages(context), add_generation_prompt=True, tokenize=False
        )
        # Video placeholders are expanded inside the prompt only, so the continuation's token count can be taken
        # from the unexpanded texts: it is the tail of the expanded sequence.
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = self.tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
        num_continuation = len(full_ids) - len(prompt_ids)
        if num_continuation <= 0:
            return 0.0, True
        inputs = self.processor(text=[prompt + continuation], videos=[clip], return_tensors="pt")
        inputs = inputs.to(self.device, dtype=self.model.dtype)
        # Logits at the last n+1 positions: position i predicts token i+1, so drop the final one.
        logits = self.model(**inputs, logits_to_keep=num_continuation + 1).logits[0, :-1].float()
        targets = inputs["input_ids"][0, -num_continuation:]
        log_probs = torch.log_softmax(logits, dim=-1)
        logprob = log_probs.gather(-1, targets[:, None]).sum().item()
        is_greedy = bool((logits.argmax(dim=-1) == targets).all())
        return logprob, is_greedy

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError(
            "memllava does not implement multi-round generation; its tasks (e.g. mmsearch) are not supported"
        )


# What the `lmms_eval.models` entry point loads: lmms-eval registers it and imports the class lazily by path.
MANIFEST = ModelManifest(model_id="memllava", simple_class_path=f"{__name__}.MemLlava")
