"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL's 2x2-merged grids and 3-D M-RoPE.

Its vision tower attends in windows and restores raster order before the merger, so
the language model sees the same per-image grids as Qwen2-VL's, and the same adapter
answers for it.
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)
