"""Finding the KV cache a forward carries, the one change the engine makes inside it, and the guard a pruned
prompt's cache carries (PrunedCache: the model without its pruner cannot continue it).

The cache is found by what it is (a `Cache` instance), and injected under the keyword
the language model's forward declares (transformers 5.24 renamed `past_key_values` to
`cache`). Dropping pruned tokens from a layer's cache has no public `Cache` method, so
`slice_layer` touches a layer's `keys`/`values` and checks first that they are what it
expects.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import torch
from transformers import Cache, DynamicCache

from .compat import EngineError, UnsupportedUseError


def _is_cache_annotation(annotation) -> bool:
    if isinstance(annotation, str):
        return "Cache" in annotation
    options = (annotation, *typing.get_args(annotation))
    return any(isinstance(option, type) and issubclass(option, Cache) for option in options)


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword under which module's forward takes its KV cache, read off its signature."""
    names = [
        name for name, parameter in inspect.signature(module.forward).parameters.items()
        if _is_cache_annotation(parameter.annotation)
    ]
    if len(names) != 1:
        raise EngineError(
            f"cannot tell which argument of {type(module).__name__}.forward is the KV cache (candidates: {names or 'none'})"
        )
    return names[0]


def find_cache(mapping: dict[str, Any]) -> tuple[str | None, Cache | None]:
    """The (keyword, cache) among mapping's values that is a Cache, or (None, None); two caches are an error."""
    found = [(name, value) for name, value in mapping.items() if isinstance(value, Cache)]
    if len(found) > 1:
        raise EngineError(f"a forward carries two KV caches ({', '.join(name for name, _ in found)})")
    return found[0] if found else (None, None)


def output_cache(output) -> Cache | None:
    """The KV cache a model output holds, whatever its field is called (`cache`, `past_key_values`)."""
    return find_cache(dict(output.items()))[1]


def check_prunable(cache: Cache | None) -> None:
    """A pruned prompt's layers hold different numbers of tokens: only a DynamicCache can."""
    if cache is not None and (not isinstance(cache, DynamicCache) or cache.is_compileable):
        raise NotImplementedError(
            f"vtprune cannot prune into a {type(cache).__name__}: its pruned prompt's layers hold different numbers "
            "of tokens, which only a plain DynamicCache keeps (static and compiled caches hold one length in every "
            "layer; a quantized one keeps its tokens its own way). Use the default DynamicCache (no "
            "cache_implementation, no StaticCache)"
        )


def new_cache(config) -> DynamicCache:
    return DynamicCache(config=config)


PRUNED_RUN = "_vtprune_run"  # the attribute a KV cache filled by a pruned prompt carries (the engine's run of it)


class PrunedCache(DynamicCache):
    """A DynamicCache that a pruned prompt filled (`mark_pruned`). Its layers hold the kept tokens only, which the
    model without its pruner would take for a shorter prompt and continue silently wrong; so, while it holds tokens,
    it is grown (`update`, which every decoder layer calls before attending: no layer runs on it) only while the
    pruner that filled it is on the model; reading it (lengths, tensors) stays free. Deep and pickled copies keep
    the class (a pickled copy keeps no decision: refused). Emptied (reset), it is a plain cache."""

    def update(self, *args, **kwargs):
        self._check_continued()
        return super().update(*args, **kwargs)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._refuse_regrouping("batch_select_indices")
        super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._refuse_regrouping("batch_repeat_interleave")
        super().batch_repeat_interleave(repeats)

    def _refuse_regrouping(self, name: str) -> None:
        """The prompt's run keeps each sample's kept tokens and layouts by its row: a cache whose rows are selected
        or repeated would be continued with another sample's (beam search's reorder_cache moves whole rows within a
        sample's beams, which share its decision, and is left alone)."""
        if self.__dict__.get(PRUNED_RUN) is not None and any(layer.get_seq_length() for layer in self.layers):
            raise UnsupportedUseError(
                f"{name} on the KV cache of a pruned prompt: vtprune keeps each sample's kept tokens by its row, "
                "which this would regroup. Select or repeat the samples before the prefill (in input_ids and the "
                "images), or continue every row of the cache"
            )

    def _check_continued(self) -> None:
        held = self.__dict__.get(PRUNED_RUN)
        if held is None or held.live:
            return
        if all(layer.get_seq_length() == 0 for layer in self.layers):
            del self.__dict__[PRUNED_RUN]
            return
        raise continued_without_its_pruner()


def continued_without_its_pruner() -> UnsupportedUseError:
    return UnsupportedUseError(
        "this KV cache holds a prompt that a vtprune pruner pruned (its layers keep only the kept visual tokens), "
        "and that pruner has been removed since (or this is a pickled copy of one, which keeps no pruning "
        "decision): the model would read it as a shorter prompt. Continue the conversation before "
        "pruner.remove() (inside the `with vtprune.apply(...)` block), or start it again with an empty cache"
    )


def mark_pruned(cache: Cache, run) -> None:
    """Hang a pruned prompt's run on the cache it filled and guard the cache (see PrunedCache)."""
    setattr(cache, PRUNED_RUN, run)
    if type(cache) is DynamicCache:
        cache.__class__ = PrunedCache


def slice_layer(cache: Cache, layer: int, index: torch.Tensor, expected_length: int) -> None:
    """Keep, in decoder layer `layer`'s cache, the slots index [B, n] (of expected_length slots), per sample."""
    held = cache.layers[layer] if layer < len(getattr(cache, "layers", ())) else None
    keys, values = getattr(held, "keys", None), getattr(held, "values", None)
    if not (isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)):
        raise EngineError(
            f"cannot slice the KV cache of decoder layer {layer}: {type(cache).__name__} holds no keys/values "
            "tensors there (vtprune slices a DynamicCache's layers)"
        )
    expected = (index.shape[0], expected_length)
    if keys.dim() != 4 or (keys.shape[0], keys.shape[2]) != expected or values.shape[:3] != keys.shape[:3]:
        raise EngineError(
            f"the KV cache of decoder layer {layer} has keys of shape {tuple(keys.shape)}; vtprune expected "
            f"[batch {expected[0]}, heads, {expected[1]} tokens, head_dim]"
        )
    gather = index[:, None, :, None].to(keys.device)
    held.keys = keys.gather(2, gather.expand(-1, keys.shape[1], -1, keys.shape[3]))
    held.values = values.gather(2, gather.expand(-1, values.shape[1], -1, values.shape[3]))


def layer_keys(cache: Cache | None, layer: int, rows: int) -> torch.Tensor | None:
    """[B, kv heads, rows, d]: the keys (RoPE applied) decoder layer `layer` cached for the last `rows` tokens it
    ran on; None where the cache does not hold them (no cache; a sliding window shorter than the prompt)."""
    held = cache.layers[layer] if cache is not None and layer < len(getattr(cache, "layers", ())) else None
    keys = getattr(held, "keys", None)
    if not isinstance(keys, torch.Tensor) or keys.dim() != 4 or keys.shape[2] < rows:
        return None
    return keys[:, :, keys.shape[2] - rows:]


def cropped_tokens(cache: Cache, expected: list[int]) -> int:
    """k when every decoder layer's cache holds k > 0 tokens fewer than expected (a crop took back its last k
    tokens: assisted decoding's rejected candidates); else 0."""
    short = {e - cache.get_seq_length(layer) for layer, e in enumerate(expected)}
    return max(0, short.pop()) if len(short) == 1 else 0


def check_lengths(cache: Cache, expected: list[int], when: str) -> None:
    """Each decoder layer's cache holds as many tokens as the engine's layout says."""
    actual = [cache.get_seq_length(layer) for layer in range(len(expected))]
    if actual != expected:
        raise EngineError(
            f"{when}, the KV cache holds {actual} tokens per decoder layer where vtprune's layouts say {expected}"
        )
