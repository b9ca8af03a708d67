"""The state of one pruned prompt: what prefill decided, and what decode steps reuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Adapter, VisualItem
from ..methods import LLM_INPUT, Method, Stage
from ..methods.primitives import on_device
from .layout import FILL, Layout


@dataclass
class Decision:
    """The visual tokens kept at each stage (kept[stage][sample]: original positions) of a prompt."""

    stage_layers: list[int]
    kept: list[list[torch.Tensor]]
    prompt_length: int
    # merged[stage][sample]: (positions, hidden states) that a merging method wrote over kept tokens (a method merging
    # inside the vision tower: every kept token's state at the LLM input, which a replay, running no merges, restores)
    merged: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    # moves[stage][sample]: (positions, the position each was merged into, FILL for none); see `moved`
    moves: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    layer_positions: list[torch.Tensor] = field(default_factory=list)  # see positions_at
    made_for: "Origin | None" = field(default=None, repr=False)  # the prompt it was decided on (replaying checks it)

    def __repr__(self) -> str:
        """Counts, not tensors: printed whole, a decision runs to thousands of positions."""
        kept = [[int(positions.numel()) for positions in stage] for stage in self.kept]
        merges = ", with merges" if any(any(stage) for stage in self.merged) else ""
        return f"Decision(stage_layers={self.stage_layers}, kept_per_sample={kept}, " \
               f"prompt_length={self.prompt_length}{merges})"

    @property
    def moved(self) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """moved[stage][sample]: (positions, positions they were merged into), for pictures of a merge (filtered
        here, when asked, rather than with a host read per item while the prompt is prefilled)."""
        return [[(sources[targets != FILL], targets[targets != FILL]) for sources, targets in stage]
                for stage in self.moves]

    def positions_at(self, layer: int) -> torch.Tensor:
        """[B, n]: the prompt position each row of decoder layer `layer` holds at prefill (-1: a fill slot).

        Under pruning, `output_attentions` / `output_hidden_states` return per-layer tensors
        of the pruned lengths: attentions[layer] is [B, heads, n, n] over these rows, and
        hidden_states[layer + 1] (that layer's output) has these rows. The last hidden
        state and the logits are scattered back to the prompt's length.
        """
        return self.layer_positions[layer]


@dataclass
class PromptText:
    """What a prompt's host copies (input_ids, its 2-D attention mask) say of its text, found once per forward so
    that no stage has to read the device for it."""

    tokens: list[torch.Tensor]  # per sample, on the device: its prompt tokens neither visual nor padding
    positions: list[torch.Tensor]  # per sample, on the device: their positions
    padded: bool  # the mask holds a zero
    padding: list[tuple[int, int]] | None  # per sample, its padding before and after its tokens (None: not at ends)
    ends_with_text: list[bool]  # per sample, whether its last token is text (not a visual placeholder)
    last: list[int]  # per sample, the position of its last token

    @classmethod
    def of(cls, host_ids: torch.Tensor, placeholders: tuple[int, ...], host_mask: torch.Tensor | None,
           device) -> "PromptText":
        valid = torch.ones_like(host_ids, dtype=torch.bool) if host_mask is None else host_mask
        text = valid & ~torch.isin(host_ids, torch.tensor(placeholders))
        counts = text.sum(dim=1).tolist()
        tokens = list(on_device(host_ids[text], device).split(counts))
        positions = list(on_device(torch.nonzero(text)[:, 1], device).split(counts))
        length = host_ids.shape[1]
        first = valid.int().argmax(dim=1).tolist()
        last = (length - 1 - valid.flip(1).int().argmax(dim=1)).tolist()
        at_ends = (valid.sum(dim=1) == torch.tensor(last) - torch.tensor(first) + 1).all()
        padding = [(a, length - 1 - b) for a, b in zip(first, last)] if bool(at_ends) else None
        return cls(tokens, positions, not bool(valid.all()), padding, [bool(text[s, b]) for s, b in enumerate(last)],
                   last)


@dataclass
class Prompt:
    """What a prefill's multimodal forward received, and what was decided for it."""

    input_ids: torch.Tensor
    images: list  # the forward's raw visual inputs and pre-encoded features, None where absent
    fusion: list | None = None  # per image: the vision-layer mix the method chose
    decision: Decision | None = None

    def continued_by(self, other: "Prompt") -> bool:
        """other feeds this prompt followed by more tokens, with the same images."""
        same_images = all(_same(a, b) for a, b in zip(self.images, other.images))
        return same_images and other.input_ids.shape[1] > self.input_ids.shape[1] \
            and _begins(other.input_ids, self.input_ids)


def _begins(longer: torch.Tensor, ids: torch.Tensor) -> bool:
    return longer.shape[0] == ids.shape[0] and longer.shape[1] >= ids.shape[1] \
        and torch.equal(longer[:, : ids.shape[1]].to(ids.device), ids)


@dataclass
class Origin:
    """The prompt a decision was made on, as much of it as a replay checks: its input_ids, and a fingerprint of each
    raw image input (not the images: a decision outlives its request, and must not keep its pixels alive)."""

    input_ids: torch.Tensor
    images: list  # per raw visual input, its fingerprint; None where the forward had none, or encoded features

    @classmethod
    def of(cls, prompt: Prompt) -> "Origin":
        return cls(prompt.input_ids, [_fingerprint(x) if isinstance(x, torch.Tensor) else None for x in prompt.images])

    def may_begin(self, other: Prompt) -> bool:
        """other feeds this prompt, maybe followed by more tokens, and no image input of other's differs from
        this one's where both give it the same way (raw tensors; generate may hand over encoded features instead,
        which are not compared)."""
        images_agree = all(_same_fingerprint(a, _fingerprint(b)) for a, b in zip(self.images, other.images)
                           if a is not None and isinstance(b, torch.Tensor))
        return images_agree and _begins(other.input_ids, self.input_ids)


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # an integer view of each element width


def _fingerprint(x: torch.Tensor) -> tuple:
    """x's shape and dtype, and per row (its first dimension) two integer sums over its elements' bits: plain, and
    weighted by each element's place in the row, computed on x's device (read only when a replay compares them).
    Integer sums are exact in any order (equal tensors, however laid out, agree; a weighted element wraps in its
    own width, the sums are int64) and the weights tell a reordered row (a mirrored image) from its original. It
    runs at every prefill: one product the size of the images (3 ms for 8 LLaVA images on 2 CPU cores)."""
    x = x.detach()
    rows = x.contiguous().view(_BITS[x.element_size()]).reshape(x.shape[0] if x.dim() > 1 else 1, -1)
    place = torch.arange(1, rows.shape[1] + 1, dtype=torch.int32, device=x.device)
    return tuple(x.shape), x.dtype, torch.stack([rows.sum(dim=1), (rows * place).sum(dim=1)])


def _same_fingerprint(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and torch.equal(a[2], b[2].to(a[2].device))


def _same(a, b) -> bool:
    return a is b or (
        isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    )


@dataclass
class Run:
    """One prefill and the decode steps that reuse its decision."""

    adapter: Adapter
    method: Method
    replay: Decision | None  # a decision to apply instead of asking the method
    cache: Any  # the KV cache its prefill fills; None afterwards (the cache then holds the run: `hooks._CacheRun`)
    prompt_mask: torch.Tensor  # [B, L]
    visual: torch.Tensor  # [B, L] bool
    image_of: torch.Tensor  # [B, L] long: the visual item's rank in its sample, -1 for text
    part: torch.Tensor  # [B, L] long: which of its item's grids a token is on
    coords: torch.Tensor  # [B, L, 3] (frame, row, col) on that grid
    sizes: torch.Tensor  # [B, L] tokens each position stands for (merging grows them)
    items: list[list[VisualItem]]
    plans: list[list[list[Stage]]]  # [sample][item] -> stages
    stage_layers: list[int]
    full: Layout  # the prompt as given
    lm_layout: Layout  # what the language model itself runs on
    kv_layouts: list[Layout | None]  # per decoder layer: the tokens its KV cache holds
    layer_layouts: dict[int, Layout | None] = field(default_factory=dict)  # in-LLM stage layer -> layout from there
    kept: list[list[torch.Tensor]] = field(default_factory=list)
    merged: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    moves: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)  # Decision.moves
    attention: torch.Tensor | None = None  # last-query attention for the next stage, over the current layout
    # what that attention is computed from once the stage layer is reached: (layer, input, position embeddings, layout)
    attention_from: tuple | None = None
    probe: dict | None = None  # queries, keys, hidden, scaling, rows (and normed) of the layer a method probes
    probe_from: tuple | None = None  # what a "previous" probe on cached keys is made from, as attention_from
    # decoder layer -> (its input, the layout that input is on), for methods that compare against it
    references: dict[int, tuple[torch.Tensor, Layout]] = field(default_factory=dict)
    reference_layers: set[int] = field(default_factory=set)
    unsliced: torch.Tensor | None = None  # [B, L] visual tokens whose item keeps the early layers' cache whole
    slices_some: bool = False  # some item's pruned tokens leave the early layers' cache too
    keeps_some_whole: bool = False  # some item keeps the early layers' cache whole (its tokens are unsliced)
    # (sample, item) -> its original tokens and the sample's text at the reference layer, once taken
    item_references: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    prompt_text: PromptText | None = None  # what the host copies say of the prompt's text (set by plan_run)
    late_from: int | None = None  # replay of a longer sequence with a sliced cache: positions from here are "decoded"
    late_visible: torch.Tensor | None = None  # [B, L] what those positions may see
    prefill: bool = True
    generated: int = 0  # tokens fed after the prompt
    repeated: int = 0  # tokens the current forward fed again that the cache already held
    ids: torch.Tensor | None = None  # [B, prompt + generated] the conversation's token ids, where known
    tail_valid: torch.Tensor | None = None  # [B, generated] during decode
    step_masks: dict[int, Any] = field(default_factory=dict)  # per-forward cache of built masks / positions
    encoded: list[list[Any]] | None = None  # [sample][item] where a vision-stage method finds it (EncodedItem)
    # (a bool tensor on the device, the error to raise if it is True): checks made without reading the device,
    # read together when the prefill ends
    checks: list[tuple[torch.Tensor, Callable[[], Exception]]] = field(default_factory=list)

    @property
    def text(self) -> list[torch.Tensor]:
        """Per sample: its prompt tokens neither visual nor padding."""
        return self.prompt_text.tokens

    @property
    def input_pruned(self) -> bool:
        return bool(self.stage_layers) and self.stage_layers[0] == LLM_INPUT

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.shape[1]

    @property
    def num_layers(self) -> int:
        return len(self.kv_layouts)

    def layout_at(self, layer: int) -> Layout:
        """The layout decoder layer `layer` runs on during prefill."""
        current = self.lm_layout
        for start, layout in self.layer_layouts.items():
            if start <= layer and layout is not None:
                current = layout
        return current

    def decision(self) -> Decision:
        positions = [self.layout_at(layer).positions for layer in range(self.num_layers)]
        return Decision(self.stage_layers, self.kept, self.prompt_length, self.merged, self.moves, positions)
