"""The prefill compiled: fewer tokens become lower latency where kernel launches dominate.

At batch 1 on a GPU a prefill is launch-bound: pruning 576 visual tokens to 64 shortens every kernel
but launches as many, and Python between layers costs as much again. `compile_prefill` runs each layer
stack of a prefill (the decoder; the vision towers an adapter lists) as a few compiled *segments*
(torch.compile, by default mode="reduce-overhead": CUDA graphs on a GPU), each a run of consecutive
layers. A segment starts where the pruner replaces the hidden states (an in-LLM stage) and at a layer
whose hook may change its input or output; a layer with a hook inside it (the vision recorder's on an
attention block, ToMe's merges) runs eagerly on its own. Where a hook only reads a layer's input or
output (the pruner's scoring at the layer before a stage, transformers' `output_hidden_states`, which
LLaVA's tower always asks for, CLASP's fusion), the segment returns that layer's output too. So the
unpruned decoder, and the decoder under a method acting at the LLM input or in the vision tower, is one
graph; under FastV (layer 2) two: layers 0-1 and 2-31. Single-token decode steps, whose cache grows every
step (a new shape each time), stay eager; a forward on a cache a pruned prompt filled (a follow-up turn)
runs its decoder layer by layer, each layer attending to a cache of its own length.

transformers' loop still calls every layer: the first of a segment runs the whole segment, the others
hand its outputs on. Each checks that it was given what the layer before it handed on and the inputs the
segment ran it with (the same tensors), and raises an EngineError otherwise, so a hook that changed them
inside a segment stops the forward instead of being silently skipped. The pruner's own layer hooks still
run around every layer (its bookkeeping), as before. The loop's state lives on the handle: one forward at a
time (another thread's is refused), and no deep copy of the model while a handle is open.

Segments run only inside the loop of the module holding the layers (a layer called on its own runs
eagerly). transformers' output-capturing hooks, which stay on a model's modules once it has recorded hidden
states or attentions, are taken off the segment's modules for each compiled call where they would do
nothing (dynamo cannot trace their ContextVar read). torch.compile's default shape handling applies: a
segment's first shape gets a static graph, a second one a graph with dynamic sizes that serves every later
one (with backend="cudagraphs", `vtprune bench --compile cudagraphs` asks dynamic=False: a graph per shape); each
segment is a code object of its own to dynamo. Instance-scoped: only this model's layers, undone
by remove().
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import threading
import types
from collections.abc import Callable

import torch

from ..adapters import adapter_for
from .compat import UnsupportedUseError


@dataclasses.dataclass(frozen=True)
class HiddenAccess:
    """What hooks do to the hidden states at a stack's layers in the forward being run, by layer index."""

    replaced: frozenset[int] = frozenset()  # layers whose input a hook replaces: a segment starts there
    read: frozenset[int] = frozenset()  # layers whose input a hook reads: the layer before hands on its own output


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int
    end: int
    exposed: tuple[int, ...] = ()  # layers before `end - 1` whose own output the segment returns too
    eager: bool = False  # a layer with a hook inside it, run as it is


@dataclasses.dataclass
class _Handed:
    """A segment that has run, which its later layers hand on."""

    segment: Segment
    outputs: dict[int, torch.Tensor]  # layer -> its output (the exposed ones and the last)
    returned: torch.Tensor  # what the last layer called returned
    args: tuple
    kwargs: dict
    next: int = 1  # the segment's layer to be called next, counted from its first


class _CompiledStack:
    """One stack of layers (each called as layer(hidden, *args, **kwargs) -> hidden) run segment by segment."""

    def __init__(self, model, layers, options: dict, access: Callable[[], HiddenAccess | None],
                 compiles: Callable, owns_outputs: bool = False):
        self.layers = list(layers)
        self.owns_outputs = owns_outputs
        if any("forward" in vars(layer) for layer in self.layers):
            raise ValueError("this model's layers already have a forward of their own (compiled before?); "
                             "remove() that first")
        # Segments run only inside the loop of the module that holds the layers: a layer called on its own elsewhere
        # is one layer, run eagerly.
        owner = next(module for module in model.modules() if any(child is layers for child in module.children()))
        self.in_loop, self._thread, self._busy = False, None, threading.Lock()
        self._handles = [owner.register_forward_pre_hook(self._loop_starts),
                         owner.register_forward_hook(self._loop_ends, always_call=True)]
        self.options, self.access, self.compiles = options, access, compiles
        self.eager = [layer.forward for layer in self.layers]  # before any state changes
        # each layer's submodules, whose hooks every forward's plan looks at (listed once: walking the module tree
        # at each forward costs a batch-1 GPU prefill more than a millisecond)
        self._inside = [list(layer.modules())[1:] for layer in self.layers]
        self.segments: dict[Segment, Callable] = {}  # compiled as first run, for this handle's life
        self.last_segments: list[Segment] = []  # the last forward's, in order
        self._plan: dict[int, Segment] | None = None  # this loop's, once its first layer is called
        self._idle: dict[int, list] = {}  # segment start -> its layers' modules whose forward hooks are all idle
        self._handed: _Handed | None = None
        for index, layer in enumerate(self.layers):
            layer.forward = _LayerForward(self, index)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self.layers:
            vars(layer).pop("forward", None)
        self.layers, self.eager, self.segments, self._handed, self._handles = [], [], {}, None, []

    def _loop_starts(self, module, args) -> None:
        # The loop's state lives here: one forward at a time (another thread's would hand this one's tensors on).
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(
                "vtprune.compile_prefill serves one forward of a model at a time, and another thread is running one: "
                "run them one after another, or give each thread a model (and a compile_prefill) of its own"
            )
        self._thread = threading.get_ident()
        self.in_loop, self._plan, self._handed = True, None, None

    def _loop_ends(self, module, args, output) -> None:
        if self._thread != threading.get_ident():  # (always called: also after another thread's refused start)
            return
        self.in_loop, self._plan, self._handed, self._thread = False, None, None, None
        self._busy.release()

    def _run(self, index: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        if self._plan is None:  # the loop's first layer
            self._plan, self._handed, self.last_segments = self._plan_now(), None, []
            if hidden.is_cuda:
                # A new forward may overwrite the CUDA-graph memory of the last one's outputs: tell the graphs so,
                # once (a segment takes the earlier ones' outputs, which must stay alive).
                torch.compiler.cudagraph_mark_step_begin()
        if self._handed is not None:
            return self._hand_on(index, self._handed, hidden, args, kwargs)
        segment = self._plan.get(index) or Segment(index, index + 1, eager=True)  # (a loop that began elsewhere)
        self.last_segments.append(segment)
        if segment.eager:
            self._handed = None
            return self.eager[index](hidden, *args, **kwargs)
        compiled = self.segments.get(segment)
        if compiled is None:
            forwards = tuple(self.eager[segment.start:segment.end])
            compiled = self.segments[segment] = torch.compile(_segment(forwards, segment), **self.options)
        with _idle_hooks_off(self._idle[segment.start]):
            last, exposed = compiled(hidden, *args, **kwargs)
        if self.owns_outputs and last.is_cuda:  # they outlive the next stack's CUDA-graph step
            last, exposed = last.clone(), [output.clone() for output in exposed]
        outputs = dict(zip(segment.exposed, exposed)) | {segment.end - 1: last}
        returned = outputs.get(index, last)
        self._handed = _Handed(segment, outputs, returned, args, kwargs) if segment.end > index + 1 else None
        return returned

    def _hand_on(self, index: int, handed: _Handed, hidden, args, kwargs) -> torch.Tensor:
        """Layer `index`, inside a segment that has run: what the segment computed for it, once checked that it comes
        next and was given what the segment gave it."""
        expected = handed.segment.start + handed.next
        same = index == expected and hidden is handed.returned and len(args) == len(handed.args) \
            and kwargs.keys() == handed.kwargs.keys() and all(a is b for a, b in zip(args, handed.args)) \
            and all(kwargs[k] is handed.kwargs[k] for k in kwargs)
        if not same:
            raise UnsupportedUseError(
                f"layer {index} of {type(self.layers[index]).__name__} was called inside a compiled segment of layers "
                f"{handed.segment.start}-{handed.segment.end - 1} (layer {expected} next), with other hidden states or "
                "inputs than the segment ran it with, or out of turn (a hook between the layers changed them, or a loop "
                "calling the layers in another order?); vtprune.compile_prefill cannot serve this forward: run it "
                "without compile_prefill"
            )
        # a layer whose output nothing reads hands on the segment's last: its successor only passes it along too
        handed.returned = handed.outputs.get(index, handed.outputs[handed.segment.end - 1])
        handed.next += 1
        if index == handed.segment.end - 1:
            self._handed = None
        return handed.returned

    def _plan_now(self) -> dict[int, Segment]:
        """Each segment's first layer -> the segment, for the forward the stack is starting."""
        access, count = self.access(), len(self.layers)
        if access is None:  # each layer on its own
            access = HiddenAccess(replaced=frozenset(range(count)))
        starts, read = {0, count} | access.replaced, set(access.read)
        alone = set(range(count)) if _global_hooks() else set()  # (they would be traced inside the graphs)
        for i, layer in enumerate(self.layers):
            hooks = _hooks(layer, self._inside[i])
            if "inside" in hooks:
                alone.add(i)
            if "changes input" in hooks:
                starts.add(i)
            if "changes output" in hooks:
                starts |= {i, i + 1}
            if "reads output" in hooks:  # (transformers' hidden-states hook keeps its first layer's input too)
                read |= {i, i + 1}
        starts |= alone | {i + 1 for i in alone}
        bounds = sorted(starts)
        plan = {start: Segment(start, end, tuple(i - 1 for i in sorted(read) if start < i < end), start in alone)
                for start, end in zip(bounds, bounds[1:])}
        self._idle = {start: [module for inside in self._inside[start:end] for module in inside if module._forward_hooks]
                      for start, end in zip(bounds, bounds[1:])}
        return plan


class _LayerForward:
    """A layer's forward while compile_prefill is open: its stack's segment, or the layer's own eager forward."""

    def __init__(self, stack: _CompiledStack, index: int):
        self.stack, self.index, self.eager = stack, index, stack.eager[index]
        self.__signature__ = inspect.signature(self.eager)  # what it takes: the layer's (apply checks it)

    def __call__(self, hidden_states, *args, **kwargs):
        stack = self.stack
        if not (stack.in_loop and stack.compiles(hidden_states)):
            return self.eager(hidden_states, *args, **kwargs)
        return stack._run(self.index, hidden_states, args, kwargs)

    def __deepcopy__(self, memo):
        # The copy's layers would run this model's segments, on this model's weights.
        raise TypeError("a model with vtprune.compile_prefill open cannot be deep-copied: copy it before, or after "
                        "the handle's remove()")


def _segment(forwards: tuple, segment: Segment):
    exposed = tuple(segment.start + i in segment.exposed for i in range(len(forwards)))

    def run_layers(hidden_states, *args, **kwargs):
        outputs = []
        for forward, keep in zip(forwards, exposed):
            hidden_states = forward(hidden_states, *args, **kwargs)
            if keep:
                outputs.append(hidden_states)
        return hidden_states, tuple(outputs)

    # dynamo keeps its graphs, recompile count and "skip this frame" per code object: each segment gets one of its own
    # (the default 8 graphs each; a frame dynamo gives up on leaves the other segments compiled)
    name = f"vtprune_segment_{segment.start}_{segment.end}"
    code = run_layers.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, run_layers.__globals__, name, None, run_layers.__closure__)


@contextlib.contextmanager
def _idle_hooks_off(modules: list):
    """transformers' idle output-capturing hooks off `modules` for one compiled call: dynamo would trace them, and
    their ContextVar read breaks the graph (giving up on the whole segment). They would have done nothing."""
    saved = [(module, dict(module._forward_hooks)) for module in modules]
    for module, _ in saved:
        module._forward_hooks.clear()
    try:
        yield
    finally:
        for module, hooks in saved:
            module._forward_hooks.update(hooks)


def _hooks(layer, inside: list) -> set[str]:
    """What hooks acting in this forward may do at a layer (whose submodules are `inside`), beyond the pruner's own
    ones (which it reports itself)."""
    found = set()
    if any(module._forward_pre_hooks or not all(map(_idle, module._forward_hooks.values())) for module in inside):
        found.add("inside")
    if any(not getattr(hook, "vtprune_layer_hook", False) for hook in layer._forward_pre_hooks.values()):
        found.add("changes input")
    acting = [hook for hook in layer._forward_hooks.values() if not _idle(hook)]
    if any(not _reads_only(hook) for hook in acting):
        found.add("changes output")
    elif acting:
        found.add("reads output")
    return found


def _reads_only(hook) -> bool:
    """vtprune's fusion hooks and transformers' output-capturing ones keep a layer's output, and change nothing."""
    return getattr(hook, "vtprune_reads_output", False) or _capturing(hook)


def _capturing(hook) -> bool:
    return getattr(hook, "__qualname__", "").endswith(".output_capturing_hook")


def _idle(hook) -> bool:
    """transformers' output-capturing hooks stay on a model's layers and attention blocks once it has returned
    hidden states or attentions, and do nothing in a forward that does not record what they capture (the key their
    closure holds is not in the active collector). A hook not recognised as one is not idle."""
    if not _capturing(hook):
        return False
    try:
        from transformers.utils.output_capturing import _active_collector
        captures = dict(zip(hook.__code__.co_freevars, (cell.cell_contents for cell in hook.__closure__)))["key"]
    except (ImportError, KeyError, TypeError, ValueError):
        return False
    collector = _active_collector.get()
    return not collector or captures not in collector


def _global_hooks() -> bool:
    """Whether hooks registered for every module (torch.nn.modules.module.register_module_forward_hook) are set:
    each layer then runs on its own, so that they see what it computes."""
    from torch.nn.modules import module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks)


class CompiledPrefill:
    """One model's prefill compiled, stack by stack and segment by segment; remove() restores the eager forwards."""

    def __init__(self, model, **compile_options):
        adapter = adapter_for(model)
        self.model = model
        options = {"mode": "reduce-overhead", **compile_options}
        try:  # torch.compile checks its options when called (it compiles only at the first run): now, not then
            torch.compile(lambda x: x, **options)
        except Exception as error:
            raise ValueError(f"compile_prefill's options {compile_options} are torch.compile's, which refuses them: "
                             f"{error}") from None
        try:
            towers = [layers for _, layers in adapter.vision_encoders()]
        except ValueError:  # a family whose towers vtprune does not act in (Qwen2-VL's): they stay eager
            towers = []
        self.decoder, self.towers = None, []
        try:
            self.decoder = _CompiledStack(model, adapter.decoder_layers, options, self._decoder_access, _many_tokens)
            for layers in towers:
                self.towers.append(_CompiledStack(model, layers, options, HiddenAccess, _always, owns_outputs=True))
        except ValueError:
            self.remove()
            raise

    @property
    def stacks(self) -> list[_CompiledStack]:
        return [stack for stack in (self.decoder, *self.towers) if stack is not None]

    @property
    def last_segments(self) -> list[tuple[int, int]]:
        """The decoder's segments in the last forward that compiled it, as (first layer, end)."""
        return [(segment.start, segment.end) for segment in self.decoder.last_segments]

    def _decoder_access(self) -> HiddenAccess | None:
        pruner = getattr(self.model, "_vtprune_pruner", None)
        return pruner.hidden_access() if pruner is not None else HiddenAccess()

    def remove(self) -> None:
        for stack in self.stacks:
            stack.remove()

    def __enter__(self) -> "CompiledPrefill":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _many_tokens(hidden: torch.Tensor) -> bool:
    return hidden.shape[1] > 1


def _always(hidden: torch.Tensor) -> bool:
    return True


# What `vtprune bench --compile` may name: inductor's kernels in CUDA graphs (torch.compile's "reduce-overhead"), or
# the eager kernels captured in CUDA graphs with no code generated (far quicker to compile a 7B model's segments; at
# batch 1, where launches dominate, most of the gain). The latter takes a static graph per shape: recompiled with
# dynamic sizes after a second shape, its CUDA-graph tree replayed a segment recorded at one sequence length with
# the inputs of another, and failed (H100, session 15)
COMPILERS = {"inductor": {"mode": "reduce-overhead"},
             "cudagraphs": {"backend": "cudagraphs", "mode": None, "dynamic": False}}


def compile_prefill(model, **compile_options) -> CompiledPrefill:
    """Compile `model`'s prefill (its decoder and the vision towers vtprune knows), segment by segment
    (torch.compile's options; default mode="reduce-overhead"); works with or without a vtprune pruner on the
    model. Returns a handle; .remove() undoes it."""
    return CompiledPrefill(model, **compile_options)


def forget_compiled_graphs(model: torch.nn.Module) -> None:
    """Drop torch's compiled code where the model, or a module of it, was compiled (torch.compile of its forward,
    Module.compile): torch does not guard compiled graphs on module hooks (`skip_nnmodule_hook_guards`), so graphs
    traced before apply() ran on without the pruner's hooks (silently unpruned), and graphs traced while a pruner was
    on would keep running its hooks after remove(). torch._dynamo.reset() drops every compiled graph of the process;
    each is traced again at its next call."""
    if any(module._compiled_call_impl is not None
           or hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable") for module in model.modules()):
        torch._dynamo.reset()
