"""ToMe (Bolya et al., ICLR 2023): bipartite soft matching inside the vision encoder's blocks.

From facebookresearch/ToMe (tome/merge.py, tome/patch/timm.py), at every block from the
first to the one whose output the projector reads (LLaVA's vision_feature_layer), between
the block's attention and its MLP:
- metric: the block's attention keys averaged over heads, L2-normalised per token;
- alternate split of the tokens in their current order, A = even places, B = odd places;
  each A token's best match is its most similar B token (cosine); the [CLS] token (A's first)
  never merges (its scores are -inf);
- the r A tokens with the highest best-match scores merge into their B matches; the new
  order is the unmerged A tokens (sorted back into their previous order, which keeps [CLS]
  first) followed by all B tokens;
- merges are size-weighted means (each token carries how many patches it stands for),
  and later blocks add log(size) to every attention logit of a merged key (proportional
  attention, on in ToMe's timm patch);
- r per block: ToMe's one `r` for every block, clamped to (tokens - 1) // 2 per block; here an r
  per block, fitted so that exactly `budget` patches reach the projector: the removal is spread
  evenly over the blocks (the first ones one more when it does not divide), raised where the
  halving limit of the later blocks would leave too many.

Deviations (also in the README):
- ToMe shortens the sequence; transformers' encoder layers cannot be shortened from a hook,
  so merged-away tokens stay in the tower masked out of attention (engine/block_merge.py).
  Survivors compute the same up to rounding; the encoder is not faster.
- ToMe has no notion of the LLM: each surviving token keeps the position (and grid cell,
  for pictures) of the column it survives in, a B token or an unmerged A token.
- Towers that cut an image into several rows (LLaVA-NeXT's tiles, video frames) are refused:
  the count per row must be known before the tower runs.
- The matching metric is computed in float32 (ToMe's in the model's dtype): in bfloat16 many
  best-match scores tie, and ToMe's unstable sort then picks among them arbitrarily.
"""

from __future__ import annotations

import torch

from .base import BlockInput, BlockMerge, BlockMergingMethod, ModelInfo, feature_layer


def even_schedule(layers: list[int], tokens: int, protected: int, remove: int) -> dict[int, int]:
    """Tokens to merge away at each of layers so that `remove` go in all, as evenly as ToMe's limit of
    (tokens - protected) // 2 per block allows, from rows of `tokens` tokens."""
    def capacity(tokens: int, blocks: int) -> int:  # the most the next `blocks` blocks can merge away
        total = 0
        for _ in range(blocks):
            r = (tokens - protected) // 2
            total, tokens = total + r, tokens - r
        return total

    least = tokens - capacity(tokens, len(layers)) - protected
    if remove > tokens - protected - least:
        raise ValueError(f"tome cannot merge {tokens - protected} patches down to {tokens - protected - remove} in "
                         f"{len(layers)} blocks: each block merges at most half, so they keep at least {least}; "
                         f"use a budget of {least} or more (or a deeper vision tower)")
    schedule = {}
    for i, layer in enumerate(layers):
        left = len(layers) - i
        limit = (tokens - protected) // 2
        r = min(-(-remove // left), limit, remove)
        while r < limit and remove - r > capacity(tokens - r, left - 1):
            r += 1
        schedule[layer] = r
        tokens, remove = tokens - r, remove - r
    return schedule


def bipartite_soft_matching(metric: torch.Tensor, r: int, cls: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [R, n - r], into [R, n]) of ToMe's matching on metric [R, n, d] (see the module docstring)."""
    rows, n, _ = metric.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = a @ b.transpose(1, 2)
    if cls:
        scores[:, 0] = -torch.inf
    best, match = scores.max(dim=-1)
    unmerged = best.argsort(dim=-1, descending=True)[:, r:]  # the r best-matched A tokens merge
    if cls:
        unmerged = unmerged.sort(dim=-1).values
    kept_a, kept_b = unmerged.shape[1], b.shape[1]
    # Every index below is a view of one arange: each op counts, as a GPU's host launches them one by one.
    count = torch.arange(n, device=metric.device)
    order = torch.cat([2 * unmerged, count[1::2].expand(rows, -1)], dim=1)
    into_a = (match + kept_a).scatter_(1, unmerged, count[:kept_a].expand(rows, -1))  # merged: their B match's slot
    into = torch.empty(rows, n, dtype=torch.long, device=metric.device)
    into[:, 0::2] = into_a
    into[:, 1::2] = count[kept_a:kept_a + kept_b]
    return order, into


def size_weighted_merge(hidden: torch.Tensor, size: torch.Tensor, into: torch.Tensor, slots: int):
    """(states [R, slots, D], sizes [R, slots]): each slot the size-weighted mean of the tokens going into it."""
    rows, _, width = hidden.shape
    sizes = torch.zeros(rows, slots, dtype=size.dtype, device=size.device).scatter_add_(1, into, size)
    weighted = (hidden * size[..., None].to(hidden.dtype))
    sums = torch.zeros(rows, slots, width, dtype=hidden.dtype, device=hidden.device)
    sums.scatter_add_(1, into[..., None].expand(-1, -1, width), weighted)
    return sums / sizes[..., None].to(hidden.dtype), sizes


class ToMe(BlockMergingMethod):
    name = "tome"
    summary = "token merging in the vision encoder's blocks: bipartite soft matching, size-weighted, proportional attention"
    where = "vision encoder blocks (between attention and MLP); tokens dropped at the LLM input"
    proportional_attention = True
    reads_queries = False  # its metric is the keys

    def merge_schedule(self, model: ModelInfo, layers: int, patches: int, keep: int) -> dict[int, int]:
        last = layers + feature_layer(model)  # the block whose output the projector reads
        return even_schedule(list(range(last + 1)), patches + 1, 1, patches - keep)

    def merge(self, block: BlockInput, r: int) -> BlockMerge:
        order, into = bipartite_soft_matching(block.key.float().mean(dim=1), r, block.cls)
        hidden, size = size_weighted_merge(block.hidden, block.size, into, order.shape[1])
        return BlockMerge(order, into, hidden, size)
