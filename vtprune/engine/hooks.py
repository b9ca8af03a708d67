"""The handle `vtprune.apply` returns: removable hooks on one model, and the dispatch between them.

Hooks at three levels, plus what a method adds in the vision tower (vision.py: the recorder, fusion):
- on the top-level model: a pre-hook keeps its logits_to_keep and labels (which only it receives);
- on the multimodal model: a pre-hook reads input_ids (and the vision kwargs) to find each
  sample's visual items (images, videos) and takes the one-forward-at-a-time lock, which a
  post-hook (always called, errors included) releases;
- on the language model: a prompt (an empty or absent KV cache) starts a run
  (prefill.py); a forward on the run's own cache is a decode step (decode.py); a forward
  post-hook ends the prefill, checks it and records its stats;
- on each decoder layer: gives the layer the hidden states, mask and positions of the
  tokens it runs on (prefill) or its cache holds (decode).
The model instance's generate is wrapped too (`_wrap_generate`: which uncached forwards are generate's own
re-feeds); remove() undoes all of it.

Prefill decides; decode reuses the decision (the run is tied to the cache object).
Wherever what transformers did disagrees with what the engine tracks, it raises an
EngineError instead of running unpruned or wrong.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable

import torch

from ..adapters import Adapter, VisualItem
from ..adapters.base import CHUNKED_PREFILL
from ..methods import Method
from . import cache as kv
from . import decode, prefill
from .budget import keeps_whole
from .compat import EngineError, UnsupportedUseError, require_arguments
from .compiled import HiddenAccess, forget_compiled_graphs
from .run import Decision, Origin, Prompt, PromptText, Run
from .stats import PruneStats, counts_per_layer
from .vision import VisionRecorder

SUPPORTED_ATTENTION = ("eager", "sdpa")
# the multimodal forward's raw visual inputs (Video-LLaVA before transformers 5.23: pixel_values_images)
VISUAL_INPUTS = ("pixel_values", "pixel_values_images", "pixel_values_videos")


_RUN = kv.PRUNED_RUN  # the attribute a KV cache filled by a pruned prompt carries: a _CacheRun


def check_attention(adapter: Adapter) -> None:
    implementation = adapter.attn_implementation
    if implementation not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {implementation!r} is not supported; load the model with "
            f"attn_implementation one of {', '.join(SUPPORTED_ATTENTION)} (or call model.set_attn_implementation)"
        )


class _Owner:
    """A pruner's mark on the caches its prompts filled; dead once the pruner is removed."""

    live = True


@dataclasses.dataclass
class _CacheRun:
    """The pruner's mark and the prompt's Run, on the cache the prompt filled: the cache owns its run, so a run lives
    as long as the conversation that can continue it. A deep copy of the cache (transformers' prompt-reuse recipe)
    gets a run of its own, on the copy, with the prompt's decision shared."""

    owner: _Owner | None
    run: Run

    @property
    def live(self) -> bool:
        return self.owner is not None and self.owner.live

    def __deepcopy__(self, memo) -> "_CacheRun":
        return _CacheRun(self.owner, dataclasses.replace(self.run))

    def __reduce__(self):
        # A pickled cache comes back without its run (which holds the model): marked, so that continuing it is
        # refused rather than run as if nothing had been pruned.
        return _CacheRun, (None, None)


class Pruner:
    """Hooks on one model, removable, with the last prefill's stats and decision."""

    def __init__(self, model, adapter: Adapter, method: Method, budget: int | float):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.budget = budget
        self._stats: PruneStats | Callable[[], PruneStats] | None = None  # see last_stats
        self.last_decision: Decision | None = None
        self._replay: Decision | None = None
        self._items: list[list[VisualItem]] | None = None
        self._text: PromptText | None = None  # of the forward being run: its prompt's text, read on the host
        self._fusion: list[dict[int, float] | None] | None = None  # per image of the forward being run
        self._vision_states: dict = {}
        self._encoded_here = False  # the forward in progress got raw images or videos (not features encoded ahead)
        self._generate_images = None  # the raw visual inputs of the generate call in progress
        self._run: Run | None = None
        self._prompt: Prompt | None = None  # the forward being run, as the multimodal model received it
        self._input_ids: torch.Tensor | None = None  # of the forward being run
        self._caller_positions = False  # whether the forward being run was given position_ids
        self._logits_to_keep = None  # the top-level forward's, read by the multimodal forward it calls
        self._labels = self._forward_labels = None  # the top-level forward's; the labels of the forward being run
        self._uncached: Prompt | None = None  # the last prompt generate decided without a cache, which it re-feeds
        self._num_layers = adapter.model_info.num_layers
        self._owner = _Owner()  # marks the caches this pruner's prompts filled (see _RUN)
        self.removed = False  # remove() ran: the hooks are off and the model runs unpruned
        self._in_with = False  # a with block is open on this pruner (its end removes the pruner)
        # One forward at a time: its state lives here (threads, or DataParallel's replicas, would share it).
        self._busy, self._busy_thread = threading.Lock(), None
        self._cache_keyword = kv.cache_keyword(adapter.language_model)
        require_arguments(adapter.language_model, ("inputs_embeds", "attention_mask", "position_ids"))
        require_arguments(adapter.decoder_layers[0],
                          ("hidden_states", "attention_mask", "position_ids", "position_embeddings"))
        # Fusion first: a model that cannot fuse refuses before any other hook is in place.
        self._handles = adapter.vision_state_hooks(self._vision_states) if method.fuses_vision_layers else []
        if method.fuses_vision_layers:
            self._handles.append(adapter.projector_fusion_hook(self._vision_states, lambda: self._fusion))
        self._recorder = VisionRecorder(adapter, method, budget) if method.acts_in_vision else None
        self._handles += [
            model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True),
            adapter.multimodal_model.register_forward_pre_hook(self._on_multimodal_forward, with_kwargs=True),
            adapter.multimodal_model.register_forward_hook(self._after_multimodal_forward, always_call=True),
            adapter.language_model.register_forward_pre_hook(self._on_language_model_forward, with_kwargs=True),
            adapter.language_model.register_forward_hook(self._after_language_model_forward, with_kwargs=True),
        ]
        for index, layer in enumerate(adapter.decoder_layers):
            self._handles.append(layer.register_forward_pre_hook(self._decoder_layer_hook(index), with_kwargs=True))
        self._wrap_generate()
        forget_compiled_graphs(model)

    # ----------------------------------------------------------------- public
    @property
    def last_stats(self) -> PruneStats | None:
        """The last prefill's stats; counted from its layouts when first read, so a prefill whose stats nobody
        reads spends no device work or read on them."""
        if callable(self._stats):
            self._stats = self._stats()
        return self._stats

    @property
    def reads_vision_tower(self) -> bool:
        """Whether this pruner needs the vision tower to run under it (its method reads the tower's attention or
        states, merges inside it, or mixes its layers). Where False, image features the model encoded on its own
        (`get_image_features`, passed as mm_encoder_outputs on transformers 5.23+) prune exactly as its pixels do."""
        return self.method.acts_in_vision or self.method.fuses_vision_layers

    def remove(self) -> None:
        """Take every hook off the model; it then computes exactly as before apply()."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._recorder is not None:
            self._recorder.remove()
        if self._generate is not None and self.model.__dict__.get("generate") is self._generate:
            if self._own_generate is None:
                del self.model.generate
            else:
                self.model.generate = self._own_generate
        self._run = self._text = self._fusion = self._prompt = self._uncached = self._input_ids = None
        self._generate = self._own_generate = None  # (generate's wrapper holds this pruner: a cycle pinning the model)
        self._owner.live = False  # the caches filled until now refuse to be continued (kv.PrunedCache)
        self._owner = _Owner()
        self._vision_states.clear()
        if getattr(self.model, "_vtprune_pruner", None) is self:
            del self.model._vtprune_pruner
        self.removed = True
        forget_compiled_graphs(self.model)

    def _check_not_removed(self) -> None:
        """A removed pruner has no hooks on the model: a with block or a replay on it would run unpruned."""
        if self.removed:
            raise RuntimeError("this pruner was removed (its remove() ran, or its with block ended), so the model "
                               "runs unpruned; call vtprune.apply(model, ...) again for a new pruner")

    def __reduce__(self):
        raise TypeError("a model with a vtprune pruner cannot be pickled (torch.save of the model, multiprocessing): "
                        "the pruner holds hooks on it; remove() the pruner first, or save the weights alone "
                        "(save_pretrained, state_dict: they are the model's own)")

    def __deepcopy__(self, memo):
        # The decoder layers' hooks would still reach this pruner from the copy.
        raise TypeError("a model with a vtprune pruner cannot be deep-copied: copy it before vtprune.apply (or after "
                        "pruner.remove()), then apply a pruner to each copy")

    def __enter__(self) -> "Pruner":
        self._check_not_removed()
        if self._in_with:
            # the inner block's end would remove the pruner, and the rest of the outer block run unpruned
            raise RuntimeError("this pruner's with block is already open, and leaving a with block removes the "
                               "pruner: open one with block per pruner")
        self._in_with = True
        return self

    def __exit__(self, *exc) -> None:
        self._in_with = False
        self.remove()

    @contextlib.contextmanager
    def replaying(self, decision: Decision):
        """Prefills inside this block keep exactly decision's tokens instead of asking the method.

        A prefill longer than the decision's prompt treats the extra tokens as decoded
        ones: with a sliced KV cache they see only the kept prompt tokens, as they did
        when decoded. So a cached generation can be checked against recomputation.
        The vision tower runs as the model's own meanwhile (no q/k read for scoring, no merges inside it; a
        merging method's states come from the decision), so a replay costs the method's schedule without its work.
        """
        self._check_not_removed()
        if not isinstance(decision, Decision):
            raise TypeError(f"replaying takes a Decision (e.g. pruner.last_decision after a pruned prefill), not "
                            f"{type(decision).__name__}: run a prefill under the pruner first")
        outer = self._replay  # (a replay inside another one gives it back when it ends)
        self._replay = decision
        if self._recorder is not None:
            self._recorder.paused = True
        try:
            yield self
        finally:
            self._replay = outer
            if self._recorder is not None:
                self._recorder.paused = outer is not None

    def hidden_access(self) -> HiddenAccess | None:
        """What the engine does to the decoder layers' hidden states in the forward being run (so that
        compile_prefill may run the layers between them as one graph); None where each layer gets inputs of its own
        (a forward continuing a pruned prompt's cache, whose layers hold caches of different lengths)."""
        run = self._run
        if run is None:
            return HiddenAccess()
        return prefill.hidden_access(run) if run.prefill else None

    def __repr__(self) -> str:
        def short(value) -> str:  # a tokenizer or a calibration table would fill the screen
            text = repr(value)
            return text if len(text) <= 60 else f"<{type(value).__name__}>"

        options = self.method.options
        shown = ", ".join(f"{f.name}={short(getattr(options, f.name))}" for f in dataclasses.fields(options))
        return f"Pruner(method={self.method.name!r}, budget={self.budget!r}, options={type(options).__name__}({shown}))"

    def _wrap_generate(self) -> None:
        """generate with use_cache=False feeds the whole sequence again at every step; within one generate call
        those forwards reuse the prompt's decision (so both cache modes give the same tokens), and nowhere else (a
        forward of the caller's own, without a cache, decides on its own input whatever ran before). The model's
        generate is wrapped on this instance to know which forwards are generate's; remove() unwraps it."""
        self._own_generate = self.model.__dict__.get("generate")  # the caller's own instance attribute, if any
        inner = self.model.generate

        @functools.wraps(inner)
        def generate(*args, **kwargs):
            config = kwargs.get("generation_config") or self.model.generation_config
            guidance = kwargs.get("guidance_scale", getattr(config, "guidance_scale", None))
            if guidance is not None and guidance != 1:
                raise NotImplementedError(
                    f"generate's classifier-free guidance (guidance_scale={guidance}) runs the model a second time at "
                    "each step, on the prompt without its images, and a pruner would take that forward for a new "
                    "prompt; generate without guidance_scale, or remove the pruner")
            chunk = kwargs.get("prefill_chunk_size") or getattr(config, "prefill_chunk_size", None)
            prompt = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            # a chunk as long as the prompt is the whole prompt in one forward: its last position is read
            self._generate_chunked = bool(chunk) and not (isinstance(prompt, torch.Tensor) and chunk >= prompt.shape[-1])
            self._uncached, self._generating = None, True
            self._generate_images = [kwargs.get(key) for key in VISUAL_INPUTS]  # (what its decisions were made for)
            # generate encodes raw images itself (5.23+: before its first forward): tower runs before it are stale;
            # features the caller encoded and passes as mm_encoder_outputs keep theirs
            if self._recorder is not None and any(x is not None for x in self._generate_images):
                self._recorder.take()
            try:
                return inner(*args, **kwargs)
            finally:
                self._uncached, self._generating, self._generate_images = None, False, None
                self._vision_states.pop("states", None)  # (what every forward of the call could remix: done)

        self._generating, self._generate_chunked, self._generate = False, False, generate
        self.model.generate = generate

    # ------------------------------------------------------------------ hooks
    def _on_model_forward(self, module, args, kwargs):
        self._logits_to_keep, self._labels = kwargs.get("logits_to_keep"), kwargs.get("labels")

    def _on_multimodal_forward(self, module, args, kwargs):
        me = threading.get_ident()
        if not self._busy.acquire(blocking=False) and self._busy_thread != me:
            raise RuntimeError(
                "a pruned model runs one forward at a time, and another thread is running one (threads, or "
                "torch.nn.DataParallel's replicas, share its pruner): run them one after another, or give each "
                "worker a model of its own (DistributedDataParallel, accelerate launch). A forward that a "
                "KeyboardInterrupt stopped holds it until its thread runs another"
            )
        self._busy_thread = me
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._input_ids = input_ids
        self._caller_positions = kwargs.get("position_ids") is not None
        logits_to_keep, self._logits_to_keep = self._logits_to_keep, None
        self._forward_labels, self._labels = self._labels, None
        encoded = kwargs.get("mm_encoder_outputs") or {}
        self._fusion = self._text = self._prompt = None
        raw = [kwargs.get(key) for key in VISUAL_INPUTS]
        self._encoded_here = any(x is not None for x in raw)
        # Placeholder ids without images or videos to go with them (a decode step that happened
        # to generate one) are plain text to the model, and so to the pruner.
        if not self._encoded_here and all(v is None for v in encoded.values()):
            self._items = None
            return None
        if input_ids is None:
            raise ValueError("vtprune finds the visual tokens from input_ids; pass input_ids (not inputs_embeds) with images")
        check_attention(self.adapter)  # apply() checked it; model.set_attn_implementation may have changed it since
        if isinstance(logits_to_keep, int) and logits_to_keep > 1:
            raise NotImplementedError(
                f"a prompt with images asks for the logits of its last {logits_to_keep} tokens: that is how assisted "
                "decoding (generate's assistant_model, or prompt lookup) feeds candidate tokens along with the prompt, "
                "and vtprune would prune them as part of it. Generate without assistant_model / "
                "prompt_lookup_num_tokens; to score a prompt's every position pass logits_to_keep=0"
            )
        _, cache = kv.find_cache(kwargs)
        kv.check_prunable(cache)
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError(
                "vtprune cannot prune images added to a prompt that already has a KV cache; pass a follow-up "
                f"turn without pixel_values (the first turn's images are in the cache); {CHUNKED_PREFILL}"
            )
        for key in ("vision_feature_select_strategy", "vision_feature_layer"):  # LLaVA's forward takes both
            given, own = kwargs.get(key), getattr(self.model.config, key, None)
            if given is not None and given != own:
                raise ValueError(
                    f"{key}={given!r} was passed to the forward (or generate), over the model config's {own!r}: "
                    f"vtprune lays out the visual tokens and reads the vision tower as the config says; remove the "
                    f"pruner, set model.config.{key} and apply it again (apply() checks it)")
        host_ids = input_ids.cpu()  # the prompt's layout is read on the host, once for the batch
        self._items = self.adapter.visual_items(host_ids, kwargs)
        if self._recorder is not None and self._encoded_here:
            self._recorder.take()  # this forward encodes its own images: whatever an earlier run left is stale
        if not any(self._items):
            raise ValueError(
                f"images were passed to {type(self.model).__name__}, but vtprune found none of their placeholder "
                f"tokens in input_ids (ids {sorted(self.adapter.placeholder_ids)}): build the prompt with the model's "
                "processor and put its image or video placeholder (e.g. \"<image>\") in the text"
            )
        mask = kwargs.get("attention_mask")
        host_mask = mask.cpu().bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        if host_mask is not None and not bool(host_mask.any(dim=1).all()):
            empty = torch.nonzero(~host_mask.any(dim=1)).flatten().tolist()
            if self._generate_chunked:  # a left-padded sample's first chunk can be all padding
                raise ValueError(f"sample {empty[0]} of the batch has no token in the first prefill chunk; {CHUNKED_PREFILL}")
            raise ValueError(f"sample {empty[0]} of the batch has an attention_mask of zeros only: none of its tokens "
                             "would run, so there is nothing to prune it by; drop it from the batch")
        self._text = PromptText.of(host_ids, self.adapter.placeholder_ids, host_mask, input_ids.device)
        # generate (5.23+) hands its forwards the features it encoded, not the images: the prompt keeps the images
        if not self._encoded_here and self._generating:
            raw = self._generate_images
        images = raw + [encoded.get(kind) for kind in ("image", "video")]
        self._prompt = Prompt(input_ids, images)
        continued = self._continued_prompt(cache, kwargs)
        if continued is not None:
            self._prompt = continued
        elif self.method.fuses_vision_layers:
            self._prompt.fusion = [
                None if keeps_whole(self.budget, item.length) else self.method.vision_fusion(text)
                for text, sample in zip(self._text.tokens, self._items) for item in sample]
        if self.method.fuses_vision_layers:
            self._fusion = self._prompt.fusion
            self.adapter.remix_encoded_images(kwargs, self._vision_states, self._fusion)
        return None

    def _continued_prompt(self, cache, kwargs) -> Prompt | None:
        """The prompt decided without a cache that this forward of the same generate call, also without one,
        extends (generate with use_cache=False feeds the whole sequence at every step): its decision is reused,
        not made again."""
        last = self._uncached
        if last is None or not self._generating or cache is not None \
                or prefill.wants_cache(self.adapter.language_model, kwargs):
            return None
        return last if last.continued_by(self._prompt) else None

    def _after_multimodal_forward(self, module, args, output):
        if self._busy_thread == threading.get_ident():  # (always called: also after an error)
            self._busy_thread = None
            self._busy.release()
            # What only this forward reads goes with it, as a stock model lets its inputs and temporaries go: the
            # prompt (its images), the tower states CLASP mixed for images this forward encoded itself (features
            # encoded ahead, by generate or the caller, may feed further forwards: theirs stay until the tower runs
            # again or the generate call ends), and a prefill an error stopped (its KV cache and full-length states
            # would otherwise stay alive into the retry).
            self._prompt = self._text = self._input_ids = None
            if self._encoded_here:
                self._vision_states.pop("states", None)
            if self._run is not None and self._run.prefill:
                self._run = None
        return output

    def _on_language_model_forward(self, module, args, kwargs):
        items, self._items = self._items, None
        self._fusion = None  # the images of this forward are encoded by now
        keyword, cache = kv.find_cache(kwargs)
        if keyword not in (None, self._cache_keyword) and self._cache_keyword in kwargs:
            raise EngineError(
                f"the language model got its KV cache as {keyword!r} beside a {self._cache_keyword!r} argument, "
                f"which its forward would take instead"
            )
        past = cache.get_seq_length() if cache is not None else 0
        has_images = items is not None and any(items)
        if past == 0:
            self._run = None
            if cache is not None and hasattr(cache, _RUN):  # an emptied cache (reset) starts afresh
                delattr(cache, _RUN)
            if has_images:
                return self._start_run(module, args, kwargs, items)
            batch = kwargs["inputs_embeds"].shape[0]
            self._stats = PruneStats([[0] * self._num_layers] * batch, [0] * batch, [0] * batch, self.budget)
            self.last_decision = self._uncached = None
            return None
        # The run travels with the cache its prompt filled, so each conversation continues its own, whatever other
        # prompts ran in between.
        held = getattr(cache, _RUN, None)
        self._run = run = held.run if held is not None and held.owner is self._owner else None
        if held is None:  # a cache filled without pruning: nothing to apply
            return None
        if not held.live:
            raise kv.continued_without_its_pruner()
        if run is None:
            raise UnsupportedUseError(
                f"a forward continues a KV cache ({type(cache).__name__} of {past} tokens) that a pruned prompt of "
                "another vtprune pruner filled (another model's); continue it on that model, or start a new prompt "
                "with an empty cache"
            )
        cropped = kv.cropped_tokens(cache, [layout.length + run.generated for layout in run.kv_layouts])
        if cropped > run.generated:
            raise UnsupportedUseError(
                f"the KV cache lost its last {cropped} tokens, {cropped - run.generated} of them the pruned prompt's "
                "(assisted or prompt-lookup decoding whose first forward carried candidate tokens with the prompt: "
                "they were pruned as part of it); generate without assistant_model / prompt_lookup_num_tokens"
            )
        if cropped:
            decode.crop(run, cropped)  # assisted decoding took back decoded candidates it rejected
        kv.check_lengths(cache, [layout.length + run.generated for layout in run.kv_layouts], "before a decode step")
        fed_ids, self._input_ids = self._input_ids, None
        return (args, kwargs) if decode.continue_run(run, kwargs, fed_ids, self._caller_positions) else None

    def _after_language_model_forward(self, module, args, kwargs, output):
        run = self._run
        if run is None:
            return output
        if not run.prefill:
            output.last_hidden_state = decode.pad_repeated(run, output.last_hidden_state)
            return output
        labels, self._forward_labels = self._forward_labels, None
        if labels is not None and labels.shape == run.prompt_mask.shape:  # (other shapes: transformers' loss refuses)
            run.checks.append(prefill.labels_check(run, labels))
        self._check_prefill(run, output)
        self._record_stats(run)
        if run.replay is None and self._prompt is not None:
            self._prompt.decision = self.last_decision
            self._uncached = self._prompt if run.cache is None and self._generating else None
        if run.cache is not None:
            # The cache holds its run, not the other way round (a cycle would keep every cache alive until the
            # garbage collector ran): decode steps find the run through the cache they continue.
            kv.mark_pruned(run.cache, _CacheRun(self._owner, run))
            run.cache = None
        run.prefill = False
        run.step_masks = {}
        # What only the prefill reads goes now: the run lives as long as its cache (the vision tower's recorded
        # queries and keys among it).
        run.references, run.item_references, run.attention, run.attention_from, run.probe = {}, {}, None, None, None
        run.checks = []
        run.encoded = None
        output.last_hidden_state = prefill.finish(run, output.last_hidden_state)
        return output

    def _decoder_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            run = self._run
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if run.prefill:
                hidden = prefill.at_layer(run, index, hidden, kwargs)
            else:
                decode.at_layer(run, index, kwargs, hidden.shape[1], hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        hook.vtprune_layer_hook = True  # compile_prefill tells the engine's hooks from others' by this
        return hook

    # --------------------------------------------------------------- prefill
    def _start_run(self, language_model, args, kwargs, items: list[list[VisualItem]]):
        embeds = kwargs["inputs_embeds"]
        kv.check_prunable(kv.find_cache(kwargs)[1])
        attention_mask = kwargs.get("attention_mask")
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
            raise NotImplementedError("vtprune needs a 2-D attention mask (static/compiled caches are not supported)")
        prompt_mask = attention_mask if attention_mask is not None else \
            embeds.new_ones(embeds.shape[:2], dtype=torch.long)
        replay = self._replay
        if replay is not None and replay.made_for is not None and self._prompt is not None \
                and not replay.made_for.may_begin(self._prompt):
            raise ValueError(
                "pruner.replaying(decision) got a prompt the decision was not made for (another batch size, other "
                "tokens, or other images: its kept positions and merged states would land on the wrong tokens); "
                "replay a decision on its own prompt, which may go on with more tokens"
            )
        if replay is None and self._prompt is not None and self._prompt.decision is not None:
            replay = self._prompt.decision  # a continuation of a prompt decided without a cache
        run = prefill.plan_run(self.adapter, self.method, self.budget, replay, items, self._text, prompt_mask,
                               self._num_layers)
        if not prefill.prunes(run):  # the budget keeps every token: leave the model's computation untouched
            if self._recorder is not None:
                self._recorder.take()
            self._record_stats(run)
            return None
        if self._generating and not self._generate_chunked:
            self._refuse_prompts_ending_with_a_droppable_token(items)
        prefill.begin(run, language_model, kwargs, self._cache_keyword, self._recorder.take() if self._recorder else [])
        run.ids, self._input_ids = self._input_ids, None
        self._run = run
        return args, kwargs

    def _refuse_prompts_ending_with_a_droppable_token(self, items: list[list[VisualItem]]) -> None:
        """generate reads the next token off the prompt's last position: where that is a visual token a method may
        drop (a LLaVA or Video-LLaVA prompt ending with its image; LLaVA-NeXT's and OneVision's images end with a
        newline token, never dropped), the logits there are a zero state's. A forward of the caller's own (a prompt
        prefix cached for reuse) and a chunk of a chunked prefill do not read them, and run."""
        text = self._text
        for b, sample in enumerate(items):
            last = text.last[b]
            if not text.ends_with_text[b] and any(start <= last < start + length
                                                  for item in sample for start, length in item.runs):
                if self._recorder is not None:
                    self._recorder.take()  # the tower runs of this forward, which no later forward may take
                raise ValueError(
                    f"sample {b}'s prompt ends with an image or video token: generate would predict its next token "
                    "from that token's state, which pruning may drop (the logits there would mean nothing); end the "
                    "prompt with text, as the chat template's assistant turn does"
                )

    def _record_stats(self, run: Run) -> None:
        layouts = [run.layout_at(layer) for layer in range(self._num_layers)]
        visual, images, budget = run.visual, [len(sample) for sample in run.items], self.budget

        def stats() -> PruneStats:
            counted = {}  # layers sharing a layout are counted once
            for layout in layouts:
                if id(layout) not in counted:
                    counted[id(layout)] = layout.count(visual)
            return PruneStats(visual_tokens_per_layer=counts_per_layer([counted[id(layout)] for layout in layouts]),
                              images_per_sample=images, visual_tokens_per_sample=visual.sum(dim=1).tolist(),
                              nominal_budget=budget)

        self._stats = stats
        if run.replay is not None:
            self.last_decision = run.replay
        else:
            self.last_decision = run.decision()
            self.last_decision.made_for = Origin.of(self._prompt) if self._prompt else None

    def _check_prefill(self, run: Run, output) -> None:
        """The pruned prefill did what was planned, on the cache the engine tracks."""
        skipped = [index for index, layout in enumerate(run.kv_layouts) if layout is None]
        if skipped:
            raise EngineError(f"decoder layers {skipped} ran without passing through vtprune's hooks")
        counted = run.layout_at(run.num_layers - 1).count(run.visual)
        flags = [flag.to(counted.device, counted.dtype).reshape(1) for flag, _ in run.checks]
        read = torch.cat([*flags, counted]).tolist()  # the prefill's one read of the device, for every check
        for (_, error), flag in zip(run.checks, read):
            if flag:
                raise error()
        expected, kept = prefill.expected_kept(run), read[len(flags):]
        if kept != expected:
            raise EngineError(
                f"the prefill should have left {expected} visual tokens per sample for the last decoder layer, "
                f"but {kept} reached it"
            )
        returned = kv.output_cache(output)
        if returned is not None and run.cache is None and prefill.checkpointed(self.adapter.decoder_layers):
            kv.check_lengths(returned, [0] * run.num_layers, "after a prefill under gradient checkpointing")
            return  # the empty cache transformers made: a later forward with it is a new prompt
        if returned is not run.cache:
            raise EngineError(
                "the language model filled a different KV cache from the one vtprune tracks "
                f"({type(returned).__name__} returned, {type(run.cache).__name__} tracked)"
            )
        if run.cache is not None:
            kv.check_lengths(run.cache, [layout.length for layout in run.kv_layouts], "after the prefill")
