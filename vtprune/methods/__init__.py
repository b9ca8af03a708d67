"""The method registry: adding a method is one file plus one line here."""

from __future__ import annotations

from .base import (LLM_INPUT, BlockInput, BlockMerge, BlockMergingMethod, Grid, ImageView, LayerProbe, Method, ModelInfo, Selection, Stage, VisionLayer,
                   VisionMethod, VisionView)
from .clasp import CLASP
from .clse import CLSE
from .clse_merge import CLSEMerge
from .dart import DART
from .divprune import DivPrune
from .fastv import FastV
from .ficoco_v import FiCoCoV
from .hired import HiRED
from .pdrop import PDrop
from .pool import Pool
from .prumerge_plus import PruMergePlus
from .random_subset import RandomSubset
from .sparsevlm import SparseVLM
from .tome import ToMe
from .uniform_grid import UniformGrid
from .visionzip import VisionZip
from .vispruner import VisPruner

REGISTRY: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (CLASP, CLSE, CLSEMerge, DART, DivPrune, FastV, FiCoCoV, HiRED, PDrop, Pool, PruMergePlus, RandomSubset, SparseVLM,
                ToMe, UniformGrid, VisionZip, VisPruner)
}


# What a method is given where the model has no tokenizer (random weights: tests, the demo, the bench): CLASP routes
# on the instruction's text, so it is told the instruction's class instead.
WITHOUT_TOKENIZER: dict[str, dict] = {"clasp": {"question_class": "general"}}


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["LLM_INPUT", "REGISTRY", "BlockInput", "BlockMerge", "BlockMergingMethod", "Grid", "ImageView", "LayerProbe", "Method", "ModelInfo", "Selection", "Stage", "VisionLayer",
           "VisionMethod", "VisionView", "WITHOUT_TOKENIZER", "get_method"]
