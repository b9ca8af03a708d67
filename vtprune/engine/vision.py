"""The vision-encoder stage: what a method acting before the projector sees, and how its choice lands.

While the vision encoder runs, hooks keep the queries and keys of the layers the method
names (computed from each layer's own projections, so eager and sdpa towers give the
same) and the projector's input. The decision itself is made at the LLM input, where
every item's placeholder positions are known: each item's tokens are found in the
encoded rows (an image, an anyres tile, a video frame), the method picks (and may merge,
in the projector's input space), merged tokens are projected, and the LLM-input stage
drops the rest. Placeholders, mask and positions thus shrink the same way as for any
LLM-input method, and every kept token keeps its own position.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import Adapter, VisualItem
from ..adapters.base import EncodedPlace
from ..methods import BlockMergingMethod, Method, VisionLayer, VisionView
from ..methods.primitives import on_device
from .block_merge import BlockMerging, TowerMerge, tower_attention_inputs
from .compat import EngineError, UnsupportedUseError


@dataclass
class EncodedCall:
    """One run of a vision tower and the projector after it."""

    kind: str  # "image" or "video": what the tower encoded
    layers: dict[int, VisionLayer] = field(default_factory=dict)  # keyed by the method's layer names
    features: torch.Tensor | None = None  # [R, T', D] the projector's input
    projected: torch.Tensor | None = None  # [R, T', D_llm] its output
    merge: TowerMerge | None = None  # a BlockMergingMethod's merges in this run (None: it merged nothing)


class VisionRecorder:
    """Hooks that keep, per tower run, the q/k of the method's vision layers and the projector's input and output."""

    def __init__(self, adapter: Adapter, method: Method, budget: int | float):
        self.adapter, self.method = adapter, method
        # While a decision is replayed the tower runs as the model's own: the q/k the method scores with and a
        # BlockMergingMethod's merges are its work, which a replay (the bench's schedule oracle) leaves out.
        self.paused = False
        self.calls: list[EncodedCall] = []
        self._pending: EncodedCall | None = None  # a tower run whose projector has not run yet
        self._projecting: EncodedCall | None = None
        self.handles = []
        names = method.vision_layers(adapter.model_info)
        towers = adapter.vision_encoders()
        for kind, layers in towers:  # all checked before any hook is in place
            method.check_vision_layers(adapter.model_info, len(layers), kind)
        if isinstance(method, BlockMergingMethod) and not adapter.one_row_per_image:
            raise ValueError(f"method {method.name!r} merges inside the vision tower to a count per row, which needs "
                             f"one tower row per image; {type(adapter.model).__name__} cuts images into tiles "
                             "(see the README's table of methods and families)")
        for kind, layers in towers:
            self.handles.append(layers[0].register_forward_pre_hook(self._start_hook(kind)))
            for name in names:
                self.handles.append(layers[name].self_attn.register_forward_pre_hook(self._layer_hook(name), with_kwargs=True))
        if isinstance(method, BlockMergingMethod):  # after the start hooks: a run's merges live in its call
            self.handles += BlockMerging(self, towers, method, adapter.model_info, budget, adapter.vision_cls).handles
        projector = adapter.projector
        self.handles.append(projector.register_forward_pre_hook(self._before_projector))
        self.handles.append(projector.register_forward_hook(self._after_projector))

    @property
    def running(self) -> EncodedCall | None:
        """The tower run in progress (its projector has not run yet), for hooks inside the tower's blocks."""
        return self._pending

    def _start_hook(self, kind: str):
        def hook(module, args):
            if not self.paused and _replayed_in_backward(module, args):
                raise ValueError(
                    f"method {self.method.name!r} works on the vision tower's run (its hooks record the tower's "
                    "layers, or merge inside them), which gradient checkpointing would run again in the backward "
                    "pass without that run (wrong gradients or a CheckpointError; a frozen tower too, when "
                    "checkpointing made its inputs require grad): turn checkpointing off in the tower (its layers' "
                    "gradient_checkpointing = False), or run it in eval mode")
            self._pending = None if self.paused else EncodedCall(kind)

        return hook

    def _layer_hook(self, name: int):
        def hook(module, args, kwargs):
            if self._pending is None:
                return
            query, key, scaling = tower_attention_inputs(module, args[0] if args else kwargs["hidden_states"])
            self._pending.layers[name] = VisionLayer(query, key, scaling, self.adapter.vision_cls)

        return hook

    def _before_projector(self, module, args):
        # The engine's own projection of merged tokens comes with no tower run before it: not a call.
        self._projecting, self._pending = self._pending, None
        if self._projecting is not None:
            self._projecting.features = args[0]

    def _after_projector(self, module, args, output):
        call, self._projecting = self._projecting, None
        if call is not None:
            call.projected = output
            self.calls.append(call)

    def take(self) -> list[EncodedCall]:
        """The calls recorded since the last take (a prefill's images, encoded by its forward or ahead of it)."""
        calls, self.calls = self.calls, []
        return calls

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.calls, self._pending, self._projecting = [], [], None, None


def place_items(adapter: Adapter, calls: list[EncodedCall], items: list[list[VisualItem]],
                embeds: torch.Tensor, checks: list) -> list[list["EncodedItem"]]:
    """Each item's place in the recorded rows of its kind, checked against the features the LLM received: at once
    where it had to be searched, else on the device, the check appended to `checks` (Run.checks) to be read when
    the prefill ends."""
    by_kind: dict[str, list[EncodedCall]] = {}
    for call in calls:
        by_kind.setdefault(call.kind, []).append(call)
    encoded = {kind: _concatenated(group) for kind, group in by_kind.items()}
    projected = {kind: call.projected.to(embeds.dtype) for kind, call in encoded.items()}  # as the LLM received it
    alike = _placed_alike(adapter, encoded, projected, items, embeds, checks)
    if alike is not None:
        return alike
    next_row = dict.fromkeys(encoded, 0)
    placed, seen = [], []  # seen: (sample, item, its EncodedItem) of every item placed so far
    for b, sample in enumerate(items):
        row = []
        for item in sample:
            call = encoded.get(item.kind)
            if call is None:
                raise UnsupportedUseError(
                    f"a {item.kind} reached the language model, but vtprune saw no vision-tower run encode it since "
                    "the last forward: features encoded ahead serve the one forward after them, encoded with the "
                    "pruner applied (encode them again for another)")
            start = next_row[item.kind]
            received = embeds[b, item.positions(embeds.device)]
            place = adapter.encoded_place(item, projected[item.kind][start:], received)
            if place is not None:
                next_row[item.kind] = start + place.count
                found = EncodedItem(call, start, place)
            else:
                # generate's beams and num_return_sequences repeat each sample after its images were encoded once:
                # a repeat's features are an earlier item's, exactly
                found = next((done for c, earlier, done in seen if earlier.kind == item.kind
                              and torch.equal(embeds[c, earlier.positions(embeds.device)], received)), None)
                if found is None:
                    raise EngineError(f"vtprune cannot find the {item.kind} of sample {b} at position "
                                      f"{item.runs[0][0]} among the vision tower's rows (from row {start}): its "
                                      "features differ from every candidate's")
            seen.append((b, item, found))
            row.append(found)
        placed.append(row)
    for kind, call in encoded.items():
        if next_row[kind] != call.features.shape[0]:
            raise UnsupportedUseError(
                f"the vision tower encoded {call.features.shape[0]} {kind} rows since the last forward, but the "
                f"prompt's {kind}s take {next_row[kind]} (vtprune takes every tower run since the last forward for "
                "this one's: where the model's get_image_features ran on other images in between, run it just "
                "before the forward its features are for)")
    return placed


def _placed_alike(adapter: Adapter, encoded: dict, projected: dict, items: list[list[VisualItem]],
                  embeds: torch.Tensor, checks: list) -> list[list["EncodedItem"]] | None:
    """Each item placed in the rows after the previous item of its kind, as that one was when their grids are the
    same (a batch of images of one size: one search by the adapter, then one comparison for all the others, however
    many); None when an item is not found so (a repeated sample of generate's beams, a layout the assumption does
    not fit), and the items are then found one by one. Where the family's layout alone says an item's place
    (Adapter.known_place) and the rows are as many as the items take, the model itself filled the items with the
    rows in this order: no search, and the comparison is appended to `checks` instead of read here."""
    next_row = dict.fromkeys(encoded, 0)
    previous: dict = {}  # kind -> (grids, place) of the last item the adapter placed
    placed, assumed = [], {}  # assumed: id(place) -> (place, kind, known, [(sample, item, first row)])
    for b, sample in enumerate(items):
        row = []
        for item in sample:
            call = encoded.get(item.kind)
            if call is None:
                return None
            start = next_row[item.kind]
            grids, place = previous.get(item.kind, (None, None))
            if grids == item.parts and start + place.count <= call.features.shape[0]:
                assumed[id(place)][3].append((b, item, start))
            else:
                place = adapter.known_place(item, embeds.device)
                if place is not None and start + place.count <= call.features.shape[0]:
                    assumed[id(place)] = (place, item.kind, True, [(b, item, start)])
                else:
                    place = adapter.encoded_place(item, projected[item.kind][start:],
                                                  embeds[b, item.positions(embeds.device)])
                    if place is None:
                        return None
                    assumed[id(place)] = (place, item.kind, False, [])
                previous[item.kind] = (item.parts, place)
            next_row[item.kind] = start + place.count
            row.append(EncodedItem(call, start, place))
        placed.append(row)
    if any(next_row[kind] != call.features.shape[0] for kind, call in encoded.items()):
        return None
    for place, kind, known, found in assumed.values():  # what the adapter would have compared, for all at once
        if not found:
            continue
        sample = on_device(torch.tensor([b for b, _, _ in found]), embeds.device)[:, None]
        positions = on_device(torch.stack([item.positions() for _, item, _ in found]), embeds.device)
        first = on_device(torch.tensor([start for _, _, start in found]), place.rows.device)[:, None]
        rows, received = projected[kind][first + place.rows, place.feature_columns], embeds[sample, positions]
        if not known:
            if not torch.equal(rows, received):
                return None
            continue
        checks.append(((rows != received).any(), lambda kind=kind: EngineError(
            f"the vision tower's {kind} rows are not the features the language model received at the prompt's "
            f"{kind} placeholders, in order: vtprune cannot tell which tokens a method scored")))
    return placed


@dataclass
class EncodedItem:
    """Where one visual item's tokens are in the rows of its call."""

    call: EncodedCall
    first_row: int
    place: "EncodedPlace"

    def view(self, item: VisualItem, coords, part, keep: int, index: int, text) -> VisionView:
        rows = slice(self.first_row, self.first_row + self.place.count)
        layers = {name: VisionLayer(layer.query[rows], layer.key[rows], layer.scaling, layer.cls)
                  for name, layer in self.call.layers.items()}
        place = self.place
        return VisionView(
            features=self.call.features[rows][place.rows, place.feature_columns], coords=coords, part=part,
            parts=item.parts, rows=place.rows, columns=place.columns, layers=layers, keep=keep, image_index=index,
            kind=item.kind, text=text, merged_into=self._merged_into(rows),
        )

    def _merged_into(self, rows: slice) -> torch.Tensor | None:
        """Per token of the item, the item's token whose column its merges ended in (-1: a column not the item's)."""
        merge, place = self.call.merge, self.place
        if merge is None:
            return None
        slot = merge.slot[rows].to(place.rows.device)
        token_at = torch.full(slot.shape, -1, dtype=torch.long, device=slot.device)
        token_at[place.rows, place.columns] = torch.arange(place.rows.numel(), device=slot.device)
        return token_at[place.rows, slot[place.rows, place.columns]]


def _concatenated(calls: list[EncodedCall]) -> EncodedCall:
    if len(calls) == 1:
        return calls[0]
    layers = {
        name: VisionLayer(torch.cat([c.layers[name].query for c in calls]), torch.cat([c.layers[name].key for c in calls]),
                          first.scaling, first.cls)
        for name, first in calls[0].layers.items()
    }
    merge = None
    if any(c.merge is not None for c in calls):  # every run of a kind merges alike: the same rows, the same schedule
        merge = TowerMerge({}, *(torch.cat([getattr(c.merge, name) for c in calls])
                                 for name in ("alive", "position", "size")))
    return EncodedCall(calls[0].kind, layers, torch.cat([c.features for c in calls]),
                       torch.cat([c.projected for c in calls]), merge)


def _replayed_in_backward(layer, args) -> bool:
    """Whether gradient checkpointing will run this tower layer again in the backward pass (transformers'
    GradientCheckpointingLayer checkpoints in training mode with gradients on, when something needs them)."""
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled()):
        return False
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or \
        any(p.requires_grad for p in layer.parameters())
