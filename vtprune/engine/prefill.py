"""Applying a method's decision while a prompt is prefilled.

A run starts at the language model's input (where an LLM-input stage shrinks the
sequence), narrows the hidden states at each in-LLM stage layer, gives every decoder
layer the mask and positions of the layout it runs on, and ends by scattering the
last hidden states back to the prompt's length so logits stay aligned with input_ids.
"""

from __future__ import annotations

import functools

import torch
import transformers

from ..adapters import Adapter, VisualItem
from ..methods import LLM_INPUT, BlockMergingMethod, ImageView, LayerProbe, Method, Selection, VisionView
from ..methods.primitives import fill_at, on_device, same_shape
from . import cache as kv
from . import vision
from .budget import keeps_whole, tokens_for_budget
from .compat import EngineError
from .compiled import HiddenAccess
from .layout import FILL, Layout, decoder_mask, take, take_positions
from .run import Decision, PromptText, Run


def plan_run(adapter: Adapter, method: Method, budget, replay: Decision | None, items: list[list[VisualItem]],
             text: PromptText, prompt_mask: torch.Tensor, num_layers: int) -> Run:
    """A run's per-token bookkeeping and each visual item's stages, before anything is pruned."""
    batch, length = prompt_mask.shape
    device = prompt_mask.device
    visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
    image_of = torch.full((batch, length), -1, dtype=torch.long, device=device)
    part = torch.zeros(batch, length, dtype=torch.long, device=device)
    coords = torch.zeros(batch, length, 3, dtype=torch.long, device=device)
    unsliced = torch.zeros(batch, length, dtype=torch.bool, device=device)
    info = adapter.model_info
    plans, slicing = [], set()
    tokens = []  # per item, on the host: (sample, position, item index, part, coords, unsliced) of its tokens
    for b, sample in enumerate(items):
        plan = []
        for i, item in enumerate(sample):
            where = item.positions()
            slices = method.slices_kv_cache_of(item.kind, info.family)
            slicing.add(slices)
            tokens.append((torch.full_like(where, b), where, torch.full_like(where, i), *item.token_layout(),
                           torch.full_like(where, not slices, dtype=torch.bool)))
            keep = tokens_for_budget(budget, item.length)
            whole = keeps_whole(budget, item.length)
            plan.append([] if whole else method.item_stages(info, keep, item.length, item.kind))
        plans.append(plan)
    if tokens:  # written into the batch's tensors at once: a few copies to the device, not a few ops per item
        sample, where, index, part_of, coords_of, unsliced_of = (on_device(torch.cat(column), device)
                                                                 for column in zip(*tokens))
        fill_at(visual, (sample, where), True)
        image_of[sample, where], part[sample, where], coords[sample, where] = index, part_of, coords_of
        unsliced[sample, where] = unsliced_of
    full = Layout.full(prompt_mask, tuple(sum(item.length for item in sample) for sample in items))
    run = Run(
        adapter=adapter, method=method, replay=replay, cache=None, prompt_mask=prompt_mask, visual=visual,
        image_of=image_of, part=part, coords=coords, sizes=torch.ones(batch, length, device=device), items=items,
        plans=plans,
        stage_layers=sorted({stage.layer for plan in plans for stages in plan for stage in stages}),
        full=full, lm_layout=full, kv_layouts=[None] * num_layers, prompt_text=text, unsliced=unsliced,
        slices_some=method.slices_kv_cache and True in slicing, keeps_some_whole=False in slicing,
        reference_layers={method.reference_layer(info, item.kind) for sample in items for item in sample}
        if method.needs_reference else set(),
    )
    if replay is not None:
        run.stage_layers = replay.stage_layers
        if run.slices_some and run.prompt_length > replay.prompt_length \
                and replay.kept:
            kept = torch.zeros_like(visual)
            for b, positions in enumerate(replay.kept[-1]):
                fill_at(kept[b], (on_device(positions, device),), True)
            run.late_from = replay.prompt_length
            run.late_visible = ~visual | kept | unsliced
    return run


def prunes(run: Run) -> bool:
    """Whether any stage of any image keeps fewer tokens than the image has (or a decision is replayed)."""
    return run.replay is not None or any(
        stage.keep < item.length
        for plan, sample in zip(run.plans, run.items)
        for stages, item in zip(plan, sample)
        for stage in stages
    )


def expected_kept(run: Run) -> list[int]:
    """Per sample, the visual tokens its images' stages leave for the last decoder layer."""
    if run.replay is not None and run.replay.kept:
        return [int(positions.numel()) for positions in run.replay.kept[-1]]
    return [
        sum(min([item.length, *(stage.keep for stage in stages)]) for stages, item in zip(plan, sample))
        for plan, sample in zip(run.plans, run.items)
    ]


def wants_cache(language_model, kwargs: dict) -> bool:
    """Whether a forward with these kwargs keeps a KV cache."""
    use_cache = kwargs.get("use_cache")  # Qwen2-VL passes None explicitly: the config decides then
    return language_model.config.use_cache if use_cache is None else bool(use_cache)


@functools.cache
def hooks_inside_checkpoint() -> bool:
    """Older transformers (5.17) checkpoint a layer's __call__, with its hooks inside: the backward pass runs
    vtprune's layer hooks again, after the prefill's run is gone. Newer ones checkpoint forward, hooks outside."""
    # (transformers' modeling modules take seconds to import: asked here, not when vtprune is imported)
    from transformers.modeling_layers import GradientCheckpointingLayer

    return "__call__" in vars(GradientCheckpointingLayer)


def checkpointed(decoder_layers) -> bool:
    """Whether transformers runs these layers under gradient checkpointing in this forward, which has them fill
    no KV cache (GradientCheckpointingLayer drops it: the backward pass runs each layer again). Refused where
    the backward pass would run vtprune's hooks again."""
    layer = decoder_layers[0]
    if not (getattr(layer, "gradient_checkpointing", False) and layer.training) \
            or getattr(layer, "_can_checkpoint_with_cache", False):
        return False
    if hooks_inside_checkpoint() and torch.is_grad_enabled():
        raise NotImplementedError(
            f"gradient checkpointing in transformers {transformers.__version__} runs each decoder layer again in "
            "the backward pass with vtprune's hooks inside, after the pruned forward is gone: turn it off "
            "(model.gradient_checkpointing_disable()) or use a transformers that checkpoints a layer's forward (5.24 does)")
    return hooks_inside_checkpoint() or torch.is_grad_enabled()  # (5.17 drops the cache without gradients too)


def begin(run: Run, language_model, kwargs: dict, cache_keyword: str, encoded_calls: list) -> None:
    """Start a run at the language model's input: own the KV cache, and apply an LLM-input stage
    (where a method acting in the vision encoder picks from encoded_calls, the tower runs it saw)."""
    embeds = kwargs["inputs_embeds"]
    if run.method.acts_in_vision and run.replay is None:
        run.encoded = vision.place_items(run.adapter, encoded_calls, run.items, embeds, run.checks)
    batch, length, _ = embeds.shape
    _, run.cache = kv.find_cache(kwargs)
    if checkpointed(run.adapter.decoder_layers):
        run.cache = None  # none is filled (hooks check it stays empty): the run is a forward without one
    elif wants_cache(language_model, kwargs) and run.cache is None:
        # Made here rather than inside the language model, so that decode steps can be told
        # apart from a new prompt by the cache object they carry.
        run.cache = kwargs[cache_keyword] = kv.new_cache(language_model.config)

    if run.input_pruned:
        layout, hidden = narrow(run, 0, run.full, embeds, attention=None)
        index = layout.index_in(run.full)
        kwargs["inputs_embeds"] = hidden
        kwargs["attention_mask"] = layout.valid.long()
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the language model would have made itself
            position_ids = torch.arange(length, device=embeds.device)[None].expand(batch, length)
        kwargs["position_ids"] = take_positions(position_ids, index)
        run.lm_layout = layout
    run.layer_layouts = {layer: None for layer in run.stage_layers if layer != LLM_INPUT}


def hidden_access(run: Run) -> HiddenAccess:
    """What at_layer does to the decoder layers' input hidden states: replaces them at each in-LLM stage; reads them
    at the layer before a stage (what a method's attention or probe is computed from) and at the layers a method
    compares against. (Said alike of a replayed decision, which reads nothing, so that it shares its method's
    compiled segments.)"""
    stages = frozenset(run.layer_layouts)
    return HiddenAccess(replaced=stages, read=frozenset({layer - 1 for layer in stages} | run.reference_layers))


def at_layer(run: Run, index: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Decoder layer `index` is about to run at prefill: prune there if it is a stage, and give it its layout."""
    method = run.method
    if index in run.reference_layers:
        run.references[index] = (hidden, run.layout_at(index - 1))  # before this layer's own stage, if any
    if index in run.layer_layouts:
        if run.attention_from is not None:  # layer index - 1 has run, and cached its keys
            run.attention, run.attention_from = _last_query_attention(run, *run.attention_from), None
        if run.probe_from is not None:
            run.probe, run.probe_from = _probe(run, *run.probe_from, cached=True), None
        if run.replay is None and method.probe_layer == "stage":  # the stage layer's own q/k, before it prunes
            previous = run.layout_at(index - 1)
            cos, sin = kwargs["position_embeddings"]
            moved = previous.index_in(run.lm_layout)
            ids = kwargs.get("position_ids")
            run.probe = _probe(run, index, hidden, (take(cos, moved), take(sin, moved)),
                               None if ids is None else take_positions(ids, moved), previous)
        if run.replay is None and method.probe_normed and run.probe is not None:
            run.probe["normed"] = run.adapter.language_model.norm(hidden)  # what the decoder's final norm makes of it
        hidden = _prune_in_llm(run, index, hidden)
    layout = run.layout_at(index)
    run.kv_layouts[index] = layout
    if layout is not run.lm_layout or run.late_from is not None:
        _substitute_layer_inputs(run, layout, kwargs, hidden)
    if run.replay is None and index + 1 in run.stage_layers:
        if method.needs_attention:
            # Computed when the stage layer is reached: by then this layer has put its keys in the KV cache.
            run.attention_from = (index, hidden, kwargs["position_embeddings"], layout)
        if method.probe_layer == "previous":
            probe_from = (index, hidden, kwargs["position_embeddings"], kwargs.get("position_ids"), layout)
            if method.probe_from_cache:  # made once the stage layer is reached, from the keys this layer will cache
                run.probe_from = probe_from
            else:
                run.probe = _probe(run, *probe_from)
    return hidden


def finish(run: Run, hidden: torch.Tensor) -> torch.Tensor:
    """The last hidden states scattered back to the prompt's length (pruned positions hold zeros)."""
    final = run.layout_at(run.num_layers)
    batch, length = run.prompt_mask.shape
    # Fill slots go to a spare column that is then cut off.
    full = hidden.new_zeros(batch, length + 1, hidden.shape[-1])
    target = torch.where(final.positions == FILL, length, final.positions)
    full.scatter_(1, target[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
    return full[:, :length]


IGNORE_INDEX = -100  # transformers' loss skips labels of this value


def labels_check(run: Run, labels: torch.Tensor):
    """(flag, error) for run.checks: whether a label is predicted from a visual token the method dropped, whose
    logits (those of a zero state, see `finish`) mean nothing, so that a loss would count them."""
    dropped = run.visual & ~run.layout_at(run.num_layers).held(run.prompt_mask.shape[1])
    flag = (dropped[:, :-1] & (labels[:, 1:].to(dropped.device) != IGNORE_INDEX)).any()
    return flag, lambda: ValueError(
        "labels: some follow a visual token the method dropped, whose logits mean nothing (the loss would count "
        f"them): set the label after each visual token to {IGNORE_INDEX}, the ignore index, as a visual token's own")


def _prune_in_llm(run: Run, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    previous = run.layout_at(layer - 1)
    layout, hidden = narrow(run, run.stage_layers.index(layer), previous, hidden, run.attention)
    run.layer_layouts[layer] = layout
    run.attention = run.probe = None
    if run.slices_some and run.cache is not None:
        sliced = {}  # a layout the earlier layers' caches share is narrowed (and its slots found) once
        for earlier in range(layer):
            held = run.kv_layouts[earlier]
            if id(held) not in sliced:
                cached = _cached_after(run, held, layout)
                sliced[id(held)] = cached, None if cached is held else cached.index_in(held)
            cached, index = sliced[id(held)]
            if cached is not held:
                kv.slice_layer(run.cache, earlier, index, held.length)
                run.kv_layouts[earlier] = cached
    return hidden


def _cached_after(run: Run, held: Layout, layout: Layout) -> Layout:
    """What an early layer's KV cache (holding `held`) keeps after a stage: the stage's layout, plus the
    tokens of items whose method keeps their early cache whole (CLSE's videos)."""
    if not run.keeps_some_whole:
        return layout
    kept = []
    for b in range(len(run.items)):
        mine = held.positions[b][held.positions[b] != FILL]
        keep = run.visual[b, mine] & (run.unsliced[b, mine] | torch.isin(mine, layout.positions[b]))
        kept.append(mine[keep])
    return held.narrowed(run.visual, kept, run.prompt_mask)



def narrow(run: Run, stage: int, layout: Layout, hidden: torch.Tensor, attention):
    """Ask the method (or the replayed decision) which visual tokens of `layout` survive `stage`.

    Every item that prunes at this stage is put in one list of views, so that the method selects for the
    whole batch at once (Method.select_batch). Returns the new layout and the hidden states taken into it
    (merged where the method merges).
    """
    layer = run.stage_layers[stage]
    replay = run.replay
    batch = len(run.items)
    if replay is not None:
        kept = [replay.kept[stage][b].to(layout.positions.device) for b in range(batch)]
        merged, moved = replay.merged[stage], replay.moves[stage]
    else:
        kept, merged, moved = _select(run, layer, layout, hidden, attention)
    narrowed = layout.narrowed(run.visual, kept, run.prompt_mask)
    taken = take(hidden, narrowed.index_in(layout))
    writes = [(b, positions, value) for b, values in enumerate(merged) for positions, value in values]
    for group in same_shape([(positions.shape, value.shape) for _, positions, value in writes]):  # written together
        sample, slots = _slots(narrowed, [writes[g][0] for g in group], [writes[g][1] for g in group])
        taken[sample, slots] = torch.stack([writes[g][2].to(taken.dtype) for g in group])
    if replay is None and layer == LLM_INPUT and isinstance(run.method, BlockMergingMethod):
        # A replay runs the tower without the method's merges (its work, not its schedule: see VisionRecorder.paused),
        # so the decision keeps the merged states the language model received at the kept tokens.
        merged = [[] for _ in kept]
        for group in same_shape([positions.shape for positions in kept]):
            sample, slots = _slots(narrowed, group, [kept[b] for b in group])
            for b, values in zip(group, taken[sample, slots]):
                merged[b].append((kept[b], values))
    run.kept.append(kept)
    run.merged.append(merged)
    run.moves.append(moved)
    return narrowed, taken


def _slots(layout: Layout, samples: list[int], positions: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """([G, 1] samples, [G, n] the rows of `layout` holding those samples' positions), for positions of one shape."""
    sample = on_device(torch.tensor(samples), layout.positions.device)[:, None]
    stacked = on_device(torch.stack(positions), layout.positions.device)
    return sample, torch.searchsorted(layout.positions[sample[:, 0]].contiguous(), stacked.contiguous())


def _select(run: Run, layer: int, layout: Layout, hidden: torch.Tensor, attention):
    """Per sample: the kept positions, the merged (positions, hidden) pairs and the (sources, targets) of merges
    (Decision.moves)."""
    batch = len(run.items)
    chosen = [[None] * len(plan) for plan in run.plans]  # [sample][item]: its kept positions
    asked = []  # (sample, item, stage index, keep, slots) of each item the method selects in
    item_slots = _item_slots(run, layout, layer)
    for b in range(batch):
        for i, stages in enumerate(run.plans[b]):
            mine = item_slots[b][i]
            own = [s.layer for s in stages]  # the item's own schedule: a video's may differ from an image's
            keep = stages[own.index(layer)].keep if layer in own else mine.numel()
            if keep >= mine.numel():
                chosen[b][i] = layout.positions[b, mine]
                continue
            asked.append((b, i, own.index(layer), keep, mine))
    rows = _gathered(run, layout, hidden, attention, asked)
    views = [_view(run, b, i, layer, stage, keep, mine, row) for (b, i, stage, keep, mine), row in zip(asked, rows)]
    picks, flawed = _checked_selections(run, views, run.method.select_batch(views) if views else [])
    merged = [[] for _ in range(batch)]
    sources, targets = [[] for _ in range(batch)], [[] for _ in range(batch)]
    answers = [(b, i, row["positions"], picked, view) for (b, i, *_), row, view, picked in zip(asked, rows, views, picks)]
    for group in same_shape([_alike(positions, picked) for _, _, positions, picked, _ in answers]):
        alike = [answers[g] for g in group]
        positions = torch.stack([positions for _, _, positions, _, _ in alike])  # [G, n]
        wrong = torch.stack([flawed[g] for g in group])  # [G]
        if not isinstance(alike[0][3], Selection):
            picked = _sound(torch.stack([picked for *_, picked, _ in alike]), wrong)
            for (b, i, *_), row in zip(alike, positions.gather(1, picked)):
                chosen[b][i] = row
            continue
        selections = [picked for *_, picked, _ in alike]
        kept = positions.gather(1, _sound(torch.stack([picked.keep for picked in selections]), wrong))  # [G, k]
        sample = on_device(torch.tensor([b for b, *_ in alike]), kept.device)[:, None]
        run.sizes[sample, kept] = torch.stack([picked.sizes for picked in selections]).to(run.sizes.dtype)
        destination = torch.stack([picked.destination for picked in selections])
        # FILL: dropped without being merged anywhere (left in, so that no host read is needed here)
        moved_to = torch.where(destination >= 0, kept.gather(1, destination.clamp(min=0)), FILL)
        values = None if selections[0].hidden is None else torch.stack([picked.hidden for picked in selections])
        if values is not None and run.encoded is not None:  # merged projector inputs: project them
            values = run.adapter.projector(values.to(alike[0][4].features.dtype))
        for index, (b, i, *_) in enumerate(alike):
            chosen[b][i] = kept[index]
            sources[b].append(positions[index])
            targets[b].append(moved_to[index])
            if values is not None:
                merged[b].append((kept[index], values[index]))
    empty = layout.positions[0, :0]
    kept = [_joined(row, empty) for row in chosen]
    moved = [(_joined(s, empty), _joined(t, empty)) for s, t in zip(sources, targets)]
    return kept, merged, moved


def _alike(positions: torch.Tensor, picked: torch.Tensor | Selection) -> tuple:
    """What answers must share to be mapped to positions together: the item's size and the answer's kind and shapes
    (a merging one's merged states too)."""
    if not isinstance(picked, Selection):
        return positions.shape, picked.shape
    merged = None if picked.hidden is None else (picked.hidden.shape, picked.hidden.dtype)
    return positions.shape, picked.keep.shape, "selection", merged


def _joined(parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts) if parts else empty


def _item_slots(run: Run, layout: Layout, layer: int) -> list[list[torch.Tensor]]:
    """[sample][item]: the slots of `layout` (the input of stage `layer`) holding the item's tokens, in order. How
    many each holds follows from its stages so far, on the host, so the device is not read."""
    batch, length = layout.positions.shape
    most = max((len(plan) for plan in run.plans), default=0)
    counts = [0] * (batch * most)
    for b, (plan, sample) in enumerate(zip(run.plans, run.items)):
        for i, (stages, item) in enumerate(zip(plan, sample)):
            counts[b * most + i] = min([item.length, *(stage.keep for stage in stages if stage.layer < layer)])
    owner = run.image_of.gather(1, layout.positions.clamp(min=0))
    held = (layout.positions != FILL) & (owner >= 0)
    rank = torch.arange(batch, device=owner.device)[:, None] * most + owner
    group = torch.where(held, rank, batch * most).flatten()  # slots holding no item's token sort last
    found = torch.zeros(batch * most + 1, dtype=torch.long, device=group.device).index_add_(
        0, group, torch.ones_like(group))[:-1]  # a bincount, which would read the device to size its output
    run.checks.append(((found != on_device(torch.tensor(counts), found.device)).any(), lambda: EngineError(
        f"the layout before stage {layer} holds other numbers of its items' tokens than their stages planned")))
    order = torch.sort(group, stable=True).indices[: sum(counts)]  # sample-major, each item's slots in order
    slots = torch.split(order % length, counts)
    return [[slots[b * most + i] for i in range(len(plan))] for b, plan in enumerate(run.plans)]


def _gathered(run: Run, layout: Layout, hidden: torch.Tensor, attention, asked: list) -> list[dict]:
    """Per asked (sample, item, stage, keep, slots): its positions and the run's per-token tensors at them (hidden
    states, coords, parts, sizes, attention, reference states), gathered for items of one size and kind together
    (each item's are rows of the group's tensors: views, not copies)."""
    rows: list = [None] * len(asked)
    kinds = [run.items[b][i].kind for b, i, *_ in asked]
    for group in same_shape([(mine.numel(), kind) for (*_, mine), kind in zip(asked, kinds)]):
        device = layout.positions.device
        sample = on_device(torch.tensor([asked[g][0] for g in group]), device)[:, None]
        slots = torch.stack([asked[g][4] for g in group])
        positions = layout.positions[sample, slots]
        fields = {"positions": positions, "coords": run.coords[sample, positions], "part": run.part[sample, positions]}
        if run.encoded is None:
            fields |= {"hidden": hidden[sample, slots], "sizes": run.sizes[sample, positions],
                       "attention": None if attention is None else attention[sample, slots],
                       "reference": _references(run, sample, positions, kinds[group[0]])}
        for index, g in enumerate(group):
            rows[g] = {name: None if value is None else value[index] for name, value in fields.items()}
    return rows


def _view(run: Run, b: int, i: int, layer: int, stage: int, keep: int, mine: torch.Tensor,
          row: dict) -> ImageView | VisionView:
    """What the method sees of sample b's item i (at slots `mine` of the current layout, its tensors gathered in
    `row`) at its `stage`-th stage."""
    item = run.items[b][i]
    if run.encoded is not None:
        return run.encoded[b][i].view(item, row["coords"], row["part"], keep, i, run.text[b])
    view = ImageView(
        hidden=row["hidden"], coords=row["coords"], part=row["part"], parts=item.parts, keep=keep, layer=layer,
        stage=stage, image_index=i, sizes=row["sizes"], attention=row["attention"], reference=row["reference"],
        text=run.text[b], probe=_layer_probe(run, b, mine),
    )
    if run.references:
        view.item_reference, view.text_reference = _item_references(run, b, i, row["hidden"].device)
    return view


def _references(run: Run, sample: torch.Tensor, positions: torch.Tensor, kind: str) -> torch.Tensor | None:
    """[G, n, D] the tokens at positions [G, n] of samples [G, 1] as they entered the method's reference layer for
    items of this kind."""
    if not run.references:
        return None
    hidden, layout = run.references[run.method.reference_layer(run.adapter.model_info, kind)]
    slots = torch.searchsorted(layout.positions[sample[:, 0]].contiguous(), positions.contiguous())
    return hidden[sample, slots]


def _item_references(run: Run, sample: int, i: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Item i's original tokens and its sample's text tokens as they entered the reference layer (taken once a
    run: every stage sees the same)."""
    if (sample, i) not in run.item_references:
        item = run.items[sample][i]
        at = on_device(torch.tensor([[sample]]), device)
        run.item_references[sample, i] = (_references(run, at, item.positions(device)[None], item.kind)[0],
                                          _references(run, at, run.prompt_text.positions[sample][None], item.kind)[0])
    return run.item_references[sample, i]


def _checked_selections(run: Run, views: list, picks: list) -> tuple[list[torch.Tensor | Selection], list]:
    """The method's answers, each keep as long indices on its view's device, and per answer whether it is flawed
    (a bool on that device). An answer of the wrong length raises here; one with repeated or out-of-range indices
    is found on the device without reading it, and raised when the prefill ends (run.checks): a read here would
    stall a GPU at every stage. Until then a flawed answer is replaced by the view's first tokens (_sound), so that
    the prefill runs on to that check on the shapes it planned."""
    name = run.method.name
    if len(picks) != len(views):
        raise RuntimeError(f"method {name!r} answered {len(picks)} selections for {len(views)} views")
    indices = [on_device((p.keep if isinstance(p, Selection) else p).flatten().long(), v.hidden.device)
               for p, v in zip(picks, views)]
    shapes = [(view.keep, view.hidden.shape[0]) for view in views]  # (keep, tokens)
    wrong = [i for i, (index, (keep, _)) in enumerate(zip(indices, shapes)) if index.numel() != keep]
    if wrong:
        raise _wrong_selection(name, indices[wrong[0]].numel(), *shapes[wrong[0]])
    flawed: list = [None] * len(views)
    for group in same_shape([view.hidden.device for view in views]):
        found = _flawed([indices[i] for i in group], [shapes[i][1] for i in group])
        for index, i in enumerate(group):
            flawed[i] = found[index]

        def error(found=found, group_shapes=[shapes[i] for i in group]) -> RuntimeError:  # (host values only)
            keep, tokens = group_shapes[int(found.int().argmax())]
            return _wrong_selection(name, keep, keep, tokens)

        run.checks.append((found.any(), error))
    answers = [Selection(index, p.hidden, p.sizes, on_device(p.destination, index.device))
               if isinstance(p, Selection) else index for p, index in zip(picks, indices)]
    return answers, flawed


def _wrong_selection(name: str, returned: int, keep: int, tokens: int) -> RuntimeError:
    return RuntimeError(f"method {name!r} returned {returned} indices for a keep of {keep} of {tokens} tokens (they "
                        "must be distinct and in range)")


def _flawed(indices: list[torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """[V] whether each view's indices (all on one device) repeat or fall outside its `tokens`, on that device."""
    device = indices[0].device
    counts = [index.numel() for index in indices]
    owner = torch.repeat_interleave(torch.arange(len(indices)), torch.tensor(counts),  # on the host, moved at once
                                    output_size=sum(counts))
    flat, limit, owner = torch.cat(indices), on_device(torch.tensor(tokens)[owner], device), on_device(owner, device)
    span = max(tokens) + 1
    ranked = (owner * span + flat.clamp(0, span - 1)).sort().values  # a view's indices side by side
    repeated = torch.zeros(len(indices), dtype=torch.long, device=device).index_add_(
        0, ranked[1:] // span, (ranked.diff() == 0).long())
    outside = torch.zeros(len(indices), dtype=torch.long, device=device).index_add_(
        0, owner, ((flat < 0) | (flat >= limit)).long())
    return (repeated + outside) > 0


def _sound(picked: torch.Tensor, flawed: torch.Tensor) -> torch.Tensor:
    """picked [G, k] with each flawed row ([G] bool) replaced by 0..k-1: distinct and in range, so that a wrong
    answer, reported when the prefill ends, keeps the shapes planned until then."""
    first = torch.arange(picked.shape[1], device=picked.device)
    return torch.where(flawed[:, None], first, picked)


def _last_query_attention(run: Run, layer: int, hidden, position_embeddings, layout: Layout) -> torch.Tensor:
    """Each sample's last prompt token's attention over `layout` at decoder layer `layer` (which has run: its
    keys are taken from the KV cache where it holds them, not recomputed)."""
    slots = torch.arange(layout.length, device=hidden.device)
    valid = layout.valid
    query_index = torch.where(valid, slots, -1).amax(dim=1)
    key_mask = valid & (slots[None] <= query_index[:, None])
    keys = kv.layer_keys(run.cache, layer, layout.length)
    return run.adapter.last_query_attention(layer, hidden, position_embeddings, query_index, key_mask, keys)


def _probe(run: Run, layer: int, hidden: torch.Tensor, position_embeddings, position_ids, layout: Layout,
           cached: bool = False) -> dict:
    """Decoder layer `layer`'s keys over every sample, on `layout`, and the queries of the rows that ask (each
    sample's text rows and last row), for LayerProbes. cached: the layer has run, and its keys are taken from the KV
    cache where it holds them (at the model's positions, as the queries then are). Otherwise RoPE is applied at
    sample-relative positions (the first real token at 0) where the model's are 1-D: a plain forward of a left-padded
    batch numbers positions by slot, and key norms (unlike attention) are not invariant to that shift."""
    rows, asking, slots = _probe_rows(run, layout)
    adapter = run.adapter
    attn = adapter.decoder_layers[layer].self_attn
    key = kv.layer_keys(run.cache, layer, layout.length) if cached else None
    if key is not None:
        query = adapter.queries_at(layer, hidden, position_embeddings, slots)
        key = key.to(query.device).repeat_interleave(attn.num_key_value_groups, dim=1)
    else:
        relative = adapter.relative_rope(hidden, position_ids, layout.valid)
        query, key = adapter.queries_and_keys(layer, hidden, relative or position_embeddings, slots)
    return {"query": query, "key": key, "hidden": hidden, "rows": rows, "asking": asking, "scaling": attn.scaling}


def _layer_probe(run: Run, sample: int, mine: torch.Tensor) -> LayerProbe | None:
    """Sample `sample`'s LayerProbe over its tokens present in the probed layout, for the item at slots `mine`."""
    if run.probe is None:
        return None
    probe = run.probe
    present, text, count = probe["rows"][sample]
    visual = mine - present.start if isinstance(present, slice) else torch.searchsorted(present, mine)
    asking = probe["asking"][sample]
    normed = probe.get("normed")
    return LayerProbe(
        asking_query=probe["query"][sample][:, :asking.numel()], key=probe["key"][sample][:, present],
        hidden=probe["hidden"][sample, present], scaling=probe["scaling"], visual=visual,
        text=text, last=count - 1, asking=asking, normed=None if normed is None else normed[sample, present],
    )


def _probe_rows(run: Run, layout: Layout):
    """For a probe of `layout`, per sample: (its slots holding a token (neither padding nor fill), as a slice where
    they are one run (the usual case: fill and padding on one side; a slice takes views, not copies), which of
    those (rows of the sample's LayerProbe) hold text, how many there are); per sample the rows that ask (its text
    rows and its last row, ascending); and the slots of those [B, A], each sample's padded with its last. Their
    counts come from the host where the prompt's text and padding say them (_host_row_counts), else from one read of
    the device for the whole batch."""
    valid = layout.valid
    batch, length = valid.shape
    placeholders = on_device(torch.tensor(run.adapter.placeholder_ids), valid.device)
    text = valid & ~torch.isin(run.ids.gather(1, layout.positions.clamp(min=0)), placeholders)
    row = valid.long().cumsum(dim=1) - 1  # a valid slot's row in its sample
    count = valid.sum(dim=1)
    asks = text | (valid & (row == count[:, None] - 1))
    known = _host_row_counts(run.prompt_text, layout)
    counts, first, last, texts, askings = known if known is not None else torch.stack([
        count, valid.int().argmax(dim=1), length - 1 - valid.flip(1).int().argmax(dim=1), text.sum(dim=1),
        asks.sum(dim=1)]).tolist()

    def ascending(selected: torch.Tensor) -> torch.Tensor:  # [B, L]: each sample's selected slots first, in order
        return torch.argsort((~selected).to(torch.uint8), dim=1, stable=True)

    valid_slots = ascending(valid) if any(b + 1 - a != n for a, b, n in zip(first, last, counts)) else None
    present = [slice(a, b + 1) if b + 1 - a == n else valid_slots[s, :n]
               for s, (a, b, n) in enumerate(zip(first, last, counts))]
    text_rows = row.gather(1, ascending(text))
    widest, asked = max(askings), asks.sum(dim=1, keepdim=True)
    asking_slots = ascending(asks)[:, :widest]
    # padded with the sample's last row (its last asking slot)
    asking_slots = torch.where(torch.arange(widest, device=valid.device) < asked, asking_slots,
                               asking_slots.gather(1, asked - 1))
    asking_rows = row.gather(1, asking_slots)
    rows = [(p, text_rows[s, :t], n) for s, (p, t, n) in enumerate(zip(present, texts, counts))]
    return rows, [asking_rows[s, :a] for s, a in enumerate(askings)], asking_slots


def _host_row_counts(text: PromptText, layout: Layout) -> list[list[int]] | None:
    """_probe_rows' per-sample counts (valid slots, the first and the last, text rows, asking rows) as the host knows
    them: every text and padding token stays in every layout, so where each sample's padding is at its ends, its
    valid slots are one run after its fill and left padding; and where its last token is text, that is its last row
    and its asking rows are its text rows. None where that does not hold."""
    if text.padding is None or not all(text.ends_with_text):
        return None
    texts = [positions.numel() for positions in text.positions]
    counts = [size - before - after for size, (before, after) in zip(layout.sizes, text.padding)]
    first = [layout.length - size + before for size, (before, _) in zip(layout.sizes, text.padding)]
    last = [layout.length - 1 - after for _, after in text.padding]
    return [counts, first, last, texts, texts]


def _substitute_layer_inputs(run: Run, layout: Layout, kwargs, hidden) -> None:
    """Give a decoder layer the mask and positions of its layout at prefill."""
    key = id(layout)
    if key not in run.step_masks:
        late_rows = late_visible = None
        if run.late_from is not None:
            late_rows = layout.positions >= run.late_from
            late_visible = layout.valid & run.late_visible.gather(1, layout.positions.clamp(min=0))
        mask = decoder_mask(layout.valid, hidden.shape[1], run.adapter.attn_implementation, hidden.dtype,
                            late_rows, late_visible, all_valid=not (run.prompt_text.padded or layout.filled))
        index = layout.index_in(run.lm_layout)
        cos, sin = kwargs["position_embeddings"]
        ids = kwargs.get("position_ids")
        positions = ((take(cos, index), take(sin, index)), None if ids is None else take_positions(ids, index))
        run.step_masks[key] = (mask, positions)
    kwargs["attention_mask"], (kwargs["position_embeddings"], kwargs["position_ids"]) = run.step_masks[key]
