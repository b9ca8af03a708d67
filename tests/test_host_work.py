"""Issue 17 item 2, held: a method selects a batch of alike items without per-item work.

A GPU pays for every op a selection launches, per item when it loops over items; so, for every method, the ops
its select_batch dispatches for four alike samples are those for one, but for a few per extra item (views
aside; vtprune.bench.ops counts them device-independently)."""

import pytest

from vtprune.api import refusal
from vtprune.bench.ops import count_prefill
from vtprune.methods import REGISTRY, WITHOUT_TOKENIZER
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

PER_EXTRA_ITEM = 8  # CLASP's 3 is the most today


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_selection_does_not_grow_with_the_batch(method):
    model = tiny_llava()
    budget = 8
    reason = refusal(model, method, budget, **WITHOUT_TOKENIZER.get(method, {}))
    if reason:
        pytest.skip(reason)
    one, four = (tiny_inputs(model, [SampleLayout()] * n) for n in (1, 4))
    count_prefill(model, method, budget, one)  # warm-up: caches a method fills once
    alone, batch = (count_prefill(model, method, budget, inputs)["select_ops"] for inputs in (one, four))
    assert alone > 0
    assert batch - alone <= 3 * PER_EXTRA_ITEM, f"{method}: {alone} ops for one item, {batch} for four"
