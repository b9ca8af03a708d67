"""Adapter registry: adding a model family is one file plus one line here."""

from __future__ import annotations

from torch import nn

from .base import Adapter, VisualItem
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_vl import Qwen2_5_VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .video_llava import VideoLlavaAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen2_5_VLAdapter, VideoLlavaAdapter,
)


def supported_models() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.model_classes]


def adapter_for(model: nn.Module) -> Adapter:
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            found = adapter(model)
            found.check_supported()
            return found
    if name == "OptimizedModule":  # what torch.compile(model) returns
        raise ValueError("vtprune.apply takes the model itself, not what torch.compile returned: apply the pruner "
                         "first and compile afterwards (or pass compiled._orig_mod)")
    raise ValueError(f"vtprune does not support {name}; supported model classes: {', '.join(supported_models())}")


__all__ = ["ADAPTERS", "Adapter", "VisualItem", "adapter_for", "supported_models"]
