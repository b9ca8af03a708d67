"""The one vocabulary in which the engine and the methods ask questions about a model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..methods.base import Grid, ModelInfo
from ..methods.primitives import apply_rope, last_query_attention, on_device

# The decoders (their config's model_type) whose attention `queries_and_keys` recomputes as they compute it: a pre-norm
# layer (input_layernorm), q and k projections, rotate-half RoPE over the whole head, the module's own scaling. Each
# is checked against its own eager attention (tests/test_primitives.py). Others differ in ways that change which
# tokens score highest: q/k norms (Qwen3, OLMo-2), interleaved or partial RoPE (Cohere; Phi, StableLM, GLM), layers
# without RoPE (SmolLM3), clipped projections (OLMo), fused ones (Phi-3).
REPRODUCED_ATTENTION = ("llama", "mistral", "qwen2", "qwen2_vl_text", "qwen2_5_vl_text", "gemma", "granite")

# Said where a prompt's image placeholders come cut short: generate's chunked prefill is the usual way.
CHUNKED_PREFILL = "a prompt prefilled in chunks (generate's prefill_chunk_size) must hold every image whole in its first chunk"
# What each vision_feature_select_strategy passes to the projector, as a refusal explains it.
FEATURE_STRATEGIES = {"default": "each image's CLS token dropped", "full": "every token the tower outputs"}


@dataclass(frozen=True)
class VisualItem:
    """One image or video of one sample: the positions of its prunable tokens, and the grids they fill.

    runs are (start, length) stretches of positions, in order; the tokens fill `parts`
    one after another, each in (frame, row, col) raster order. Placeholder positions in
    no run (LLaVA-NeXT's row-closing newline tokens) are never pruned nor counted.
    """

    runs: tuple[tuple[int, int], ...]
    parts: tuple[Grid, ...]
    kind: str = "image"  # or "video"

    def __post_init__(self):
        if sum(length for _, length in self.runs) != sum(grid.size for grid in self.parts):
            raise ValueError(f"a visual item's runs {self.runs} do not hold its grids {self.parts}")

    @classmethod
    def grid(cls, start: int, rows: int, cols: int, frames: int = 1, kind: str = "image") -> "VisualItem":
        """A single grid whose tokens are consecutive from start."""
        return cls(((start, frames * rows * cols),), (Grid(rows, cols, frames),), kind)

    @property
    def length(self) -> int:
        return sum(length for _, length in self.runs)

    def positions(self, device=None) -> torch.Tensor:
        """[length] the item's sequence positions, run after run (a few ops however many runs: a LLaVA-NeXT image
        has one per row of its high-resolution grid)."""
        if len(self.runs) == 1:
            start, length = self.runs[0]
            return torch.arange(start, start + length, device=device)
        starts, lengths = (on_device(torch.tensor(column), device) for column in zip(*self.runs))
        shift = starts - (lengths.cumsum(0) - lengths)  # a run's first position minus the tokens before it
        return torch.arange(self.length, device=device) + torch.repeat_interleave(shift, lengths,
                                                                                  output_size=self.length)

    def token_layout(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """[length] part index and [length, 3] (frame, row, col) of each token, in item order."""
        parts, coords = [], []
        for index, grid in enumerate(self.parts):
            n = torch.arange(grid.size, device=device)
            parts.append(torch.full_like(n, index))
            coords.append(torch.stack([n // (grid.rows * grid.cols), n // grid.cols % grid.rows, n % grid.cols], dim=-1))
        return torch.cat(parts), torch.cat(coords)


@dataclass(frozen=True)
class EncodedPlace:
    """Where an item's tokens are in the vision tower's rows (images, anyres tiles, frames), from its first row."""

    count: int  # rows the item takes
    rows: torch.Tensor  # [N] each token's row
    columns: torch.Tensor  # [N] its column among the tower's tokens of that row ([CLS], when any, is 0)
    feature_columns: torch.Tensor  # [N] its column in the projector's input (which may lack [CLS])


def single_row(tokens: int, device) -> EncodedPlace:
    """The place of an item that is the whole of one row after its [CLS] token, which the projector's input lacks
    (a LLaVA image)."""
    features = torch.arange(tokens, device=device)
    return EncodedPlace(1, torch.zeros_like(features), features + 1, features)


def single_row_place(projected: torch.Tensor, received: torch.Tensor) -> EncodedPlace | None:
    """single_row, if the row's projection is what the LLM received."""
    place = single_row(received.shape[0], received.device)
    if projected.shape[0] < 1 or not torch.equal(projected[0, place.feature_columns], received):
        return None
    return place


class Adapter(ABC):
    """Answers model questions for one model family; one subclass (one file) per family."""

    family: ClassVar[str]  # a short name methods may key per-family defaults on
    model_classes: ClassVar[tuple[str, ...]]  # class names, so nothing here imports a model class

    def __init__(self, model: nn.Module):
        self.model = model

    @property
    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives input_ids and the vision inputs."""
        return self.model.model

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack (embeddings excluded from its forward: it receives inputs_embeds)."""
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(self.family, len(self.decoder_layers), self._vision_feature_layer())

    def _vision_feature_layer(self) -> int | None:
        """config.vision_feature_layer (an index into the tower's hidden_states) as an encoder-layer index from the end."""
        index = getattr(self.model.config, "vision_feature_layer", None)
        vision = getattr(self.model.config, "vision_config", None)
        if not isinstance(index, int) or vision is None:
            return None
        return index if index < 0 else index - 1 - vision.num_hidden_layers

    @property
    def attn_implementation(self) -> str:
        return self.language_model.config._attn_implementation

    # The vision_feature_select_strategy the family's grids assume (LLaVA's "default": CLS dropped), if any.
    feature_strategy: ClassVar[str | None] = None

    def check_supported(self) -> None:
        """Raise ValueError for configurations of this family that the engine cannot prune correctly."""
        if (window := sliding_window(self.language_model.config)) is not None:
            raise ValueError(
                f"{type(self.model).__name__}'s language model attends within a sliding window of {window} tokens, "
                "which vtprune does not support (it prunes full-attention decoders); a checkpoint trained without "
                "one has sliding_window=None in its text config")
        strategy = getattr(self.model.config, "vision_feature_select_strategy", None)
        if self.feature_strategy is not None and strategy != self.feature_strategy:
            raise ValueError(
                f"{type(self.model).__name__} with vision_feature_select_strategy={strategy!r} is not supported: "
                f"vtprune lays out the family's grids for {self.feature_strategy!r} "
                f"({FEATURE_STRATEGIES[self.feature_strategy]}), as its checkpoints use"
            )

    def check_decoder_attention(self, method: str) -> None:
        """Raise ValueError where `method`, which scores with a decoder layer's attention or keys, would read them
        wrong: the decoder is not one whose attention the adapter recomputes exactly (REPRODUCED_ATTENTION)."""
        kind = self.language_model.config.model_type
        if kind not in REPRODUCED_ATTENTION:
            raise ValueError(
                f"method {method!r} scores tokens with the language model's attention, which vtprune recomputes as "
                f"{', '.join(REPRODUCED_ATTENTION)} decoders compute it; this model's is a {kind!r} decoder "
                f"({type(self.decoder_layers[0].self_attn).__name__}), whose attention it would read wrong. Methods "
                "that read no decoder attention run on it (e.g. random, divprune, visionzip)")

    @property
    @abstractmethod
    def placeholder_ids(self) -> tuple[int, ...]:
        """The token ids that stand for visual features in input_ids (what a router must not read as text)."""

    @abstractmethod
    def visual_items(self, input_ids: torch.Tensor, model_kwargs: dict[str, Any]) -> list[list[VisualItem]]:
        """Each sample's visual items, in sequence order, from input_ids and the multimodal forward's kwargs."""

    def vision_state_hooks(self, store: dict) -> list:
        raise ValueError(f"vision-layer fusion is not implemented for {type(self.model).__name__}; pass fusion=False")

    # ------------------------------------------------- the vision-encoder stage
    vision_cls: ClassVar[bool] = True  # the tower's rows start with a [CLS] token
    one_row_per_image: ClassVar[bool] = False  # the tower encodes each image whole, in one row (no tiles)

    def vision_encoders(self) -> list[tuple[str, nn.ModuleList]]:
        """(the kind it encodes, its encoder layers) of each vision tower, for methods acting in the encoder."""
        raise ValueError(
            f"methods acting in the vision encoder are not supported on {type(self.model).__name__} "
            "(see the README's table of methods and families)"
        )

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def encoded_place(self, item: VisualItem, projected: torch.Tensor, received: torch.Tensor) -> EncodedPlace | None:
        """Where item's tokens are in the rows `projected` [R, T', D] (the projector's output from the item's first
        row on), found by matching them with the features the LLM received for it, [N, D]; None if they differ.
        Here: the known place, if the rows there hold what the LLM received (a family that must search overrides)."""
        place = self.known_place(item, received.device)
        if place is None:
            raise NotImplementedError
        if projected.shape[0] < place.count or not torch.equal(projected[place.rows, place.feature_columns], received):
            return None
        return place

    def known_place(self, item: VisualItem, device) -> EncodedPlace | None:
        """Where item's tokens are in the rows from its first, where the family's layout alone says it (no features
        searched: what encoded_place would find when it finds anything); None where it must be searched."""
        return None

    def last_query_attention(
        self,
        layer_index: int,
        hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        query_index: torch.Tensor,
        key_mask: torch.Tensor,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Head-averaged attention of each sample's query_index token over all tokens, at decoder layer layer_index.

        Recomputed from the layer's own norm, q/k projections and RoPE, so it needs
        neither eager attention nor output_attentions. hidden [B, n, D] is the layer's
        input; keys [B, kv heads, n, d], where given, are the ones the layer cached (only
        the query is then computed); returns [B, n].
        """
        attn = self.decoder_layers[layer_index].self_attn
        if keys is None:
            query, keys = self.queries_and_keys(layer_index, hidden, position_embeddings, query_index[:, None])
        else:
            query = self.queries_at(layer_index, hidden, position_embeddings, query_index[:, None])
            keys = keys.to(query.device).repeat_interleave(attn.num_key_value_groups, dim=1)
        return last_query_attention(query[:, :, 0], keys, key_mask, attn.scaling)

    def relative_rope(self, hidden: torch.Tensor, position_ids: torch.Tensor | None, valid: torch.Tensor):
        """(cos, sin) at each sample's positions counted from its first real token, for a 1-D RoPE language model
        given [B, n] position_ids; None where the given ones already are (Qwen's M-RoPE counts from each sample's
        first token) or are unknown."""
        if position_ids is None or position_ids.dim() != 2:
            return None
        ids = position_ids.expand(hidden.shape[0], -1)
        first = torch.where(valid, ids, torch.iinfo(ids.dtype).max).amin(dim=1, keepdim=True)
        return self.language_model.rotary_emb(hidden, ids - first)

    def queries_and_keys(self, layer_index: int, hidden: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor], query_rows: torch.Tensor | None = None):
        """Decoder layer layer_index's queries and keys for its input hidden [B, n, D], RoPE applied, keys repeated
        to the query heads: [B, H, n or Q, d] (only each sample's query_rows [B, Q], when given) and [B, H, n, d]."""
        layer = self.decoder_layers[layer_index]
        attn = layer.self_attn
        batch, n, _ = hidden.shape
        normed = layer.input_layernorm(hidden)
        cos, sin = (t.expand(batch, -1, -1) for t in position_embeddings)
        if query_rows is not None:
            query = self.queries_at(layer_index, hidden, position_embeddings, query_rows)
        else:
            query = self._queries(layer_index, hidden, cos, sin, normed)
        keys = attn.k_proj(normed).view(batch, n, -1, attn.head_dim).transpose(1, 2)
        keys = apply_rope(keys, cos, sin).repeat_interleave(attn.num_key_value_groups, dim=1)
        return query, keys

    def queries_at(self, layer_index: int, hidden: torch.Tensor,
                   position_embeddings: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """[B, H, Q, d] decoder layer layer_index's queries (RoPE applied) of each sample's rows [B, Q] of its
        input hidden [B, n, D] only."""
        sample = torch.arange(hidden.shape[0], device=hidden.device)[:, None]
        cos, sin = (t.expand(hidden.shape[0], -1, -1)[sample, rows] for t in position_embeddings)
        return self._queries(layer_index, hidden[sample, rows], cos, sin)

    def _queries(self, layer_index: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 normed: torch.Tensor | None = None) -> torch.Tensor:
        """[B, H, n, d] decoder layer layer_index's queries (RoPE applied) for its input rows hidden [B, n, D]."""
        layer = self.decoder_layers[layer_index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden) if normed is None else normed
        query = attn.q_proj(normed).view(*hidden.shape[:2], -1, attn.head_dim).transpose(1, 2)
        return apply_rope(query, cos, sin)


def place_in_runs(runs: list[list[tuple[int, int]]], layouts, kind: str) -> list[list[VisualItem]]:
    """Items laid out, in order, over each sample's placeholder runs. layouts yields, per item passed,
    a function start -> (the item placed there, the placeholder positions it takes)."""
    layouts = iter(layouts)
    items = []
    for sample_runs in runs:
        sample = []
        for start, length in sample_runs:
            end = start + length
            while start < end:
                layout = next(layouts, None)
                if layout is None:
                    raise ValueError(f"input_ids hold more {kind} tokens than the {kind}s passed")
                item, span = layout(start)
                if start + span > end:
                    raise ValueError(f"the {kind} tokens at position {start} do not match their {kind}'s layout")
                sample.append(item)
                start += span
        items.append(sample)
    if next(layouts, None) is not None:
        raise ValueError(f"more {kind}s were passed than input_ids hold {kind} tokens for")
    return items


def sliding_window(config) -> int | None:
    """The window of a decoder config whose layers (some or all) attend within one, else None. Qwen2 names its
    layers' kinds (layer_types; use_sliding_window off leaves every layer full); Mistral has no layer_types, and a
    sliding_window that is set makes every layer slide."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def split_runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive integers in a sorted 1-D tensor."""
    if positions.numel() == 0:
        return []
    breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
    bounds = [0, *breaks.tolist(), positions.numel()]
    return [(int(positions[a]), b - a) for a, b in zip(bounds[:-1], bounds[1:])]


def whole_images(row: torch.Tensor, token_id: int, rows: int, cols: int) -> list[VisualItem]:
    """The images of one sample whose every image is a run of rows x cols `token_id` placeholders (runs of
    consecutive images are split); a run of another length is an error naming it."""
    items, size = [], rows * cols
    for start, length in split_runs(torch.nonzero(row == token_id).flatten()):
        if length % size:
            raise ValueError(f"a run of {length} image tokens at position {start} is not a whole number of images "
                             f"({size} tokens each; {CHUNKED_PREFILL})")
        items += [VisualItem.grid(start + offset, rows, cols) for offset in range(0, length, size)]
    return items
