"""PruMerge+ (Shang et al., 2024): IQR outliers of [CLS] attention plus spatial samples, each absorbing its neighbours.

Read from the authors' released code (42Shawn/LLaVA-PruMerge,
`llava/model/multimodal_encoder/clip_encoder.py`, `CLIPVisionTower.token_prune_merge_advanced_plus`,
the path `forward` takes, with `if_adaptive=True`). Per tower row (an image; an anyres tile; a frame):

1. Attention: the queries and keys of the tower's LAST encoder layer (`encoder.layers[23]` of
   CLIP-L's 24, hooked at `q_proj` / `k_proj`: raw projections, bias included) are used as ONE
   head of the full width C = H x d (1024): softmax(q k^T x C^-0.5) over the row's tokens
   ([CLS] included), not split into the layer's heads. The [CLS] row of it, over the patches, is
   the score a. `vision_layers` is (-1,): the last layer, one after the layer whose output
   (hidden_states[-2]) the projector receives; its q/k are computed from that output.
2. Outliers: with Q1, Q3 the 25th / 75th percentiles of a over the row's patches (linear
   interpolation, numpy's default), the outliers are the patches with a > Q3 + 1.5 (Q3 - Q1);
   their count c sets the authors' adaptive budget. Kept first: the top-c patches by a.
3. Spatial samples: with step = int(N / c) and stride = int(step / 3), the positions
   0, stride, 2 stride, ... < N - 1 of the row's patches in raster order (`torch.arange(0, 575,
   stride)` with N = 576) that are not outliers are kept too.
4. Merge: each kept token i takes its 32 most similar other patches of the row (cosine of the
   raw full-width keys of that layer; candidates are ALL the row's other patches, kept or not)
   and becomes x_i + sum_j a_j x_j over those 32 (x: the projector's input features; a: the
   [CLS] attention of step 1). The normalisation by sum_j a_j is commented out in the released
   code, so this is a weighted SUM added to x_i, not an average; it is kept as released.
5. The authors append one more token, sum_j a_j x_j over all the row's dropped patches.

Budget (the authors' count is adaptive, c + the new samples, about a quarter of the tokens;
the engine asks for a fixed number per item, view.keep). The item's budget is split over its
rows in proportion to their token counts (`row_groups`, largest remainders; a single LLaVA-1.5
image is one row). In a row of N patches with budget k:
- the top min(c, k) patches by a are kept (when c > k, only the k strongest outliers);
- the remaining k - min(c, k) are spatial samples: the arithmetic sequence of step 3 with the
  authors' stride for this row (N // c // 3, at least 1; N - 1 when c = 0, where the released
  code divides by zero), outliers left out; if it leaves fewer than needed the stride is made
  smaller one by one until it leaves enough; if it leaves more, the needed number is taken
  evenly spaced among them (`evenly_spaced`). If even stride 1 (every patch but the last)
  leaves too few, every patch not yet kept is a candidate.
So at k equal to the authors' own count (c + their samples) the kept set is exactly theirs.
The counts are integer arithmetic (N // c where the authors write int(1 / (c / N))); at
N = 576 both give the same value for every c.

Deviations, on purpose:
- The extra token of step 5 has no original position and no placeholder in the prompt of an
  HF model, so it is left out: the budget goes to positioned tokens only (the authors' LLM
  input has one token more than their kept count).
- Order: the authors hand the LLM the outliers (by decreasing a), then the samples (in raster
  order), packed; here every kept token sits at its own place in the item, in original order,
  as the engine does for every method.
- Multi-row items (not in the authors' code, which is LLaVA-1.5 only and breaks for a batch of
  more than one image): each row is handled on its own, as the HiRED authors' port of this code
  to LLaVA-NeXT does (hasanar1f/HiRED `prumerge_llava_next.py`: every tile and the base image
  separately), with the budget split as above. Their port works on all 576 patches of a tile;
  here a tile's patches are those the LLM receives (its padding patches, removed by LLaVA-NeXT's
  unpadding, are not in the view): percentiles, the stride and the sequence run over them, in
  their order within the tile. Their port also hands the LLM neither newline tokens nor an unpadded
  grid; here the model's own packing stays (newlines, never pruned nor counted, and unpadding), as
  for every method. Videos: per frame.
- Neighbours: min(32, the row's patches - 1) (the released topk needs at least 32 others).
- `destination` and `sizes`: the authors' clusters overlap (a patch can be absorbed by several
  kept tokens, a kept token can absorb other kept tokens, and a patch may be absorbed by none:
  its only trace is the left-out extra token). For the engine's bookkeeping each dropped patch
  is assigned to the kept token that absorbed it with the highest key cosine, or, if none did,
  to the kept token of the item with the highest key cosine; sizes count those assignments
  (they sum to N). The features are the authors' sums above whatever this assignment says.
- Numerics: attention, percentiles, similarities and the merge in float32 (the authors: the
  model's dtype, fp16, with percentiles of its float32 copy); the merged features are cast back
  to the features' dtype. Ties (exactly equal attentions or cosines) follow torch.topk.
- Towers without [CLS] (SigLIP in LLaVA-OneVision, Qwen's ViT): not supported (ValueError);
  the IQR rule is defined on [CLS] attention and no port of it to such towers is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelInfo, Selection, VisionLayer, VisionMethod, VisionView
from .primitives import gather_rows, layout_key, row_layouts, row_tokens, same_shape

LAYER = -1  # encoder.layers[23] of CLIP-L's 24
NEIGHBOURS = 32


def full_width_cls_attention(layer: VisionLayer) -> torch.Tensor:
    """[R, T] per tower row: the [CLS] attention of each token, the layer's heads concatenated into one head of
    width H x d."""
    if not layer.cls:
        raise ValueError("method 'prumerge+' needs a [CLS] token, and this vision tower has none")
    heads, width = layer.query.shape[1], layer.query.shape[3]
    logits = torch.einsum("rhd,rhtd->rt", layer.query[:, :, 0].float(), layer.key.float()) * (heads * width) ** -0.5
    return logits.softmax(dim=-1)


def outlier_counts(scores: torch.Tensor) -> torch.Tensor:
    """[B] how many of each row's scores [B, N] lie above Q3 + 1.5 x IQR (linear-interpolated quartiles)."""
    scores = scores.float()
    q1, q3 = torch.quantile(scores, 0.25, dim=1), torch.quantile(scores, 0.75, dim=1)
    return (scores > (q3 + 1.5 * (q3 - q1))[:, None]).sum(dim=1)


def row_selection(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """[B, keep] positions of the kept tokens among each row's N tokens (scores [B, N] in raster order): the
    strongest outliers (by decreasing score), then the spatial samples (ascending); see the module docstring.

    Written for rows whose outlier counts differ, without reading them: every stride the authors' loop could try is
    counted at once, and the samples are ranks among a row's candidates."""
    batch, n = scores.shape
    device = scores.device
    outliers = outlier_counts(scores)
    strong = outliers.clamp(max=keep)  # [B] outliers kept
    top = torch.topk(scores, keep, dim=1).indices  # by decreasing score
    slot = torch.arange(keep, device=device)
    is_strong = slot < strong[:, None]
    taken = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, top, is_strong)
    needed = keep - strong
    # The authors' stride (n - 1 where they divide by zero), and no longer than leaves `needed` positions.
    stride = torch.where(outliers > 0, (n // outliers.clamp(min=1) // 3).clamp(min=1), max(1, n - 1))
    stride = torch.where(needed > 1, torch.minimum(stride, ((n - 2) // (needed - 1).clamp(min=1)).clamp(min=1)), stride)
    # Smaller strides one by one until one leaves enough untaken positions of 0, s, 2s, ... < n - 1; else stride 1.
    strides = torch.arange(1, max(1, n - 1) + 1, device=device)
    on_sequence = (top[..., None] % strides == 0) & (top[..., None] < n - 1) & is_strong[..., None]  # [B, keep, S]
    free = ((n - 2) // strides + 1)[None] - on_sequence.sum(dim=1)  # [B, S] untaken positions on each sequence
    enough = (free >= needed[:, None]) & (strides[None] <= stride[:, None])
    stride = (enough * strides).amax(dim=1).clamp(min=1)
    position = torch.arange(n, device=device)
    candidate = (position < n - 1) & (position % stride[:, None] == 0) & ~taken
    short = candidate.sum(dim=1) < needed  # even stride 1 leaves too few: every untaken position
    candidate = torch.where(short[:, None], ~taken, candidate)
    # `needed` of them evenly spaced (primitives.evenly_spaced, row by row)
    count = candidate.sum(dim=1)
    rank = ((slot[None] - strong[:, None]).clamp(min=0).double() + 0.5) * count[:, None] / needed.clamp(min=1)[:, None]
    rank = torch.where(needed[:, None] >= count[:, None], slot[None] - strong[:, None], rank.floor().long())
    ascending = torch.argsort((~candidate).to(torch.uint8), dim=1, stable=True)  # candidates first, in order
    samples = ascending.gather(1, rank.clamp(min=0, max=n - 1))
    return torch.where(is_strong, top, samples)


def absorb(features: torch.Tensor, unit: torch.Tensor, scores: torch.Tensor, tokens: torch.Tensor,
           kept: torch.Tensor, neighbours: int):
    """Each kept token takes its most similar other patches of its row, weighted by their [CLS] attention.

    features [B, N, D], unit keys [B, N, C] and scores [B, N] over a view's tokens; tokens [B, n]: one row's tokens
    in raster order; kept [B, k]: positions among them. Returns (the kept tokens [B, k], their states [B, k, D]
    in float32 at least, which tokens each absorbed [B, k, N])."""
    n = tokens.shape[1]
    dtype = torch.promote_types(features.dtype, torch.float32)
    row_unit = gather_rows(unit, tokens)
    row_features = gather_rows(features, tokens).to(dtype)
    similarity = gather_rows(row_unit, kept) @ row_unit.transpose(1, 2)
    similarity.scatter_(2, kept[..., None], float("-inf"))  # never itself
    local = torch.topk(similarity, min(neighbours, n - 1), dim=-1).indices  # [B, k, count] positions in the row
    weight = scores.gather(1, tokens).gather(1, local.flatten(1)).view(local.shape).to(dtype)
    weights = torch.zeros(*kept.shape, n, dtype=dtype, device=features.device).scatter_(2, local, weight)
    absorbed = torch.zeros(*kept.shape, features.shape[1], dtype=torch.bool, device=features.device)
    absorbed.scatter_(2, tokens.gather(1, local.flatten(1)).view(local.shape), True)
    own = gather_rows(row_features, kept)
    return tokens.gather(1, kept), own + weights @ row_features, absorbed


class PruMergePlus(VisionMethod):
    name = "prumerge+"
    summary = ("IQR outliers of [CLS] attention (last vision layer, heads as one) plus spatial samples; each kept "
               "token adds its 32 key-nearest patches weighted by their [CLS] attention")

    @dataclass(frozen=True)
    class Options:
        neighbours: int = NEIGHBOURS  # patches each kept token absorbs
        layer: int = LAYER  # vision layer whose q/k give the attention and the keys

    @classmethod
    def validate(cls, options: "PruMergePlus.Options") -> None:
        if options.neighbours < 0:
            raise ValueError(f"prumerge+ neighbours must be >= 0; got {options.neighbours}")

    def vision_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return (self.options.layer,)

    def select(self, view: VisionView) -> Selection:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[VisionView]) -> list[Selection]:
        """Items of one shape whose tokens sit alike in the tower's rows (a LLaVA batch's images, one row each; a
        LLaVA-NeXT batch's images of one size) are selected together, row by row, each row's items as [B, n]
        tensors; where each token sits is read from the device once for the batch (not at all for one-row items)."""
        layouts = row_layouts(views)
        keys = []
        for view, layout in zip(views, layouts):
            layer = view.layers[self.options.layer]
            keys.append((view.features.shape, view.features.dtype, view.features.device, layer.key.shape,
                         layer.key.dtype, layer.key.device, layer.cls, view.keep, layout_key(layout)))
        picks: list = [None] * len(views)
        for group in same_shape(keys):
            alike = [views[i] for i in group]
            layer, rows, columns = VisionView.stacked(alike, self.options.layer)
            features = torch.stack([view.features for view in alike])
            budgeted = [(tokens, budget) for tokens, budget in
                        row_tokens([layouts[i] for i in group], columns, alike[0].keep) if budget]
            for index, selection in zip(group, self._select(features, layer, rows, columns, budgeted)):
                picks[index] = selection
        return picks

    def _select(self, features: torch.Tensor, layer: VisionLayer, rows: torch.Tensor, columns: torch.Tensor,
                groups: list[tuple[torch.Tensor, int]]) -> list[Selection]:
        """B items of N tokens each (features [B, N, D]; rows, columns [B, N]: where each token was encoded, rows
        indexing `layer`'s, which holds every item's), whose tower rows are `groups`: (the row's tokens [B, n] in
        raster order, its budget)."""
        device = features.device
        scores = full_width_cls_attention(layer).to(device)[rows, columns]  # [B, N]
        unit = torch.nn.functional.normalize(layer.key[rows, :, columns].float().flatten(2).to(device), dim=-1)
        per_row = [absorb(features, unit, scores, tokens, row_selection(scores.gather(1, tokens), budget),
                          self.options.neighbours) for tokens, budget in groups]
        keep, hidden, absorbed = (torch.cat(parts, dim=1) for parts in zip(*per_row))
        order = torch.argsort(keep, dim=1)
        keep = keep.gather(1, order)
        hidden = gather_rows(hidden, order)
        absorbed = gather_rows(absorbed, order).transpose(1, 2)  # [B, N, k]

        similarity = unit @ gather_rows(unit, keep).transpose(1, 2)
        by_absorber = similarity.masked_fill(~absorbed, float("-inf"))
        destination = torch.where(absorbed.any(dim=-1), by_absorber.argmax(dim=-1), similarity.argmax(dim=-1))
        destination.scatter_(1, keep, torch.arange(keep.shape[1], device=device).expand_as(keep))
        sizes = torch.zeros(keep.shape, device=device).scatter_add_(1, destination, torch.ones(destination.shape,
                                                                                               device=device))
        return [Selection(*parts) for parts in zip(keep, hidden.to(features.dtype), sizes, destination)]
