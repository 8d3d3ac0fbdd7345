"""MemLlava: a memory-augmented LLaVA-OneVision for long videos, native to Hugging Face Transformers.

Importing this package registers the config and model with the Auto classes, so
`AutoModel.from_pretrained(path)` works without `trust_remote_code` wherever the package is installed;
saved checkpoints carry the remote-code files and load anywhere with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_memllava import MemLlavaOnevisionConfig
from .modeling_memllava import (
    MemLlavaOnevisionForConditionalGeneration,
    MemLlavaOnevisionModel,
    MemoryFuser,
    RecurrentMemory,
)
from .processing_memllava import MemLlavaOnevisionProcessor, MemLlavaOnevisionVideoProcessor


AutoConfig.register(MemLlavaOnevisionConfig.model_type, MemLlavaOnevisionConfig, exist_ok=True)
# AutoModel returns the generation-capable class, the convention of remote-code chat models.
AutoModel.register(MemLlavaOnevisionConfig, MemLlavaOnevisionForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(MemLlavaOnevisionConfig, MemLlavaOnevisionForConditionalGeneration, exist_ok=True)
AutoProcessor.register(MemLlavaOnevisionConfig, MemLlavaOnevisionProcessor, exist_ok=True)

__all__ = [
    "MemLlavaOnevisionConfig",
    "MemLlavaOnevisionForConditionalGeneration",
    "MemLlavaOnevisionModel",
    "MemLlavaOnevisionProcessor",
    "MemLlavaOnevisionVideoProcessor",
    "MemoryFuser",
    "RecurrentMemory",
]
