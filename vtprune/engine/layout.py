"""Which tokens a stretch of decoder layers holds, and the attention masks that follow from it.

Pure tensor code: the engine (run.py, prefill.py, decode.py) calls it, nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..methods.primitives import fill_at, on_device

FILL = -1  # position of a fill slot: samples that keep fewer tokens are left-filled up to the batch's longest


@dataclass
class Layout:
    """The original sequence positions held by some decoder layers, per sample, in original order."""

    positions: torch.Tensor  # [B, n] long, FILL for fill slots (which always come first)
    valid: torch.Tensor  # [B, n] bool: a real token that may be attended (not fill, not padding)
    # Known on the host from the plan: per sample, the slots that are not fill, and the visual tokens among them.
    # Shapes then follow without reading the device.
    sizes: tuple[int, ...]
    visual_sizes: tuple[int, ...]

    @classmethod
    def full(cls, prompt_mask: torch.Tensor, visual_sizes: tuple[int, ...]) -> "Layout":
        batch, length = prompt_mask.shape
        # contiguous, so that the searches that read it (index_in) need no copy of it each time
        positions = torch.arange(length, device=prompt_mask.device).repeat(batch, 1)
        return cls(positions, prompt_mask.bool(), (length,) * batch, visual_sizes)

    @property
    def filled(self) -> bool:
        """Whether some sample is left-filled."""
        return min(self.sizes) < max(self.sizes)

    @property
    def length(self) -> int:
        return self.positions.shape[1]

    def narrowed(self, visual: torch.Tensor, kept_visual: list[torch.Tensor], prompt_mask: torch.Tensor) -> "Layout":
        """This layout with only kept_visual[b] (original positions, distinct, of sample b's visual tokens in this
        layout) left of sample b's visual tokens."""
        batch, length = visual.shape
        # Which original positions the new layout holds, over every sample at once: this layout's text, and the
        # kept visual tokens.
        held = self.held(length) & ~visual
        kept = torch.cat([on_device(k, visual.device) for k in kept_visual])
        counts = tuple(k.numel() for k in kept_visual)
        samples = torch.repeat_interleave(torch.arange(batch, device=visual.device),
                                          on_device(torch.tensor(counts), visual.device), output_size=kept.numel())
        fill_at(held, (samples, kept), True)
        # Sorting FILL (-1) below every held position leaves each row's positions last, in order: left-filled.
        order = torch.where(held, torch.arange(length, device=visual.device), FILL).sort(dim=1).values
        # every text slot stays, so each sample's new size is known on the host
        sizes = tuple(size - seen + count for size, seen, count in zip(self.sizes, self.visual_sizes, counts))
        positions = order[:, length - max(sizes):]
        valid = (positions != FILL) & prompt_mask.bool().gather(1, positions.clamp(min=0))
        return Layout(positions, valid, sizes, counts)

    def held(self, length: int) -> torch.Tensor:
        """[B, length] bool: the original positions this layout holds (a spare last column takes fill slots)."""
        held = torch.zeros(self.positions.shape[0], length + 1, dtype=torch.bool, device=self.positions.device)
        held.scatter_(1, torch.where(self.positions == FILL, length, self.positions), True)
        return held[:, :length]

    def index_in(self, other: "Layout") -> torch.Tensor:
        """For each slot of self, the slot of other holding the same position (fill slots map to slot 0)."""
        index = torch.searchsorted(other.positions.contiguous(), self.positions.contiguous())
        return index.clamp(max=other.length - 1)

    def count(self, selected: torch.Tensor) -> torch.Tensor:
        """How many real slots per sample hold a position where selected [B, L] is True."""
        held = self.positions != FILL
        return (held & selected.gather(1, self.positions.clamp(min=0))).sum(dim=1)


def take(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor [B or 1, L, ...] taken per sample along dim 1 at index [B, n]."""
    tensor = tensor.expand(index.shape[0], *tensor.shape[1:])
    trailing = tensor.shape[2:]
    return tensor.gather(1, index.view(*index.shape, *[1] * len(trailing)).expand(*index.shape, *trailing))


def take_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Position ids [B or 1, L] or M-RoPE's [k, B, L] taken per sample at index [B, n]."""
    if position_ids.dim() == 2:
        return take(position_ids, index)
    return take(position_ids.permute(1, 2, 0), index).permute(2, 0, 1)


def decoder_mask(
    kv_valid: torch.Tensor,
    query_length: int,
    implementation: str,
    dtype: torch.dtype,
    late_rows: torch.Tensor | None = None,
    late_visible: torch.Tensor | None = None,
    *,
    all_valid: bool,
):
    """The 4-D mask a decoder layer needs for keys kv_valid [B, kv] of which the last query_length are the queries.

    late_rows [B, q] and late_visible [B, kv] narrow what some queries see: a late row
    attends only to late-visible keys (a recompute of tokens that, when decoded with a
    pruned KV cache, saw only the kept tokens). Returns None where sdpa's own causal
    handling is already exact (no invalid key; a full square or a single query). all_valid: whether every key is
    valid, as the caller knows it on the host (False where it does not: the mask is then built, never read).
    """
    kv_length = kv_valid.shape[1]
    if implementation == "sdpa" and late_rows is None and all_valid and query_length in (1, kv_length):
        return None
    device = kv_valid.device
    query_pos = torch.arange(kv_length - query_length, kv_length, device=device)[:, None]
    key_pos = torch.arange(kv_length, device=device)[None, :]
    allowed = (key_pos <= query_pos)[None, None] & kv_valid[:, None, None, :]
    if late_rows is not None:
        allowed = allowed & ~(late_rows[:, None, :, None] & ~late_visible[:, None, None, :])
    # A query that may see nothing (padding, fill) sees itself, so that no softmax row is
    # empty: sdpa would give NaN there, and NaN values poison even zero-weight sums.
    allowed = allowed | (key_pos == query_pos)[None, None]
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed
