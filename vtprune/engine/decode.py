"""Decode steps (and later forwards on the same cache) reusing a prefill's decision.

Each decoder layer's cache holds the prompt's tokens of its own layout; a step's mask
for that layer is that layout's valid slots followed by every token fed since the
prompt. Positions continue from the unpruned prompt's length.
"""

from __future__ import annotations

import torch

from .layout import Layout, decoder_mask
from .run import Run


def continue_run(run: Run, kwargs: dict) -> bool:
    """Adjust the language model's kwargs for one decode step; False when nothing needs changing."""
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
        return False
    # The first layers' cache holds a shortened prompt: give the language model that
    # prompt's mask, and the positions it would have computed on the unpruned sequence.
    kwargs["attention_mask"] = torch.cat([first.valid.long(), attention_mask[:, run.prompt_length :]], dim=1)
    if kwargs.get("position_ids") is None:
        start = expected - query_length
        kwargs["position_ids"] = torch.arange(start, expected, device=embeds.device)[None].expand(batch, -1)
    return True


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
        run.step_masks[key] = decoder_mask(kv_valid, query_length, run.adapter.attn_implementation, dtype)
    return run.step_masks[key]
