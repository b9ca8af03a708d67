"""Decode steps (and later forwards on the same cache) reusing a prefill's decision.

Each decoder layer's cache holds the prompt's tokens of its own layout; a step's mask
for that layer is that layout's valid slots followed by every token fed since the
prompt. Positions continue from the unpruned prompt's length.
"""

from __future__ import annotations

import torch

from .layout import Layout, decoder_mask
from .run import Run


def continue_run(run: Run, kwargs: dict, fed_ids: torch.Tensor | None, caller_positions: bool) -> bool:
    """Adjust the language model's kwargs for a forward on the run's cache; False when nothing needs changing.

    A later turn of a conversation comes here too. transformers feeds the tokens past
    what the cache reports holding, and a pruned cache holds fewer than the sequence:
    the forward then starts with tokens the cache already has (pruned or not). Those
    are dropped here (and given zero outputs by `pad_repeated`), so the new tokens
    see exactly the kept tokens of the prompt, at their own positions. Where they
    start is read off the attention mask (it spans the whole conversation); without
    one, a forward that begins with the tokens after the cache's reported length is
    such a re-feed. Re-fed tokens must be the conversation's own (fed_ids: this
    forward's input_ids, when it had some). Positions the caller gave (caller_positions)
    are kept as they are.
    """
    embeds = kwargs["inputs_embeds"]
    batch, fed, _ = embeds.shape
    if batch != len(run.items):
        raise ValueError(
            f"a forward on a pruned prompt's cache has {batch} rows, but the cache holds {len(run.items)} samples: "
            "generate repeats a follow-up turn's rows for num_beams or num_return_sequences > 1, not its cache "
            "(without a pruner transformers fails there too); continue with num_beams=1 and num_return_sequences=1, "
            "or repeat the samples before the first turn")
    attention_mask = kwargs.get("attention_mask")
    consumed = run.prompt_length + run.generated
    if attention_mask is None:
        start = _start_without_mask(run, fed_ids, consumed)
        if kwargs.get("position_ids") is not None and not caller_positions:
            # Qwen2-VL / 2.5-VL number a mask-less forward's tokens from the cache's reported length (plus the
            # prompt's M-RoPE offset); a pruned cache reports fewer tokens than the conversation holds.
            kwargs["position_ids"] = kwargs["position_ids"] + (start - _reported(run))
        attention_mask = torch.ones(batch, start + fed, dtype=torch.long, device=embeds.device)
    elif isinstance(attention_mask, dict) or attention_mask.dim() != 2:
        raise ValueError(
            f"a forward on a pruned prompt's cache got an attention mask of shape "
            f"{tuple(getattr(attention_mask, 'shape', ()))}; vtprune needs a 2-D mask over the whole conversation"
        )
    start = attention_mask.shape[1] - fed  # the first fed token's place in the conversation
    repeated = consumed - start
    if not 0 <= repeated < fed:
        raise ValueError(
            f"a forward on a pruned prompt's cache feeds the conversation's tokens {start}..{start + fed - 1} "
            f"(by its attention mask of {attention_mask.shape[1]} columns), but the cache holds its first {consumed}: "
            f"feed the tokens from {consumed} on, with an attention mask over the whole conversation"
        )
    if fed_ids is not None and run.ids is not None:
        if repeated and not torch.equal(fed_ids[:, :repeated], run.ids[:, start:consumed]):
            raise ValueError(
                f"a forward on a pruned prompt's cache feeds again its tokens {start}..{consumed - 1}, but they differ "
                "from the conversation that cache holds; continue that conversation, or start a new prompt"
            )
        run.ids = torch.cat([run.ids, fed_ids[:, repeated:].to(run.ids.device)], dim=1)
    if repeated:
        kwargs["inputs_embeds"] = embeds[:, repeated:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., repeated:]
    run.repeated = repeated
    query_length = fed - repeated
    expected = consumed + query_length
    run.generated += query_length
    run.tail_valid = attention_mask[:, run.prompt_length :].bool()
    run.step_masks = {}
    first = run.kv_layouts[0]
    if first is run.full and not repeated:
        return False
    # The first layers' cache holds a shortened prompt: give the language model that
    # prompt's mask, and the positions it would have computed on the unpruned sequence.
    kwargs["attention_mask"] = torch.cat([first.valid.long(), attention_mask[:, run.prompt_length :]], dim=1)
    if kwargs.get("position_ids") is None:
        start = expected - query_length
        kwargs["position_ids"] = torch.arange(start, expected, device=embeds.device)[None].expand(batch, -1)
    return True


def crop(run: Run, tokens: int) -> None:
    """The cache dropped its last `tokens` decoded tokens (a crop): the run forgets them too."""
    run.generated -= tokens
    if run.ids is not None:
        run.ids = run.ids[:, : run.prompt_length + run.generated]


def _start_without_mask(run: Run, fed_ids: torch.Tensor | None, consumed: int) -> int:
    """Where a mask-less forward's tokens begin: after the cache's reported length when they begin with the
    conversation's tokens from there (transformers re-feeding a pruned cache), else after all it holds."""
    reported = _reported(run)
    again = consumed - reported
    if fed_ids is None or run.ids is None or not 0 < again < fed_ids.shape[1]:
        return consumed
    return reported if torch.equal(fed_ids[:, :again], run.ids[:, reported:consumed]) else consumed


def _reported(run: Run) -> int:
    """The tokens the cache reports holding (its first layer's)."""
    return run.kv_layouts[0].length + run.generated


def pad_repeated(run: Run, hidden: torch.Tensor) -> torch.Tensor:
    """The forward's output, with zero rows in front for the repeated tokens, so it aligns with what was fed."""
    if not run.repeated:
        return hidden
    return torch.cat([hidden.new_zeros(hidden.shape[0], run.repeated, hidden.shape[2]), hidden], dim=1)


def at_layer(run: Run, index: int, kwargs: dict, query_length: int, dtype: torch.dtype) -> None:
    """Decoder layer `index` is about to run a decode step: give it the mask of the tokens its cache holds."""
    layout = run.kv_layouts[index]
    if layout is run.kv_layouts[0]:
        return  # the language model's own mask, built from layer 0's layout, is this layer's
    kwargs["attention_mask"] = _mask(run, layout, query_length, dtype)


def _mask(run: Run, layout: Layout, query_length: int, dtype: torch.dtype):
    key = id(layout)
    if key not in run.step_masks:
        kv_valid = torch.cat([layout.valid, run.tail_valid], dim=1)
        # Built rather than left to sdpa even where every key is valid: whether the generated tokens' mask holds a
        # zero is on the device, and reading it would stall a GPU at every step.
        run.step_masks[key] = decoder_mask(kv_valid, query_length, run.adapter.attn_implementation, dtype,
                                           all_valid=False)
    return run.step_masks[key]
