"""The public entry points: apply a method to a model, and list the methods."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .adapters import adapter_for
from .engine import Pruner, check_attention, check_budget
from .engine.compat import warn_if_untested
from .methods import REGISTRY, get_method


def apply(model, method: str, budget: int | float, **options: Any) -> Pruner:
    """Prune `model`'s visual tokens with `method`, keeping `budget` per image.

    budget: an int, the visual tokens kept per image (a budget at or above an image's
    token count keeps it whole, a documented no-op), or a float in (0, 1], the fraction
    kept. options: the method's own (see `vtprune.methods()`). Returns a handle whose
    `remove()` (or leaving its `with` block) restores the model exactly.

    A method's schedule reads the budget its own way (SparseVLM's is the authors' average label, not
    the final count), and options that fix each stage's count (clse's keep, for images; sparsevlm's
    counts; pdrop's ratios) leave it only deciding which items stay whole: `last_stats` counts what
    was kept, and its nominal_budget is the budget as given.
    """
    method_cls = get_method(method)
    budget = check_budget(budget)
    adapter = adapter_for(model)
    if getattr(model, "_vtprune_pruner", None) is not None:
        raise RuntimeError(
            f"this model already carries a pruner ({model._vtprune_pruner!r}); call its remove() before applying another"
        )
    check_attention(adapter)
    if method_cls.reads_decoder_attention():
        adapter.check_decoder_attention(method_cls.name)
    warn_if_untested()
    instance = method_cls(method_cls.parse_options(options))
    instance.check_model(adapter.model_info)
    pruner = Pruner(model, adapter, instance, budget)
    model._vtprune_pruner = pruner
    return pruner


def refusal(model, method: str, budget: int | float, *, videos: bool = False, **options: Any) -> str | None:
    """Why apply() refuses this method at this budget on this model (its ValueError's message), or why its pruner
    would refuse the videos of the prompts when `videos`; None where it runs. Nothing stays on the model. The
    harnesses list such a config as not run (ToMe@64 on a 3-layer tower, ToMe on a video task) instead of
    stopping."""
    try:
        apply(model, method, budget, **options).remove()
    except ValueError as error:
        return str(error)
    return get_method(method).kind_refusal("video") if videos else None


@dataclass(frozen=True)
class MethodInfo:
    """One registered method, as `vtprune.methods()` lists it: its name for `apply`, where it acts (the LLM's
    input, its layers, the vision encoder), a one-line summary, and its options with their defaults."""

    name: str
    where: str
    summary: str
    defaults: dict[str, Any]


def methods() -> list[MethodInfo]:
    """The registered methods, where each acts, and its default options."""
    return [MethodInfo(cls.name, cls.where, cls.summary, cls.defaults()) for _, cls in sorted(REGISTRY.items())]
