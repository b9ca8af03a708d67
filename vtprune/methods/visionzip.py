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
from .primitives import cls_attention, in_token_order, mean_keys, received_attention, row_groups

CONTEXTUAL_SHARE = 10 / 64  # 54+10 / 108+20 / 162+30 at 64 / 128 / 192 (README, paper)


def split_counts(keep: int, share: float) -> tuple[int, int]:
    """(dominant, contextual) for a row's budget: contextual = round_half_up(keep x share)."""
    contextual = min(keep, math.floor(keep * share + 0.5))
    return keep - contextual, contextual


def importance(layer: VisionLayer, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[N] [CLS] attention summed over heads; the received attention on a tower without [CLS]."""
    if layer.cls:
        return cls_attention(layer, rows, columns).sum(dim=0)
    return received_attention(layer, rows, columns)


def anchor_positions(candidates: int, count: int, device=None) -> torch.Tensor:
    """The released code's anchors among a row's candidates: 0, step, 2 step, ... (the first count)."""
    return torch.arange(0, candidates, max(1, candidates // count), device=device)[:count]


def contextual_merge(features: torch.Tensor, keys: torch.Tensor, count: int, spare: int | None = None):
    """The released code's contextual step on one row's candidates (features [M, D], keys [M, d], in row order);
    `spare`: a candidate (not an anchor) left out of the merge.

    Returns (anchor positions [c], anchor features [c, D] after the merge, sizes [c], the anchor slot
    of every candidate [M], -1 for the spare)."""
    m = features.shape[0]
    anchors = anchor_positions(m, count, features.device)
    dtype = torch.promote_types(features.dtype, torch.float32)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    slot = torch.full((m,), -1, dtype=torch.long, device=features.device)
    slot[anchors] = torch.arange(anchors.numel(), device=features.device)
    others = torch.ones(m, dtype=torch.bool, device=features.device)
    others[anchors] = False
    if spare is not None:
        others[spare] = False
    others = torch.nonzero(others).flatten()
    slot[others] = (unit[others] @ unit[anchors].T).argmax(dim=-1)
    membership = (slot[others][None, :] == torch.arange(anchors.numel(), device=features.device)[:, None]).to(dtype)
    assigned = membership.sum(dim=1)  # [c] candidates each anchor absorbed
    merged = features[anchors].to(dtype) + (membership @ features[others].to(dtype)) / assigned.clamp(min=1)[:, None]
    return anchors, merged, assigned.float() + 1, slot


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
        features = view.features
        n, device = features.shape[0], features.device
        if view.keep >= n:
            return torch.arange(n, device=device)
        (layer,) = view.layers.values()
        rows, columns = view.rows.to(device), view.columns.to(device)
        score = importance(layer, rows, columns).to(device)
        keys = mean_keys(layer, rows, columns).to(device)

        keep, hidden, sizes = [], [], []
        destination = torch.full((n,), -1, dtype=torch.long, device=device)
        merges = False
        for tokens, budget in row_groups(rows, columns, view.keep):
            dominant, contextual = split_counts(budget, self.options.contextual_share)
            cls_slot = int(layer.cls and contextual > 0 and dominant > 0)  # the authors' [CLS], given to a patch
            top = torch.topk(score[tokens], dominant - cls_slot).indices
            is_dominant = torch.zeros(tokens.numel(), dtype=torch.bool, device=device)
            is_dominant[top] = True
            keep.append(tokens[is_dominant])  # in row order, as the authors' masked_select
            hidden.append(features[tokens[is_dominant]])
            sizes.append(torch.ones(dominant - cls_slot, device=device))
            if contextual == 0:
                continue
            merges = True
            candidates = tokens[~is_dominant]
            spare = None
            if cls_slot:  # the best candidate that is not an anchor (ties: the first in row order)
                free = score[candidates].clone()
                free[anchor_positions(candidates.numel(), contextual, device)] = -torch.inf
                spare = int(free.argmax())
                keep.append(candidates[spare:spare + 1])
                hidden.append(features[candidates[spare:spare + 1]])
                sizes.append(torch.ones(1, device=device))
            anchors, merged, anchor_sizes, slot = contextual_merge(features[candidates], keys[candidates], contextual,
                                                                   spare)
            keep.append(candidates[anchors])
            hidden.append(merged)
            sizes.append(anchor_sizes)
            offset = sum(k.numel() for k in keep[:-1])  # the anchors' first slot in torch.cat(keep)
            destination[candidates] = torch.where(slot >= 0, slot + offset, -1)  # the spare: its own slot, below
        keep = torch.cat(keep)
        if not merges:
            return keep.sort().values
        dtype = torch.promote_types(features.dtype, torch.float32)
        hidden, sizes = torch.cat([h.to(dtype) for h in hidden]), torch.cat(sizes)
        destination[keep] = torch.arange(keep.numel(), device=device)
        return Selection(*in_token_order(keep, hidden.to(features.dtype), sizes, destination))
