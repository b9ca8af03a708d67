"""The method registry: adding a method is one file plus one line here."""

from __future__ import annotations

from .base import (LLM_INPUT, BlockInput, BlockMerge, BlockMergingMethod, Grid, ImageView, LayerProbe, Method, ModelInfo, Selection, Stage, VisionLayer,
                   VisionMethod, VisionView, did_you_mean)
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


# What each method is given where there is no checkpoint on disk (Method.without_checkpoint): random weights.
WITHOUT_CHECKPOINT: dict[str, dict] = {name: cls.without_checkpoint for name, cls in REGISTRY.items() if cls.without_checkpoint}


def checkpoint_options(folder, processor) -> dict[str, dict]:
    """Per method, the options a command gives it on the checkpoint in folder (Method.checkpoint_options)."""
    return {name: cls.checkpoint_options(folder, processor) for name, cls in REGISTRY.items()}


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}{did_you_mean(name, REGISTRY)}; registered methods: "
                         f"{', '.join(sorted(REGISTRY))}") from None


__all__ = ["LLM_INPUT", "REGISTRY", "BlockInput", "BlockMerge", "BlockMergingMethod", "Grid", "ImageView", "LayerProbe", "Method", "ModelInfo", "Selection", "Stage", "VisionLayer",
           "VisionMethod", "VisionView", "WITHOUT_CHECKPOINT", "checkpoint_options", "did_you_mean", "get_method"]
