"""Issue 17 item 2, held: a method selects a batch of alike items without per-item work.

A GPU pays for every op a selection launches, per item when it loops over items; so, for every method, the ops
its select_batch dispatches for four alike samples are those for one, but for a few per extra item (views
aside; vtprune.bench.ops counts them device-independently); and the engine's stage work reads no value from the
device."""

import pytest
import torch

import vtprune

from vtprune.adapters import adapter_for
from vtprune.api import refusal
from vtprune.bench.ops import count_prefill
from vtprune.engine.cache import cache_keyword, output_cache
from vtprune.methods import REGISTRY, WITHOUT_CHECKPOINT
from vtprune.tiny import SampleLayout, tiny_inputs, tiny_llava

PER_EXTRA_ITEM = 8  # CLASP's 3 is the most today
ENGINE_OPS_PER_MERGING_BLOCK = 16  # 12-13 today (26-27 before session 26)


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_selection_does_not_grow_with_the_batch(method):
    model = tiny_llava()
    budget = 8
    reason = refusal(model, method, budget, **WITHOUT_CHECKPOINT.get(method, {}))
    if reason:
        pytest.skip(reason)
    one, four = (tiny_inputs(model, [SampleLayout()] * n) for n in (1, 4))
    count_prefill(model, method, budget, one)  # warm-up: caches a method fills once
    alone, batch = (count_prefill(model, method, budget, inputs)["select_ops"] for inputs in (one, four))
    assert alone > 0
    assert batch - alone <= 3 * PER_EXTRA_ITEM, f"{method}: {alone} ops for one item, {batch} for four"


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_a_selection_reads_the_device_no_more_for_more_items_or_tokens(method):
    """Each read of the device in a selection stalls a GPU until its queue drains; one per item, or per round of a
    greedy loop (a Python number written through index tensors is such a read: torch copies it over by a blocking
    copy), stalls it that many times. A method's reads, explicit or inside torch (`stage_reads`), are no more for
    three samples than for one, nor at budget 16 than at 8 (each counted in a second prefill: what a method
    computes once and keeps, e.g. pooling's windows for a grid, is not per batch)."""
    from vtprune.bench.ops import stage_reads

    model = tiny_llava()
    reads = {}
    for samples, budget in ((1, 8), (3, 8), (1, 16)):
        reason = refusal(model, method, budget, **WITHOUT_CHECKPOINT.get(method, {}))
        if reason:
            pytest.skip(reason)
        inputs = tiny_inputs(model, [SampleLayout(images=2, text_before=3)] * samples)
        with vtprune.apply(model, method, budget, **WITHOUT_CHECKPOINT.get(method, {})), torch.no_grad():
            model(**inputs, use_cache=True, logits_to_keep=1)  # warm-up: what a method computes once and keeps
            with stage_reads(methods=True) as counted:
                model(**inputs, use_cache=True, logits_to_keep=1)
        reads[samples, budget] = counted
    one = sum(reads[1, 8].values())
    assert sum(reads[3, 8].values()) <= one, (dict(reads[1, 8]), dict(reads[3, 8]))
    assert sum(reads[1, 16].values()) <= one, (dict(reads[1, 8]), dict(reads[1, 16]))


def test_a_sync_is_named_by_the_line_outside_torch_that_asked_for_it():
    """host_work.py names each CUDA sync by its line; torch's own Python wrappers (Tensor.item's, say) would name
    only themselves, so the line is the innermost one outside torch. Checked with a stand-in for torch's warning."""
    import inspect

    from vtprune.bench.ops import sync_sites

    torch_like = {}
    exec(compile("import warnings\ndef item(message):\n    warnings.warn(message)\n",
                 "/lib/site-packages/torch/_tensor.py", "exec"), torch_like)
    here = inspect.currentframe()
    with sync_sites() as sites:
        asked = here.f_lineno + 1
        torch_like["item"]("called a synchronizing CUDA operation")
        torch_like["item"]("another warning")
    assert dict(sites) == {f"{here.f_code.co_filename}:{asked}": 1}


PROBING = {"sparsevlm", "pdrop", "dart"}  # methods that probe a decoder layer's queries and keys


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_the_engine_reads_nothing_from_the_device_while_it_prunes(method):
    """On a GPU a read of a device value waits for every queued kernel and leaves the GPU idle while the host catches
    up. The engine's stage work (in the vision tower's hooks, at the language model's input, at each in-LLM stage)
    knows its shapes on the host, and reads nothing: a wrong answer of a method, or tower rows that are not the
    items the language model received, are reported by the prefill's one read at its end. A decode step reads
    nothing. (LLaVA-NeXT's tiles are searched for each new grid of tiles: two reads there, not tested here.)"""
    from vtprune.bench.ops import stage_reads

    model = tiny_llava()
    budget = 8
    reason = refusal(model, method, budget, **WITHOUT_CHECKPOINT.get(method, {}))
    if reason:
        pytest.skip(reason)
    for samples in (1, 3):
        inputs = tiny_inputs(model, [SampleLayout(images=2, text_before=3)] * samples)
        with vtprune.apply(model, method, budget, **WITHOUT_CHECKPOINT.get(method, {})) as pruner, torch.no_grad():
            with stage_reads() as reads:
                output = model(**inputs, use_cache=True, logits_to_keep=1)
            stages = len(pruner.last_decision.stage_layers)
            assert stages > 0
            assert not reads, dict(reads)
            step = output.logits[:, -1:].argmax(-1)
            with stage_reads() as reads:  # a decode step on the pruned cache
                model(input_ids=step, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1),
                      use_cache=True, **{cache_keyword(model.model.language_model): output_cache(output)})
            assert not reads, dict(reads)


@pytest.mark.parametrize("method", sorted(PROBING))
@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("case", ["text last", "image last", "padding inside"])
def test_a_probes_rows_counted_on_the_host_are_those_the_device_holds(method, padding_side, case, monkeypatch):
    """A layer probe's rows (valid slots, text rows, asking rows) come from counts the host knows where each sample's
    padding is at its ends and its prompt ends with text; they equal what the device holds (read instead, as for a
    prompt ending with an image, or a mask with a zero inside)."""
    from vtprune.engine import prefill

    probe_rows, host_counts, compared = prefill._probe_rows, prefill._host_row_counts, []

    def checked(run, layout):
        known = host_counts(run.prompt_text, layout)
        assert (known is not None) == (case == "text last")
        from_host = probe_rows(run, layout)
        monkeypatch.setattr(prefill, "_host_row_counts", lambda *args: None)
        read = probe_rows(run, layout)
        monkeypatch.setattr(prefill, "_host_row_counts", host_counts)
        assert _rows_as_tensors(from_host) == _rows_as_tensors(read)
        compared.append(layout.length)
        return from_host

    monkeypatch.setattr(prefill, "_probe_rows", checked)
    model = tiny_llava()
    after = 0 if case == "image last" else 4
    inputs = tiny_inputs(model, [SampleLayout(text_after=after), SampleLayout(images=2, text_before=6, text_after=after)],
                         padding_side=padding_side)
    if case == "padding inside":  # the second token of sample 1 (text) masked out
        first = int(inputs["attention_mask"][1].argmax())
        inputs["attention_mask"][1, first + 1] = 0
    with vtprune.apply(model, method, 8, **WITHOUT_CHECKPOINT.get(method, {})), torch.no_grad():
        model(**inputs, use_cache=True, logits_to_keep=1)
    assert compared


def _rows_as_tensors(found) -> list:
    rows, asking, slots = found
    plain = lambda value: value.tolist() if isinstance(value, torch.Tensor) else list(range(value.start, value.stop))  # noqa: E731
    return [[(plain(present), text.tolist(), count) for present, text, count in rows], [a.tolist() for a in asking],
            slots.tolist()]


@pytest.mark.parametrize("method", ["sparsevlm", "visionzip"])
def test_a_finished_prefill_keeps_none_of_its_checks(method):
    """The checks a prefill defers hold device tensors; the run lives as long as its KV cache, so they go with the
    rest of what only the prefill reads (else every stage's flags, and what their messages need, would stay)."""
    from vtprune.engine.cache import PRUNED_RUN

    model = tiny_llava()
    inputs = tiny_inputs(model, [SampleLayout(), SampleLayout(images=2, text_before=3)])
    with vtprune.apply(model, method, 8, **WITHOUT_CHECKPOINT.get(method, {})), torch.no_grad():
        run = getattr(output_cache(model(**inputs, use_cache=True)), PRUNED_RUN).run
    assert run.checks == [] and run.references == {} and run.encoded is None


@pytest.mark.parametrize("method", ["tome", "ficoco_v"])
def test_a_merging_block_costs_the_engine_few_ops(method):
    """On a GPU a vision tower's blocks are short kernels, so the host's ops in a merging block are what the device
    waits for (ToMe and FiCoCo-V were 1.5-1.6x their schedule oracle on an H100). Besides the method's merge, the
    engine adds the block's keys (and queries), the attention bias, the survivors' gathers and the write: a deeper
    tower costs the engine at most ENGINE_OPS_PER_MERGING_BLOCK ops more for each merging block more."""
    def engine_ops_over_replay(tower_layers: int) -> tuple[int, int]:
        model = tiny_llava()
        config = model.config
        config.vision_config.num_hidden_layers = tower_layers
        model = type(model)(config).eval()
        inputs = tiny_inputs(model, [SampleLayout()] * 2)
        count_prefill(model, method, 8, inputs)  # warm-up
        ops = count_prefill(model, method, 8, inputs)
        method_class = REGISTRY[method]
        schedule = method_class(method_class.Options()).merge_schedule(adapter_for(model).model_info, tower_layers, 64, 8)
        blocks = sum(r > 0 for r in schedule.values())
        return ops["engine_ops"] - ops["replay_ops"], blocks

    (shallow, shallow_blocks), (deep, deep_blocks) = engine_ops_over_replay(6), engine_ops_over_replay(14)
    assert deep_blocks >= shallow_blocks + 4
    assert 0 < (deep - shallow) / (deep_blocks - shallow_blocks) <= ENGINE_OPS_PER_MERGING_BLOCK, (shallow, deep)


def test_stage_reads_counts_every_read_it_names_and_puts_torch_back():
    """The other tests here hold the engine to no reads; this one holds the counter to seeing them: each kind of
    read, explicit or inside torch, made from a line of the engine's tower hooks is counted once under its name."""
    from vtprune.bench.ops import READS, stage_reads

    tower_hook = {}  # a stand-in for a line of engine/vision.py
    exec(compile("def run(work):\n    return work()\n", "/site-packages/vtprune/engine/vision.py", "exec"), tower_hook)
    x, mask = torch.arange(6), torch.arange(6) > 2
    reads = {
        "tolist": lambda: x.tolist(), "item": lambda: x[0].item(), "__bool__": lambda: bool(x[1]),
        "__int__": lambda: int(x[1]), "__float__": lambda: float(x[1]), "__index__": lambda: [0, 1][x[1]],
        "nonzero": lambda: x.nonzero(), "cpu": lambda: x.cpu(), "numpy": lambda: x.numpy(),
        "equal": lambda: torch.equal(x, x), "bincount.default": lambda: torch.bincount(x),
        "masked_select.default": lambda: x.masked_select(mask), "_unique2.default": lambda: torch.unique(x),
        "unique_consecutive.default": lambda: torch.unique_consecutive(x),
        "unique_dim.default": lambda: torch.unique(x, dim=0),
        "repeat_interleave without output_size": lambda: x.repeat_interleave(x),
        "indexing by a mask": lambda: x[mask],
        "a number written through tensor indices": lambda: x.clone().__setitem__(torch.tensor([1]), 5),
    }
    before = [getattr(owner, name) for owner, name in READS] + [torch.Tensor.__setitem__]
    for name, read in reads.items():
        with stage_reads() as counted:
            tower_hook["run"](read)
        assert dict(counted) == {f"engine/vision.py:2 {name}": 1}, name
    with stage_reads() as counted:
        tower_hook["run"](lambda: torch.nonzero(x))
    assert dict(counted) == {"engine/vision.py:2 nonzero": 1}
    assert [getattr(owner, name) for owner, name in READS] + [torch.Tensor.__setitem__] == before


def test_stage_reads_counts_a_read_while_a_decode_step_masks_a_pruned_layer(monkeypatch):
    from vtprune.bench.ops import stage_reads
    from vtprune.engine import decode

    def reading_mask(kv_valid, *args, **kwargs):
        kv_valid.tolist()
        return mask_of(kv_valid, *args, **kwargs)

    model, mask_of = tiny_llava(), decode.decoder_mask
    inputs = tiny_inputs(model, [SampleLayout()])
    with vtprune.apply(model, "fastv", 8), torch.no_grad():
        output = model(**inputs, use_cache=True, logits_to_keep=1)
        step = output.logits[:, -1:].argmax(-1)
        monkeypatch.setattr(decode, "decoder_mask", reading_mask)
        with stage_reads() as reads:
            model(input_ids=step, attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1),
                  use_cache=True, **{cache_keyword(model.model.language_model): output_cache(output)})
    assert reads and all(site.startswith("engine/decode.py:") and site.endswith(" tolist") for site in reads), reads
