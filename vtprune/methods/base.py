"""What a pruning method is, as the engine sees it.

A method says at which stages it acts (decoder layer 0 = the LLM input, before any
decoder layer runs) and how many tokens of an image survive each stage; then, per
image and stage, it picks the survivors from plain tensors in an `ImageView`.
It never touches the model.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

LLM_INPUT = 0  # stage layer meaning "before decoder layer 0"


@dataclass(frozen=True)
class Stage:
    layer: int  # the tokens are dropped before this decoder layer runs
    keep: int  # visual tokens of one image that survive this stage


@dataclass
class ImageView:
    """One image's surviving visual tokens at one stage."""

    hidden: torch.Tensor  # [N, D] hidden states entering the stage layer (projected features at the LLM input)
    coords: torch.Tensor  # [N, 2] (row, col) of each token on the image's token grid
    grid: tuple[int, int]  # (rows, cols) of that grid
    keep: int  # how many to return
    layer: int
    image_index: int  # the image's rank within its sample
    attention: torch.Tensor | None = None  # [N] last-query attention at the layer before, when the method asks


class Method(ABC):
    """A registered pruning method; subclasses are one file each in vtprune/methods/."""

    name: ClassVar[str]
    summary: ClassVar[str]
    where: ClassVar[str]  # a person's description of where it acts, for `vtprune methods`
    needs_attention: ClassVar[bool] = False

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, options: "Method.Options"):
        self.options = options

    @classmethod
    def parse_options(cls, given: dict[str, Any]) -> "Method.Options":
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(given) - known)
        if unknown:
            hint = ", ".join(sorted(known)) or "none"
            raise TypeError(f"method {cls.name!r} has no option {', '.join(map(repr, unknown))}; its options are: {hint}")
        options = cls.Options(**given)
        cls.validate(options)
        return options

    @classmethod
    def validate(cls, options: "Method.Options") -> None:
        """Raise ValueError for options that cannot work on any model."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Options())

    def check_model(self, num_layers: int) -> None:
        """Raise ValueError when the options do not fit a decoder of num_layers layers."""
        for stage in self.stages(num_layers, budget=1, num_tokens=2):
            if not 0 <= stage.layer < num_layers:
                raise ValueError(
                    f"method {self.name!r} would act before decoder layer {stage.layer}, "
                    f"but the model has {num_layers} layers (0..{num_layers - 1})"
                )

    @abstractmethod
    def stages(self, num_layers: int, budget: int, num_tokens: int) -> list[Stage]:
        """The stages for one image of num_tokens tokens at a nominal budget (tokens kept per image)."""

    @abstractmethod
    def select(self, view: ImageView) -> torch.Tensor:
        """Indices into view's tokens of the view.keep tokens to keep (any order)."""
