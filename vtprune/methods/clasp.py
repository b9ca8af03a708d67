"""CLASP (2026): class-adaptive layer fusion and dual-stage pivot/completion pruning.

From the paper (arXiv 2604.12767; its abstract, introduction and Figure 1 caption as the
project's notes record them, ../shared/notes/methods.md, and its project page): a router maps
the instruction to a question class; the class sets (a) how vision-encoder layers are fused
into the features the projector receives and (b) how the token budget R splits between
attention-salient *pivot* tokens (relevance) and redundancy-aware *completion* tokens
(coverage); R tokens are kept ("192 retained tokens, 66.7% reduction"). Figure 1 sweeps five
fusion strategies from shallow- to deep-weighted. (The project page's own examples of
classes are "OCR, counting, grounding, or open-ended reasoning".)

The paper's code is not released and does not say where pruning happens, which attention
gives salience, what completion is, the class set or the router. The project's reading:
- one pruning step before decoder layer K=2 (as FastV and DART, which CLASP reports
  beating) keeps R tokens: pivots are the top of the last-query attention at layer K-1,
  completion tokens are added by greedy max-min cosine coverage (farthest point) against
  everything chosen so far, on the visual hidden states entering layer K (the residual
  stream, not normed); the class's split is the pivots' share of R;
- fusion candidates (`fusion_candidates`, searched by `vtprune calibrate`): the model's own
  feature layer, and five mixes A-E of a shallow, a middle and the deep (feature) layer,
  from shallow- to deep-weighted; per-class weights (a mix: they sum to 1) and splits come
  from the calibration table (identity fusion and an even split without one);
- six classes and a rule-based English/Chinese router (vtprune.router), overridable, which reads the
  prompt's question: its last user turn without the chat template and the answer-format
  instructions benchmarks append (`router.instruction`).
`progressive=True` runs this project's earlier schedule instead: stages before layers 2/6/15 of 32
(scaled to depth) keeping 2R / 1.5R / R. Those are the numbers of SparseVLM's sparse layers (an earlier
version of our notes attributed them to CLASP by mistake), one layer earlier than SparseVLM prunes (after
them: before 3/7/16 in vtprune's counting); the schedule spends far more compute (its equivalent budget is
well above R) and is never the default.

Fusion is implemented for LLaVA-1.5's tower; on the other families a table that fuses is refused (pass
fusion=False). An image the budget keeps whole is not fused: a keep-all budget leaves the model untouched.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..router import CLASSES, checked, instruction, route
from .base import ImageView, Method, ModelInfo, Stage, scale_layers
from .primitives import farthest_point, same_shape, topk_in_order

CALIBRATION_FILE = "clasp_calibration.json"  # a checkpoint's table, beside its weights (`vtprune calibrate`)
STEP_LAYER = 2  # K: one step, before decoder layer 2 (layers 0..1 see every visual token)
PROGRESSIVE_LAYERS, PROGRESSIVE_DEPTH = (2, 6, 15), 32
PROGRESSIVE_MULTIPLIERS = (2.0, 1.5, 1.0)
DEFAULT_SPLIT = 0.5
CLASS_CACHE_SIZE = 4096  # prompts whose class is remembered (decoding and routing one is host work)
# Strategies A-E: weights of a shallow, a middle and the deep (the model's feature) layer, shallow- to deep-weighted.
FUSION_STRATEGIES = ((0.6, 0.3, 0.1), (0.4, 0.4, 0.2), (1 / 3, 1 / 3, 1 / 3), (0.2, 0.4, 0.4), (0.1, 0.3, 0.6))


def fusion_candidates(own_layer: int, num_states: int) -> list[dict[int, float] | None]:
    """The fusions calibration tries: None (the model's own feature layer), then strategies A-E over the hidden
    states at a quarter and half of the tower's depth and the feature layer (indices as in `hidden_states`)."""
    deep = own_layer % num_states
    shallow, middle = max(1, round(deep / 4)), max(1, round(deep / 2))
    candidates: list[dict[int, float] | None] = [None]
    for weights in FUSION_STRATEGIES:
        mix: dict[int, float] = {}
        for layer, weight in zip((shallow, middle, deep), weights):
            mix[layer] = mix.get(layer, 0.0) + weight  # a shallow tower may give two of them the same layer
        candidates.append(mix)
    return candidates


@dataclass(frozen=True)
class ClassSettings:
    fusion: dict[int, float] | None  # vision hidden-state index -> weight; None: the model's own feature layer
    split: float  # share of each stage's keep given to pivot tokens


def load_calibration(source: str | Path | dict) -> dict[str, ClassSettings]:
    """A table written by `vtprune calibrate --method clasp` (its path, or the table itself): settings per class."""
    path = "the calibration table" if isinstance(source, dict) else Path(source)
    try:
        table = source if isinstance(source, dict) else json.loads(path.read_text())
        settings = {
            name: ClassSettings({int(k): float(v) for k, v in entry["fusion"].items()} if entry.get("fusion") else None,
                                float(entry["split"]))
            for name, entry in table["classes"].items()
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{path} is not a CLASP calibration table ({error}); make one with `vtprune calibrate`") from None
    for name, entry in settings.items():
        problem = _table_problem(name, entry)
        if problem:
            raise ValueError(f"{path} {problem}; make the table with `vtprune calibrate`")
    return settings


def _table_problem(name: str, entry: ClassSettings) -> str | None:
    """What is wrong with one class's row of a calibration table, if anything."""
    if name not in CLASSES:
        return f"names class {name!r}, which the router never gives (classes: {', '.join(CLASSES)})"
    if not 0 <= entry.split <= 1:
        return f"gives class {name!r} a split of {entry.split}, outside [0, 1]"
    weights = list((entry.fusion or {}).values())
    # a mix: weights that summed to 2 would feed the projector twice the features it was trained on
    mix = all(math.isfinite(w) and w >= 0 for w in weights) and math.isclose(sum(weights), 1.0, abs_tol=1e-3)
    if weights and not mix:
        return (f"gives class {name!r} fusion weights {entry.fusion}: they must be finite, >= 0 and sum to 1 "
                "(within 0.001)")
    return None


class CLASP(Method):
    name = "clasp"
    summary = "class-adaptive vision-layer fusion; one step keeps R: pivots by attention + completion by max-min coverage"
    where = "vision features + inside the LLM, before layer K=2"
    needs_attention = True
    without_checkpoint = {"question_class": "general"}  # no tokenizer to read the instruction with

    @classmethod
    def checkpoint_options(cls, folder: Path, processor) -> dict:
        """Routes with the checkpoint's tokenizer, fused and split by the calibration table beside its weights, if any."""
        table = Path(folder) / CALIBRATION_FILE
        return {"tokenizer": processor.tokenizer, **({"calibration": str(table)} if table.exists() else {})}

    @dataclass(frozen=True)
    class Options:
        tokenizer: Any = None  # decodes each prompt for the router (processor.tokenizer)
        question_class: str | None = None  # one class for every sample, instead of routing
        router: Callable[[str], str] | None = None  # instruction text -> class, instead of the built-in rules
        calibration: str | Path | dict | None = None  # a table from `vtprune calibrate --method clasp`
        fusion: bool = True  # False: the projector gets the model's own feature layer (ablation)
        completion: bool = True  # False: pivots only (ablation)
        split: float | None = None  # one pivot share for every class, overriding the table (ablation)
        progressive: bool = False  # the 3-stage schedule (2/6/15 of 32, keeping 2R/1.5R/R) instead of one step
        layers: tuple[int, ...] | None = None  # stage layers instead (default: (2,), or 2/6/15 scaled to depth)
        multipliers: tuple[float, ...] | None = None  # keep per stage, in budgets (default: (1,), or 2/1.5/1)

    @classmethod
    def validate(cls, options: "CLASP.Options") -> None:
        if options.tokenizer is None and options.question_class is None and options.router is None:
            raise ValueError(
                "clasp routes on the instruction's text: pass tokenizer=processor.tokenizer "
                "(with router=callable to route it your way), or question_class=..."
            )
        if options.tokenizer is not None and not callable(getattr(options.tokenizer, "decode", None)):
            raise TypeError(f"clasp's tokenizer decodes each prompt for the router, and a "
                            f"{type(options.tokenizer).__name__} has no decode: pass tokenizer=processor.tokenizer")
        if options.router is not None and options.tokenizer is None and options.question_class is None:
            raise ValueError("clasp's router reads the instruction's text, which needs the tokenizer to decode it: "
                             "pass tokenizer=processor.tokenizer with router=...")
        if options.question_class is not None and options.question_class not in CLASSES:
            raise ValueError(f"question_class must be one of {', '.join(CLASSES)}; got {options.question_class!r}")
        if options.split is not None and not 0.0 <= options.split <= 1.0:
            raise ValueError(f"split is the pivots' share of a stage and must lie in [0, 1]; got {options.split}")
        if options.layers is not None and options.multipliers is not None and \
                len(options.layers) != len(options.multipliers):
            raise ValueError("clasp needs one multiplier per stage layer")
        if options.multipliers is not None and not all(0 < m < float("inf") for m in options.multipliers):
            raise ValueError(f"clasp's multipliers (each stage's tokens as a multiple of the budget) must be > 0 and "
                             f"finite; got {options.multipliers}")
        if options.multipliers is not None and list(options.multipliers) != sorted(options.multipliers, reverse=True):
            raise ValueError(f"clasp's multipliers must not grow from stage to stage (a stage keeps tokens the one "
                             f"before kept); got {options.multipliers}")

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
            if len(self._classes) >= CLASS_CACHE_SIZE:  # a server sees prompt after prompt
                self._classes.clear()
            text = self.options.tokenizer.decode(list(key), skip_special_tokens=True)
            self._classes[key] = self._router(instruction(text))
        return self._classes[key]

    def settings(self, text_ids: torch.Tensor) -> ClassSettings:
        found = self.table.get(self.question_class(text_ids), ClassSettings(None, DEFAULT_SPLIT))
        split = found.split if self.options.split is None else self.options.split
        return ClassSettings(found.fusion if self.options.fusion else None, split if self.options.completion else 1.0)

    def vision_fusion(self, text_ids: torch.Tensor) -> dict[int, float] | None:
        return self.settings(text_ids).fusion

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        progressive = self.options.progressive
        layers = self.options.layers or (scale_layers(PROGRESSIVE_LAYERS, PROGRESSIVE_DEPTH, model.num_layers)
                                         if progressive else (STEP_LAYER,))
        multipliers = self.options.multipliers or (PROGRESSIVE_MULTIPLIERS if progressive else (1.0,))
        if len(layers) != len(multipliers):
            raise ValueError(f"clasp needs one multiplier per stage layer; got layers={layers} multipliers={multipliers}")
        return [Stage(layer, min(num_tokens, max(1, round(budget * m)))) for layer, m in zip(layers, multipliers)]

    def select(self, view: ImageView) -> torch.Tensor:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[ImageView]) -> list[torch.Tensor]:
        pivots = [self._pivots(view) for view in views]
        picks = [None] * len(views)
        # Items of one shape with as many pivots (every image of a LLaVA batch asking one class) grow their
        # completion tokens in one greedy loop.
        for group in same_shape([(v.hidden.shape, v.hidden.dtype, v.keep, p.numel()) for v, p in zip(views, pivots)]):
            first = views[group[0]]
            completion = farthest_point(torch.stack([views[j].hidden for j in group]),
                                        torch.stack([pivots[j] for j in group]), first.keep - pivots[group[0]].numel())
            for j, added in zip(group, completion):
                picks[j] = torch.cat([pivots[j], added])
        return picks

    def _pivots(self, view: ImageView) -> torch.Tensor:
        share = self.settings(view.text).split
        # At least one pivot unless the split says none: coverage grown from nothing starts at
        # the mean, where two tokens are exactly tied and float noise would pick.
        return topk_in_order(view.attention, max(round(share * view.keep), 1 if share > 0 else 0))

