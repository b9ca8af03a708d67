"""SparseVLM (ICML'25): text raters score the visual tokens at three sparse layers; part of the dropped tokens
is recycled into cluster tokens.

Read from the authors' released code at the repository's `v1.5` tag (Gumpest/SparseVLMs, commit b9619e6;
the ICML'25 method; `main` is SparseVLM+ v2.0, a different method, and the first release `91fb6d9` and the
`video` branch keep rank(relation) tokens instead of a schedule):
`llava/model/language_model/modelling_sparse_llama.py` (`LlamaDynamicvitModel.forward`, the sparse-layer
branch of `LlamaDynamicvitDecoderLayer.forward` and `LlamaDynamicvitFlashAttention2.forward` with
`return_logits=True`), `score.py` (`attn_postprocess_topk`, the schedule) and `utils.py` (`cluster_and_merge`).

1. Raters, chosen once per prompt from the LLM's input embeddings (decoder layer 0's input): with V the
   image's visual embeddings [N0, D] and T the embeddings of the text tokens that follow the image [T, D],
   relevance = softmax over the text tokens of V T^T (raw dot products, no scaling), averaged over the visual
   tokens -> [T]; the raters are the text tokens whose relevance is above its mean over the text tokens.
2. At each sparse layer l (2, 6, 15 of 32) the layer runs on every token it has; its own attention
   (softmax(q k^T / sqrt(d)) with the causal mask, RoPE applied) from the raters' rows to the image's current
   tokens, averaged over heads and raters, is the score. The top `count` tokens by score are kept
   (count = the schedule's, at most the current tokens - 1).
3. Recycling: of the d dropped tokens, the int(0.3 d) + 1 with the highest scores are clustered into
   int(m / 10) + 1 clusters (m the recycled count) by density-peak clustering (DPC-kNN) on the layer's OUTPUT
   hidden states: distances ||x_i - x_j|| / sqrt(D); density exp(-mean of the squared distances to the
   cluster_num nearest, self included); parent distance = distance to the nearest denser token (the largest
   distance of all when none is denser); centres = the cluster_num tokens with the largest parent distance x
   density; every token joins its nearest centre (first on ties), each centre its own cluster. Each cluster
   becomes one token: the plain mean of its members. The other ~70% of the dropped tokens are discarded.
   The image then has count + clusters tokens, all of which the next sparse layer scores again.
4. Schedule (`score.py`, `retained_tokens` in 192/128/64): counts 300/200/110, 303/110/36, 66/30/17.

As vtprune runs it:
- Stages. The authors' sparse layer l runs on all its tokens (its KV cache holds them all), scores with its own
  attention and prunes its OUTPUT; so in vtprune the stages are before decoder layers l + 1 = 3/7/16 of 32
  (`scale_layers` to other depths), scored with the probe of the layer before each stage
  (probe_layer = "previous"), and the KV caches of the layers before a stage are not sliced
  (slices_kv_cache = False: every layer caches what it ran on, as theirs).
- Budget. The authors' `retained_tokens` (192/128/64) is their own average of visual tokens over the 32 layers
  (their comment "2*576 4*300 10*200 16*110"; they count a sparse layer with its pruned count), not a final
  count. vtprune's budget is read as that nominal label: at 576 tokens budget 192/128/64 runs their counts
  exactly, and each stage keeps count + clusters tokens: 309/204/113, 312/117/39, 82/32/18. The final kept
  count (113/39/18) is NOT the budget; the equivalent budget (visual tokens averaged over all 32 decoder
  layers as vtprune's stats count them: 3 x 576, 4 x K1, 9 x K2, 16 x K3) is 206.5 / 145.4 / 82.25
  (the authors' own count, one layer earlier each stage: 192.0 / 128.6 / 64.8).
- Other budgets and item sizes (our rule; the authors' README says to edit score.py): with r = budget / N,
  each stage's count is N x g(r), g piecewise linear in r through the authors' three points
  (r = 64/576, 128/576, 192/576 -> count / 576) and proportional to r outside them (through 0 below 64/576,
  from the 192 point above 192/576), rounded to the nearest, at least 1, at most the tokens present - 1
  (as the authors' topk). So at the authors' three retain ratios any N gets their schedule scaled by N / 576.
- A Stage's keep is count + clusters (the tokens the image has after it). `select` recovers the split from
  (N, keep): the largest count with count + clusters(N - count) == keep (the function is non-decreasing in
  count with steps of 0 or 1, so one exists whenever keep >= 1 + clusters(N - 1)). At the authors' points the
  split is theirs (tested); elsewhere, where two counts give the same total, the larger one runs (one more
  top-k token and one cluster fewer than N x g(r) may say; a hand-set `counts` is honoured the same way). A smaller keep (only a hand-set schedule or a direct call gives one) is plain
  top-keep selection without recycling.
- Raters need the LLM-input embeddings of the item's ORIGINAL tokens and of the text tokens: the view's
  `item_reference` ([N0, D], every token of the item at decoder layer 0's input, in item order) and
  `text_reference` ([T, D], the rows `probe.text` names, at decoder layer 0's input, in that order). The raters
  are recomputed from them at every stage (identical each time, so "chosen once" holds without state).

Deviations, on purpose:
- Positions: the authors pack the kept visual tokens, then the cluster tokens, then the text, and re-number
  every position contiguously (`position_ids[:, :new_len]`), so their later layers (and later sparse layers'
  attention) see compacted positions. vtprune keeps every token's original position; a cluster token has none
  of its own in the authors' code, so it takes the position of its DPC centre (a member of the cluster, chosen
  deterministically), and its merged value replaces that token's hidden state (Selection: keep = the kept
  tokens + the centres; destination = the cluster's slot for recycled members, -1 for the discarded ones).
- Which text rates: the authors' one image is followed by the question and "ASSISTANT:"; they take every token
  after the image (never the system prompt before it). Here: the prompt's text tokens after the item's last
  token (per item, so each image of a multi-image prompt chooses its own raters); if no text follows the item,
  all the prompt's text tokens; if the relevance is flat (no token above its mean, e.g. one candidate), all
  candidates rate; with no text at all, the prompt's last token. The authors' code is batch-1 (`mask[0]`), its
  spans read from the first sample (the pre-prompt length and the image's feature count); here everything comes
  from the probe's rows per sample.
- Noise: the authors add unseeded uniform noise x 1e-6 to the densities to break ties; in their fp16 it is
  lost to rounding for any density above 2^-8 (half of fp16's spacing there exceeds 1e-6), so ties mostly stay
  ties there. None is added here: a token is denser only when strictly denser. Ties are real: mutual nearest
  neighbours have exactly equal densities when clusters = 2 (the density uses self + 1 neighbour), so such a
  pair can both become centres, as in the authors' fp16 runs; every density is 1 when clusters = 1, and the
  centre is then the recycled token with the highest score (the authors': the noise's pick). Ties in
  the top-k, in the recycled top-30% and among centres go to the lower index (stable sorts; the recycled tokens
  are ordered by decreasing score, as the authors' topk orders them).
- Merge: the authors' weights are all 1 and their 1e-6 in the denominator vanishes in fp16: the plain mean.
  A cluster token's size is the sum of its members' sizes (bookkeeping only).
- Precision: everything in float32 (the authors: fp16 embeddings, attention, distances); pairwise distances
  from a float64 Gram matrix, rounded to float32 (the authors subtract every pair, an M x M x D tensor: the
  same distances up to rounding, at several times the cost).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import ImageView, LayerProbe, Method, ModelInfo, Selection, Stage, scale_layers
from .primitives import gather_rows, in_token_order, on_device, same_shape

# The authors' sparse layers (2, 6, 15 of 32) prune their own output: vtprune's stages are one layer later.
STAGE_LAYERS = ((3, 7, 16), 32)
# score.py: top-k counts per sparse layer for `retained_tokens`, on LLaVA-1.5's 576 visual tokens.
AUTHORS_COUNTS = {64: (66, 30, 17), 128: (303, 110, 36), 192: (300, 200, 110)}
AUTHORS_TOKENS = 576


def recycled_count(dropped: int, ratio: float) -> int:
    """How many of the dropped tokens are clustered back (the authors' int(d x 0.3) + 1)."""
    return int(dropped * ratio) + 1


def cluster_count(recycled: int, divisor: int) -> int:
    """How many clusters the recycled tokens form (the authors' int(m / 10) + 1)."""
    return int(recycled / divisor) + 1


def tokens_after(n: int, count: int, ratio: float, divisor: int) -> int:
    """The tokens an item of n has after a stage keeping the top `count` (count < n) and recycling the rest."""
    return count + cluster_count(recycled_count(n - count, ratio), divisor)


def split_keep(n: int, keep: int, ratio: float, divisor: int) -> tuple[int, int]:
    """(top-k count, clusters) whose sum is keep for an item of n tokens; (keep, 0) when keep is too small to
    recycle (keep < 1 + clusters(n - 1)) and (n, 0) when keep >= n."""
    if keep >= n:
        return n, 0
    for count in range(keep, 0, -1):  # the largest count: tokens_after is non-decreasing in count
        total = tokens_after(n, count, ratio, divisor)
        if total == keep:
            return count, keep - count
        if total < keep:
            break
    return keep, 0


def schedule_fractions(ratio: float) -> tuple[float, ...]:
    """Each stage's top-k count as a fraction of the item's tokens, at a retain ratio budget / N: piecewise
    linear through the authors' three points, proportional beyond them."""
    knots = sorted(AUTHORS_COUNTS)
    points = [(b / AUTHORS_TOKENS, [c / AUTHORS_TOKENS for c in AUTHORS_COUNTS[b]]) for b in knots]
    (r_low, low), (r_high, high) = points[0], points[-1]
    if ratio <= r_low:
        return tuple(v * ratio / r_low for v in low)
    if ratio >= r_high:
        return tuple(v * ratio / r_high for v in high)
    for (r0, v0), (r1, v1) in zip(points, points[1:]):
        if r0 <= ratio <= r1:
            t = (ratio - r0) / (r1 - r0)
            return tuple(a + t * (b - a) for a, b in zip(v0, v1))
    raise AssertionError("unreachable")


def default_counts(budget: int, num_tokens: int) -> tuple[int, ...]:
    """The top-k count of each stage for one item of num_tokens at a nominal budget (before clamping)."""
    return tuple(max(1, math.floor(num_tokens * f + 0.5)) for f in schedule_fractions(budget / num_tokens))


def choose_raters(visual: torch.Tensor, text: torch.Tensor, candidate: torch.Tensor | None = None) -> torch.Tensor:
    """[..., T] bool: the text tokens whose relevance (softmax over the candidate text of visual . text, averaged over
    the visual tokens; LLM-input embeddings visual [..., N0, D] and text [..., T, D]) is above its mean over the
    candidates; all candidates when none is. candidate [..., T]: which text tokens may rate (None: all)."""
    logits = visual.float() @ text.float().transpose(-1, -2)
    if candidate is None:
        candidate = torch.ones(logits.shape[:-2] + logits.shape[-1:], dtype=torch.bool, device=logits.device)
    relevance = logits.masked_fill(~candidate[..., None, :], -torch.inf).softmax(dim=-1).mean(dim=-2)
    mean = (relevance * candidate).sum(dim=-1, keepdim=True) / candidate.sum(dim=-1, keepdim=True)
    raters = (relevance > mean) & candidate
    return torch.where(raters.any(dim=-1, keepdim=True), raters, candidate)


def rater_candidates(view: ImageView) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probe rows that may rate, their LLM-input embeddings): the prompt's text rows (rater_scores marks those
    after the item, or all if none follows, as candidates); with no text at all, the last row alone (embeddings
    None: it rates)."""
    probe = view.probe
    if probe is None:
        raise ValueError("sparsevlm scores with a LayerProbe of the layer before each stage")
    item_reference = getattr(view, "item_reference", None)
    text_reference = getattr(view, "text_reference", None)
    if item_reference is None or text_reference is None:
        raise ValueError("sparsevlm needs the view's item_reference and text_reference (LLM-input embeddings of the "
                         "item's original tokens and of the prompt's text tokens)")
    text = probe.text.to(probe.visual.device)
    if text.numel() == 0:
        return on_device(torch.tensor([probe.last]), text.device), None
    return text, text_reference


def rater_scores(views: list[ImageView], candidates: list[tuple]) -> torch.Tensor:
    """[B, N] for B views of one shape (their probes, candidates and references stack): the probed layer's causal
    attention from each view's raters to its tokens, averaged over heads and raters."""
    rows = torch.stack([row for row, _ in candidates])  # [B, R]
    device = rows.device
    visual = torch.stack([view.probe.visual for view in views]).to(device)
    if candidates[0][1] is None:
        raters = torch.ones(rows.shape, dtype=torch.bool, device=device)
        query = torch.stack([view.probe.last_query()[:, None] for view in views]).float()  # [B, H, 1, d]
    else:
        after = rows > visual.amax(dim=1, keepdim=True)  # the text after the item; all of it if none follows
        reference = torch.stack([view.item_reference for view in views])
        raters = choose_raters(reference, torch.stack([embeds for _, embeds in candidates]),
                               (after | ~after.any(dim=1, keepdim=True)).to(reference.device)).to(device)
        query = LayerProbe.stacked_text_queries([view.probe for view in views]).float()  # [B, H, R, d]
    key = torch.stack([view.probe.key for view in views]).float()  # [B, H, L, d]
    logits = torch.einsum("bhrd,bhld->bhrl", query, key) * views[0].probe.scaling
    future = torch.arange(key.shape[2], device=device) > rows[..., None]  # [B, R, L]
    # Averaged in float64, then rounded: equal attention stays exactly equal whatever order a column is summed in
    # (ties go to the lower index).
    attention = logits.masked_fill(future[:, None], float("-inf")).softmax(dim=-1).double().mean(dim=1)  # [B, R, L]
    weights = raters.double() / raters.sum(dim=-1, keepdim=True)  # non-candidates and non-raters weigh 0
    return torch.einsum("br,brl->bl", weights, attention).float().gather(1, visual)


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """[..., M, M] Euclidean distances between the rows of x [..., M, D], as the authors' (x_i - x_j).norm() but
    from a float64 Gram matrix of the centred rows: its error is ~1e-16 of the rows' squared spread, below float32
    rounding except between rows all but identical (a float32 subtraction of every pair is exact there, further
    off elsewhere, and costs an M x M x D tensor); exactly symmetric with a zero diagonal, so the densities of
    mutual nearest neighbours tie exactly, as in exact arithmetic."""
    x = x.double()
    x = x - x.mean(dim=-2, keepdim=True)  # distances do not move; the Gram matrix's cancellation shrinks
    squares = (x * x).sum(dim=-1)
    distance = squares[..., :, None] + squares[..., None, :] - 2 * x @ x.transpose(-1, -2)
    distance.diagonal(dim1=-2, dim2=-1).zero_()
    distance = distance.clamp_(min=0).sqrt_()
    return torch.minimum(distance, distance.transpose(-1, -2)).float()


def density_peak_clusters(x: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN as the authors' cluster_and_merge (without its tie-breaking noise), on x [..., M, D]: (centres
    [..., c] indices into x, in decreasing centre score; assignment [..., M] of each token to a centre's rank)."""
    distance = pairwise_distance(x) / x.shape[-1] ** 0.5
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest ** 2).mean(dim=-1)).exp()
    denser = density[..., None, :] > density[..., :, None]  # [..., i, j]: j is denser than i
    farthest = distance.flatten(-2).amax(dim=-1)[..., None, None]  # per item, as the authors' dist_max
    parent = torch.where(denser, distance, farthest).amin(dim=-1)
    centres = torch.sort(parent * density, descending=True, stable=True).indices[..., :clusters]
    members = distance.shape[-1]
    assignment = distance.gather(-2, centres[..., None].expand(*centres.shape, members)).argmin(dim=-2)
    assignment.scatter_(-1, centres, torch.arange(clusters, device=x.device).expand_as(centres))
    return centres, assignment


def recycle(hidden: torch.Tensor, sizes: torch.Tensor, scores: torch.Tensor, count: int, clusters: int,
            ratio: float) -> tuple[torch.Tensor, ...]:
    """One stage for B items of n tokens at once (hidden [B, n, D], sizes and scores [B, n]): keep the top
    `count` by score and merge the recycled share of the rest into `clusters` tokens at their DPC centres.
    Returns (keep, hidden, sizes) [B, count + clusters(, D)] in ascending token order and destination [B, n]."""
    batch, n, _ = hidden.shape
    device = hidden.device
    order = torch.sort(scores, descending=True, stable=True).indices  # ties: the lower index first
    kept = order[:, :count]
    recycled = order[:, count:count + recycled_count(n - count, ratio)]  # decreasing score
    members = gather_rows(hidden, recycled)
    centres, assignment = density_peak_clusters(members, clusters)
    membership = torch.nn.functional.one_hot(assignment, clusters).transpose(1, 2).float()  # [B, clusters, m]
    merged = membership @ members.float() / membership.sum(dim=-1, keepdim=True)
    keep = torch.cat([kept, recycled.gather(1, centres)], dim=1)
    values = torch.cat([gather_rows(hidden, kept), merged.to(hidden.dtype)], dim=1)
    weights = (membership @ sizes.gather(1, recycled)[..., None].float())[..., 0]
    sizes = torch.cat([sizes.gather(1, kept), weights.to(sizes.dtype)], dim=1)
    destination = torch.full((batch, n), -1, dtype=torch.long, device=device)
    destination.scatter_(1, kept, torch.arange(count, device=device).expand(batch, -1))
    destination.scatter_(1, recycled, count + assignment)
    return in_token_order(keep, values, sizes, destination)


class SparseVLM(Method):
    name = "sparsevlm"
    summary = "text raters' attention at 3 layers, authors' schedule; top 30% of the dropped recycled as clusters"
    where = "inside the LLM, after layers 2/6/15 of 32 (stages before 3/7/16)"
    needs_reference = True  # the LLM-input embeddings the raters are chosen from
    probe_layer = "previous"
    probe_from_cache = True  # attention only

    @dataclass(frozen=True)
    class Options:
        layers: tuple[int, ...] | None = None  # stage layers; default 3/7/16 of 32 (after sparse layers 2/6/15)
        counts: tuple[int, ...] | None = None  # top-k count per stage before recycling; default: the authors'
        recycle: bool = True  # cluster part of the dropped tokens back in (False: plain top-k)
        recycle_ratio: float = 0.3  # share of the dropped tokens recycled (int(d x ratio) + 1)
        cluster_divisor: int = 10  # clusters = int(recycled / divisor) + 1

    @classmethod
    def fixed_counts(cls, options: "SparseVLM.Options", kind: str) -> str | None:
        return None if options.counts is None else "counts"

    @classmethod
    def validate(cls, options: "SparseVLM.Options") -> None:
        if options.layers is not None and options.counts is not None and len(options.layers) != len(options.counts):
            raise ValueError(f"sparsevlm needs one count per stage layer; got layers={options.layers} "
                             f"counts={options.counts}")
        if options.counts is not None and any(c < 1 for c in options.counts):
            raise ValueError(f"sparsevlm counts must be >= 1; got {options.counts}")
        if options.counts is not None and list(options.counts) != sorted(options.counts, reverse=True):
            # a stage ranks the tokens the one before left (its count plus clusters) and keeps at most all but one:
            # a larger count later would be cut to that, silently (the authors' schedules all shrink)
            raise ValueError(f"sparsevlm counts must not grow from stage to stage (each stage keeps the top count of "
                             f"the tokens the stage before left); got {options.counts}")
        if not 0 <= options.recycle_ratio < 1 or options.cluster_divisor < 2:
            # (fewer recycled tokens than dropped ones, fewer clusters than recycled tokens)
            raise ValueError("sparsevlm needs 0 <= recycle_ratio < 1 and cluster_divisor >= 2")

    def stage_layers(self, model: ModelInfo) -> tuple[int, ...]:
        return self.options.layers or scale_layers(*STAGE_LAYERS, model.num_layers)

    def stages(self, model: ModelInfo, budget: int, num_tokens: int) -> list[Stage]:
        layers = self.stage_layers(model)
        counts = self.options.counts or default_counts(budget, num_tokens)
        if len(counts) != len(layers):
            raise ValueError(f"sparsevlm needs one count per stage layer; got layers={layers} counts={counts}")
        stages, n = [], num_tokens
        for layer, count in zip(layers, counts):
            if n > 1:
                count = min(count, n - 1)  # the authors' topk keeps at most all but one
                n = tokens_after(n, count, self.options.recycle_ratio, self.options.cluster_divisor) \
                    if self.options.recycle else count
            stages.append(Stage(layer, n))
        return stages

    def score(self, view: ImageView) -> torch.Tensor:
        """[N] the raters' attention to the view's tokens at the probed layer."""
        return rater_scores([view], [rater_candidates(view)])[0]

    def select(self, view: ImageView) -> torch.Tensor | Selection:
        return self.select_batch([view])[0]

    def select_batch(self, views: list[ImageView]) -> list[torch.Tensor | Selection]:
        """Views of one shape (a LLaVA batch's images under prompts of one length) are scored, chosen and merged
        together, each with its own raters."""
        options, picks, candidates = self.options, [None] * len(views), {}
        for v, view in enumerate(views):
            if view.keep >= view.hidden.shape[0]:
                picks[v] = torch.arange(view.hidden.shape[0], device=view.hidden.device)
            else:
                candidates[v] = rater_candidates(view)
        pruned, shapes = list(candidates), []
        for v in pruned:
            view, (rows, embeds) = views[v], candidates[v]
            shapes.append((view.hidden.shape, view.hidden.dtype, view.hidden.device, view.sizes.dtype, view.keep,
                           view.probe.key.shape, view.item_reference.shape, rows.numel(), embeds is None))
        for grouped in same_shape(shapes):
            group = [pruned[g] for g in grouped]
            first = views[group[0]]
            n, keep, device = first.hidden.shape[0], first.keep, first.hidden.device
            scores = rater_scores([views[v] for v in group], [candidates[v] for v in group]).to(device)
            count, clusters = split_keep(n, keep, options.recycle_ratio, options.cluster_divisor) \
                if options.recycle else (keep, 0)
            if clusters == 0:
                top = torch.sort(scores, descending=True, stable=True).indices[:, :keep].sort(dim=1).values
                for v, row in zip(group, top):
                    picks[v] = row
                continue
            hidden = torch.stack([views[v].hidden for v in group])
            sizes = torch.stack([views[v].sizes for v in group])
            for v, *stage in zip(group, *recycle(hidden, sizes, scores, count, clusters, options.recycle_ratio)):
                picks[v] = Selection(*stage)
        return picks
