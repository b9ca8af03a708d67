"""DivPrune (CVPR'25): the most diverse subset of each visual item's tokens, at the LLM input.

Read from the authors' released code (vbdi/divprune, `LLaVA/llava/model/llava_arch.py`,
`DivPrune`): the tokens are the projected visual features as they enter the language
model; the distance between two tokens is 1 - their cosine similarity; the selection is
greedy max-min diversity:

- first pick: the token whose nearest other token is farthest, i.e. the largest
  second-smallest entry of its column of the distance matrix (the smallest being its
  own distance, ~0);
- every next pick: the token whose distance to the nearest token picked so far is
  largest;
- ties go to the lowest index (argmax's first maximum);
- the kept tokens then keep their original order and, as for every vtprune method, their original
  position ids (the authors' LLaVA code passes no position_ids, so their LLM renumbers the shortened
  sequence contiguously: a deliberate deviation, see the README's "positions").

Deviation (documented, on purpose): the authors' loop does not exclude tokens already
picked, so a token can be picked twice; their kept list then holds a repeat and keeps
fewer distinct tokens than asked. That happens only when no unpicked token is farther
from the picked set than a picked token is from itself (its self-distance, 0 up to
rounding): every remaining token is an exact (or, within rounding, a near) duplicate
of a picked one, or ties with it exactly. vtprune returns distinct tokens (the engine
checks), so picked tokens are excluded here: in that case this picks the unpicked token
farthest from the picked set (lowest index on ties) where the authors repeat one. On
inputs without such ties the picks are the authors'.

Two smaller differences, for numerical robustness: distances are computed in float32 at
least (the authors compute them in the model's dtype, fp16 in their runs), which is not
only a matter of near-ties: on clustered features, where many distances are close, fp16's
rounding changes most picks (in an audit on random clustered features, 3 of 16 and 17 of 64
kept tokens in common), and in bfloat16 a token's distance to itself reaches ~8e-3, so the
authors' loop repeats picks (20-23 distinct of 64); and a zero feature vector is taken as a zero unit vector
(distance 1 to every token) where the authors' division by its norm gives NaN.
The authors select over the first image of a sample at a hard-coded offset; here every
visual item (an image, or a whole video) is selected on its own, over all its tokens. On
LLaVA-NeXT their pool (and the count it is a ratio of) includes the image-newline tokens;
here newlines are not an item's tokens: never candidates, never dropped, never counted.
"""

from __future__ import annotations

import torch

from .base import LLM_INPUT, ImageView, Method, ModelInfo, Stage
from .primitives import DISTANCE_MATRIX_ENTRIES, distance_matrix_chunks, greedy_max_min, same_shape

_BLOCK = DISTANCE_MATRIX_ENTRIES  # distance-matrix entries computed at once (64 MB in float32)


def nearest_neighbour_distance(unit: torch.Tensor) -> torch.Tensor:
    """[G, N] per item and token, the second-smallest entry of its column of 1 - unit @ unit.T (the smallest is
    its own distance), for unit [G, N, D]; in column blocks so that large items (videos) never hold the whole
    N x N matrix."""
    groups, n = unit.shape[:2]
    step = max(1, _BLOCK // (n * groups))
    return torch.cat([
        (1 - unit @ unit[:, start : start + step].transpose(1, 2)).topk(2, dim=1, largest=False).values[:, 1]
        for start in range(0, n, step)
    ], dim=1)


def max_min_diversity(features: torch.Tensor, k: int) -> torch.Tensor:
    """DivPrune's greedy max-min selection on cosine distance: k distinct indices into features [N, D], in pick
    order (see the module docstring for the first pick, ties, and the one deviation). Features [G, N, D] are G
    items selected independently, in one loop: [G, k]."""
    single = features.dim() == 2
    unit = torch.nn.functional.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
    unit = unit[None] if single else unit
    groups, n = unit.shape[:2]
    k = max(0, min(k, n))
    # Items whose distance matrix fits in _BLOCK entries hold it whole (a pick's distances are then one of its
    # rows), as many at a time as fit; larger ones (videos) compute each pick's distances when it is made.
    whole, chunks = distance_matrix_chunks(groups, n, _BLOCK, unit.device)
    picks = torch.cat([_greedy(unit[chunk], k, whole) for chunk in chunks])
    return picks[0] if single else picks


def _greedy(unit: torch.Tensor, k: int, whole: bool) -> torch.Tensor:
    """[G, k] picks for unit [G, N, D]; `whole`: the items' distance matrices are computed once and held."""
    groups, n = unit.shape[:2]
    if n < 2 or k == 0:
        return torch.zeros(groups, k, dtype=torch.long, device=unit.device)
    matrix = 1 - unit @ unit.transpose(1, 2) if whole else None
    # The first pick: the token farthest from its nearest neighbour; after it, each token's distance to its
    # nearest picked token (the authors' loop; masking the picked ones is the deviation).
    score = matrix.topk(2, dim=1, largest=False).values[:, 1] if whole else nearest_neighbour_distance(unit)
    taken = torch.zeros(groups, n, dtype=torch.bool, device=unit.device)
    return greedy_max_min(unit, score, taken, k, matrix=matrix, fresh=True)


class DivPrune(Method):
    name = "divprune"
    summary = "greedy max-min cosine diversity of the projected visual tokens (authors' first pick and order)"
    where = "LLM input"

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        return [Stage(LLM_INPUT, budget)]

    def select(self, view: ImageView) -> torch.Tensor:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[ImageView]) -> list[torch.Tensor]:
        picks = [None] * len(views)
        for group in same_shape([(view.hidden.shape, view.keep) for view in views]):
            stacked = torch.stack([views[i].hidden for i in group])
            for i, row in zip(group, max_min_diversity(stacked, views[group[0]].keep).sort(dim=1).values):
                picks[i] = row
        return picks
