"""Counting the ops a pruned prefill dispatches, inside the method's select_batch and outside it.

A GPU launches each op (microseconds each) and stalls at each host read, so the ops a prefill adds for every
extra sample are the per-item work issue 17 item 2 asks to remove. benchmarks/host_work.py prints them per
method; tests/test_host_work.py holds the selections to it.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vtprune
from vtprune.methods import WITHOUT_CHECKPOINT, BlockMergingMethod


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops other than views, by where they run: inside the method's own work (select_batch,
    a block-merging method's merges: "select") or not ("engine"); with cuda, only those on a CUDA tensor (the
    engine's host-side bookkeeping on CPU copies launches nothing; on the CPU it cannot be told apart and is
    counted)."""

    def __init__(self, cuda: bool):
        super().__init__()
        self.where, self.cuda = "engine", cuda
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        launches = not func.is_view and (not self.cuda or any(
            isinstance(a, torch.Tensor) and a.is_cuda for a in torch.utils._pytree.tree_leaves((args, kwargs))))
        if launches:  # a view (a slice, a row) launches nothing
            self.ops[self.where] += 1
        return func(*args, **(kwargs or {}))


def count_prefill(model, method: str, budget: int, inputs: dict, cuda: bool = False) -> dict:
    """One pruned prefill of `inputs`: its ops inside select_batch and a block-merging method's merges ("select_ops")
    and outside ("engine_ops"), and on CUDA its host synchronisations ("syncs"; None elsewhere) and the lines that
    made them ("sync_sites": "file:line" -> count, the Python line that called the synchronising op); then the same prefill replaying its decision (the
    schedule oracle: the same kept tokens, no scoring) and its ops ("replay_ops"). What the method launches beyond
    its replay is its own host work: where a GPU's kernels are short (a vision tower's blocks), the device waits
    for it."""
    pruner = vtprune.apply(model, method, budget, **WITHOUT_CHECKPOINT.get(method, {}))
    counter = OpCounter(cuda)

    def counted(work):
        def run(*args):
            where, counter.where = counter.where, "select"
            try:
                return work(*args)
            finally:
                counter.where = where

        return run

    pruner.method.select_batch = counted(pruner.method.select_batch)
    if isinstance(pruner.method, BlockMergingMethod):  # its merges inside the tower are its own work too
        pruner.method.merge = counted(pruner.method.merge)
    try:
        with torch.no_grad(), sync_sites() as sites:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("warn")
            with counter:
                model(**inputs, use_cache=True, logits_to_keep=1)
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
        replay = OpCounter(cuda)
        with torch.no_grad(), pruner.replaying(pruner.last_decision), replay:
            model(**inputs, use_cache=True, logits_to_keep=1)
    finally:
        pruner.remove()
    return {"select_ops": counter.ops["select"], "engine_ops": counter.ops["engine"],
            "replay_ops": replay.ops["engine"],
            "syncs": sum(sites.values()) if cuda else None, "sync_sites": dict(sites.most_common()) if cuda else None}


@contextlib.contextmanager
def sync_sites():
    """Counts the CUDA synchronisations torch warns of (under torch.cuda.set_sync_debug_mode("warn")) by the line
    that asked for them: the innermost frame outside torch, as torch's own Python wrappers (Tensor.item's, say)
    would name only themselves."""
    sites = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites[calling_site(sys._getframe(1))] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record  # restored by catch_warnings
        yield sites


def calling_site(frame) -> str:
    """"file:line" of the innermost frame outside torch and the warnings module."""
    while frame is not None:
        path = frame.f_code.co_filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith(("/warnings.py", "/_py_warnings.py")):
            return f"{path}:{frame.f_lineno}"
        frame = frame.f_back
    return "unknown"


# What reads a tensor's values into Python: on a GPU each such read of a device tensor waits for its queue to drain.
READS = [(torch.Tensor, name) for name in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__",
                                           "nonzero", "cpu", "numpy")] + [(torch, "equal"), (torch, "nonzero")]

# Ops whose CUDA kernels read the device before they return, though no value reaches Python: their output's size
# depends on the data (bincount sizes its output by the input's maximum, minlength or not).
SIZED_BY_DATA = {torch.ops.aten.bincount.default, torch.ops.aten.masked_select.default,
                 torch.ops.aten._unique2.default, torch.ops.aten.unique_consecutive.default,
                 torch.ops.aten.unique_dim.default}
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
            torch.ops.aten._index_put_impl_.default}


def implicit_read(func, args, kwargs) -> str | None:
    """The name of the implicit device read a dispatched op makes on CUDA, or None."""
    if func in SIZED_BY_DATA:
        return func.__name__
    if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in INDEXING and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1]):
        return "indexing by a mask"  # a nonzero first
    return None


def scalar_write(tensor, index, value) -> bool:
    """Whether `tensor[index] = value` writes a Python number through tensor indices, which torch does by making the
    number a CPU tensor and copying it to a CUDA tensor's device with a blocking copy (a read of its queue)."""
    indices = index if isinstance(index, tuple) else (index,)
    return isinstance(value, (bool, int, float)) and any(isinstance(i, torch.Tensor) for i in indices)


TOWER_HOOKS = ("engine/vision.py", "engine/block_merge.py")


@contextlib.contextmanager
def stage_reads(methods: bool = False):
    """Counts, by "file:line name", the reads of tensor values (READS) that vtprune makes while a prefill prunes: in
    its hooks on the vision tower (engine/vision.py, engine/block_merge.py), under prefill.plan_run and
    prefill.begin (the language model's input) and prefill.at_layer (each in-LLM stage), and while a decode step
    continues a pruned cache (decode.continue_run, decode.at_layer); the method's own code (the innermost vtprune
    frame in vtprune/methods/) only with `methods`. Besides explicit reads, the ops that read a CUDA device inside
    torch: those sized by their data (`SIZED_BY_DATA`, a repeat_interleave without output_size, indexing by a mask)
    and a Python number written through tensor indices. Device-independent: on the CPU every tensor counts, a host
    copy's too (the engine reads none there)."""
    from vtprune.engine import decode, prefill

    stage_code = {prefill.plan_run.__code__, prefill.begin.__code__, prefill.at_layer.__code__,
                  decode.continue_run.__code__, decode.at_layer.__code__}
    reads = collections.Counter()

    def site(frame) -> str | None:
        line = None
        while frame is not None:
            path = frame.f_code.co_filename.replace("\\", "/")
            if "/vtprune/" in path:
                here = f"{path.rsplit('/vtprune/', 1)[-1]}:{frame.f_lineno}"
                if line is None and here.startswith("methods/") and not methods:
                    return None
                line = line or here
                if here.startswith(TOWER_HOOKS):
                    return line
            if frame.f_code in stage_code:
                return line
            frame = frame.f_back
        return None

    def count(name: str) -> None:
        where = site(sys._getframe(2))
        if where is not None:
            reads[f"{where} {name}"] += 1

    def counted(read, name):
        def wrapper(*args, **kwargs):
            count(name)
            return read(*args, **kwargs)
        return wrapper

    def setitem(tensor, index, value):
        if scalar_write(tensor, index, value):
            count("a number written through tensor indices")
        return write(tensor, index, value)

    class ImplicitReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = implicit_read(func, args, kwargs)
            if name is not None:
                count(name)
            return func(*args, **kwargs)

    originals = [(owner, name, getattr(owner, name)) for owner, name in READS]
    write = torch.Tensor.__setitem__
    for owner, name, read in originals:
        setattr(owner, name, counted(read, name))
    torch.Tensor.__setitem__ = setitem
    try:
        with ImplicitReads():
            yield reads
    finally:
        torch.Tensor.__setitem__ = write
        for owner, name, read in originals:
            setattr(owner, name, read)
