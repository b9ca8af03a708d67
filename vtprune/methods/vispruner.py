"""VisPruner (ICCV'25): important tokens by [CLS] attention, then diverse tokens by iterative deduplication.

Read from the authors' released code (Theia-4869/VisPruner, mirrored as anonymous-4869/VisPruner):
`llava/model/llava_arch.py`, `LlavaMetaForCausalLM.encode_images` (marked [VisPruner]), with
`llava/model/multimodal_encoder/clip_encoder.py`, `feature_select` (attention and features of the
same layer, `mm_vision_select_layer` = -2: the [CLS] row of that layer's attention over the
patches, and the patch features the projector receives). Per tower row (an image, an anyres
tile; the authors run LLaVA-NeXT with the same count in each of its five tiles), for a budget T:

1. Important: rank the patches by [CLS] attention averaged over heads (descending); the first
   T_imp = int(T x important_ratio) are kept (important_ratio 0.5 is the authors' default,
   `--important_ratio` in `llava/eval/model_vqa_loader.py`; their README also shows 0.75).
2. Diverse: the rest, in that ranked order, is the residual; T_div = T - T_imp of it are kept.
   Features are L2-normalised projector inputs. While the residual is longer than T_div, one
   round: r = min(8, R - T_div); split the residual into a = its even positions and b = its odd
   positions; score each a token by its largest cosine similarity to any b token; drop the r
   a tokens with the largest scores; the new residual is the remaining a tokens in descending
   score order followed by all b tokens in their order (this reordering steers the next
   round's split, so it is kept exactly).
3. Keep the important and the remaining residual tokens, in the item's order.

Deviations, on purpose:
- The released loop breaks when the residual has an odd length: its `expand(-1, R // 2 - r)`
  has one column fewer than the ceil(R/2) - r surviving a tokens, a shape error unless one side
  has a single column and broadcasts (at any batch size; it then runs: right when two a tokens
  survive, wrongly dropping the last one when one does). It also fails when r exceeds the number of a tokens (a negative
  expand). Both are reachable at budgets the authors never ran (T_imp odd, e.g. T = 50 at ratio
  0.5; budgets near the row's size). Here a is always the ceil(R/2) even positions and a round
  drops min(r, len(a)) of them; wherever the released code runs right, this is the same
  computation.
- Budget per item: the engine gives one budget per item, split over the item's tower rows in
  proportion to the item's tokens in each row (`row_groups`): the authors' equal per-tile
  count for equal rows. The authors pin every LLaVA-NeXT image to one layout (their
  `llava/mm_utils.py` replaces the grid pinpoints by 672x672 alone: a base view and 2x2 tiles,
  2880 tokens); here the model's processor picks the layout, as the checkpoint was trained
  with. The authors select among all 576 patches of a LLaVA-NeXT tile and
  never unpad (their `encode_images` path strips `_unpad` from the merge type, so their LLM input
  has padding patches and no newline tokens); here the candidates are the item's tokens only (the
  padding patches are not in the view), the model's newline tokens stay (outside the budget), and
  every budgeted token reaches the LLM. Videos (no released path) are pruned frame by frame.
- Positions: the kept tokens keep their original positions (the authors pack them and renumber), as the engine
  does for every method.
- Ties: the ranking by attention and each round's ranking by similarity use a stable
  descending sort (ties: the earlier token first; the authors' argsort is unstable).
- Towers without [CLS] (SigLIP: LLaVA-OneVision; Qwen's ViT): the importance is the attention
  each token receives, averaged over the row's queries and the heads, as the authors describe
  for Qwen2.5-VL (VisPruner issue 1: "the average attention each visual token receives from all
  other tokens"; issue 9 asks the same). The engine offers the vision stage on
  LLaVA, LLaVA-NeXT and Video-LLaVA (all CLIP, with [CLS]) today.
- Numerics: attention in float32, similarities in float32 at least (float64 features stay
  float64; the authors: the model's dtype, fp16). The residual's similarity matrix is computed
  once and each round reads an a token's score down its column of the b rows (the authors multiply
  the a x b block's features each round: the same dot products up to float rounding, and the rounds
  cost no matmul and no scattered reads). The loop is chaotic under rounding: one
  near-tie that flips reorders every later round's a/b split, so runs in different precisions
  can keep quite different diverse tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ModelInfo, VisionLayer, VisionMethod, VisionView, feature_layer
from .primitives import (DISTANCE_MATRIX_ENTRIES, cls_attention, held_entries, layout_key, on_device,
                         received_attention, row_layouts, row_tokens, same_shape)


def importance(layer: VisionLayer, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[N] [CLS] attention averaged over heads; the received attention on a tower without [CLS]."""
    if layer.cls:
        return cls_attention(layer, rows, columns).mean(dim=0)
    return received_attention(layer, rows, columns)


def descending(values: torch.Tensor) -> torch.Tensor:
    return torch.sort(values, descending=True, stable=True).indices


def deduplicate(unit: torch.Tensor, residual: torch.Tensor, count: int, per_round: int,
                owner: torch.Tensor | None = None) -> torch.Tensor:
    """The authors' iterative matching and pruning: shrink residual (indices into unit [N, D], unit-norm rows,
    in ranked order) to count tokens, dropping per round the even-position tokens most similar to the odd ones.

    Batched, in lockstep: residual [J, R] with unit [G, N, D] and owner [J] (the unit each residual indexes)
    gives [J, count]."""
    single = residual.dim() == 1
    if single:
        unit, residual, owner = unit[None], residual[None], torch.zeros(1, dtype=torch.long, device=unit.device)
    size = residual.shape[1]
    # A residual is one tower row's tokens (a few hundred), so its matrix is small; the batch's are held a chunk
    # at a time (residuals are independent: chunking changes nothing).
    at_once = max(1, held_entries(unit.device, DISTANCE_MATRIX_ENTRIES) // (size * size))
    kept = []
    for start in range(0, residual.shape[0], at_once):
        tokens = residual[start:start + at_once]
        features = unit[owner[start:start + at_once, None], tokens]
        kept.append(tokens.gather(1, survivors(features @ features.transpose(1, 2), count, per_round)))
    kept = torch.cat(kept)
    return kept[0] if single else kept


def survivors(similarity: torch.Tensor, count: int, per_round: int) -> torch.Tensor:
    """[J, count] positions in J residuals that survive the rounds, from their cosine similarities [J, R, R]
    (held whole).

    An a token's score, its largest similarity to a b token, is read down its column of the b rows (entries
    [b, a], where the authors read [a, b]: the same dot products, rounding aside): the b rows are copied whole,
    contiguous, and maxed together, so a round makes no scattered reads. Whenever the residual is half the
    matrix's side or less, the matrix is cut down to it, so the copied rows stay short."""
    jobs, size = similarity.shape[:2]
    frame = position = torch.arange(size, device=similarity.device).expand(jobs, size)  # frame: matrix index -> input
    job = torch.arange(jobs, device=similarity.device)[:, None]
    matrix, first_row = similarity, size * job  # first_row: where each residual's rows start in matrix.flatten(0, 1)
    while count > 0:
        drop = min(per_round, position.shape[1] - count)
        if drop <= 0:
            break
        if 2 * position.shape[1] <= matrix.shape[1]:
            matrix, frame = along_both(matrix, position), frame.gather(1, position)
            position = torch.arange(frame.shape[1], device=frame.device).expand_as(frame)
            first_row = frame.shape[1] * job
        a, b = position[:, 0::2], position[:, 1::2]
        rows = matrix.flatten(0, 1).index_select(0, (first_row + b).flatten()).view(jobs, b.shape[1], matrix.shape[2])
        score = rows.amax(dim=1).gather(1, a)
        drop = min(drop, a.shape[1])
        position = torch.cat([a.gather(1, descending(score)[:, drop:]), b], dim=1)
    return frame.gather(1, position)


def along_both(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[J, K, K]: matrix [J, N, N] restricted to index [J, K] on both axes, in that order."""
    rows = matrix.gather(1, index[:, :, None].expand(-1, -1, matrix.shape[2]))
    return rows.gather(2, index[:, None, :].expand(-1, index.shape[1], -1))


class VisPruner(VisionMethod):
    name = "vispruner"
    summary = ("important tokens by [CLS] attention at the feature layer, then diverse tokens by iteratively dropping "
               "near-duplicates among the rest (half and half)")

    @dataclass(frozen=True)
    class Options:
        important_ratio: float = 0.5  # T_imp = int(budget x ratio) per row; the rest are diverse tokens
        per_round: int = 8  # the most tokens one deduplication round drops
        layer: int | None = None  # vision layer read; None: the one whose output the projector receives

    @classmethod
    def validate(cls, options: "VisPruner.Options") -> None:
        if not 0 <= options.important_ratio <= 1:
            raise ValueError(f"vispruner important_ratio must be in [0, 1]; got {options.important_ratio}")
        if options.per_round < 1:
            raise ValueError(f"vispruner per_round must be >= 1; got {options.per_round}")

    def vision_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return (feature_layer(model, self.options.layer),)

    def select(self, view: VisionView) -> torch.Tensor:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[VisionView]) -> list[torch.Tensor]:
        """Items of one shape whose tokens sit alike in the tower's rows are ranked together, row by row (where each
        token sits is read once for the batch, not at all for one-row items); residuals of one length and count
        are deduplicated together."""
        kept = [[] for _ in views]
        units, rounds = {}, []  # per view its normalised features; per residual (view, its ranked tokens, count)
        pruned = []
        for v, view in enumerate(views):
            if view.keep >= view.features.shape[0]:
                kept[v].append(torch.arange(view.features.shape[0], device=view.features.device))
            else:
                pruned.append(v)
        layouts = row_layouts([views[v] for v in pruned])
        keys = [(views[v].features.shape, views[v].features.dtype, views[v].features.device,
                 next(iter(views[v].layers.values())).key.shape, views[v].keep, layout_key(layout))
                for v, layout in zip(pruned, layouts)]
        for group in same_shape(keys):
            members = [pruned[g] for g in group]
            unit, rows = self._rank_rows([views[v] for v in members], [layouts[g] for g in group])
            for b, v in enumerate(members):
                units[v] = unit[b]
                for important, rest, count in rows:
                    kept[v].append(important[b])
                    if count > 0:
                        rounds.append((v, rest[b], count))
        # Residuals of one length and count (every image of a LLaVA batch) are deduplicated in one loop.
        for group in same_shape([(units[v].shape, residual.numel(), count) for v, residual, count in rounds]):
            owners = sorted({rounds[j][0] for j in group})
            unit = torch.stack([units[v] for v in owners])
            owner = on_device(torch.tensor([owners.index(rounds[j][0]) for j in group]), unit.device)
            residual = torch.stack([rounds[j][1] for j in group])
            for j, row in zip(group, deduplicate(unit, residual, rounds[group[0]][2], self.options.per_round, owner)):
                kept[rounds[j][0]].append(row)
        return [torch.cat(parts).sort().values for parts in kept]

    def _rank_rows(self, views: list[VisionView], layouts: list) -> tuple[torch.Tensor, list]:
        """For views of one shape and row layout (row_layouts; None: one row): (unit features [B, N, D], per tower
        row (its important tokens [B, T_imp], the rest ranked [B, n - T_imp], by decreasing importance, and how many
        of the rest to keep))."""
        layer, rows, columns = VisionView.stacked(views, next(iter(views[0].layers)))
        features = torch.stack([view.features for view in views])
        score = importance(layer, rows.flatten(), columns.flatten()).to(features.device).view(columns.shape)
        ranked_rows = []
        for tokens, budget in row_tokens(layouts, columns, views[0].keep):
            important = int(budget * self.options.important_ratio)
            ranked = tokens.gather(1, descending(score.gather(1, tokens)))
            ranked_rows.append((ranked[:, :important], ranked[:, important:], budget - important))
        return unit_features(features), ranked_rows


def unit_features(features: torch.Tensor) -> torch.Tensor:
    """Features normalised to unit length, in float32 at least."""
    return torch.nn.functional.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
