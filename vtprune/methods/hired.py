"""HiRED (AAAI'25): early-layer [CLS] attention shares the budget among anyres tiles, a late layer's picks tokens.

Read from the authors' released code (hasanar1f/HiRED): LLaVA-NeXT in
`transformers/src/transformers/models/llava_next/modeling_llava_next.py` (`ViT_Attn_Hook`,
`HiRED_token_selection`, `HiRED_sub_img_budgets`, the forward's settings), LLaVA-1.5 in
`transformers/src/transformers/models/llava/modeling_llava.py` (`HiRED_token_selection`), defaults
from `accuracy_benchmarks/*.sh` (token_budget_rate 0.2, alpha 0.5).

Attention: the q/k projections of a vision layer (bias included), split into the layer's heads,
softmax(q k^T / sqrt(d)) per head over the row's tokens ([CLS] included); the [CLS] row over the
patches, SUMMED over heads. Two layers: encoder layer 0 (the authors' `vit_top_layer`, the
"initial layer") and layer 22 of 24 (`vit_bottom_layer`, the "final layer"; it is the layer
whose output, hidden_states[-2], the projector receives), so `vision_layers` is (0, -2).

LLaVA-1.5 (an item of one tower row): keep the top-k patches by layer -2 attention.

LLaVA-NeXT (row 0 the base image, rows 1.. the tiles in LLaVA-NeXT's row-major tile order),
with a total budget k and alpha (0.5):
1. Base image: k_base = min(int(k x alpha), base patches); its top k_base patches by layer -2
   attention are kept.
2. Tiles share k_sub = min(k - k_base, the tiles' patches). The base image's top
   int(base patches x (1 - alpha)) patches by LAYER-0 attention are marked; each tile's score is
   how many marked base patches fall in its region; tile t gets int(count_t / sum(count) x k_sub)
   (float32, truncated), at most its patch count.
3. Within each tile, its top patches by layer -2 attention (the tile's own [CLS] row).
Regions (the `regions` option): "released" (default) reproduces the released code, which
reshapes the base image's raster-ordered marks to (tiles high, tiles wide, -1): region t is the
t-th of as many equal consecutive chunks of the base raster as there are tiles, i.e. horizontal
bands, whatever the tile layout (on 2x2 tiles, the band of base rows 0-5 scores the top-left
tile, rows 6-11 the top-right one). "spatial" scores each tile by the marked base patches that
show the same part of the image: base patch (r, c) of a b_h x b_w grid is mapped to the
high-resolution token at (floor((r + 0.5) h / b_h), floor((c + 0.5) w / b_w)) of the unpadded
h x w grid and counts for that token's tile. With tiles of 2 high and 1 wide both agree.
In general base patch p (raster order) of P counts for tile floor(p x tiles / P) (chunk t starts
at ceil(t P / tiles)): the released chunks when tiles divides P, as on every LLaVA-NeXT layout (P = 576; 2, 3 or 4
tiles), and chunks as equal as can be where the released reshape would fail.

Deviations, on purpose:
- Exact budget: the released per-tile truncation leaves up to (tiles - 1) tokens of the budget
  unused, and the released tiles select among all 576 patches of a tile, then unpad, so picks
  that fall in a tile's padding are dropped as well: their LLM input is shorter than their
  budget. Here a tile's patches are those the LLM receives (its padding is not in the view), a
  tile's share is capped at them, and whatever the truncations and caps leave of k_sub goes, one
  token at a time, to the tile with the largest remaining fractional share (share - given) that
  still has patches (ties to the earlier tile; the shares are float32, as the released ones, so
  remainders equal in exact arithmetic can differ by a rounding and go the other way). If the tiles cannot take k - k_base (k close to
  the item's size), the base image takes the rest. So exactly view.keep tokens are kept; at a
  budget whose shares are whole numbers, on tiles without padding, the tiles' counts are the
  authors'.
- Tile grid: the transformers copy in the authors' repository (4.42.0.dev0) assigns
  get_anyres_image_grid_shape's (tiles high, tiles wide) to (width, height) in its HiRED packing
  and budget code, so on non-square layouts (1x2, 2x1, 1x3, 3x1) it stacks the tiles transposed and
  unpads with the wrong geometry: at a 336 x 672 image 288 of 1152 tile positions reach its LLM
  (192 of 1728 at 300 x 900). Here the installed transformers' own grid is used, so every tile
  token it selects reaches the LLM; on square layouts the two agree. (The same swap makes the
  released reshape above read (tiles wide, tiles high), which changes nothing: chunk t still goes
  to tile t.)
- Budget: the authors' k is int(tower rows x 576 x rate) (padding patches counted); the engine
  gives k per item (a fraction of the item's tokens, padding not counted).
- Newlines: the released LLaVA-NeXT code packs the kept tokens with `image_newline=None`, so its
  LLM input has no newline tokens at all (pruned or not); here newline tokens are not the
  item's tokens and stay as the model places them. Kept tokens keep their original position ids
  (the released packing keeps their order but renumbers the shortened sequence contiguously).
- alpha = 1 leaves no marked base patch; if the tiles still get a share (k > base patches),
  they share it in proportion to their patch counts (the released code would divide by zero).
- Videos (not in the authors' code): every frame is a row with its own [CLS]; no base image
  exists, so the item keeps its top-k patches by layer -2 attention over all frames together.
- Towers without [CLS] (SigLIP in LLaVA-OneVision, Qwen's ViT): not supported (ValueError).
- Numerics: attention in float32 (the authors: the model's dtype, fp16); torch.topk ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelInfo, VisionLayer, VisionMethod, VisionView
from .primitives import cls_attention, layout_key, row_layouts, same_shape, topk_in_order

REGIONS = ("released", "spatial")


def tile_shares(counts: torch.Tensor, total: int, capacity: list[int]) -> list[int]:
    """Tokens per tile: the released truncated proportional shares of `total` by counts (by capacity when every
    count is 0), each at most its capacity, the rest handed out by largest remaining share (module docstring)."""
    weights = counts if int(counts.sum()) > 0 else torch.tensor(capacity)
    shares = weights.long() / weights.long().sum() * total  # float32, as the released `(ratio * budget).int()`
    given = [min(int(share), cap) for share, cap in zip(shares.tolist(), capacity)]
    left = min(total, sum(capacity)) - sum(given)
    fractions = shares.tolist()
    while left > 0:
        open_tiles = [t for t in range(len(given)) if given[t] < capacity[t]]
        best = max(open_tiles, key=lambda t: (fractions[t] - given[t], -t))
        given[best] += 1
        left -= 1
    return given


class HiRED(VisionMethod):
    name = "hired"
    summary = ("anyres: layer-0 [CLS] attention of the base image shares the budget among tiles (alpha to the base "
               "image), layer -2 [CLS] attention picks the tokens of each; one image: top-k by layer -2")

    @dataclass(frozen=True)
    class Options:
        alpha: float = 0.5  # the base image's share of the budget (and 1 - alpha of its patches are marked)
        early_layer: int = 0  # vision layer whose [CLS] attention shares the budget among tiles
        late_layer: int = -2  # vision layer whose [CLS] attention picks the tokens
        regions: str = "released"  # which base patches score a tile: "released" (raster chunks) or "spatial"

    @classmethod
    def validate(cls, options: "HiRED.Options") -> None:
        if not 0 <= options.alpha <= 1:
            raise ValueError(f"hired alpha must be in [0, 1]; got {options.alpha}")
        if options.regions not in REGIONS:
            raise ValueError(f"hired regions must be one of {', '.join(REGIONS)}; got {options.regions!r}")

    def vision_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.options.early_layer, self.options.late_layer)))

    def select_batch(self, views: list[VisionView]) -> list[torch.Tensor]:
        """Items of one shape whose tokens sit alike in the tower's rows are selected together: one-row images and
        videos (one top-k pool each) at once; anyres items with the base image's and every tile's top-k over the
        batch, the tiles' shares read from the device once. An anyres item with a tile of no tokens on its own."""
        picks: list = [None] * len(views)
        layouts = row_layouts(views)
        keys = []
        for view, layout in zip(views, layouts):
            late = view.layers[self.options.late_layer]
            keys.append((late.key.shape, late.key.dtype, late.key.device, late.cls, view.features.shape,
                         view.features.device, view.keep, view.kind, layout_key(layout)))
        for group in same_shape(keys):
            alike = [views[i] for i in group]
            late, rows, columns = VisionView.stacked(alike, self.options.late_layer)
            if not late.cls:
                raise ValueError("method 'hired' needs a [CLS] token, and this vision tower has none")
            device = alike[0].features.device
            score = cls_attention(late, rows.flatten(), columns.flatten()).sum(dim=0).to(device).view(columns.shape)
            layout = layouts[group[0]]
            if layout is None or alike[0].kind == "video":  # one pool of top-k (the released LLaVA-1.5 branch)
                chosen = list(topk_in_order(score, alike[0].keep))
            elif len(layout) == late.query.shape[0] // len(alike):  # every tower row holds tokens
                chosen = self._anyres(alike, [layouts[i] for i in group], score, rows, columns)
            else:
                chosen = [self._select_item(view) for view in alike]
            for i, pick in zip(group, chosen):
                picks[i] = pick
        return picks

    def _anyres(self, views: list[VisionView], layouts: list, score: torch.Tensor, rows: torch.Tensor,
                columns: torch.Tensor) -> list[torch.Tensor]:
        """Anyres items of one layout (row 0 the base image, then the tiles; every row holds tokens), their late
        [CLS] attention score [B, N] and tower rows / columns [B, N] in the stacked layers: `_select_item` for the
        batch, with one read of the tiles' marked counts."""
        device = score.device
        alpha, keep = self.options.alpha, views[0].keep
        base = torch.stack([layout[0][0] for layout in layouts]).to(device)  # raster (column) order
        members = [torch.stack([layout[t][0].sort().values for layout in layouts]).to(device)  # in item order
                   for t in range(1, len(layouts[0]))]
        capacity = [tile.shape[1] for tile in members]
        base_budget = min(int(keep * alpha), base.shape[1])
        tile_budget = min(keep - base_budget, sum(capacity))
        base_budget = keep - tile_budget
        picks = [base.gather(1, torch.topk(score.gather(1, base), base_budget, dim=1).indices)]
        shares = [[0] * len(members) for _ in views]
        if tile_budget > 0:
            early = VisionLayer.stacked([view.layers[self.options.early_layer] for view in views])
            early = cls_attention(early, rows.gather(1, base).flatten(), columns.gather(1, base).flatten()).sum(dim=0)
            marked = torch.topk(early.to(device).view(base.shape), int(base.shape[1] * (1 - alpha)), dim=1).indices
            if self.options.regions == "released":  # raster bands: the same for every item of the layout
                region = self.base_regions(views[0], base[0], len(members)).expand_as(base)
            else:
                region = torch.stack([self.base_regions(view, row, len(members)) for view, row in zip(views, base)])
            counts = torch.zeros(base.shape[0], len(members), dtype=torch.long, device=device)
            counts.scatter_add_(1, region.gather(1, marked), torch.ones_like(marked))
            shares = [tile_shares(row, tile_budget, capacity) for row in counts.cpu()]  # the one read
        for t, tile in enumerate(members):
            most = max(share[t] for share in shares)
            picks.append(tile.gather(1, torch.topk(score.gather(1, tile), most, dim=1).indices))  # each takes its own
        return [torch.cat([picks[0][b]] + [picks[1 + t][b, :share[t]] for t in range(len(members))]).sort().values
                for b, share in enumerate(shares)]

    def select(self, view: VisionView) -> torch.Tensor:
        return self.select_batch([view])[0]

    def _select_item(self, view: VisionView) -> torch.Tensor:
        device = view.features.device
        late_layer = view.layers[self.options.late_layer]
        if not late_layer.cls:
            raise ValueError("method 'hired' needs a [CLS] token, and this vision tower has none")
        rows, columns = view.rows.to(device), view.columns.to(device)
        late = cls_attention(late_layer, rows, columns).sum(dim=0).to(device)
        tiles = late_layer.query.shape[0] - 1
        if view.kind == "video" or tiles == 0:
            return topk_in_order(late, view.keep)

        base = torch.nonzero(rows == 0).flatten()
        base = base[torch.argsort(columns[base])]  # raster order
        members = [torch.nonzero(rows == 1 + t).flatten() for t in range(tiles)]
        capacity = [tile.numel() for tile in members]
        base_budget = min(int(view.keep * self.options.alpha), base.numel())
        tile_budget = min(view.keep - base_budget, sum(capacity))
        base_budget = view.keep - tile_budget

        picks = [base[torch.topk(late[base], base_budget).indices]]
        if tile_budget > 0:
            early = cls_attention(view.layers[self.options.early_layer], rows[base], columns[base]).sum(dim=0)
            marked = torch.topk(early.to(device), int(base.numel() * (1 - self.options.alpha))).indices
            region = self.base_regions(view, base, tiles)
            counts = torch.bincount(region[marked], minlength=tiles)
            for tile, share in zip(members, tile_shares(counts.cpu(), tile_budget, capacity)):
                picks.append(tile[torch.topk(late[tile], share).indices])
        return torch.cat(picks).sort().values

    def base_regions(self, view: VisionView, base: torch.Tensor, tiles: int) -> torch.Tensor:
        """[P] the tile (0-based) each base patch (in raster order) scores for."""
        p = base.numel()
        if self.options.regions == "released":
            return torch.arange(p, device=base.device) * tiles // p
        if len(view.parts) < 2:
            raise ValueError("hired regions='spatial' needs an item with a base grid and a high-resolution grid")
        (base_grid, grid) = view.parts[:2]
        coords, part = view.coords.to(base.device), view.part.to(base.device)
        high = torch.nonzero(part == 1).flatten()
        lookup = torch.full((grid.rows * grid.cols,), -1, dtype=torch.long, device=base.device)
        lookup[coords[high, 1] * grid.cols + coords[high, 2]] = high
        y = ((coords[base, 1].double() + 0.5) * grid.rows / base_grid.rows).floor().long().clamp(max=grid.rows - 1)
        x = ((coords[base, 2].double() + 0.5) * grid.cols / base_grid.cols).floor().long().clamp(max=grid.cols - 1)
        token = lookup[y * grid.cols + x]
        if bool((token < 0).any()):
            raise ValueError("hired regions='spatial' needs every token of the high-resolution grid in the view")
        return view.rows.to(base.device)[token] - 1
