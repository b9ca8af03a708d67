"""FiCoCo-V (Filter, Correlate, Compress; AAAI'26): token reduction inside the vision encoder's blocks.

Read from kawhiiiileo/FiCoCo (llava/model/multimodal_encoder/FiCoCo_V.py and clip_encoder.py).
At each block from the second half of the tower (the authors' layers 12-23 of 24) up to the
one whose output the projector reads, between the block's attention and its MLP:
- Filter: A = the block's attention logits (scaled q.k, before softmax) averaged over heads;
  each patch's redundancy score s = beta * L2n(A[CLS, patches]) - (1 - beta) * L2n(row mean of
  A over the patch keys), L2-normalised over the tokens, beta = 0.35. Local penalty: in each
  2x2 window of the patch grid, the live token of lowest score has it pushed further down
  (halved if positive, doubled if not). The r tokens of lowest score are dropped; [CLS] never.
- Correlate: P = softmax(A) over the keys; each dropped token's targets are its k most-attended
  kept tokens, k = the largest count, over the dropped tokens, of logits above their row's
  0.998 quantile (2 on rows longer than 501 tokens, 1 on shorter ones: at r = 42, 2 in the first
  two reducing blocks, then 1); weights are P normalised over the k (computed as the softmax of
  the k logits: the same weights, as P's normaliser over the whole row cancels; the k are the
  largest logits towards kept tokens, the largest P as P is monotone in the logit).
- Compress: each kept token u becomes (x_u + sum w x_i) / (1 + sum w) over the dropped tokens i
  that chose it. No sizes are carried, no proportional attention (as released).
- r per block: the authors remove a constant 42 per block (114 patches left); here the
  removal is fitted to the budget and spread evenly over the blocks.

The released code runs only at batch 1 and is off by default (merge_visual = False); where it
is broken, vtprune follows what it evidently means (deviations, also in the README):
- survivors stay in their original order with [CLS] first (the release sorts them by score
  and then treats whichever token comes first as [CLS], so the real [CLS] can be merged away
  and LLaVA's [:, 1:] drops an arbitrary patch);
- targets are kept tokens (the release picks any token, the dropped one itself included, and
  then indexes the reordered survivors with pre-reduction indices);
- the local penalty uses each live token's own 2x2 window at every block (the release keeps a
  576-entry score buffer that is never reset, across blocks and images: only on a process's first
  image does its first reducing block penalise the true window minima; after that the penalised
  set depends on stale scores, so the authors' reported runs had it mis-targeted on almost every
  image; this follows the paper's description);
- on a grid of odd side the last, 1-wide windows count too (the release assumes 24 x 24 and
  its window search covers whole 2x2 windows only, so it never penalises that edge);
- scores and k per image, quantiles in float32 (the release averages logits over the batch too and
  calls torch.quantile on fp16, which raises); only the logits the merge reads are computed
  ([CLS]'s row, the dropped tokens' rows, each patch's mean logit as its query . the mean patch
  key): the release's values up to float rounding.
- positions: each survivor keeps the position of its own column (the release hands the LLM its
  survivors packed), as the engine does for every method.
Towers that cut an image into several rows (LLaVA-NeXT's tiles, video frames) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import BlockInput, BlockMerge, BlockMergingMethod, ModelInfo, feature_layer
from .primitives import gather_rows


class HeadMeanLogits:
    """The attention logits averaged over heads, from query, key [R, H, n, d], row by row as they are read:
    sum_h q_h . k_h / H is one product over the heads' concatenated dimensions (equal to the per-head logits' mean
    up to float rounding), and the merge reads only [CLS]'s row, each patch row's mean over the patch keys and the
    dropped tokens' rows, so the [R, n, n] matrix is never formed (forming it and gathering its rows took a fifth to a
    third of FiCoCo-V's merge at batch 8 on 2 CPU cores)."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, scaling: float):
        rows, heads, n, _ = query.shape
        self.query = query.transpose(1, 2).reshape(rows, n, -1) * (scaling / heads)  # before the sum: float16's headroom
        self.key = key.transpose(1, 2).reshape(rows, n, -1)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """[R, m, n] the logits of the tokens index [R, m]."""
        return gather_rows(self.query, index) @ self.key.transpose(1, 2)

    def redundancy(self, beta: float) -> torch.Tensor:
        """[R, n - 1] Filter's score of each patch (lower: more redundant), [CLS] first: beta L2n([CLS]'s logits over
        the patches) - (1 - beta) L2n(each patch's mean logit over the patches), that mean as q . mean(k) (linear)."""
        cls = self.query[:, :1] @ self.key[:, 1:].transpose(1, 2)
        similar = self.query[:, 1:] @ self.key[:, 1:].mean(dim=1)[..., None]
        return beta * F.normalize(cls[:, 0], dim=-1) - (1 - beta) * F.normalize(similar[..., 0], dim=-1)


def penalise_window_minima(score: torch.Tensor, columns: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """score [R, m] with the lowest of each 2x2 window's live patches pushed down (halved if > 0, else doubled);
    columns [R, m] are the patches' tower columns (1 + raster index)."""
    cells = columns - 1
    window = (cells // grid[1] // 2) * ((grid[1] + 1) // 2) + (cells % grid[1]) // 2
    windows = ((grid[0] + 1) // 2) * ((grid[1] + 1) // 2)
    lowest = torch.full((score.shape[0], windows), torch.inf, dtype=score.dtype, device=score.device)
    lowest.scatter_reduce_(1, window, score, reduce="amin")
    # the first patch holding its window's minimum (ties: the lower column)
    is_min = score == lowest.gather(1, window)
    first = torch.full_like(lowest, score.shape[1], dtype=torch.long)
    index = torch.arange(score.shape[1], device=score.device).expand_as(score)
    first.scatter_reduce_(1, window, torch.where(is_min, index, score.shape[1]), reduce="amin")
    penalised = index == first.gather(1, window)
    return torch.where(penalised, torch.where(score > 0, score / 2, score * 2), score)


CORRELATION_QUANTILE = 0.998


def correlation_width(dropped_logits: torch.Tensor) -> torch.Tensor:
    """[R] k: the most logits of a dropped token's row [R, r, n] above that row's 0.998 quantile."""
    top, quantile = largest_and_quantile(dropped_logits, CORRELATION_QUANTILE)
    return (top > quantile).sum(-1).amax(-1)  # the rest of a row lies at or below top[-1] <= quantile


def correlation_bound(n: int, dtype: torch.dtype) -> int:
    """The most k can be on rows of n logits, known on the host: the values above a row's quantile are among its
    n - floor(rank) largest but for the last of them, which the quantile is at or above."""
    return max(1, n - quantile_rank(n, CORRELATION_QUANTILE, dtype)[1] - 1)


def quantile_rank(n: int, q: float, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """(q (n - 1) as torch.quantile computes it, in the rows' dtype; its floor), on the host."""
    rank = torch.tensor(q, dtype=dtype) * (n - 1)
    return rank, int(rank)


def upper_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(rows, q, dim=-1, keepdim=True) on rows without NaN, bit for bit (tested)."""
    return largest_and_quantile(rows, q)[1]


def largest_and_quantile(rows: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(each row's largest values down to its sorted [floor(q (n - 1))], descending; its q quantile, keepdim), the
    quantile from those few values instead of a sort of the whole row: a high quantile needs only them (~35 ms of
    FiCoCo-V's merges a batch of 8 on 2 CPU cores went to sorting)."""
    n = rows.shape[-1]
    rank, below = quantile_rank(n, q, rows.dtype)
    top = torch.topk(rows, n - below, dim=-1).values  # descending: the last is the sorted row's [below]
    return top, torch.lerp(top[..., -1:], top[..., max(n - below - 2, 0):][..., :1], rank - below)


class FiCoCoV(BlockMergingMethod):
    name = "ficoco_v"
    summary = "filter (CLS vs patch-similarity logits, 2x2 local penalty), correlate, compress inside the vision encoder"
    where = "vision encoder blocks (second half, between attention and MLP); tokens dropped at the LLM input"

    @dataclass(frozen=True)
    class Options:
        beta: float = 0.35
        first_layer: int | None = None  # the first encoder layer that reduces; None: the authors' 12 of 24, scaled

    @classmethod
    def validate(cls, options) -> None:
        if not 0.0 <= options.beta <= 1.0:
            raise ValueError(f"ficoco_v's beta weighs [CLS] attention against patch similarity: in [0, 1]; got {options.beta}")

    def merge_schedule(self, model: ModelInfo, layers: int, patches: int, keep: int) -> dict[int, int]:
        last = layers + feature_layer(model)  # the block whose output the projector reads
        first = round(12 * layers / 24) if self.options.first_layer is None else self.options.first_layer
        if not 0 <= first <= last:
            raise ValueError(f"ficoco_v's first_layer must lie in 0..{last} (the layer the projector reads); got {first}")
        blocks = list(range(first, last + 1))
        remove = patches - keep
        return {layer: remove // len(blocks) + (i < remove % len(blocks)) for i, layer in enumerate(blocks)}

    def merge(self, block: BlockInput, r: int) -> BlockMerge:
        rows, n, _ = block.hidden.shape
        logits = HeadMeanLogits(block.query, block.key, block.scaling)
        score = penalise_window_minima(logits.redundancy(self.options.beta), block.columns[:, 1:], block.grid)
        ranked = score.argsort(dim=-1, stable=True) + 1  # patches, most redundant first
        dropped, kept = ranked[:, :r], torch.cat([torch.zeros_like(ranked[:, :1]), ranked[:, r:]], dim=1).sort(-1).values
        # Correlate: each dropped token's most-attended kept tokens
        dropped_logits = logits.rows(dropped).float()  # [R, r, n]; quantiles and softmax in float32
        towards_kept = dropped_logits.gather(2, kept[:, None].expand(-1, r, -1))  # [R, r, n - r]
        # k is read from the data, but not to the host (a GPU would wait at every merging block): the top `bound` are
        # taken, and those beyond k weigh nothing
        bound = min(correlation_bound(n, dropped_logits.dtype), kept.shape[1])
        k = correlation_width(dropped_logits).clamp(min=1, max=kept.shape[1])  # [R]: each image its own
        top, target = towards_kept.topk(bound, dim=-1)
        top = top.masked_fill(torch.arange(bound, device=top.device) >= k[:, None, None], -torch.inf)
        weight = top.softmax(dim=-1).to(block.hidden.dtype)  # P over the k, normalised: the row's sum cancels
        # Compress: (x_u + sum w x_i) / (1 + sum w)
        x = block.hidden
        width = x.shape[2]
        total = gather_rows(x, kept)  # a new tensor: the scatter below may write into it
        mass = torch.ones(rows, kept.shape[1], dtype=x.dtype, device=x.device)
        sources = gather_rows(x, dropped)  # [R, r, D]
        total.scatter_add_(1, target.flatten(1)[..., None].expand(-1, -1, width),
                           (weight[..., None] * sources[:, :, None]).flatten(1, 2))
        mass.scatter_add_(1, target.flatten(1), weight.flatten(1))
        into = torch.empty(rows, n, dtype=torch.long, device=x.device)
        into.scatter_(1, kept, torch.arange(kept.shape[1], device=x.device).expand(rows, -1))
        into.scatter_(1, dropped, target[..., 0])
        size = torch.zeros(rows, kept.shape[1], dtype=block.size.dtype, device=x.device).scatter_add_(1, into, block.size)
        return BlockMerge(kept, into, total / mass[..., None], size)
