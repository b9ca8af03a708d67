"""The method registry: adding a method is one file plus one line here."""

from __future__ import annotations

from .base import LLM_INPUT, Grid, ImageView, Method, ModelInfo, Selection, Stage
from .clasp import CLASP
from .clse import CLSE
from .clse_merge import CLSEMerge
from .fastv import FastV
from .random_subset import RandomSubset
from .uniform_grid import UniformGrid

REGISTRY: dict[str, type[Method]] = {cls.name: cls for cls in (CLASP, CLSE, CLSEMerge, FastV, RandomSubset, UniformGrid)}


def get_method(name: str) -> type[Method]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}") from None


__all__ = ["LLM_INPUT", "REGISTRY", "Grid", "ImageView", "Method", "ModelInfo", "Selection", "Stage", "get_method"]
