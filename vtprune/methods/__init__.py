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
    if not isinstance(name, str):
        raise TypeError(f"a method is given by its name, a string (one of {', '.join(sorted(REGISTRY))}); got "
                        f"{type(name).__name__}")
    if name in REGISTRY:
        return REGISTRY[name]
    if "," in name:
        hint = ": one method here (`vtprune eval --methods` takes a comma-separated list)"
    elif ":" in name:
        hint = (": a method's options are keyword arguments of apply (apply(model, 'fastv', budget, layer=3)); "
                "name:key=value is the command line's spelling")
    elif name.strip().lower() in ("unpruned", "none", "baseline"):
        hint = (": the unpruned model is no method (`vtprune eval` runs its unpruned row in every run; in Python, "
                "do not apply a pruner, or remove() it)")
    else:
        hint = did_you_mean(name, REGISTRY)
    raise ValueError(f"unknown method {name!r}{hint}; registered methods: {', '.join(sorted(REGISTRY))}")


__all__ = ["LLM_INPUT", "REGISTRY", "BlockInput", "BlockMerge", "BlockMergingMethod", "Grid", "ImageView", "LayerProbe", "Method", "ModelInfo", "Selection", "Stage", "VisionLayer",
           "VisionMethod", "VisionView", "WITHOUT_CHECKPOINT", "checkpoint_options", "did_you_mean", "get_method"]
