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
  their order within the tile. Videos: per frame.
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
from .primitives import evenly_spaced, row_groups

LAYER = -1  # encoder.layers[23] of CLIP-L's 24
NEIGHBOURS = 32


def full_width_cls_attention(layer: VisionLayer, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[N] the [CLS] attention of each token with the layer's heads concatenated into one head of width H x d."""
    if not layer.cls:
        raise ValueError("method 'prumerge+' needs a [CLS] token, and this vision tower has none")
    heads, width = layer.query.shape[1], layer.query.shape[3]
    logits = torch.einsum("rhd,rhtd->rt", layer.query[:, :, 0].float(), layer.key.float()) * (heads * width) ** -0.5
    return logits.softmax(dim=-1)[rows, columns]


def outlier_count(scores: torch.Tensor) -> int:
    """How many scores lie above Q3 + 1.5 x IQR (linear-interpolated quartiles)."""
    scores = scores.float()
    quartiles = torch.quantile(scores, torch.tensor([0.25, 0.75], device=scores.device))
    bound = quartiles[1] + 1.5 * (quartiles[1] - quartiles[0])
    return int((scores > bound).sum())


def spatial_samples(n: int, taken: torch.Tensor, outliers: int, needed: int) -> torch.Tensor:
    """Positions (in the row's raster order) of `needed` spatial samples not yet taken (see the module docstring)."""
    device = taken.device
    if needed <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    stride = max(1, n // outliers // 3) if outliers else max(1, n - 1)
    if needed > 1:  # strides whose sequence is shorter than needed cannot do: skip them
        stride = min(stride, max(1, (n - 2) // (needed - 1)))
    while True:
        sequence = torch.arange(0, n - 1, stride, device=device)
        candidates = sequence[~taken[sequence]]
        if candidates.numel() >= needed or stride == 1:
            break
        stride -= 1
    if candidates.numel() < needed:
        candidates = torch.nonzero(~taken).flatten()
    return candidates[evenly_spaced(candidates.numel(), needed, device)]


def row_selection(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Positions of the kept tokens among one row's N tokens (scores [N] in raster order): outliers, then samples."""
    n = scores.shape[0]
    outliers = outlier_count(scores)
    strongest = torch.topk(scores, min(outliers, keep)).indices
    taken = torch.zeros(n, dtype=torch.bool, device=scores.device)
    taken[strongest] = True
    return torch.cat([strongest, spatial_samples(n, taken, outliers, keep - strongest.numel())])


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
        features = view.features
        n, device = features.shape[0], features.device
        layer = view.layers[self.options.layer]
        rows, columns = view.rows.to(device), view.columns.to(device)
        scores = full_width_cls_attention(layer, rows, columns).to(device)
        keys = layer.key[rows, :, columns].float().flatten(1).to(device)  # [N, H x d]: the raw k_proj output
        unit = torch.nn.functional.normalize(keys, dim=-1)
        dtype = torch.promote_types(features.dtype, torch.float32)

        keep, hidden, absorbed = [], [], []
        for tokens, budget in row_groups(rows, columns, view.keep):
            if budget == 0:
                continue
            kept = tokens[row_selection(scores[tokens], budget)]
            similarity = unit[kept] @ unit[tokens].T  # [k, n_row]
            similarity[tokens[None, :] == kept[:, None]] = float("-inf")  # never itself
            count = min(self.options.neighbours, tokens.numel() - 1)
            local = torch.topk(similarity, count, dim=-1).indices  # [k, count] positions in the row
            weights = torch.zeros(kept.numel(), tokens.numel(), dtype=dtype, device=device)
            weights.scatter_(1, local, scores[tokens][local].to(dtype))
            mask = torch.zeros(kept.numel(), n, dtype=torch.bool, device=device)
            mask.scatter_(1, tokens[local], True)
            keep.append(kept)
            hidden.append(features[kept].to(dtype) + weights @ features[tokens].to(dtype))
            absorbed.append(mask)
        keep, hidden, absorbed = torch.cat(keep), torch.cat(hidden), torch.cat(absorbed)
        order = torch.argsort(keep)
        keep, hidden, absorbed = keep[order], hidden[order], absorbed[order]

        similarity = unit @ unit[keep].T  # [N, k]
        by_absorber = similarity.masked_fill(~absorbed.T, float("-inf"))
        destination = torch.where(absorbed.T.any(dim=-1), by_absorber.argmax(dim=-1), similarity.argmax(dim=-1))
        destination[keep] = torch.arange(keep.numel(), device=device)
        sizes = torch.bincount(destination, minlength=keep.numel()).float()
        return Selection(keep, hidden.to(features.dtype), sizes, destination)
