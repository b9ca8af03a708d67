"""The only code that touches a running model: hooks that apply a method's decisions.

Three kinds of forward pre-hook, all removable:
- on the multimodal model: reads input_ids (and the vision kwargs) to find each
  sample's image spans;
- on the language model: starts a run at prefill; a method acting at the LLM input
  (stage layer 0) shrinks inputs_embeds, the 2-D mask and the position ids here, so
  every decoder layer and the KV cache see the short sequence; a forward post-hook
  scatters the output back to the prompt's length so logits stay aligned with input_ids;
- on each decoder layer: an in-LLM stage at layer K drops (or merges) tokens from the
  hidden states there, and every layer from K on gets position embeddings, position
  ids and a 4-D mask for its own, shorter layout. Layers before K keep their full KV
  cache unless the method slices it to the kept tokens.

Prefill decides; decode reuses the decision (the run is tied to the cache object),
with each layer's mask built from the layout of that layer's cache. Kept tokens keep
their original positions.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from ..adapters import Adapter, ImageSpan
from ..methods import LLM_INPUT, ImageView, Method, Selection, Stage
from .budget import tokens_for_budget
from .layout import FILL, Layout, decoder_mask, take, take_positions
from .stats import PruneStats, counts_per_layer

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass
class Decision:
    """The visual tokens kept at each stage (kept[stage][sample]: original positions) of a prompt."""

    stage_layers: list[int]
    kept: list[list[torch.Tensor]]
    prompt_length: int
    # merged[stage][sample]: (positions, hidden states) that a merging method wrote over kept tokens
    merged: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    # moved[stage][sample]: (positions, positions they were merged into), for pictures of a merge
    moved: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)


@dataclass
class _Run:
    """One prefill and the decode steps that reuse its decision."""

    cache: Any
    prompt_mask: torch.Tensor  # [B, L]
    visual: torch.Tensor  # [B, L] bool
    image_of: torch.Tensor  # [B, L] long: the image's rank in its sample, -1 for text
    coords: torch.Tensor  # [B, L, 2] (row, col) on the image's grid
    sizes: torch.Tensor  # [B, L] tokens each position stands for (merging grows them)
    spans: list[list[ImageSpan]]
    plans: list[list[list[Stage]]]  # [sample][image] -> stages
    stage_layers: list[int]
    full: Layout  # the prompt as given
    lm_layout: Layout  # what the language model itself runs on
    kv_layouts: list[Layout | None]  # per decoder layer: the tokens its KV cache holds
    layer_layouts: dict[int, Layout | None] = field(default_factory=dict)  # in-LLM stage layer -> layout from there
    kept: list[list[torch.Tensor]] = field(default_factory=list)
    merged: list[list[list[tuple[torch.Tensor, torch.Tensor]]]] = field(default_factory=list)
    moved: list[list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=list)
    attention: torch.Tensor | None = None  # last-query attention for the next stage, over the current layout
    reference: torch.Tensor | None = None  # layer-0 input, for methods that compare against it
    text: list[torch.Tensor] = field(default_factory=list)  # per sample: prompt tokens neither visual nor padding
    late_from: int | None = None  # replay of a longer sequence with a sliced cache: positions from here are "decoded"
    late_visible: torch.Tensor | None = None  # [B, L] what those positions may see
    prefill: bool = True
    generated: int = 0  # tokens fed after the prompt
    tail_valid: torch.Tensor | None = None  # [B, generated] during decode
    step_masks: dict[int, Any] = field(default_factory=dict)  # per-forward cache of built masks / positions

    @property
    def input_pruned(self) -> bool:
        return bool(self.stage_layers) and self.stage_layers[0] == LLM_INPUT

    @property
    def prompt_length(self) -> int:
        return self.prompt_mask.shape[1]

    def layout_at(self, layer: int) -> Layout:
        """The layout decoder layer `layer` runs on during prefill."""
        current = self.lm_layout
        for start, layout in self.layer_layouts.items():
            if start <= layer and layout is not None:
                current = layout
        return current


class Pruner:
    """The handle `vtprune.apply` returns: hooks on one model, removable, with the last prefill's stats."""

    def __init__(self, model, adapter: Adapter, method: Method, budget: int | float):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self.last_stats: PruneStats | None = None
        self.last_decision: Decision | None = None
        self._replay: Decision | None = None
        self._spans: list[list[ImageSpan]] | None = None
        self._text: list[torch.Tensor] | None = None  # per sample of the forward being run: its prompt's text ids
        self._fusion: list[dict[int, float] | None] | None = None  # per image of the forward being run
        self._vision_states: dict = {}
        self._run: _Run | None = None
        self._info = adapter.model_info
        self._num_layers = self._info.num_layers
        # Fusion first: a model that cannot fuse refuses before any other hook is in place.
        self._handles = adapter.vision_state_hooks(self._vision_states) if method.fuses_vision_layers else []
        if method.fuses_vision_layers:
            self._handles.append(adapter.projector_fusion_hook(self._vision_states, lambda: self._fusion))
        self._handles += [
            adapter.multimodal_model.register_forward_pre_hook(self._on_multimodal_forward, with_kwargs=True),
            adapter.language_model.register_forward_pre_hook(self._on_language_model_forward, with_kwargs=True),
            adapter.language_model.register_forward_hook(self._after_language_model_forward, with_kwargs=True),
        ]
        for index, layer in enumerate(adapter.decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(self._decoder_layer_hook(index), with_kwargs=True))

    # ----------------------------------------------------------------- public
    def remove(self) -> None:
        """Take every hook off the model; it then computes exactly as before apply()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._run = self._text = self._fusion = None
        self._vision_states.clear()
        if getattr(self.model, "_vtprune_pruner", None) is self:
            del self.model._vtprune_pruner

    def __enter__(self) -> "Pruner":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def replaying(self, decision: Decision):
        """Prefills inside this block keep exactly decision's tokens instead of asking the method.

        A prefill longer than the decision's prompt treats the extra tokens as decoded
        ones: with a sliced KV cache they see only the kept prompt tokens, as they did
        when decoded. So a cached generation can be checked against recomputation.
        """
        self._replay = decision
        try:
            yield self
        finally:
            self._replay = None

    def __repr__(self) -> str:
        return f"Pruner(method={self.method.name!r}, budget={self.budget!r}, options={self.method.options})"

    # ------------------------------------------------------------------ hooks
    def _on_multimodal_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self._fusion = self._text = None
        # Placeholder ids without images to go with them (a decode step that happened to
        # generate one) are plain text to the model, and so to the pruner.
        if kwargs.get("pixel_values") is None and encoded.get("image") is None:
            self._spans = None
        elif input_ids is None:
            raise ValueError("vtprune finds the visual tokens from input_ids; pass input_ids (not inputs_embeds) with images")
        else:
            self._spans = self.adapter.image_spans(input_ids, kwargs)
            mask = kwargs.get("attention_mask")
            self._text = [text_tokens(input_ids[b], sample, mask, b) for b, sample in enumerate(self._spans)]
            if self.method.fuses_vision_layers:
                self._fusion = [self.method.vision_fusion(text) for text, sample in zip(self._text, self._spans)
                                for _ in sample]
                self.adapter.refuse_encoded_images(kwargs, self._vision_states, self._fusion)
        return None

    def _on_language_model_forward(self, module, args, kwargs):
        spans, self._spans = self._spans, None
        self._fusion = None  # the images of this forward are encoded by now
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        has_images = spans is not None and any(spans)
        if past == 0:
            self._run = None
            if has_images:
                return self._start_run(module, args, kwargs, spans)
            batch = kwargs["inputs_embeds"].shape[0]
            self.last_stats = PruneStats([[0] * self._num_layers] * batch, [0] * batch, [0] * batch, self.budget)
            self.last_decision = None
            return None
        if has_images:
            raise NotImplementedError("vtprune cannot prune images added to a prompt that already has a KV cache")
        run = self._run
        if run is None or run.cache is not cache:  # a cache this pruner did not fill: leave it alone
            self._run = None
            return None
        return self._continue_run(run, args, kwargs)

    def _after_language_model_forward(self, module, args, kwargs, output):
        run = self._run
        if run is None or not run.prefill:
            return output
        final = run.layout_at(self._num_layers)
        self._record_stats(run)
        run.prefill = False
        run.step_masks = {}
        run.reference = run.attention = None
        hidden = output.last_hidden_state
        batch, length = run.prompt_mask.shape
        # Scatter back to the prompt's length (pruned positions hold zeros); fill slots
        # go to a spare column that is then cut off.
        full = hidden.new_zeros(batch, length + 1, hidden.shape[-1])
        target = torch.where(final.positions == FILL, length, final.positions)
        full.scatter_(1, target[..., None].expand(-1, -1, hidden.shape[-1]), hidden)
        output.last_hidden_state = full[:, :length]
        return output

    def _decoder_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            run = self._run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if run.prefill:
                hidden = self._prefill_layer(run, index, hidden, kwargs)
            elif run.kv_layouts[index] is not run.kv_layouts[0]:
                self._substitute_mask(run, run.kv_layouts[index], kwargs, hidden.shape[1], hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    # --------------------------------------------------------------- prefill
    def _start_run(self, language_model, args, kwargs, spans: list[list[ImageSpan]]):
        embeds = kwargs["inputs_embeds"]
        batch, length, _ = embeds.shape
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
            raise NotImplementedError("vtprune needs a 2-D attention mask (static/compiled caches are not supported)")
        prompt_mask = attention_mask if attention_mask is not None else embeds.new_ones(batch, length, dtype=torch.long)

        device = embeds.device
        visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        image_of = torch.full((batch, length), -1, dtype=torch.long, device=device)
        coords = torch.zeros(batch, length, 2, dtype=torch.long, device=device)
        plans = []
        for b, sample in enumerate(spans):
            plan = []
            for i, span in enumerate(sample):
                where = slice(span.start, span.start + span.length)
                visual[b, where] = True
                image_of[b, where] = i
                offsets = torch.arange(span.length, device=device)
                coords[b, where] = torch.stack([offsets // span.grid[1], offsets % span.grid[1]], dim=-1)
                budget = tokens_for_budget(self.budget, span.length)
                # A budget that keeps the whole image is a no-op, even for schedules (like CLSE's)
                # whose early stages keep more than the budget and later ones less.
                plan.append(self.method.stages(self._info, budget, span.length) if budget < span.length else [])
            plans.append(plan)
        stage_layers = sorted({stage.layer for plan in plans for stages in plan for stage in stages})
        full = Layout.full(prompt_mask)
        run = _Run(
            cache=None, prompt_mask=prompt_mask, visual=visual, image_of=image_of, coords=coords,
            sizes=torch.ones(batch, length, device=device), spans=spans, plans=plans, stage_layers=stage_layers,
            full=full, lm_layout=full, kv_layouts=[None] * self._num_layers,
        )
        run.text = self._text
        if self._replay is not None:
            self._prepare_replay(run)
        elif not any(
            stage.keep < span.length
            for plan, sample in zip(plans, spans)
            for stages, span in zip(plan, sample)
            for stage in stages
        ):  # the budget keeps every token: leave the model's computation untouched
            self._record_stats(run)
            return None

        use_cache = kwargs.get("use_cache")  # Qwen2-VL passes None explicitly: the config decides then
        if use_cache is None:
            use_cache = language_model.config.use_cache
        if use_cache and kwargs.get("past_key_values") is None:
            # Made here rather than inside the language model, so that decode steps can be told
            # apart from a new prompt by the cache object they carry.
            kwargs["past_key_values"] = DynamicCache(config=language_model.config)
        run.cache = kwargs.get("past_key_values")

        if run.input_pruned:
            layout, hidden = self._narrow(run, 0, run.full, embeds, attention=None)
            index = layout.index_in(run.full)
            kwargs["inputs_embeds"] = hidden
            kwargs["attention_mask"] = layout.valid.long()
            position_ids = kwargs.get("position_ids")
            if position_ids is None:  # what the language model would have made itself
                position_ids = torch.arange(length, device=device)[None].expand(batch, length)
            kwargs["position_ids"] = take_positions(position_ids, index)
            run.lm_layout = layout
        run.layer_layouts = {layer: None for layer in run.stage_layers if layer != LLM_INPUT}
        self._run = run
        return args, kwargs

    def _prepare_replay(self, run: _Run) -> None:
        decision = self._replay
        run.stage_layers = decision.stage_layers
        if self.method.slices_kv_cache and run.prompt_length > decision.prompt_length:
            kept = torch.zeros_like(run.visual)
            for b, positions in enumerate(decision.kept[-1]):
                kept[b, positions.to(kept.device)] = True
            run.late_from = decision.prompt_length
            run.late_visible = ~run.visual | kept

    def _prefill_layer(self, run: _Run, index: int, hidden: torch.Tensor, kwargs) -> torch.Tensor:
        if index == 0 and self.method.needs_reference:
            run.reference = hidden
        if index in run.layer_layouts:
            hidden = self._prune_in_llm(run, index, hidden)
        layout = run.layout_at(index)
        run.kv_layouts[index] = layout
        if layout is not run.lm_layout or run.late_from is not None:
            self._substitute_layer_inputs(run, layout, kwargs, hidden)
        if self.method.needs_attention and self._replay is None and index + 1 in run.stage_layers:
            run.attention = self._last_query_attention(run, index, hidden, kwargs, layout)
        return hidden

    def _prune_in_llm(self, run: _Run, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        previous = run.layout_at(layer - 1)
        layout, hidden = self._narrow(run, run.stage_layers.index(layer), previous, hidden, run.attention)
        run.layer_layouts[layer] = layout
        run.attention = None
        if self.method.slices_kv_cache and run.cache is not None:
            for earlier in range(layer):
                self._slice_cache_layer(run, earlier, layout)
        return hidden

    def _slice_cache_layer(self, run: _Run, layer: int, layout: Layout) -> None:
        cache_layer = run.cache.layers[layer]
        index = layout.index_in(run.kv_layouts[layer])
        expand = index[:, None, :, None].expand(-1, cache_layer.keys.shape[1], -1, cache_layer.keys.shape[-1])
        cache_layer.keys = cache_layer.keys.gather(2, expand)
        cache_layer.values = cache_layer.values.gather(2, expand)
        run.kv_layouts[layer] = layout

    def _narrow(self, run: _Run, stage: int, layout: Layout, hidden: torch.Tensor, attention):
        """Ask the method (or the replayed decision) which visual tokens of `layout` survive `stage`.

        Returns the new layout and the hidden states taken into it (merged where the method merges).
        """
        layer = run.stage_layers[stage]
        kept, merged, moved = [], [], []
        for b in range(len(run.spans)):
            slots = torch.nonzero(layout.positions[b] != FILL).flatten()
            if self._replay is not None:
                kept.append(self._replay.kept[stage][b].to(slots.device))
                merged.append(self._replay.merged[stage][b])
                moved.append(self._replay.moved[stage][b])
                continue
            images = run.image_of[b, layout.positions[b, slots]]
            chosen, values, sources, targets = [], [], [], []
            for i, stages in enumerate(run.plans[b]):
                mine = slots[images == i]
                positions = layout.positions[b, mine]
                keep = next((s.keep for s in stages if s.layer == layer), mine.numel())
                if keep >= mine.numel():
                    chosen.append(positions)
                    continue
                view = ImageView(
                    hidden=hidden[b, mine], coords=run.coords[b, positions], grid=run.spans[b][i].grid, keep=keep,
                    layer=layer, stage=stage, image_index=i, sizes=run.sizes[b, positions],
                    attention=None if attention is None else attention[b, mine],
                    reference=None if run.reference is None else run.reference[b, run.lm_layout.slots_of(b, positions)],
                    text=run.text[b],
                )
                picked = self._checked_selection(view)
                if isinstance(picked, Selection):
                    run.sizes[b, positions[picked.keep]] = picked.sizes.to(run.sizes.dtype)
                    values.append((positions[picked.keep], picked.hidden))
                    sources.append(positions)
                    targets.append(positions[picked.keep][picked.destination])
                    picked = picked.keep
                chosen.append(positions[picked])
            kept.append(torch.cat(chosen) if chosen else layout.positions[b, :0])
            merged.append(values)
            empty = layout.positions[b, :0]
            moved.append((torch.cat(sources) if sources else empty, torch.cat(targets) if targets else empty))
        run.kept.append(kept)
        run.merged.append(merged)
        run.moved.append(moved)
        narrowed = layout.narrowed(run.visual, kept, run.prompt_mask)
        taken = take(hidden, narrowed.index_in(layout))
        for b, values in enumerate(merged):
            for positions, value in values:
                taken[b, narrowed.slots_of(b, positions)] = value.to(taken.dtype)
        return narrowed, taken

    def _checked_selection(self, view: ImageView) -> torch.Tensor | Selection:
        picked = self.method.select(view)
        indices = (picked.keep if isinstance(picked, Selection) else picked).flatten().long()
        n = view.hidden.shape[0]
        if indices.numel() != view.keep or indices.unique().numel() != view.keep or bool((indices < 0).any() | (indices >= n).any()):
            raise RuntimeError(
                f"method {self.method.name!r} returned {indices.numel()} indices for a keep of {view.keep} "
                f"of {n} tokens (they must be distinct and in range)"
            )
        indices = indices.to(view.hidden.device)
        if isinstance(picked, Selection):
            return Selection(indices, picked.hidden, picked.sizes, picked.destination.to(view.hidden.device))
        return indices

    def _last_query_attention(self, run: _Run, layer: int, hidden, kwargs, layout: Layout) -> torch.Tensor:
        slots = torch.arange(layout.length, device=hidden.device)
        valid = layout.valid
        if run.late_from is not None:  # score from the prompt's own last token, as the prefill did
            valid = valid & (layout.positions < run.late_from)
        query_index = torch.where(valid, slots, -1).amax(dim=1)
        key_mask = valid & (slots[None] <= query_index[:, None])
        return self.adapter.last_query_attention(layer, hidden, kwargs["position_embeddings"], query_index, key_mask)

    def _record_stats(self, run: _Run) -> None:
        counts = [run.layout_at(layer).count(run.visual) for layer in range(self._num_layers)]
        self.last_stats = PruneStats(
            visual_tokens_per_layer=counts_per_layer(counts),
            images_per_sample=[len(sample) for sample in run.spans],
            visual_tokens_per_sample=run.visual.sum(dim=1).tolist(),
            nominal_budget=self.budget,
        )
        self.last_decision = Decision(run.stage_layers, run.kept, run.prompt_length, run.merged, run.moved)

    # ------------------------------------------------------------ both phases
    def _substitute_layer_inputs(self, run: _Run, layout: Layout, kwargs, hidden) -> None:
        """Give a decoder layer the mask and positions of its layout at prefill."""
        key = id(layout)
        if key not in run.step_masks:
            late_rows = late_visible = None
            if run.late_from is not None:
                late_rows = layout.positions >= run.late_from
                late_visible = layout.valid & run.late_visible.gather(1, layout.positions.clamp(min=0))
            mask = decoder_mask(layout.valid, hidden.shape[1], self.adapter.attn_implementation, hidden.dtype,
                                late_rows, late_visible)
            index = layout.index_in(run.lm_layout)
            cos, sin = kwargs["position_embeddings"]
            ids = kwargs.get("position_ids")
            positions = ((take(cos, index), take(sin, index)), None if ids is None else take_positions(ids, index))
            run.step_masks[key] = (mask, positions)
        kwargs["attention_mask"], (kwargs["position_embeddings"], kwargs["position_ids"]) = run.step_masks[key]

    def _substitute_mask(self, run: _Run, layout: Layout, kwargs, query_length: int, dtype) -> None:
        """Give a decoder layer, at decode, the mask of the tokens its cache holds plus those since the prompt."""
        key = id(layout)
        if key not in run.step_masks:
            kv_valid = torch.cat([layout.valid, run.tail_valid], dim=1)
            run.step_masks[key] = decoder_mask(kv_valid, query_length, self.adapter.attn_implementation, dtype)
        kwargs["attention_mask"] = run.step_masks[key]

    # ---------------------------------------------------------------- decode
    def _continue_run(self, run: _Run, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, query_length, _ = embeds.shape
        attention_mask = kwargs.get("attention_mask")
        expected = run.prompt_length + run.generated + query_length
        if attention_mask is None:
            attention_mask = torch.ones(batch, expected, dtype=torch.long, device=embeds.device)
        elif isinstance(attention_mask, dict) or attention_mask.dim() != 2 or attention_mask.shape[1] != expected:
            raise ValueError(
                f"decode step with an attention mask of shape {tuple(getattr(attention_mask, 'shape', ()))}; vtprune "
                f"expects a 2-D mask over the prompt and every token since ({expected} columns)"
            )
        run.generated += query_length
        run.tail_valid = attention_mask[:, run.prompt_length :].bool()
        run.step_masks = {}
        first = run.kv_layouts[0]
        if first is run.full:
            return None
        # The first layers' cache holds a shortened prompt: give the language model that
        # prompt's mask, and the positions it would have computed on the unpruned sequence.
        kwargs["attention_mask"] = torch.cat([first.valid.long(), attention_mask[:, run.prompt_length :]], dim=1)
        if kwargs.get("position_ids") is None:
            start = expected - query_length
            kwargs["position_ids"] = torch.arange(start, expected, device=embeds.device)[None].expand(batch, -1)
        return args, kwargs


def text_tokens(input_ids: torch.Tensor, spans: list[ImageSpan], attention_mask, sample: int) -> torch.Tensor:
    """A sample's prompt tokens without its image placeholders and padding (what a router reads)."""
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    for span in spans:
        keep[span.start : span.start + span.length] = False
    if attention_mask is not None and attention_mask.dim() == 2:
        keep &= attention_mask[sample].bool()
    return input_ids[keep]
