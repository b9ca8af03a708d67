"""CLASP (2026): class-adaptive layer fusion and dual-stage pivot/completion pruning.

The instruction's class (vtprune.router) picks (a) the mix of vision-encoder layers
the projector receives and (b) how each stage's budget splits between pivot tokens
(relevance: last-query attention) and completion tokens (coverage: greedy max-min
cosine distance to everything chosen so far). Stages at decoder layers 2/6/15 of 32.

The paper's code is not released. Where it is silent these are the project's
decisions: the six classes and a rule-based router; fusion over the vision layers
with per-class weights and splits fitted by `vtprune calibrate` (identity fusion and
an even split without a table); stage keep counts 2R / 1.5R / R for a nominal budget
R, so the last stage keeps exactly the budget.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..router import CLASSES, checked, route
from .base import ImageView, Method, ModelInfo, Stage, scale_layers
from .primitives import farthest_point, topk_in_order

AUTHORS_LAYERS, AUTHORS_DEPTH = (2, 6, 15), 32
DEFAULT_MULTIPLIERS = (2.0, 1.5, 1.0)
DEFAULT_SPLIT = 0.5


@dataclass(frozen=True)
class ClassSettings:
    fusion: dict[int, float] | None  # vision hidden-state index -> weight; None: the model's own feature layer
    split: float  # share of each stage's keep given to pivot tokens


def load_calibration(source: str | Path | dict) -> dict[str, ClassSettings]:
    """A table written by `vtprune calibrate --method clasp` (its path, or the table itself): settings per class."""
    path = source if isinstance(source, dict) else Path(source)
    try:
        table = source if isinstance(source, dict) else json.loads(path.read_text())
        return {
            name: ClassSettings({int(k): float(v) for k, v in entry["fusion"].items()} if entry.get("fusion") else None,
                                float(entry["split"]))
            for name, entry in table["classes"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a CLASP calibration table ({error}); make one with `vtprune calibrate`") from None


class CLASP(Method):
    name = "clasp"
    summary = "class-adaptive vision-layer fusion; per stage, pivots by attention + completion by max-min coverage"
    where = "vision features + inside the LLM, layers 2/6/15 of 32"
    needs_attention = True

    @dataclass(frozen=True)
    class Options:
        tokenizer: Any = None  # decodes each prompt for the router (processor.tokenizer)
        question_class: str | None = None  # one class for every sample, instead of routing
        router: Callable[[str], str] | None = None  # instruction text -> class, instead of the built-in rules
        calibration: str | Path | dict | None = None  # a table from `vtprune calibrate --method clasp`
        fusion: bool = True  # False: the projector gets the model's own feature layer (ablation)
        completion: bool = True  # False: pivots only (ablation)
        split: float | None = None  # one pivot share for every class, overriding the table (ablation)
        layers: tuple[int, ...] | None = None  # stage layers; default 2/6/15 scaled to the depth
        multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS  # keep per stage, in budgets

    @classmethod
    def validate(cls, options: "CLASP.Options") -> None:
        if options.tokenizer is None and options.question_class is None and options.router is None:
            raise ValueError(
                "clasp routes on the instruction's text: pass tokenizer=processor.tokenizer "
                "(or question_class=..., or router=callable)"
            )
        if options.question_class is not None and options.question_class not in CLASSES:
            raise ValueError(f"question_class must be one of {', '.join(CLASSES)}; got {options.question_class!r}")
        if options.split is not None and not 0.0 <= options.split <= 1.0:
            raise ValueError(f"split is the pivots' share of a stage and must lie in [0, 1]; got {options.split}")
        if options.layers is not None and len(options.layers) != len(options.multipliers):
            raise ValueError("clasp needs one multiplier per stage layer")

    def __init__(self, options: "CLASP.Options"):
        super().__init__(options)
        self.table = load_calibration(options.calibration) if options.calibration else {}
        self._router = checked(options.router) if options.router else route
        self._classes: dict[tuple[int, ...], str] = {}

    @property
    def fuses_vision_layers(self) -> bool:
        return self.options.fusion and any(s.fusion for s in self.table.values())

    def question_class(self, text_ids: torch.Tensor) -> str:
        if self.options.question_class is not None:
            return self.options.question_class
        key = tuple(text_ids.tolist())
        if key not in self._classes:
            text = self.options.tokenizer.decode(list(key), skip_special_tokens=True) if self.options.tokenizer else ""
            self._classes[key] = self._router(text)
        return self._classes[key]

    def settings(self, text_ids: torch.Tensor) -> ClassSettings:
        found = self.table.get(self.question_class(text_ids), ClassSettings(None, DEFAULT_SPLIT))
        split = found.split if self.options.split is None else self.options.split
        return ClassSettings(found.fusion if self.options.fusion else None, split if self.options.completion else 1.0)

    def vision_fusion(self, text_ids: torch.Tensor) -> dict[int, float] | None:
        return self.settings(text_ids).fusion

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        layers = self.options.layers or scale_layers(AUTHORS_LAYERS, AUTHORS_DEPTH, model.num_layers)
        if len(layers) != len(self.options.multipliers):
            raise ValueError(f"clasp needs one multiplier per stage layer; got layers={layers} "
                             f"multipliers={self.options.multipliers}")
        return [Stage(layer, min(num_tokens, max(1, round(budget * m)))) for layer, m in zip(layers, self.options.multipliers)]

    def select(self, view: ImageView) -> torch.Tensor:
        share = self.settings(view.text).split
        # At least one pivot unless the split says none: coverage grown from nothing starts at
        # the mean, where two tokens are exactly tied and float noise would pick.
        pivots = topk_in_order(view.attention, max(round(share * view.keep), 1 if share > 0 else 0))
        completion = farthest_point(view.hidden, pivots, view.keep - pivots.numel())
        return torch.cat([pivots, completion])

