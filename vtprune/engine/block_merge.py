"""Merging inside the vision encoder's blocks, for a BlockMergingMethod (ToMe, FiCoCo-V).

Such a method merges between a block's attention and its MLP. transformers' encoder layers
hold the block's residual in a local variable, so no hook can shorten the sequence there. The
tower keeps its length instead: a merged-away token's column is masked out of every later
attention (an additive bias of the dtype's minimum on its key column; log(size) on the
survivors' columns when the method uses proportional attention), and the merge is written
through the block's attention output, so that residual + output is the merged state at each
survivor whose state changed. Survivors thus compute what the shortened sequence computes, up
to the rounding of that one addition; merged-away columns go on being computed and are never
read. The encoder itself runs no faster: these methods are compared for the tokens they leave
the LLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods import BlockInput, BlockMergingMethod
from .budget import tokens_for_budget


def tower_attention_inputs(attention, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(query [R, H, T, d], key, scaling) of a vision-tower attention module on its input, from its own projections
    (the same whichever attention implementation the tower runs)."""
    split = (*hidden.shape[:2], -1, attention.head_dim)
    query = attention.q_proj(hidden).view(split).transpose(1, 2)
    key = attention.k_proj(hidden).view(split).transpose(1, 2)
    return query, key, float(getattr(attention, "scaling", None) or attention.scale)


@dataclass
class TowerMerge:
    """The merges so far of one tower run, over its R rows of T tokens."""

    schedule: dict[int, int]  # encoder layer -> tokens merged away per row there
    alive: torch.Tensor  # [R, n] columns of the surviving tokens, in the method's order
    slot: torch.Tensor  # [R, T] the column of the survivor each column's token is now part of
    size: torch.Tensor  # [R, T] tokens each survivor stands for (0 at merged-away columns)
    residual: torch.Tensor | None = None  # the merging block's input
    attention: tuple | None = None  # its (query, key, scaling)

    @classmethod
    def start(cls, schedule: dict[int, int], rows: int, tokens: int, device) -> "TowerMerge":
        columns = torch.arange(tokens, device=device).expand(rows, tokens)
        return cls(schedule, columns.clone(), columns.clone(), torch.ones(rows, tokens, device=device))

    @property
    def merged(self) -> bool:
        return self.alive.shape[1] < self.slot.shape[1]

    def bias(self, dtype: torch.dtype, proportional: bool) -> torch.Tensor:
        """[R, 1, 1, T] additive attention bias: merged-away keys out, log(size) on survivors if proportional."""
        bias = torch.full(self.slot.shape, torch.finfo(dtype).min, dtype=dtype, device=self.slot.device)
        survivors = self.size.gather(1, self.alive).log() if proportional else bias.new_zeros(self.alive.shape)
        bias.scatter_(1, self.alive, survivors.to(dtype))
        return bias[:, None, None, :]


class BlockMerging:
    """Hooks on every layer of each tower that run a BlockMergingMethod's merges in the recorder's current call."""

    def __init__(self, recorder, towers, method: BlockMergingMethod, model_info, budget: int | float, cls: bool):
        self.recorder, self.method, self.model_info, self.budget, self.cls = recorder, method, model_info, budget, cls
        self.handles = []
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
                state.attention = tower_attention_inputs(module, hidden)
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
        rows, _, width = attended.shape
        heads, head_dim = query.shape[1], query.shape[3]
        alive = state.alive
        stream = residual + attended
        along = lambda index, size: index[..., None].expand(*index.shape, size)  # noqa: E731
        block = BlockInput(
            hidden=stream.gather(1, along(alive, width)),
            query=query.gather(2, along(alive[:, None].expand(rows, heads, -1), head_dim)),
            key=key.gather(2, along(alive[:, None].expand(rows, heads, -1), head_dim)),
            scaling=scaling, size=state.size.gather(1, alive), cls=self.cls, columns=alive, grid=self.grid,
        )
        merge = self.method.merge(block, r)
        survivors = alive.gather(1, merge.order)
        column_of_old = survivors.gather(1, merge.into)  # where each old survivor's tokens went
        remap = torch.arange(state.slot.shape[1], device=alive.device).expand_as(state.slot).clone()
        remap.scatter_(1, alive, column_of_old)
        state.slot = remap.gather(1, state.slot)
        state.size = torch.zeros_like(state.size).scatter_(1, survivors, merge.size.to(state.size.dtype))
        state.alive = survivors
        # Only survivors whose state changed are written: the others keep the block's exact sum.
        before = block.hidden.gather(1, along(merge.order, width))
        changed = (merge.hidden != before).any(-1, keepdim=True)
        written = torch.where(changed, merge.hidden.to(attended.dtype) - residual.gather(1, along(survivors, width)),
                              attended.gather(1, along(survivors, width)))
        # Under autocast the residual stream is float32 and the attention output half precision.
        return attended.scatter(1, along(survivors, width), written.to(attended.dtype))
