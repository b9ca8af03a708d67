"""Compiled decoder layers for prefill: fewer tokens become lower latency where kernel launches dominate.

At batch 1 on a GPU a decoder layer's prefill is launch-bound: pruning 576 visual tokens to 64
shortens every kernel but launches as many. `compile_prefill` puts each decoder layer's forward
through torch.compile (by default mode="reduce-overhead": CUDA graphs on a GPU) for the calls that
carry more than one token, i.e. prefills, on whatever layout the pruner gave that layer. Single-token
decode steps, whose cache grows every step (a new shape each time), stay eager.

The engine's hooks are not compiled: they run around each layer's call as before, decide the kept
set, and hand the compiled layer its shortened hidden states, mask and positions. torch.compile's
default shape handling applies: the first length gets a static graph, a second one a graph with a
dynamic length that serves every later one (CUDA graphs still record one replay per length, cheaply).
dynamo guards on each layer's own KV-cache slot, so every layer gets graphs of its own (inductor's
FX-graph cache makes the repeats cheap); while a handle is open, dynamo's recompile limit is raised to
allow that many (8 per layer) instead of silently running the later layers eager, and remove() puts it
back. Instance-scoped otherwise: only this model's layers, undone by remove().
"""

from __future__ import annotations

import weakref

import torch

from ..adapters import adapter_for


_OPEN: "weakref.WeakSet[CompiledPrefill]" = weakref.WeakSet()  # the handles not yet removed (nor dropped)
_OPEN_LIMIT = [8]  # dynamo's recompile limit before the first of them opened


def _set_recompile_limit() -> None:
    """8 graphs per decoder layer of the largest model with a handle open; the limit as it was once none is."""
    needed = max((8 * len(handle.layers) for handle in _OPEN), default=0)
    torch._dynamo.config.recompile_limit = max(_OPEN_LIMIT[0], needed)


class CompiledPrefill:
    """Each decoder layer of one model compiled for prefill calls; remove() restores the eager forwards."""

    def __init__(self, model, **compile_options):
        self.layers = list(adapter_for(model).decoder_layers)
        if any("forward" in vars(layer) for layer in self.layers):
            raise ValueError("this model's decoder layers already have a forward of their own (compiled before?); "
                             "remove() that first")
        options = {"mode": "reduce-overhead", **compile_options}
        compiled = [torch.compile(layer.forward, **options) for layer in self.layers]  # before any state changes
        if not _OPEN:
            _OPEN_LIMIT[0] = torch._dynamo.config.recompile_limit
        _OPEN.add(self)
        _set_recompile_limit()
        for index, (layer, forward) in enumerate(zip(self.layers, compiled)):
            layer.forward = _prefill_compiled(layer.forward, forward, first=index == 0)

    def remove(self) -> None:
        for layer in self.layers:
            vars(layer).pop("forward", None)
        self.layers = []
        if self in _OPEN:
            _OPEN.discard(self)
            _set_recompile_limit()

    def __enter__(self) -> "CompiledPrefill":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _prefill_compiled(eager, compiled, first: bool):
    def forward(hidden_states, *args, **kwargs):
        if hidden_states.shape[1] > 1:
            # A new prefill may overwrite the CUDA-graph memory of the last one's outputs: tell the graphs so, once,
            # at its first layer (later layers take the earlier ones' outputs, which must stay alive).
            if first and hidden_states.is_cuda:
                torch.compiler.cudagraph_mark_step_begin()
            return compiled(hidden_states, *args, **kwargs)
        return eager(hidden_states, *args, **kwargs)

    return forward


def compile_prefill(model, **compile_options) -> CompiledPrefill:
    """Compile `model`'s decoder layers for prefill (torch.compile's options; default mode="reduce-overhead");
    works with or without a vtprune pruner on the model. Returns a handle; .remove() undoes it."""
    return CompiledPrefill(model, **compile_options)
