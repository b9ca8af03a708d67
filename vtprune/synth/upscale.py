"""Depth up-scaling: a deeper reference model that starts as the shipped one, layer for layer.

Each layer of the shallow model is repeated in place (6 -> 16 LM layers: 0,0,0,1,1,1,2,2,...;
3 -> 6 tower layers: 0,0,1,1,2,2), not the stack repeated (0..5,0..5,...): a copy placed
right after its source reads a residual stream like the one its source was trained on,
where a stacked copy of layer 0 would read the last layer's output. The first copy of each
layer is the source itself; the others start as identities, their attention and MLP output
projections zero (as LLaMA Pro expands a model), so that the up-scaled model computes
exactly what the shallow one does and training, not the copying, decides what the new
layers add.
"""

from __future__ import annotations

import re

import torch

# The projections that write a layer's attention and MLP results into the residual stream
# (Llama: o_proj, down_proj; CLIP: out_proj, fc2, with their biases): zero, the layer is an identity.
OUTPUT_PROJECTIONS = ("self_attn.o_proj.", "mlp.down_proj.", "self_attn.out_proj.", "mlp.fc2.")
LAYER_KEY = re.compile(r"^(?P<stack>.*\.layers\.)(?P<index>\d+)\.(?P<rest>.*)$")


def layer_sources(source_layers: int, target_layers: int) -> list[int]:
    """The source layer each target layer copies, in order, each source repeated in place; when the
    counts do not divide, the extra copies are spread evenly (6 -> 16: three, three, two, three, three, two)."""
    if target_layers < source_layers:
        raise ValueError(f"cannot up-scale {source_layers} layers to fewer ({target_layers})")
    return [i * source_layers // target_layers for i in range(target_layers)]


def stack_depths(state: dict) -> dict[str, int]:
    """Layer count of each stack of layers in a state dict, by its key prefix (the LM's and the tower's)."""
    depths: dict[str, int] = {}
    for key in state:
        match = LAYER_KEY.match(key)
        if match:
            depths[match["stack"]] = max(depths.get(match["stack"], 0), int(match["index"]) + 1)
    return depths


def upscaled_state(source: dict, target: dict) -> dict:
    """`target`'s state dict (a deeper model of the same widths) filled from `source`'s, as the module says."""
    sources = {stack: layer_sources(depth, stack_depths(target)[stack]) for stack, depth in stack_depths(source).items()}
    state = {}
    for key, like in target.items():
        match = LAYER_KEY.match(key)
        if match is None:
            value = source[key]
        else:
            index = int(match["index"])
            origin = sources[match["stack"]][index]
            value = source[f"{match['stack']}{origin}.{match['rest']}"]
            is_repeat = index > 0 and sources[match["stack"]][index - 1] == origin
            if is_repeat and match["rest"].startswith(OUTPUT_PROJECTIONS):
                value = torch.zeros_like(value)
        if value.shape != like.shape:
            raise ValueError(f"{key}: the source's is {tuple(value.shape)}, the target's {tuple(like.shape)}: "
                             "up-scaling copies layers, so both models need the same widths")
        state[key] = value.clone()
    return state


def upscale_into(target, source) -> None:
    """Load the shallower `source` model's weights into the deeper `target` (same widths), up-scaled."""
    target.load_state_dict(upscaled_state(source.state_dict(), target.state_dict()), strict=True)
