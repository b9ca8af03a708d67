"""Merging inside the vision encoder's blocks, for a BlockMergingMethod (ToMe, FiCoCo-V).

Such a method merges between a block's attention and its MLP. transformers' encoder layers
hold the block's residual in a local variable, so no hook can shorten the sequence there. The
tower keeps its length instead: a merged-away token's column is masked out of every later
attention (an additive bias of the dtype's minimum on its key column; log(size) on the
survivors' columns when the method uses proportional attention), and the merge is written
through the block's attention output: what it changed at each survivor is added there, so that
residual + output is the merged state (exactly the block's own sum where the method returns a
survivor's state unchanged).
Survivors thus compute what the shortened sequence computes, up to float rounding; merged-away
columns go on being computed and are never read. The encoder itself runs no faster: these
methods are compared for the tokens they leave the LLM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..methods import BlockInput, BlockMergingMethod
from .budget import tokens_for_budget


def tower_attention_inputs(attention, hidden: torch.Tensor, queries: bool = True):
    """(query [R, H, T, d] or None without queries, key, scaling) of a vision-tower attention module on its input,
    from its own projections (the same whichever attention implementation the tower runs)."""
    split = (*hidden.shape[:2], -1, attention.head_dim)
    query = attention.q_proj(hidden).view(split).transpose(1, 2) if queries else None
    key = attention.k_proj(hidden).view(split).transpose(1, 2)
    return query, key, float(getattr(attention, "scaling", None) or attention.scale)


@dataclass
class TowerMerge:
    """The merges so far of one tower run, over its R rows of T tokens.

    Kept in the survivors' terms (n of them), so that a merge updates each field with one op: on a GPU the tower's
    blocks are short kernels, and each op more in a merging block is host time the device waits for."""

    schedule: dict[int, int]  # encoder layer -> tokens merged away per row there
    alive: torch.Tensor  # [R, n] columns of the surviving tokens, in the method's order
    position: torch.Tensor  # [R, T] the survivor (index into alive) each column's token is now part of
    size: torch.Tensor  # [R, n] tokens each survivor stands for
    residual: torch.Tensor | None = None  # the merging block's input
    attention: tuple | None = None  # its (query or None, key, scaling)

    @classmethod
    def start(cls, schedule: dict[int, int], rows: int, tokens: int, device) -> "TowerMerge":
        columns = torch.arange(tokens, device=device).expand(rows, tokens)
        return cls(schedule, columns, columns, torch.ones(rows, tokens, device=device))

    @property
    def merged(self) -> bool:
        return self.alive.shape[1] < self.position.shape[1]

    @functools.cached_property
    def slot(self) -> torch.Tensor:
        """[R, T] the column of the survivor each column's token ended up part of: read once the tower has run
        (each of its items reads its rows; the merges never read it)."""
        return self.alive.gather(1, self.position)

    def bias(self, dtype: torch.dtype, proportional: bool) -> torch.Tensor:
        """[R, 1, 1, T] additive attention bias: merged-away keys out, log(size) on survivors if proportional."""
        bias = torch.full(self.position.shape, torch.finfo(dtype).min, dtype=dtype, device=self.alive.device)
        if proportional:
            return bias.scatter_(1, self.alive, self.size.log().to(dtype))[:, None, None, :]
        return bias.scatter_(1, self.alive, 0.0)[:, None, None, :]


class BlockMerging:
    """Hooks on every layer of each tower that run a BlockMergingMethod's merges in the recorder's current call."""

    def __init__(self, recorder, towers, method: BlockMergingMethod, model_info, budget: int | float, cls: bool):
        self.recorder, self.method, self.model_info, self.budget, self.cls = recorder, method, model_info, budget, cls
        self.handles = []
        read = getattr(recorder.adapter.model.config, "vision_feature_layer", None)
        if isinstance(read, (list, tuple)):
            raise ValueError(f"method {method.name!r} merges in the tower's blocks up to the one whose output the "
                             f"projector reads, but this model's projector reads layers {list(read)} side by side: "
                             "merges between them would reach some of a token's features and not the others")
        vision = recorder.adapter.model.config.vision_config
        self.grid = (vision.image_size // vision.patch_size,) * 2
        patches = self.grid[0] * self.grid[1]
        for kind, layers in towers:
            # A budget the method cannot reach on this tower fails here, at apply(), not at the first image.
            method.merge_schedule(model_info, len(layers), patches, tokens_for_budget(budget, patches))
            for index, layer in enumerate(layers):
                self.handles += [
                    layer.register_forward_pre_hook(self._block_start(kind, index, len(layers)), with_kwargs=True),
                    layer.self_attn.register_forward_pre_hook(self._attention_input(index), with_kwargs=True),
                    layer.self_attn.register_forward_hook(self._attention_output(index)),
                ]

    def _state(self) -> TowerMerge | None:
        call = self.recorder.running
        return None if call is None else call.merge

    def _block_start(self, kind: str, index: int, layers: int):
        def hook(module, args, kwargs):
            call = self.recorder.running
            if call is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                if (refused := self.method.kind_refusal(kind)) is not None:
                    raise ValueError(refused)
                rows, tokens = hidden.shape[:2]
                patches = tokens - int(self.cls)
                keep = tokens_for_budget(self.budget, patches)
                schedule = {layer: r for layer, r in self.method.merge_schedule(
                    self.model_info, layers, patches, keep).items() if r > 0}
                call.merge = TowerMerge.start(schedule, rows, tokens, hidden.device) if schedule else None
            state = call.merge
            if state is not None and index in state.schedule:
                state.residual = hidden

        return hook

    def _attention_input(self, index: int):
        def hook(module, args, kwargs):
            state = self._state()
            if state is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if index in state.schedule:
                state.attention = tower_attention_inputs(module, hidden, self.method.reads_queries)
            if not state.merged:
                return None
            bias = state.bias(hidden.dtype, self.method.proportional_attention)
            mask = kwargs.get("attention_mask")
            kwargs["attention_mask"] = bias if mask is None else mask + bias
            return args, kwargs

        return hook

    def _attention_output(self, index: int):
        def hook(module, args, output):
            state = self._state()
            if state is None or index not in state.schedule:
                return None
            attended, *rest = output
            return (self._merge(state, attended, state.schedule[index]), *rest)

        return hook

    def _merge(self, state: TowerMerge, attended: torch.Tensor, r: int) -> torch.Tensor:
        """The attention output that makes residual + output each survivor's merged state."""
        residual, (query, key, scaling) = state.residual, state.attention
        state.residual = state.attention = None
        width = attended.shape[2]
        alive = state.alive
        along = lambda index, size: index[..., None].expand(*index.shape, size)  # noqa: E731
        heads = lambda index: along(index[:, None].expand(-1, key.shape[1], -1), key.shape[3])  # noqa: E731
        block = BlockInput(
            hidden=(residual + attended).gather(1, along(alive, width)),
            query=None if query is None else query.gather(2, heads(alive)), key=key.gather(2, heads(alive)),
            scaling=scaling, size=state.size, cls=self.cls, columns=alive, grid=self.grid,
        )
        merge = self.method.merge(block, r)
        state.alive = alive.gather(1, merge.order)
        state.position = merge.into.gather(1, state.position)
        state.size = merge.size.to(state.size.dtype)
        # What the merge changed, added where the survivors sit: zero (and so exact) where the method returned a
        # survivor's state unchanged.
        change = merge.hidden - block.hidden.gather(1, along(merge.order, width))
        # Under autocast the residual stream is float32 and the attention output half precision.
        return attended.scatter_add(1, along(state.alive, width), change.to(attended.dtype))
