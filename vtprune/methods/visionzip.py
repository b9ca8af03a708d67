"""VisionZip (CVPR'25): dominant tokens by [CLS] attention, plus contextual tokens merged by key similarity.

Read from the authors' released code (dvlab-research/VisionZip, now JIA-Lab-research/VisionZip):
`visionzip/clip_encoder.py`, `CLIPVisionTower_VisionZip.forward`, with the keys captured by
`visionzip/utils.py` (`CLIPAttention_forward` returns the layer's raw keys averaged over heads;
`apply_info` stores them for encoder layer index 22 of 24, the layer whose output is
`hidden_states[-2]`), and `visionzip/main.py` (`visionzip(model, dominant, contextual)` passes
`dominant - 1` on: the [CLS] token is one of the dominant tokens). Per tower row (an image, an
anyres tile, a video frame), with attention and keys of the vision layer whose output the
projector receives (`vision_layers`: -2 on LLaVA-1.5/NeXT/Video-LLaVA):

1. Dominant: the patches with the largest [CLS] attention summed over heads (the softmax
   runs over the whole row, [CLS] included).
2. Contextual: the row's other patches, in their order in the row, are the candidates. With
   M candidates and c contextual tokens, step = max(1, M // c) and the anchors are candidates
   0, step, 2 step, ... (the first c of them: anchors bunch towards the row's start when M is
   not a multiple of c, as in the released code). Every other candidate goes to the anchor
   whose L2-normalised head-averaged key is most similar (dot product; ties to the first
   anchor). Only candidates are compared: the dominant patches neither absorb nor are absorbed.
3. An anchor's new feature is its own feature PLUS the mean of the features assigned to it,
   `target_hidden + aggregated_hidden` in the released code: a sum, not an average including
   the anchor (an anchor nothing was assigned to keeps its feature). Features are the
   projector's input (the feature layer's hidden states, [CLS] dropped). This is what the
   authors' reported numbers were made with, and the ports of the code we read keep it.

Counts. The authors' code takes the dominant and contextual counts as arguments; their README
gives 54+10 for 64 tokens and the paper 108+20 and 162+30 for 128 and 192 (there, 54 dominant =
[CLS] + 53 patches). For a budget k per row, contextual = round_half_up(k * contextual_share),
contextual_share = 10/64 by default, which gives 10/20/30 at exactly those budgets, and
dominant = k - contextual. On LLaVA-NeXT the authors keep the same counts in each of the five
tiles (64 per tile at 320 per image). The released code has no video path; here a video is
pruned frame by frame (each frame is a tower row), our reading.

Deviations, on purpose:
- [CLS]: HF LLaVA drops the [CLS] feature (vision_feature_select_strategy "default"), so no
  LLM token can carry it. The authors' [CLS] slot goes to a patch, chosen so that everything else
  stays theirs: the dominant patches are their dominant - 1, the contextual candidates and anchors
  are theirs, and the slot takes the highest-[CLS]-attention candidate that is not an anchor,
  kept as itself (so at most one anchor's group loses one member). At 64: 53 dominant patches,
  10 contextual tokens, and that patch. (Keeping a 54th dominant patch instead would take it out
  of the candidates and shift every later anchor by one.)
- Budget per item: the engine gives one budget per item; it is split over the item's tower
  rows in proportion to how many of the item's tokens each row holds (`row_groups`). For a
  single image or equal tiles/frames that is the authors' equal per-row count. On LLaVA-NeXT
  the authors select among all 576 patches of each tile and never unpad the high-resolution
  grid (`restore_image_features_sorted`, which also leaves out the newline tokens); here the
  candidates are the item's tokens only (the padding patches that never reach the LLM are not in
  the view), the budget follows, and the model's newline tokens stay (outside the budget).
- Order and positions: the authors put the contextual tokens after the dominant ones (and on
  LLaVA-NeXT the tiles' [CLS] and contextual tokens at the end of the image, unpositioned);
  here every kept token sits at its own place in the item (a contextual token at its anchor's)
  in the original order, as the engine does for every method.
- Rows whose share of the budget is too small for a contextual token (k * share < 0.5, i.e.
  k <= 3 at the default share) keep dominant tokens only and their other tokens are dropped
  (the released code divides by zero there). Their destination is -1 in the returned
  Selection; when no row merges, a plain index tensor is returned.
- Towers without [CLS] (SigLIP: LLaVA-OneVision; Qwen's ViT): the dominant tokens are ranked
  by the attention each token receives, averaged over the row's queries and the heads, as
  peers porting VisionZip to Qwen2.5-VL do (vllm PR 38888: column sums of the attention map;
  JIA-Lab-research/VisionZip issue 31 discusses the authors' Qwen port averaging the map over
  one axis). The engine offers the vision stage on LLaVA, LLaVA-NeXT and Video-LLaVA (all
  CLIP, with [CLS]) today; the substitute is for the towers it may add.
- Numerics: attention, similarities and the merge are computed in float32 at least (the
  authors: the model's dtype, fp16), which can reorder near-ties; the merged features are cast
  back to the features' dtype. Ties between exactly equal attentions go as torch.topk breaks
  them (the authors' code uses topk too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import ModelInfo, Selection, VisionLayer, VisionMethod, VisionView, feature_layer
from .primitives import gather_rows, in_token_order, layout_key, row_layouts, row_tokens, same_shape

CONTEXTUAL_SHARE = 10 / 64  # 54+10 / 108+20 / 162+30 at 64 / 128 / 192 (README, paper)


def split_counts(keep: int, share: float) -> tuple[int, int]:
    """(dominant, contextual) for a row's budget: contextual = round_half_up(keep x share)."""
    contextual = min(keep, math.floor(keep * share + 0.5))
    return keep - contextual, contextual


def row_importance(layer: VisionLayer) -> torch.Tensor:
    """[R, T] per tower row: each token's [CLS] attention summed over heads; on a tower without [CLS], the
    attention it receives averaged over the row's queries and the heads."""
    query, key = layer.query.float(), layer.key.float()
    if not layer.cls:
        return (query @ key.transpose(-1, -2) * layer.scaling).softmax(dim=-1).mean(dim=(1, 2))
    logits = torch.einsum("rhd,rhtd->rht", query[:, :, 0], key) * layer.scaling
    return logits.softmax(dim=-1).sum(dim=1)


def anchor_positions(candidates: int, count: int, device=None) -> torch.Tensor:
    """The released code's anchors among a row's candidates: 0, step, 2 step, ... (the first count)."""
    return torch.arange(0, candidates, max(1, candidates // count), device=device)[:count]


def contextual_merge(features: torch.Tensor, keys: torch.Tensor, count: int, spare: torch.Tensor | None = None):
    """The released code's contextual step on rows of candidates (features [B, M, D], keys [B, M, d], each row's
    candidates in row order); `spare` [B]: a candidate per row (not an anchor) left out of the merge.

    Returns (anchor features [B, c, D] after the merge, sizes [B, c], the anchor slot of every candidate [B, M],
    -1 for the spare); the anchors are anchor_positions(M, count) of every row."""
    batch, m, _ = features.shape
    device = features.device
    anchors = anchor_positions(m, count, device)
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    slot = (unit @ unit[:, anchors].transpose(1, 2)).argmax(dim=-1)  # [B, M]: the most similar anchor (ties: first)
    slot[:, anchors] = torch.arange(anchors.numel(), device=device)
    others = torch.ones(batch, m, dtype=torch.bool, device=device)
    others.index_fill_(1, anchors, False)  # (others[:, anchors] = False would copy False to a GPU, blocking)
    if spare is not None:
        others.scatter_(1, spare[:, None], False)
        slot.scatter_(1, spare[:, None], -1)
    membership = ((slot[:, None, :] == torch.arange(anchors.numel(), device=device)[None, :, None])
                  & others[:, None, :]).to(dtype)  # [B, c, M]
    assigned = membership.sum(dim=-1)  # [B, c] candidates each anchor absorbed
    merged = features[:, anchors].to(dtype) + (membership @ features.to(dtype)) / assigned.clamp(min=1)[..., None]
    return merged, assigned.float() + 1, slot


class VisionZip(VisionMethod):
    name = "visionzip"
    summary = ("dominant tokens by [CLS] attention at the feature layer, plus evenly strided anchors that absorb the "
               "rest by key similarity (54+10 at 64, [CLS]'s slot given to a patch)")

    @dataclass(frozen=True)
    class Options:
        contextual_share: float = CONTEXTUAL_SHARE  # contextual tokens per row = round(budget x share)
        layer: int | None = None  # vision layer read; None: the one whose output the projector receives

    @classmethod
    def validate(cls, options: "VisionZip.Options") -> None:
        if not 0 <= options.contextual_share <= 1:
            raise ValueError(f"visionzip contextual_share must be in [0, 1]; got {options.contextual_share}")

    def vision_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return (feature_layer(model, self.options.layer),)

    def select(self, view: VisionView) -> torch.Tensor | Selection:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[VisionView]) -> list[torch.Tensor | Selection]:
        """Items of one shape whose tokens sit alike in the tower's rows (a LLaVA batch's images, one row each; a
        LLaVA-NeXT batch's images of one size, their base image and tiles) are selected together, row by row, each
        row's items as one [B, n] batch. Where each token sits is known without a read for one-row items; for the
        others it is read from the device once for the batch."""
        picks: list = [None] * len(views)
        pruned = []
        for i, view in enumerate(views):
            if view.keep >= view.features.shape[0]:
                picks[i] = torch.arange(view.features.shape[0], device=view.features.device)
            else:
                pruned.append(i)
        layouts = row_layouts([views[i] for i in pruned])
        keys = []
        for i, layout in zip(pruned, layouts):
            view = views[i]
            (layer,) = view.layers.values()
            keys.append((view.features.shape, view.features.dtype, view.features.device, layer.key.shape,
                         layer.key.dtype, layer.key.device, layer.scaling, layer.cls, view.keep, layout_key(layout)))
        for group in same_shape(keys):
            members = [pruned[g] for g in group]
            for i, pick in zip(members, self._select_alike([views[i] for i in members], [layouts[g] for g in group])):
                picks[i] = pick
        return picks

    def _select_alike(self, views: list[VisionView], layouts: list) -> list[torch.Tensor | Selection]:
        """Views of one shape and row layout: each tower row's tokens of every view as one [B, n] batch (`_row`),
        the rows' answers joined per view as `select` would for the view alone."""
        stacked, row_of, columns = VisionView.stacked(views, next(iter(views[0].layers)))  # B x R rows; [B, N]
        features = torch.stack([view.features for view in views])  # [B, N, D]
        device = features.device
        batch, n = features.shape[:2]
        score = row_importance(stacked).to(device)[row_of, columns]  # [B, N]
        keys = stacked.key.float().mean(dim=1).to(device)[row_of, columns]  # [B, N, d]: head-averaged keys
        answers = [(tokens, *self._row(features, score, keys, tokens, budget, stacked.cls))
                   for tokens, budget in row_tokens(layouts, columns, views[0].keep)]
        keep = torch.cat([tokens.gather(1, kept) for tokens, kept, *_ in answers], dim=1)
        if all(hidden is None for *_, hidden, _, _ in answers):
            return list(keep.sort(dim=1).values)
        dtype = torch.promote_types(features.dtype, torch.float32)
        hidden = torch.cat([gather_rows(features, tokens.gather(1, kept)).to(dtype) if merged is None else merged
                            for tokens, kept, merged, _, _ in answers], dim=1)
        sizes = torch.cat([torch.ones(kept.shape, device=device) if size is None else size
                           for _, kept, _, size, _ in answers], dim=1)
        destination, offset = torch.full((batch, n), -1, dtype=torch.long, device=device), 0
        for tokens, kept, _, _, slot in answers:
            if slot is None:  # a row without contextual tokens: its dominant ones in their own slots, the rest dropped
                slot = torch.full(tokens.shape, -1, dtype=torch.long, device=device)
                slot.scatter_(1, kept, torch.arange(kept.shape[1], device=device).expand_as(kept))
            destination.scatter_(1, tokens, torch.where(slot >= 0, slot + offset, -1))
            offset += kept.shape[1]
        keep, hidden, sizes, destination = in_token_order(keep, hidden.to(features.dtype), sizes, destination)
        return [Selection(*parts) for parts in zip(keep, hidden, sizes, destination)]

    def _row(self, features: torch.Tensor, score: torch.Tensor, keys: torch.Tensor, tokens: torch.Tensor, budget: int,
             cls: bool):
        """One tower row of B items: its tokens `tokens` [B, n] (indices into each item's, in column order) with
        `budget` of them kept. Returns (kept [B, k]: positions in the row, the dominant ones in row order, then the
        [CLS] slot's patch and the anchors; their states [B, k, D] in float32 at least, their sizes [B, k], the slot
        of kept each of the row's tokens went to [B, n], -1 for none), the last three None for a row without
        contextual tokens (it keeps its dominant tokens only)."""
        batch, n = tokens.shape
        device = tokens.device
        score = score.gather(1, tokens)
        dominant, contextual = split_counts(budget, self.options.contextual_share)
        cls_slot = int(cls and contextual > 0 and dominant > 0)  # the authors' [CLS], given to a patch
        top = torch.topk(score, dominant - cls_slot, dim=1).indices
        is_dominant = torch.zeros(batch, n, dtype=torch.bool, device=device).scatter_(1, top, True)
        # dominant tokens first, then the candidates, each in row order (the authors' masked_select)
        ranked = torch.argsort((~is_dominant).to(torch.uint8), dim=1, stable=True)
        picked, candidates = ranked[:, :dominant - cls_slot], ranked[:, dominant - cls_slot:]
        if contextual == 0:
            return picked, None, None, None
        anchors = anchor_positions(candidates.shape[1], contextual, device)
        spare = None
        if cls_slot:  # the best candidate that is not an anchor (ties: the first in row order)
            free = score.gather(1, candidates)
            free.index_fill_(1, anchors, -torch.inf)
            spare = free.argmax(dim=1)
            picked = torch.cat([picked, candidates.gather(1, spare[:, None])], dim=1)
        at = tokens.gather(1, candidates)
        merged, anchor_sizes, slot = contextual_merge(gather_rows(features, at), gather_rows(keys, at), contextual, spare)
        kept = torch.cat([picked, candidates[:, anchors]], dim=1)
        hidden = torch.cat([gather_rows(features, tokens.gather(1, picked)).to(merged.dtype), merged], dim=1)
        sizes = torch.cat([torch.ones(picked.shape, device=device), anchor_sizes], dim=1)
        into = torch.full((batch, n), -1, dtype=torch.long, device=device)
        into.scatter_(1, candidates, torch.where(slot >= 0, slot + picked.shape[1], -1))  # the spare: below
        into.scatter_(1, kept, torch.arange(kept.shape[1], device=device).expand_as(kept))
        return kept, hidden, sizes, into
