"""What a pruning method is, as the engine sees it.

A method says at which stages it acts (decoder layer 0 = the LLM input, before any
decoder layer runs) and how many tokens of an image survive each stage; then, per
image and stage, it picks the survivors from plain tensors in an `ImageView`.
It never touches the model.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import numbers
import os
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .primitives import same_shape

LLM_INPUT = 0  # stage layer meaning "before decoder layer 0"


@dataclass(frozen=True)
class ModelInfo:
    """What a method may know of the model it prunes."""

    family: str  # the adapter's family name, e.g. "llava", "qwen2_vl"
    num_layers: int  # decoder layers
    # the vision-encoder layer (negative index) whose output the projector receives, where there is one
    vision_feature_layer: int | None = None


# The vision layer whose output the projector receives, per family, when the model's config does not say.
FEATURE_LAYER = {"llava_onevision": -1, "qwen2_vl": -1, "qwen2_5_vl": -1}


def feature_layer(model: ModelInfo, layer: int | None = None) -> int:
    """The vision-encoder layer a method reads (an index from the end): `layer` when given, else the one whose
    output the projector receives."""
    if layer is not None:
        return layer
    if model.vision_feature_layer is not None:
        return model.vision_feature_layer
    return FEATURE_LAYER.get(model.family, -2)


def scale_layers(layers: tuple[int, ...], authors_depth: int, depth: int) -> tuple[int, ...]:
    """Stage layers given for a decoder of authors_depth layers, rescaled to depth (distinct, increasing, >= 1)."""
    if depth == authors_depth:
        return tuple(layers)
    scaled, previous = [], 0
    for layer in layers:
        previous = max(previous + 1, round(layer * depth / authors_depth))
        scaled.append(previous)
    return tuple(scaled)


@dataclass(frozen=True)
class Stage:
    layer: int  # the tokens are dropped before this decoder layer runs
    keep: int  # visual tokens of one image that survive this stage


@dataclass(frozen=True)
class Grid:
    """One part of a visual item: its tokens in (frame, row, col) raster order."""

    rows: int
    cols: int
    frames: int = 1

    @property
    def size(self) -> int:
        return self.frames * self.rows * self.cols


@dataclass
class LayerProbe:
    """One decoder layer's queries and keys over a whole sample at prefill, for methods that score with
    text tokens (raters, pivots) or with a stage layer's own attention. Computed from the layer's norm
    and q/k projections with RoPE, so eager and sdpa give the same.

    Rows are the sample's tokens present at that layer (padding excluded), in order. Keys are held for
    every row; queries only for the rows that ask (`asking`: the text rows and the last row), since
    methods score with text or last-token queries and the visual rows' queries are most of the cost."""

    asking_query: torch.Tensor  # [H, Q, d] queries of the rows `asking` (every row when asking is None), RoPE applied
    key: torch.Tensor  # [H, L, d] keys, RoPE applied, repeated to the query heads
    hidden: torch.Tensor  # [L, D] the layer's input hidden states (before its input norm)
    scaling: float  # softmax(query @ key^T * scaling) with a causal mask is the layer's attention
    visual: torch.Tensor  # [N] rows (in L) of the view's tokens, in view order
    text: torch.Tensor  # [T] rows of the prompt's text tokens (neither visual nor padding), in order
    last: int  # row of the prompt's last token
    asking: torch.Tensor | None = None  # [Q] rows whose queries `asking_query` holds, ascending; None: every row
    normed: torch.Tensor | None = None  # [L, D] the decoder's final norm of the stage layer's input (probe_normed)

    def last_query(self) -> torch.Tensor:
        """[H, d] the query of the prompt's last row (the last of `asking`, the largest row: no check, no host read)."""
        return self.asking_query[:, -1 if self.asking is not None else self.last]

    def text_queries(self) -> torch.Tensor:
        """[H, T, d] the queries of the text rows (`asking` holds them all: no check, no host read)."""
        if self.asking is None:
            return self.asking_query[:, self.text]
        return self.asking_query[:, torch.searchsorted(self.asking, self.text.to(self.asking.device))]

    @staticmethod
    def stacked_text_queries(probes: list["LayerProbe"]) -> torch.Tensor:
        """[B, H, T, d] the text rows' queries of probes of one shape, found for all of them at once where their
        asking rows stack (else probe by probe)."""
        asking = [probe.asking for probe in probes]
        if any(rows is None for rows in asking) or len({rows.shape for rows in asking}) > 1:
            return torch.stack([probe.text_queries() for probe in probes])
        asking = torch.stack(asking)
        index = torch.searchsorted(asking, torch.stack([probe.text.to(asking.device) for probe in probes]))
        query = torch.stack([probe.asking_query for probe in probes])  # [B, H, A, d]
        return query.gather(2, index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))

    def queries(self, rows: torch.Tensor) -> torch.Tensor:
        """[H, R, d] the queries of rows `rows` [R]."""
        if self.asking is None:
            return self.asking_query[:, rows]
        rows = rows.to(self.asking.device)
        index = torch.searchsorted(self.asking, rows).clamp(max=self.asking.numel() - 1)
        if not bool((self.asking[index] == rows).all()):
            raise ValueError("a LayerProbe holds the queries of the prompt's text rows and its last row only; "
                             f"asked for rows {rows.tolist()}")
        return self.asking_query[:, index]


@dataclass
class ImageView:
    """One visual item's (an image's or a video's) surviving tokens at one stage.

    An item is one or more parts, each a grid: an image is one (rows, cols) grid; an
    anyres image (LLaVA-NeXT) a base grid and the high-resolution grid (its newline
    tokens are not the item's); a video a (frames, rows, cols) grid.
    """

    hidden: torch.Tensor  # [N, D] hidden states entering the stage layer (projected features at the LLM input)
    coords: torch.Tensor  # [N, 3] (frame, row, col) of each token in its part's grid
    part: torch.Tensor  # [N] which of `parts` each token belongs to
    parts: tuple[Grid, ...]
    keep: int  # how many to return
    layer: int
    stage: int  # 0 for the method's first stage
    image_index: int  # the item's rank within its sample
    sizes: torch.Tensor  # [N] how many original tokens each token stands for (merging methods grow them)
    attention: torch.Tensor | None = None  # [N] last-query attention at the layer before, when the method asks
    reference: torch.Tensor | None = None  # [N, D] the same tokens entering the method's reference_layer, when it asks
    text: torch.Tensor | None = None  # the sample's prompt tokens that are neither visual nor padding
    probe: LayerProbe | None = None  # when the method has a probe_layer
    # when the method needs_reference: every original token of the item, and the sample's text tokens (in the
    # order of probe.text), as they entered the reference layer, whatever earlier stages kept
    item_reference: torch.Tensor | None = None  # [N0, D]
    text_reference: torch.Tensor | None = None  # [T, D]

    @classmethod
    def of_grid(cls, hidden: torch.Tensor, rows: int, cols: int, **fields) -> "ImageView":
        """A whole single-grid image: every token of a rows x cols grid, in raster order."""
        n = torch.arange(rows * cols, device=hidden.device)
        coords = torch.stack([torch.zeros_like(n), n // cols, n % cols], dim=-1)
        return cls(hidden=hidden, coords=coords, part=torch.zeros_like(n), parts=(Grid(rows, cols),), **fields)

    @property
    def whole(self) -> bool:
        """Every token of every part is here, in item order (parts one after another, each in raster order)."""
        return self.hidden.shape[0] == sum(grid.size for grid in self.parts)

    def part_ranges(self) -> list[tuple[int, Grid]]:
        """(first token index, grid) of each part, for a whole view."""
        ranges, start = [], 0
        for grid in self.parts:
            ranges.append((start, grid))
            start += grid.size
        return ranges


@dataclass
class VisionLayer:
    """What one vision-encoder layer computed its attention from, for the rows an item was encoded in.

    A row is one image, anyres tile or video frame of the tower's batch; token 0 of each
    row is the tower's [CLS] token when `cls` is True. Attention is never requested from
    the model: methods compute what they need from these (see primitives.cls_attention).
    """

    query: torch.Tensor  # [R, H, T, d] the layer's queries (bias included, no RoPE in ViTs)
    key: torch.Tensor  # [R, H, T, d]
    scaling: float  # softmax(query @ key^T * scaling) is the layer's attention
    cls: bool

    @classmethod
    def stacked(cls, layers: list["VisionLayer"]) -> "VisionLayer":
        """Several views' layers (one tower, one shape) as one layer of all their rows, in order."""
        return cls(torch.cat([layer.query for layer in layers]), torch.cat([layer.key for layer in layers]),
                   layers[0].scaling, layers[0].cls)


@dataclass
class VisionView:
    """One visual item's tokens as the vision encoder produced them, for a method acting before the projector.

    Tokens are the item's (in item order, as in ImageView); `rows` / `columns` say where
    each one sits in the tower's rows, so per-row quantities ([CLS] attention, keys) can be
    gathered for them. Padding tokens of anyres tiles that never reach the LLM are in the
    rows but not among the item's tokens.
    """

    features: torch.Tensor  # [N, D] what the projector receives for each token (merges are made here)
    coords: torch.Tensor  # [N, 3] (frame, row, col) of each token in its part's grid
    part: torch.Tensor  # [N] which of `parts` each token belongs to
    parts: tuple[Grid, ...]
    rows: torch.Tensor  # [N] the tower row (image, tile, frame) each token was encoded in
    columns: torch.Tensor  # [N] its index among its row's T tokens (the [CLS] token, when any, is 0)
    layers: dict[int, VisionLayer]  # keyed as the method's vision_layers names them (e.g. -2)
    keep: int
    image_index: int
    kind: str = "image"
    text: torch.Tensor | None = None  # the sample's prompt tokens that are neither visual nor padding
    # A BlockMergingMethod's merges in the encoder: the token (index into this view) whose slot each token ended in
    # at the projector's input (itself for a survivor), or -1 where that slot is not one of the item's (a [CLS]).
    merged_into: torch.Tensor | None = None

    @property
    def hidden(self) -> torch.Tensor:
        return self.features

    @staticmethod
    def stacked(views: list["VisionView"], name: int) -> tuple["VisionLayer", torch.Tensor, torch.Tensor]:
        """Views of one shape: their layer `name` as one VisionLayer of all their tower rows, and each token's row in
        it and its column, [B, N] on the features' device."""
        layer = VisionLayer.stacked([view.layers[name] for view in views])
        device = views[0].features.device
        per_view = layer.query.shape[0] // len(views)  # tower rows per item
        rows = torch.stack([view.rows.to(device) for view in views]) + per_view * torch.arange(
            len(views), device=device)[:, None]
        return layer, rows, torch.stack([view.columns.to(device) for view in views])


@dataclass
class Selection:
    """A merging method's answer: the kept tokens, and the hidden states and sizes they carry on with.

    For a method acting in the vision encoder, `hidden` is in the projector's input space
    (VisionView.features); the engine projects it.
    """

    keep: torch.Tensor  # [k] indices into the view's tokens
    hidden: torch.Tensor | None  # [k, D]; None: the kept tokens carry on with their own (merged in the encoder)
    sizes: torch.Tensor  # [k]
    destination: torch.Tensor  # [N] the slot in keep each of the view's tokens went to (-1: dropped, merged nowhere)


def did_you_mean(word: str, names) -> str:
    """What an error appends for a misspelt name: " (did you mean 'NAME'?)" with the nearest of `names`, or ""
    where none is near."""
    near = difflib.get_close_matches(word, sorted(names), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


class Method(ABC):
    """A registered pruning method; subclasses are one file each in vtprune/methods/."""

    name: ClassVar[str]
    summary: ClassVar[str]
    where: ClassVar[str]  # a person's description of where it acts, for `vtprune methods`
    needs_attention: ClassVar[bool] = False
    needs_reference: ClassVar[bool] = False
    # "stage": the view carries a LayerProbe of each stage layer itself (PDrop, SparseVLM score with the layer
    # they prune at); "previous": of the layer before it (DART's keys at layer K-1).
    probe_layer: ClassVar[str | None] = None
    probe_normed: ClassVar[bool] = False  # the probe also carries LayerProbe.normed (DART's similarity states)
    # The method reads the probe's keys only through attention (softmax of query . key), which a shift of every
    # position alike does not change: a "previous" probe then takes the keys its layer has just cached, with queries
    # at the same positions, instead of computing both at sample-relative positions (which key norms need, DART's).
    probe_from_cache: ClassVar[bool] = False
    slices_kv_cache: bool = False  # drop pruned tokens from the KV cache of the layers before each stage too
    # (the default of slices_kv_cache_of, which the engine asks per item)
    fuses_vision_layers: bool = False  # the projector gets a per-sample mix of vision layers (vision_fusion)
    # Picks before the projector (its one stage is at the LLM input, where the rest are dropped): select gets a
    # VisionView, and a merging Selection's hidden states are projector inputs.
    acts_in_vision: ClassVar[bool] = False
    # Options in place of what a checkpoint supplies (checkpoint_options) where the model has none: random weights
    # (tests, the demo, the bench), and the command line's checks of a method's options before anything loads.
    without_checkpoint: ClassVar[dict] = {}

    @classmethod
    def reads_decoder_attention(cls) -> bool:
        """Whether the method scores with a decoder layer's queries and keys (its attention, or its keys' norms)."""
        return cls.needs_attention or cls.probe_layer is not None

    @classmethod
    def checkpoint_options(cls, folder: Path, processor) -> dict:
        """The options a command (eval, show, the lmms-eval plugin) gives this method on the checkpoint in folder,
        loaded with processor: what a user of the Python API passes by hand."""
        return {}

    def vision_layers(self, model: "ModelInfo") -> tuple[int, ...]:
        """For a method that acts_in_vision: the vision-encoder layers (indices into the tower's layers;
        negative counts from the end) whose queries and keys its VisionView carries."""
        return ()

    def check_vision_layers(self, model: "ModelInfo", depth: int, kind: str = "image") -> None:
        """Raise ValueError when a vision layer the method reads is not in a tower of `depth` layers."""
        outside = [name for name in self.vision_layers(model) if not -depth <= name < depth]
        if outside:
            raise ValueError(f"method {self.name!r} reads vision layers {outside}, but the {kind} tower has "
                             f"{depth} layers ({-depth}..{depth - 1})")

    @classmethod
    def kind_refusal(cls, kind: str) -> str | None:
        """Why the method cannot prune visual items of this kind ("image", "video"), or None where it can."""
        return None

    @classmethod
    def fixed_counts(cls, options, kind: str) -> str | None:
        """The option that fixes each stage's token count for items of this kind ("image", "video") whatever the
        budget (which then only decides which items stay whole: those it covers), or None where the budget sets
        them."""
        return None

    def vision_fusion(self, text_ids: torch.Tensor) -> dict[int, float] | None:
        """Weights per vision hidden-state index for a sample's images; None keeps the model's own layer."""
        return None

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
            raise TypeError(f"method {cls.name!r} has no option {', '.join(map(repr, unknown))}"
                            f"{did_you_mean(unknown[0], known)}; its options are: {hint}")
        hints = typing.get_type_hints(cls.Options)
        for key, value in given.items():
            if not _has_type(value, hints[key]):
                raise TypeError(f"method {cls.name!r} option {key!r} must be {_spell(hints[key])}; got {value!r}")
        options = cls.Options(**{key: _python_numbers(value) for key, value in given.items()})
        cls.validate(options)
        return options

    @classmethod
    def validate(cls, options: "Method.Options") -> None:
        """Raise ValueError for options that cannot work on any model."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Options())

    def check_model(self, model: ModelInfo) -> None:
        """Raise ValueError when the options do not fit the model."""
        for kind in ("image", "video"):
            layers = [stage.layer for stage in self.item_stages(model, budget=1, num_tokens=2, kind=kind)]
            for layer in layers:
                if not 0 <= layer < model.num_layers:
                    raise ValueError(
                        f"method {self.name!r} would act before decoder layer {layer} (on {_a(kind)}), "
                        f"but the model has {model.num_layers} layers (0..{model.num_layers - 1})"
                    )
            if layers != sorted(set(layers)):
                raise ValueError(f"method {self.name!r} needs increasing stage layers; got {layers}")
            if (self.needs_attention or self.needs_reference or self.probe_layer) and LLM_INPUT in layers:
                raise ValueError(
                    f"method {self.name!r} scores with an earlier layer's attention: its stage layers must be >= 1")
            if self.needs_reference and any(self.reference_layer(model, kind) >= layer for layer in layers):
                raise ValueError(f"method {self.name!r} needs its reference layer before its stage layers")

    @abstractmethod
    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        """The stages for one image of num_tokens tokens at a nominal budget (tokens kept per image)."""

    def item_stages(self, model: ModelInfo, budget: int, num_tokens: int, kind: str) -> list[Stage]:
        """The stages for one visual item of a kind ("image", "video"); videos may have a schedule of their own."""
        return self.stages(model, budget, num_tokens)

    def reference_layer(self, model: ModelInfo, kind: str) -> int:
        """The decoder layer whose input is an item's `ImageView.reference` (for methods that need one)."""
        return LLM_INPUT

    def slices_kv_cache_of(self, kind: str, family: str) -> bool:
        """Whether an item of this kind's pruned tokens leave the KV cache of the layers before each stage too,
        on a model of this family (ModelInfo.family)."""
        return self.slices_kv_cache

    @abstractmethod
    def select(self, view: ImageView) -> torch.Tensor | Selection:
        """Indices into view's tokens of the view.keep tokens to keep (any order), or a merging Selection."""

    def select_batch(self, views: list) -> list:
        """select for each of one stage's views (every pruned item of every sample in the batch), in order.

        The engine asks once per stage with the whole batch, so that a method whose selection is a loop (a greedy
        pick, rounds of matching) can run it once over stacked views of one shape (`same_shape`) instead of once
        per item. An override must answer what select answers, view by view.
        """
        return [self.select(view) for view in views]


class VisionMethod(Method):
    """A method that picks before the projector: its one stage is at the LLM input, where the rest are dropped."""

    acts_in_vision = True
    where = "vision encoder (before the projector); tokens dropped at the LLM input"

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        return [Stage(LLM_INPUT, budget)]


def _has_type(value: Any, hint: Any) -> bool:
    """Whether value fits an Options annotation (int, float, bool, str, a path, a dict, a callable,
    tuple[X, ...], unions); others (Any: a tokenizer) are the method's to check."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, member) for member in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint is Path:
        return isinstance(value, os.PathLike)
    if hint is dict:
        return isinstance(value, dict)
    if origin is collections.abc.Callable:
        return callable(value)
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        return isinstance(value, tuple) and all(_has_type(item, typing.get_args(hint)[0]) for item in value)
    return True


def _python_numbers(value: Any) -> Any:
    """numpy's numbers as Python's (in tuples too): options reach torch calls that take Python's only
    (Generator.manual_seed refused random's seed=np.int64(3))."""
    if isinstance(value, tuple):
        return tuple(_python_numbers(item) for item in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _spell(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_spell(member) for member in typing.get_args(hint))
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {_spell(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is collections.abc.Callable:
        return "a callable"
    return {type(None): "None", bool: "True or False", int: "an int", float: "a number", str: "a str",
            Path: "a path", dict: "a dict"}.get(hint, getattr(hint, "__name__", str(hint)))


@dataclass
class BlockInput:
    """One encoder block's surviving tokens, between its attention and its MLP, for a BlockMergingMethod.

    Rows are the tower's (images, tiles, frames); each has n survivors in the method's own order
    (the [CLS] token first when `cls`). Attention is softmax(query @ key^T * scaling), over the
    survivors, plus log(size) when the method uses proportional attention.
    """

    hidden: torch.Tensor  # [R, n, D] the block's residual stream after attention (what the MLP would get)
    query: torch.Tensor | None  # [R, H, n, d] the block's attention queries (None: the method reads none) and keys
    key: torch.Tensor  # [R, H, n, d]
    scaling: float
    size: torch.Tensor  # [R, n] tokens each survivor stands for
    cls: bool
    columns: torch.Tensor  # [R, n] each survivor's column in its row: [CLS] 0, then patches in raster order
    grid: tuple[int, int]  # the rows x columns of a row's patches


@dataclass
class BlockMerge:
    """A BlockMergingMethod's answer for one block: which survivors stay, in what order, and what they hold."""

    order: torch.Tensor  # [R, n'] indices into the block's n survivors, in their new order
    into: torch.Tensor  # [R, n] the new slot (index into order) each old survivor's tokens now belong to
    hidden: torch.Tensor  # [R, n', D] the new survivors' states
    size: torch.Tensor  # [R, n']


class BlockMergingMethod(VisionMethod):
    """A method that merges tokens inside the vision encoder's blocks, between attention and MLP (ToMe, FiCoCo-V).

    The engine runs `merge` at each block of `merge_schedule` on every row of the tower's batch,
    keeps merged-away tokens out of all later attention, and the item's survivors at the
    projector's input are what reaches the LLM (their own, merged, states).
    """

    proportional_attention: ClassVar[bool] = False  # later blocks add log(size) to the attention logits (ToMe)
    reads_queries: ClassVar[bool] = True  # `merge` reads the block's queries (False: BlockInput.query is None)

    @classmethod
    def kind_refusal(cls, kind: str) -> str | None:
        if kind == "image":
            return None
        return (f"method {cls.name!r} merges inside the vision tower to a count per image; it does not support "
                f"{kind}s (see the README's table)")

    @abstractmethod
    def merge_schedule(self, model: ModelInfo, layers: int, patches: int, keep: int) -> dict[int, int]:
        """Tokens to merge away at each encoder layer (index into a tower of `layers`), so that a row of
        `patches` patch tokens keeps `keep` of them at the projector's input."""

    @abstractmethod
    def merge(self, block: BlockInput, r: int) -> BlockMerge:
        """Merge r of each row's survivors away."""

    def select(self, view: VisionView) -> Selection:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[VisionView]) -> list[Selection]:
        """The survivors of the encoder's merges (the tokens merged into themselves, view.keep of each item), for
        the items of one size and keep together; with no host read (a wrong count shows as an index out of range,
        which the engine refuses)."""
        picks: list = [None] * len(views)
        for group in same_shape([(view.merged_into.shape, view.merged_into.device, view.keep) for view in views]):
            into = torch.stack([views[i].merged_into for i in group])  # [B, n]
            (batch, n), keep, device = into.shape, views[group[0]].keep, into.device
            own = torch.arange(n, device=device).expand(batch, n)
            kept = torch.where(into == own, own, n).sort(dim=1).values[:, :keep]  # survivors, ascending
            slot = torch.full((batch, n + 1), -1, dtype=torch.long, device=device)
            slot.scatter_(1, kept, torch.arange(keep, device=device).expand(batch, keep))
            destination = torch.where(into >= 0, slot.gather(1, into.clamp(min=0)), into)
            sizes = torch.zeros(batch, keep, device=device).scatter_add_(
                1, destination.clamp(min=0), (destination >= 0).float())
            for i, parts in zip(group, zip(kept, sizes, destination)):
                picks[i] = Selection(parts[0], None, parts[1], parts[2])
        return picks


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
